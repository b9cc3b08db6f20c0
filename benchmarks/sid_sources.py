"""How well SID prefixes follow behaviour, per embedding source (text / behaviour / fused), without
training a recommender: a cheap proxy, not ranking quality.

    python benchmarks/sid_sources.py --name scientific --dataset_dir D --sid_dirs text=S1 behaviour=S2 fused=S3

For every validation example (last history item h -> target t, both fit-time data: test targets are
not read) it reports the share of pairs whose SIDs share the first level (and the first two), and
the same share expected for a random target (sum over prefixes of (count / N)^2); lift = observed /
chance. A generative recommender decodes the prefix first, so prefixes that group items bought one
after another give it an easier first step. Writes ``docs/results/sid_sources_<name>.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from data_prep.dataset import RecDataset  # noqa: E402
from data_prep.io import atomic_write_json, atomic_write_text, read_json  # noqa: E402
from sid_tokenizer.catalog import load_sid_dir  # noqa: E402


def prefix_agreement(codes: np.ndarray, pairs: list[tuple[int, int]], depth: int) -> dict:
    """Share of (h, t) pairs with equal first ``depth`` codes, and the chance level of that share."""
    keys = [tuple(r) for r in codes[:, :depth].tolist()]
    observed = float(np.mean([keys[h] == keys[t] for h, t in pairs]))
    sizes = np.array(list(Counter(keys).values()), dtype=np.float64)
    chance = float(((sizes / sizes.sum()) ** 2).sum())
    return {"observed": observed, "chance": chance, "lift": observed / chance if chance else float("nan")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--name", required=True)
    p.add_argument("--dataset_dir", required=True)
    p.add_argument("--sid_dirs", nargs="+", required=True, help="label=sid_dir ...")
    p.add_argument("--output_prefix", default=None)
    a = p.parse_args()
    ds = RecDataset.load(a.dataset_dir)
    pairs = [(ex.history[-1], ex.target) for ex in ds.valid if ex.history]
    rows = []
    for spec in a.sid_dirs:
        label, _, sid_dir = spec.partition("=")
        index = load_sid_dir(sid_dir, ds)
        meta = read_json(Path(sid_dir) / "meta.json")
        row = {
            "source": label,
            "sid_dir": sid_dir,
            "level_sizes": meta["level_sizes"],
            "collisions_before": meta["counts"]["collisions_before"],
            "embedding_source": meta["inputs"].get(
                "embedding_source", "import" if meta["inputs"].get("index_path") else "text"
            ),
        }
        for depth in (1, 2):
            row[f"prefix{depth}"] = prefix_agreement(index.codes, pairs, depth)
        rows.append(row)
    payload = {
        "command": "python benchmarks/sid_sources.py " + " ".join(sys.argv[1:]),
        "machine": "2 shared CPU cores",
        "date": dt.date.today().isoformat(),
        "dataset": ds.name,
        "pairs": len(pairs),
        "rows": rows,
    }
    prefix = a.output_prefix or f"docs/results/sid_sources_{a.name}"
    atomic_write_json(ROOT / f"{prefix}.json", payload)
    lines = [
        f"# SID prefixes vs behaviour on {ds.name}: text / behaviour / fused sources",
        "",
        f"Command: `{payload['command']}`  ",
        f"Machine: 2 shared CPU cores; {payload['date']}.  ",
        f"Pairs: {len(pairs)} validation (last history item, target) pairs. Proxy only: share of pairs "
        "whose SIDs share the first level / first two levels, vs chance for a random target (lift).",
        "",
        "| source | levels | collisions before resolution | same level-1 code | chance | lift | "
        "same level-1+2 prefix | chance | lift |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p1, p2 = r["prefix1"], r["prefix2"]
        lines.append(
            f"| {r['source']} | {'x'.join(map(str, r['level_sizes']))} | {r['collisions_before']} | "
            f"{p1['observed']:.4f} | {p1['chance']:.4f} | {p1['lift']:.1f} | {p2['observed']:.4f} | "
            f"{p2['chance']:.5f} | {p2['lift']:.0f} |"
        )
    atomic_write_text(ROOT / f"{prefix}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
