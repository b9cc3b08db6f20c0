"""RL report: per-model metrics merged into one table, plus paired per-user differences to the
first checkpoint with bootstrap CIs.

    python -m eval.rl_report --inputs a/metrics.json b/metrics.json --paired SFT=ckpt1 SFT+DPO=ckpt2
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.dataset import RecDataset

logger = logging.getLogger(__name__)


@dataclass
class RLReportArgs:
    inputs: list[str] = field(
        metadata={"help": "metrics.json files written by eval.evaluate (one per model)"}
    )
    output: str = field(
        default="docs/results/rl_scientific", metadata={"help": "report prefix (.json/.md/.png)"}
    )
    metrics: list[str] = field(default_factory=lambda: ["HR@5", "NDCG@5", "HR@10", "NDCG@10", "HR@20"])
    title: str = "SFT vs SFT+GRPO vs SFT+DPO"
    notes: list[str] = field(default_factory=list, metadata={"help": "markdown lines above the tables"})
    paired: list[str] = field(
        default_factory=list,
        metadata={"help": "NAME=CHECKPOINT ...: paired per-user differences to the first one (same users)"},
    )
    paired_splits: list[str] = field(default_factory=lambda: ["valid", "test"])
    paired_metrics: list[str] = field(default_factory=lambda: ["NDCG@10", "HR@10", "HR@5", "HR@20"])
    paired_max_users: int | None = field(default=None, metadata={"help": "seeded subset (as eval.evaluate)"})
    num_beams: int = 20
    max_history: int = 20
    seed: int = 0
    n_boot: int = 1000


def paired_differences(args: RLReportArgs) -> list[dict]:
    """Per-user metric differences of each ``paired`` checkpoint to the first, on the same users
    (``eval.generate.evaluate_examples``, the code ``eval.evaluate`` runs), with percentile
    bootstrap 95% CIs of the mean difference: far tighter than comparing two unpaired CIs."""
    from eval.generate import SidRanker, evaluate_examples
    from eval.metrics import paired_difference
    from sid_tokenizer.catalog import checkpoint_dataset_dir, load_checkpoint

    named = [p.split("=", 1) for p in args.paired]
    if len(named) < 2 or any(len(p) != 2 for p in named):
        raise ValueError(f"paired must be two or more NAME=CHECKPOINT entries, got {args.paired}")
    dataset = RecDataset.load(checkpoint_dataset_dir(named[0][1]))
    per_user: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for name, ckpt in named:
        model, tokenizer, catalogue = load_checkpoint(ckpt)
        ranker = SidRanker(model, tokenizer, catalogue.index)
        for split in args.paired_splits:
            examples = list(getattr(dataset, split))
            if args.paired_max_users and args.paired_max_users < len(examples):
                examples = random.Random(args.seed).sample(examples, args.paired_max_users)
            res = evaluate_examples(ranker, examples, args.max_history, args.num_beams, batch_size=32)
            per_user[name, split] = res["per_example"]
            logger.info("%s %s: NDCG@10 %.4f (%d users)", name, split, res["NDCG@10"], len(examples))
    base = named[0][0]
    rows = []
    for name, _ in named[1:]:
        for split in args.paired_splits:
            for metric in args.paired_metrics:
                diff = np.asarray(per_user[name, split][metric]) - np.asarray(per_user[base, split][metric])
                rows.append(
                    paired_difference(
                        diff,
                        n_boot=args.n_boot,
                        seed=args.seed,
                        model=name,
                        baseline=base,
                        split=split,
                        metric=metric,
                    )
                )
    return rows


def paired_markdown(rows: list[dict]) -> list[str]:
    lines = [
        "| model - baseline | split | metric | users | mean difference [95% CI] | users better / worse |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} - {r['baseline']} | {r['split']} | {r['metric']} | {r['users']} | "
            f"{r['difference']:+.4f} [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}] | "
            f"{r['better_users']} / {r['worse_users']} |"
        )
    return lines


def write_rl_report(args: RLReportArgs) -> list[Path]:
    """Merge per-model ``eval.evaluate`` results into one report (``eval.report.write_metrics_report``),
    with paired differences when ``args.paired`` names the checkpoints."""
    from data_prep.io import read_json
    from eval.report import write_metrics_report

    results: dict[str, dict] = {}
    for path in args.inputs:
        for key, row in read_json(path)["results"].items():
            if key in results:
                raise ValueError(
                    f"{path}: row {key!r} already read from an earlier input; give each model a name"
                )
            results[key] = row
    meta: dict[str, Any] = {"inputs": list(args.inputs)}
    notes = list(args.notes)
    if args.paired:
        meta["paired_differences"] = rows = paired_differences(args)
        # one note block: the report separates notes, which would split the table
        notes.append("\n".join(["## paired differences (same users)", "", *paired_markdown(rows)]))
    return write_metrics_report(
        results, args.output, meta=meta, metrics=args.metrics, title=args.title, notes=notes
    )


if __name__ == "__main__":
    from trl import TrlParser

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    (report_args,) = TrlParser((RLReportArgs,)).parse_args_and_config()
    for written in write_rl_report(report_args):
        print(written)
