"""Check a finished batch export (``recipes/export.py``) against the offline ranking it should equal.

    python benchmarks/export_check.py --export_dir outputs/export/scientific_test --checkpoint CKPT [--sample 1000]

Reads ``topk.jsonl`` and ``topk.parquet``: same rows in both, one row per user of the split,
``k`` distinct catalogue SIDs per row; HR@10 / NDCG@10 of the exported lists against the split's
held-out items (what ``eval.evaluate`` reports for the same checkpoint); and for a seeded sample
of users, whether the exported list is identical to ``eval.generate.SidRanker`` on the same
prompt. Writes ``docs/results/export_<name>.{json,md}`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

from benchmarks.common import describe_machine, machine_info  # noqa: E402
from data_prep.dataset import RecDataset  # noqa: E402
from data_prep.io import atomic_write_json, atomic_write_text, read_json  # noqa: E402
from eval.generate import SidRanker  # noqa: E402
from eval.metrics import rank_metrics  # noqa: E402
from sid_tokenizer.catalog import checkpoint_dataset_dir, load_checkpoint  # noqa: E402
from sid_tokenizer.prompts import seq2seq_prompt  # noqa: E402


def main() -> None:
    import pyarrow.parquet as pq

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--export_dir", required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--sample", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="default docs/results/export_<export_dir name>")
    a = p.parse_args()
    machine = machine_info()
    d = Path(a.export_dir)
    meta = read_json(d / "meta.json")
    cfg = meta["config"]
    rows = [json.loads(line) for line in open(d / "topk.jsonl", encoding="utf-8")]
    same_files = pq.read_table(d / "topk.parquet").to_pylist() == rows
    model, tok, cat = load_checkpoint(a.checkpoint)
    ds = RecDataset.load(checkpoint_dataset_dir(a.checkpoint, cfg.get("dataset_dir")))
    examples = list(getattr(ds, cfg["split"]))
    by_user = {r["user_id"]: r for r in rows}
    known = {cat.index.sid(i) for i in range(len(cat.raw_ids))}
    k = cfg["k"]
    checks = {
        "rows": len(rows),
        "users_in_split": len(examples),
        "every_user_once": sorted(by_user) == sorted(ds.user_raw_ids[e.user_id] for e in examples),
        "parquet_equals_jsonl": same_files,
        "k_distinct_catalogue_sids_per_row": all(
            len(r["sids"]) == k and len(set(r["sids"])) == k and set(r["sids"]) <= known for r in rows
        ),
    }
    lists = [[[i] for i in by_user[ds.user_raw_ids[e.user_id]]["item_ids"]] for e in examples]
    metrics = rank_metrics(lists, [e.target for e in examples], ks=(10, 20))
    sub = random.Random(a.seed).sample(examples, min(a.sample, len(examples)))
    ranker = SidRanker(model, tok, cat.index)
    t0 = time.perf_counter()
    ranking = ranker.rank(
        [seq2seq_prompt(cat.index, e.history, cfg["max_history"]) for e in sub], num_beams=k, progress=False
    )
    offline_s = time.perf_counter() - t0
    identical = sum(
        [cat.index.vocab.format(s) for s in sids] == by_user[ds.user_raw_ids[e.user_id]]["sids"]
        for e, sids in zip(sub, ranking.sids, strict=True)
    )
    result = {
        "command": " ".join(["python benchmarks/export_check.py", *sys.argv[1:]]),
        "date": machine["date"],
        "machine": machine,
        "export_meta": meta,
        "checks": checks,
        "metrics": {m: round(float(metrics[m]), 4) for m in ("HR@10", "NDCG@10", "HR@20", "NDCG@20")},
        "offline_sample": {"users": len(sub), "identical_lists": identical, "seconds": round(offline_s, 1)},
    }
    out = Path(a.out) if a.out else ROOT / "docs" / "results" / f"export_{d.name}"
    atomic_write_json(out.with_suffix(".json"), result)
    em = meta
    lines = [
        f"# Batch export check: `{d}` (written by benchmarks/export_check.py)",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {describe_machine(machine)} (the cores are shared with other engineers' jobs).",
        "",
        f"Export: `python recipes/export.py` with split `{cfg['split']}`, k {k}, max_history {cfg['max_history']}, "
        f"exclude_seen {cfg['exclude_seen']}, concurrency {cfg['concurrency']}, checkpoint `{cfg['checkpoint']}`; "
        f"{em['users']} users, the last run ranked {em['ranked_now']} of them in {em['seconds_now']} s "
        f"({em['users_per_second_now']} users/s; the rest came from the partial file of an interrupted run).",
        "",
        "| check | result |",
        "|---|---|",
        *[f"| {name} | {value} |" for name, value in checks.items()],
        *[
            f"| exported lists {m} (all {len(examples)} {cfg['split']} users) | {v} |"
            for m, v in result["metrics"].items()
        ],
        f"| identical to offline `SidRanker` ({len(sub)} random users, seed {a.seed}) | {identical}/{len(sub)} |",
    ]
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
