"""Evaluate a sidrec checkpoint: full-catalogue constrained beam search, HR@K / NDCG@K.

    python -m eval.evaluate --config eval/configs/scientific_sft.yaml [--checkpoint ...]

For each split: the raw seq2seq prompt (``<|rec|>`` + last ``max_history`` SIDs) of every
held-out user, ``num_beams`` beams under the SID-trie constraint (every beam is a distinct
catalogue SID), item-level metrics (a SID shared by G items hits with probability 1/G),
validity, bootstrap 95% CIs. With ``also_unconstrained`` the same beams without the
constraint give the unconstrained validity for contrast. Writes ``<output_dir>/metrics.{json,md,png}``,
merging baseline rows from ``baselines_json`` when given.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from data_prep.dataset import RecDataset
from data_prep.io import read_json
from eval.generate import SidRanker, evaluate_examples
from eval.metrics import metrics_with_ci
from eval.report import write_metrics_report
from sid_tokenizer.catalog import Catalogue, checkpoint_dataset_dir, load_checkpoint

logger = logging.getLogger(__name__)


@dataclass
class EvalArgs:
    checkpoint: str = field(
        default="outputs/scientific/sft/final", metadata={"help": "sidrec checkpoint dir"}
    )
    dataset_dir: str | None = field(
        default=None,
        metadata={"help": "dataset dir (default: the one recorded in <checkpoint>/sidrec/meta.json)"},
    )
    model_name: str | None = field(default=None, metadata={"help": "row name in the report"})
    splits: list[str] = field(default_factory=lambda: ["test"], metadata={"help": "valid and/or test"})
    num_beams: int = 20
    batch_size: int = 32
    max_history: int = 20
    max_users: int | None = field(default=None, metadata={"help": "evaluate a seeded random subset"})
    also_unconstrained: bool = field(default=True, metadata={"help": "report unconstrained validity too"})
    unconstrained_users: int = field(default=500, metadata={"help": "users for the unconstrained contrast"})
    backend: str = field(
        default="sid_beam",
        metadata={
            "help": "sid_beam | hf (transformers generate) | vllm (vllm.LLM, batch_size prompts per engine call)"
        },
    )
    ensemble: list[str] = field(
        default_factory=list,
        metadata={
            "help": "more checkpoints (same tokenizer and sid_dir) ranked together with --checkpoint: "
            "one beam search over their averaged next-token distributions (eval/ensemble.py)"
        },
    )
    ensemble_mode: str = field(default="prob", metadata={"help": "prob (mixture) | logprob (product)"})
    device: str | None = None
    n_boot: int = 1000
    seed: int = 0
    output_dir: str = "outputs/scientific/eval"
    baselines_json: str | None = field(
        default=None, metadata={"help": "baselines.json to merge into the report"}
    )


def evaluate_checkpoint(args: EvalArgs) -> dict[str, dict[str, Any]]:
    torch.manual_seed(args.seed)
    if args.backend == "vllm":  # vllm.LLM + SidTrieLogitsProcessor (eval/vllm_backend.py); no HF weights
        from transformers import AutoTokenizer

        from eval.vllm_backend import VllmSidRanker, load_vllm

        tokenizer, catalogue = AutoTokenizer.from_pretrained(args.checkpoint), Catalogue.load(args.checkpoint)
        ranker = VllmSidRanker(
            load_vllm(args.checkpoint, num_beams=args.num_beams, seed=args.seed), tokenizer, catalogue.index
        )
    elif args.ensemble:
        from eval.ensemble import EnsembleLM, check_members

        if args.backend != "sid_beam":
            raise ValueError(f"--ensemble ranks with backend sid_beam only, not {args.backend!r}")
        paths = [args.checkpoint, *args.ensemble]
        loaded = [load_checkpoint(p, device=args.device) for p in paths]
        check_members(paths, [t for _, t, _ in loaded], [c for _, _, c in loaded])
        _, tokenizer, catalogue = loaded[0]
        model = EnsembleLM([m for m, _, _ in loaded], mode=args.ensemble_mode)
        ranker = SidRanker(model, tokenizer, catalogue.index)
    else:
        model, tokenizer, catalogue = load_checkpoint(args.checkpoint, device=args.device)
        ranker = SidRanker(model, tokenizer, catalogue.index)
    dataset_dir = checkpoint_dataset_dir(args.checkpoint, args.dataset_dir)
    dataset = RecDataset.load(dataset_dir)
    if len(catalogue.index) != dataset.num_items:
        raise ValueError(
            f"{args.checkpoint}: catalogue has {len(catalogue.index)} items, dataset "
            f"{dataset_dir} has {dataset.num_items}"
        )
    name = args.model_name or Path(args.checkpoint).parent.name
    results: dict[str, dict[str, Any]] = {}
    for split in args.splits:
        examples = list(getattr(dataset, split))
        if args.max_users and args.max_users < len(examples):
            examples = random.Random(args.seed).sample(examples, args.max_users)
        t0 = time.perf_counter()
        res = evaluate_examples(
            ranker,
            examples,
            args.max_history,
            args.num_beams,
            args.batch_size,
            constrained=True,
            backend=args.backend,
        )
        seconds = time.perf_counter() - t0
        metrics = metrics_with_ci(res, n_boot=args.n_boot, seed=args.seed)
        extra = {
            "users": len(examples),
            "seconds": round(seconds, 1),
            "users_per_second": round(len(examples) / seconds, 2),
            "num_beams": args.num_beams,
            "checkpoint": args.checkpoint,
            **(
                {"ensemble": [args.checkpoint, *args.ensemble], "ensemble_mode": args.ensemble_mode}
                if args.ensemble
                else {}
            ),
            "constrained_validity": res["valid_rate"],
            "distinct_items_per_list": _distinct_share(res["ranking"].sids),
        }
        if args.also_unconstrained:
            sub = examples[: args.unconstrained_users]
            free = evaluate_examples(
                ranker,
                sub,
                args.max_history,
                args.num_beams,
                args.batch_size,
                constrained=False,
                backend=args.backend,
            )
            extra["unconstrained_validity"] = free["valid_rate"]
            extra["unconstrained_top1_validity"] = sum(r[0] is not None for r in free["ranking"].sids) / max(
                len(sub), 1
            )
            extra["unconstrained_HR@10"] = free["HR@10"]
        results[f"{name}/{split}"] = {"model": name, "split": split, "metrics": metrics, "extra": extra}
        logger.info(
            "%s %s: HR@10 %.4f NDCG@10 %.4f validity %.3f (%d users, %.0f s)",
            name,
            split,
            res["HR@10"],
            res["NDCG@10"],
            res["valid_rate"],
            len(examples),
            seconds,
        )
    return results


def _distinct_share(sids: list[list]) -> float:
    """Mean share of distinct valid SIDs per ranked list (1.0: every beam a different item)."""
    shares = [len({s for s in row if s is not None}) / len(row) for row in sids if row]
    return sum(shares) / max(len(shares), 1)


def main() -> None:
    from trl import TrlParser

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    (args,) = TrlParser((EvalArgs,)).parse_args_and_config()
    results = evaluate_checkpoint(args)
    if args.baselines_json:
        results = {**read_json(args.baselines_json)["results"], **results}
    write_metrics_report(results, Path(args.output_dir) / "metrics")


if __name__ == "__main__":
    main()
