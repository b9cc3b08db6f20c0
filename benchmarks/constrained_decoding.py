"""Constrained vs unconstrained beam search, same model and prompts, one run.

    python benchmarks/constrained_decoding.py [--checkpoint DIR] [--users 64] [--beams 20]

Measures (a) transformers ``generate(num_beams=K)`` with and without ``SidLogitsProcessor``,
(b) sidrec's ``sid_beam_search`` (prefill once) with and without it, interleaving the
variants over repeats so machine load hits both alike; and (c) the processor's mask cost for
a 1M-item synthetic catalogue (per decoding step, batch of B*K rows). Writes
``docs/results/constrained_decoding.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

from benchmarks.common import describe_machine, machine_info  # noqa: E402
from data_prep.dataset import RecDataset  # noqa: E402
from data_prep.io import atomic_write_json, atomic_write_text  # noqa: E402
from eval.generate import SidRanker  # noqa: E402
from sid_tokenizer.catalog import checkpoint_dataset_dir, load_checkpoint  # noqa: E402
from sid_tokenizer.constrained import SidLogitsProcessor  # noqa: E402
from sid_tokenizer.prompts import seq2seq_prompt  # noqa: E402
from sid_tokenizer.trie import SidTrie  # noqa: E402


def time_rank(
    ranker: SidRanker, prompts: list[str], beams: int, batch: int, constrained: bool, backend: str
) -> float:
    t = time.perf_counter()
    ranker.rank(
        prompts, num_beams=beams, batch_size=batch, constrained=constrained, progress=False, backend=backend
    )
    return time.perf_counter() - t


def processor_scaling(num_items: int, rows: int, vocab: int = 4000, levels: int = 3, size: int = 256) -> dict:
    rng = np.random.default_rng(0)
    codes = rng.integers(0, size, (num_items, levels))
    t = time.perf_counter()
    trie = SidTrie(codes, (size,) * levels)
    build = time.perf_counter() - t
    level_ids = [np.arange(vocab + lv * size, vocab + (lv + 1) * size) for lv in range(levels)]
    proc = SidLogitsProcessor(
        trie, level_ids, prompt_length=8, eos_token_id=0, vocab_size=vocab + levels * size
    )
    out = {"items": num_items, "rows": rows, "trie_build_s": round(build, 3)}
    for step in range(levels):
        pick = codes[rng.integers(0, num_items, rows)]
        gen = (
            np.stack([level_ids[lv][pick[:, lv]] for lv in range(step)], 1)
            if step
            else np.zeros((rows, 0), int)
        )
        ids = torch.cat([torch.ones(rows, 8, dtype=torch.long), torch.as_tensor(gen, dtype=torch.long)], 1)
        scores = torch.randn(rows, vocab + levels * size)
        proc(ids, scores)
        reps = []
        for _ in range(5):
            t = time.perf_counter()
            proc(ids, scores)
            reps.append(time.perf_counter() - t)
        out[f"step{step}_ms"] = round(1000 * statistics.median(reps), 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="outputs/demo/sft/final")
    ap.add_argument("--users", type=int, default=64)
    ap.add_argument("--beams", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 avoids oversubscription on a shared machine)"
    )
    ap.add_argument("--out", default="docs/results/constrained_decoding")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    machine = machine_info()  # before the run: its load average is not ours
    model, tok, cat = load_checkpoint(args.checkpoint)
    ds = RecDataset.load(checkpoint_dataset_dir(args.checkpoint))
    ranker = SidRanker(model, tok, cat.index)
    prompts = [seq2seq_prompt(cat.index, e.history) for e in ds.test[: args.users]]
    time_rank(ranker, prompts[: args.batch], args.beams, args.batch, True, "sid_beam")  # warm-up
    variants = [(b, c) for b in ("hf", "sid_beam") for c in (False, True)]
    times: dict[str, list[float]] = {f"{b}/{'constrained' if c else 'free'}": [] for b, c in variants}
    for _ in range(args.repeats):
        for b, c in variants:
            times[f"{b}/{'constrained' if c else 'free'}"].append(
                time_rank(ranker, prompts, args.beams, args.batch, c, b)
            )
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "command": " ".join(["python benchmarks/constrained_decoding.py", *sys.argv[1:]]),
        "checkpoint": args.checkpoint,
        "users": len(prompts),
        "beams": args.beams,
        "batch": args.batch,
        "machine": machine,
        "seconds_median": {k: round(v, 3) for k, v in med.items()},
        "ratio_constrained_over_free": {
            b: round(med[f"{b}/constrained"] / med[f"{b}/free"], 3) for b in ("hf", "sid_beam")
        },
        "speedup_sid_beam_over_hf_generate": round(med["hf/constrained"] / med["sid_beam/constrained"], 2),
        "processor_1M_items": processor_scaling(1_000_000, rows=args.batch * args.beams),
    }
    md = [
        "# Constrained decoding benchmark",
        "",
        f"`{result['command']}`: checkpoint `{args.checkpoint}`, {len(prompts)} test users, {args.beams} beams, "
        f"median of {args.repeats}.",
        "",
        f"Machine: {describe_machine(machine)}.",
        "",
        "| decoder | free (s) | constrained (s) | constrained / free |",
        "|---|---|---|---|",
    ]
    for b in ("hf", "sid_beam"):
        md.append(
            f"| {b} | {med[f'{b}/free']:.2f} | {med[f'{b}/constrained']:.2f} | "
            f"{result['ratio_constrained_over_free'][b]:.3f} |"
        )
    p = result["processor_1M_items"]
    md += [
        "",
        f"sid_beam_search vs transformers generate (both constrained): "
        f"{result['speedup_sid_beam_over_hf_generate']}x faster.",
        "",
        f"SidLogitsProcessor on a 1M-item synthetic catalogue ({p['rows']} rows): trie build {p['trie_build_s']} s, "
        f"mask per step {p['step0_ms']} / {p['step1_ms']} / {p['step2_ms']} ms (levels 1/2/3).",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out + ".json", result)
    atomic_write_text(args.out + ".md", "\n".join(md) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
