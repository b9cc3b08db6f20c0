"""Run machinery shared by the SFT and RL recipes: ranking eval inside training, resumable runs,
the final model, training curves.

``RankingEvalMixin`` adds HR@K/NDCG@K from constrained beam search on a fixed subset of
validation users to ``Trainer.evaluate``; the metrics are logged and returned, so
``metric_for_best_model: eval_NDCG@10`` with ``load_best_model_at_end`` selects checkpoints
on ranking quality rather than loss (small from-scratch decoders overfit quickly).
Under DDP every process ranks the same users, so all ranks agree on the best checkpoint.

Resumable runs: a run killed at any point (kill -9) is rerun with the same command and resumes
from its last complete checkpoint; ``final/`` only ever exists complete (``save_final``).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from transformers import TrainerCallback

from data_prep.io import atomic_save_figure, atomic_write_bytes
from sid_tokenizer.catalog import copy_catalogue

logger = logging.getLogger(__name__)


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
        # a seeded random sample (the same at every eval and on every rank), not the first users: the
        # dataset's first validation users are not representative (on Scientific the demo model scored
        # HR@10 0.025 on the first 2,000 and 0.046 on a random 2,000; docs/results/demo.md)
        n = args.rank_eval_users
        users = list(examples) if n >= len(examples) else random.Random(0).sample(list(examples), n)
        res = evaluate_examples(
            ranker,
            users,
            max_history=args.max_history,
            num_beams=args.rank_eval_beams,
            batch_size=16,
            progress=False,
        )
        return {f"{prefix}_{k}": float(res[k]) for k in ("HR@5", "HR@10", "NDCG@5", "NDCG@10", "HR@20")}

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        metrics = super().evaluate(
            eval_dataset=eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix
        )
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


# One figure for every run: each panel appears when its series were logged (SFT: loss and
# validation ranking; GRPO: rewards by component, KL, rollout validity; DPO: implicit rewards).
PANELS: list[tuple[str, Callable[[str], bool]]] = [
    ("loss (train / eval)", lambda k: "loss" in k and k != "train_loss"),
    (
        "reward by component (train)",
        lambda k: k == "reward" or k.startswith("rewards/") and k.endswith("/mean"),
    ),
    ("KL to the SFT model (train)", lambda k: k == "kl"),
    ("rollouts that are catalogue SIDs", lambda k: k == "completions/valid_sid"),
    (
        "DPO implicit rewards",
        lambda k: k.removeprefix("eval_") in ("rewards/chosen", "rewards/rejected", "rewards/margins"),
    ),
    ("DPO pair accuracy", lambda k: k.removeprefix("eval_") == "rewards/accuracies"),
    ("validation ranking (constrained beam search)", lambda k: k.startswith("eval_") and "@" in k),
]


def plot_training_curves(log_history: list[dict], path: str | Path, title: str = "") -> None:
    """Training curves of a run (``trainer.state.log_history``) -> PNG, one panel per group of
    logged series that is present (``PANELS``). Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, tuple[list, list]] = {}
    for rec in log_history:
        for k, v in rec.items():
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool):
                series.setdefault(k, ([], []))
                series[k][0].append(rec.get("step"))
                series[k][1].append(v)
    panels = [(name, {k: v for k, v in series.items() if pred(k)}) for name, pred in PANELS]
    panels = [(name, curves) for name, curves in panels if curves]
    cols = min(max(len(panels), 1), 3)
    rows = -(-max(len(panels), 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, (name, curves) in zip(axes.flat, panels, strict=False):
        for k, (x, y) in sorted(curves.items()):
            ax.plot(x, y, label=k, marker="o" if len(x) < 30 else None, markersize=3)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_save_figure(fig, path)  # a kill while saving never leaves a truncated PNG


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


def start_metrics(trainer, out: Path) -> dict[str, float] | None:
    """Ranking metrics of the model before training (the same validation users as every later
    eval), computed once and kept in ``<out>/start_metrics.json`` (a resumed run reads them)."""
    if trainer.rank_eval is None:
        return None
    path = out / "start_metrics.json"
    if path.exists():
        return json.loads(path.read_text())
    trainer.model.eval()  # as in Trainer.evaluate; train() switches back
    metrics = trainer.ranking_metrics("eval")
    if trainer.accelerator.is_main_process:
        atomic_write_bytes(path, json.dumps(metrics, indent=1).encode())
    logger.info("start model: %s", metrics)
    return metrics


def _metric_key(args) -> str:
    name = args.metric_for_best_model or "loss"
    return name if name.startswith("eval_") else f"eval_{name}"


def start_is_better(trainer, start: dict[str, float] | None) -> bool:
    """True when the start model's ``metric_for_best_model`` is at least as good as the best
    checkpoint's (or no checkpoint was scored): training did not improve the selection metric."""
    args = trainer.args
    key, best = _metric_key(args), trainer.state.best_metric
    if start is None or key not in start or not args.load_best_model_at_end:
        return False
    if best is None:
        return True
    return start[key] >= best if args.greater_is_better else start[key] <= best


def save_final_or_start(trainer, tokenizer, start_dir: Path, final: Path, start: dict | None) -> dict:
    """``final/`` = the trained model (``save_final``), or a copy of the start checkpoint when
    ``start_is_better``; staged and renamed into place either way. Returns what was chosen."""
    keep_start = start_is_better(trainer, start)
    choice = {
        "metric": _metric_key(trainer.args),
        "start": start,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "best_metric": trainer.state.best_metric,
        "final": "start" if keep_start else "trained",
    }
    if not keep_start:
        save_final(trainer, tokenizer, start_dir, final)
        return choice
    logger.warning(
        "no checkpoint beat the start model on %s (start %.5f, best %s): final/ is a copy of %s",
        *(choice["metric"], start[choice["metric"]], choice["best_metric"], start_dir),
    )
    acc = trainer.accelerator
    if acc.is_main_process:
        tmp = final.with_name(f".{final.name}.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(start_dir, tmp, ignore=shutil.ignore_patterns("checkpoint-*", "runs", ".*"))
        _replace_dir(tmp, final)
    acc.wait_for_everyone()
    return choice


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
        logger.info(
            "training already finished at step %d (%s): saving final/ from %s",
            trainer.state.global_step,
            last,
            src,
        )
        trainer._load_from_checkpoint(str(src))
        return
    if last:
        logger.info("resuming from %s", last)
        trainer.args.eval_on_start = False  # the starting point was evaluated by the first run
    trainer.train(resume_from_checkpoint=last)
