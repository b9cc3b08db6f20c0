"""Evaluation inside training: ranking metrics at each eval, SID loading, curves.

``RankingEvalMixin`` adds HR@K/NDCG@K from constrained beam search on a fixed subset of
validation users to ``Trainer.evaluate``; the metrics are logged and returned, so
``metric_for_best_model: eval_NDCG@10`` with ``load_best_model_at_end`` selects checkpoints
on ranking quality rather than loss (small from-scratch decoders overfit quickly).
Under DDP every process ranks the same users, so all ranks agree on the best checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import TrainerCallback
from trl import SFTTrainer

from data_prep.dataset import RecDataset
from sid_tokenizer.llm import copy_catalogue
from sid_tokenizer.sid import SidIndex, SidVocab

logger = logging.getLogger(__name__)


def load_sid_dir(sid_dir: str | Path, dataset: RecDataset) -> SidIndex:
    """The SID index written by ``sid_tokenizer.build`` (``<sid_dir>/index.json``), aligned to
    the dataset's items; level sizes come from ``meta.json`` when present."""
    from data_prep.io import read_json

    sid_dir = Path(sid_dir)
    meta_path = sid_dir / "meta.json"
    level_sizes = None
    if meta_path.exists():
        meta = read_json(meta_path)
        level_sizes = meta.get("level_sizes")
    return SidIndex.load(sid_dir / "index.json", raw_ids=[it.raw_id for it in dataset.items],
                         level_sizes=tuple(level_sizes) if level_sizes else None)


class RankingEvalMixin:
    """Mixin for transformers/TRL trainers. ``rank_eval``: (dataset, index, examples, args) where
    args has ``rank_eval_users``, ``rank_eval_beams``, ``max_history``."""

    def __init__(self, *a, rank_eval=None, **kw) -> None:
        super().__init__(*a, **kw)
        self.rank_eval = rank_eval

    def ranking_metrics(self, prefix: str = "eval") -> dict[str, float]:
        from eval.generate import SidRanker, evaluate_examples

        dataset, index, examples, args = self.rank_eval
        model = self.accelerator.unwrap_model(self.model)
        ranker = SidRanker(model, self.processing_class, index)
        res = evaluate_examples(ranker, examples[: args.rank_eval_users], max_history=args.max_history,
                                num_beams=args.rank_eval_beams, batch_size=16, progress=False)
        return {f"{prefix}_{k}": float(res[k]) for k in ("HR@5", "HR@10", "NDCG@5", "NDCG@10", "HR@20")}

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        metrics = super().evaluate(eval_dataset=eval_dataset, ignore_keys=ignore_keys,
                                   metric_key_prefix=metric_key_prefix)
        if self.rank_eval is not None and metric_key_prefix == "eval":
            extra = self.ranking_metrics(metric_key_prefix)
            self.log(extra)
            metrics.update(extra)
        return metrics


class CatalogueCallback(TrainerCallback):
    """Copy ``<base>/sidrec`` into every saved ``checkpoint-N`` so each checkpoint can be
    evaluated or served on its own (e.g. the best one of a run that was stopped early)."""

    def __init__(self, base_dir: str | Path) -> None:
        self.base_dir = Path(base_dir)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                copy_catalogue(self.base_dir, ckpt)
        return control


class SidSFTTrainer(RankingEvalMixin, SFTTrainer):
    """SFTTrainer whose evaluation also reports full-catalogue ranking metrics."""


def trainable_sid_rows_only(model, tokenizer, vocab: SidVocab) -> None:
    """Freeze all parameters except the input/output embedding rows of the SID tokens."""
    ids = torch.tensor(tokenizer.convert_tokens_to_ids(vocab.tokens()), dtype=torch.long)
    for p in model.parameters():
        p.requires_grad_(False)
    mats = {id(m.weight): m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings())
            if m is not None}
    for w in mats.values():
        w.requires_grad_(True)
        keep = torch.zeros(w.shape[0], 1, dtype=w.dtype)
        keep[ids] = 1
        w.register_hook(lambda g, keep=keep: g * keep.to(g.device))
    n = sum(int(ids.numel()) * w.shape[1] for w in mats.values())
    logger.info("training only the %d SID embedding rows (%d parameters)", len(ids), n)


def plot_training_curves(log_history: list[dict], path: str | Path) -> None:
    """Loss (train/eval) and ranking metrics over steps -> PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, tuple[list, list]] = {}
    for rec in log_history:
        step = rec.get("step")
        for k, v in rec.items():
            if k == "step" or not isinstance(v, int | float) or k in ("epoch", "total_flos"):
                continue
            if "runtime" in k or "per_second" in k or k in ("grad_norm", "learning_rate", "num_tokens"):
                continue
            series.setdefault(k, ([], []))
            series[k][0].append(step)
            series[k][1].append(v)
    losses = {k: v for k, v in series.items() if "loss" in k and "train_loss" != k}
    ranks = {k: v for k, v in series.items() if "@" in k or "reward" in k}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for k, (x, y) in losses.items():
        axes[0].plot(x, y, label=k, marker="." if len(x) < 30 else None)
    axes[0].set_xlabel("step")
    axes[0].set_title("loss")
    axes[0].legend()
    for k, (x, y) in ranks.items():
        axes[1].plot(x, y, label=k, marker="o")
    axes[1].set_xlabel("step")
    axes[1].set_title("validation ranking (constrained beam search)")
    if ranks:
        axes[1].legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_final_model(trainer, path: str | Path) -> None:
    """Save a servable full model: LoRA adapters are merged (the adapter alone is kept in
    ``<path>_adapter``), so evaluation, RL and vLLM load one plain checkpoint."""
    path = Path(path)
    model = trainer.accelerator.unwrap_model(trainer.model)
    if hasattr(model, "merge_and_unload"):
        trainer.save_model(str(path) + "_adapter")
        model = model.merge_and_unload()
        model.save_pretrained(path)
    else:
        trainer.save_model(str(path))
