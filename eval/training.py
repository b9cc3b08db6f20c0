"""Evaluation inside training: ranking metrics at each eval, SID loading, curves.

``RankingEvalMixin`` adds HR@K/NDCG@K from constrained beam search on a fixed subset of
validation users to ``Trainer.evaluate``; the metrics are logged and returned, so
``metric_for_best_model: eval_NDCG@10`` with ``load_best_model_at_end`` selects checkpoints
on ranking quality rather than loss (small from-scratch decoders overfit quickly).
Under DDP every process ranks the same users, so all ranks agree on the best checkpoint.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from transformers import TrainerCallback
from trl import SFTTrainer

from data_prep.dataset import RecDataset
from data_prep.io import atomic_write_bytes
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
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())  # a kill while saving never leaves a truncated PNG
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


# ----------------------------------------------------------------------------- resumable runs
# Shared by recipes/sft.py and recipes/rl.py: a run killed at any point (kill -9) is rerun with the
# same command and resumes from its last complete checkpoint; final/ only ever exists complete.

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# leftovers of a killed run: data_prep.io temporary files (.NAME.XXXX.tmp) and the final-model
# staging / replaced directories of save_final (.final.partial, .final.old, ..._adapter)
_STRAY = re.compile(r"^\..+(\.tmp|\.partial|\.partial_adapter|\.old)$")


def _complete_checkpoint(path: Path) -> bool:
    """A checkpoint is complete when its trainer_state.json parses: the Trainer writes it after
    the model, optimizer, scheduler and RNG states."""
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and "global_step" in state


def _checkpoints(out: Path) -> list[Path]:
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def last_complete_checkpoint(out: Path) -> str | None:
    """The last ``checkpoint-N`` in ``out`` whose save finished (None if there is none)."""
    if not out.is_dir():
        return None
    done = [p for p in _checkpoints(out) if _complete_checkpoint(p)]
    return str(done[-1]) if done else None


def clean_output_dir(out: Path) -> None:
    """Make a run killed at any point (kill -9) resumable: remove temporary files and staging
    directories of interrupted atomic writes, and checkpoint directories whose save was
    interrupted (no complete trainer_state.json: the Trainer does not write checkpoints
    atomically), so the rerun resumes from the last complete one. Main process only."""
    if not out.is_dir():
        return
    for entry in sorted(out.iterdir()):
        if _STRAY.match(entry.name):
            logger.warning("removing %s left by an interrupted run", entry)
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    for path in _checkpoints(out):
        if not _complete_checkpoint(path):
            logger.warning("removing incomplete %s (its save was interrupted)", path)
            shutil.rmtree(path)


def finished_state(last: str | None, args) -> dict | None:
    """The trainer state saved in ``last`` if that checkpoint ends the run ``args`` asks for."""
    if last is None:
        return None
    state = json.loads((Path(last) / "trainer_state.json").read_text())
    if args.max_steps > 0:
        target = args.max_steps
    elif state.get("num_train_epochs") == args.num_train_epochs:
        target = state.get("max_steps")
    else:
        return None
    return state if target and state["global_step"] >= target else None


def _replace_dir(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``, replacing it; at every instant ``dst`` is absent or complete."""
    old = dst.with_name(f".{dst.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def save_final(trainer, tokenizer, sft: Path, final: Path) -> None:
    """Model (LoRA merged; the adapter in ``<final>_adapter``), tokenizer and ``sidrec/``
    catalogue, staged in ``.final.partial`` and renamed into place: ``final/`` exists only
    complete. Called on every process (sharded saves), the main one writes and renames."""
    acc = trainer.accelerator
    tmp = final.with_name(f".{final.name}.partial")
    tmp_adapter = Path(f"{tmp}_adapter")
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(tmp_adapter, ignore_errors=True)
    acc.wait_for_everyone()
    save_final_model(trainer, tmp)
    acc.wait_for_everyone()
    if acc.is_main_process:
        tokenizer.save_pretrained(tmp)
        copy_catalogue(sft, tmp)
        if tmp_adapter.exists():
            _replace_dir(tmp_adapter, Path(f"{final}_adapter"))
        _replace_dir(tmp, final)
    acc.wait_for_everyone()


def prepare_output_dir(training_args) -> tuple[str | None, dict | None]:
    """Clean what a killed run left (main process first), then return the last complete
    checkpoint and, when that checkpoint already ends the requested run, its trainer state."""
    out = Path(training_args.output_dir)
    with training_args.main_process_first(desc="cleaning the output dir"):
        if training_args.process_index == 0:
            clean_output_dir(out)
        last = last_complete_checkpoint(out)
    return last, finished_state(last, training_args)


def already_finished(last: str | None, done: dict | None, final: Path) -> bool:
    """True when a rerun has nothing to do: the run reached its last step (``done``, from
    ``prepare_output_dir``) and ``final/`` exists (it only ever exists complete: ``save_final``)."""
    if done is None or not final.is_dir():
        return False
    logger.info("training already finished at step %d (%s) and %s exists", done["global_step"], last, final)
    return True


def train_or_finish(trainer, last: str | None, done: dict | None) -> None:
    """``trainer.train`` resuming from ``last``; or, when the run already reached its last step
    (killed after the last checkpoint, before final/ was complete), load the weights train()
    ended with instead: a Trainer resumed at max_steps runs one step more (transformers 5.19)."""
    from transformers import TrainerState

    if done is not None:
        out = Path(trainer.args.output_dir)
        trainer.state = TrainerState.load_from_json(str(Path(last) / "trainer_state.json"))
        best = out / f"checkpoint-{trainer.state.best_global_step}"
        src = best if trainer.args.load_best_model_at_end and best.is_dir() else Path(last)
        logger.info("training already finished at step %d (%s): saving final/ from %s",
                    trainer.state.global_step, last, src)
        trainer._load_from_checkpoint(str(src))
        return
    if last:
        logger.info("resuming from %s", last)
        trainer.args.eval_on_start = False  # the starting point was evaluated by the first run
    trainer.train(resume_from_checkpoint=last)
