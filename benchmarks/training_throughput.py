"""SFT training throughput on real Scientific data, through the project's own training path.

    python benchmarks/training_throughput.py [--config recipes/configs/sft_scientific.yaml] [--repeats 2]

Each variant builds the base checkpoint with ``recipes.model.prepare_base_checkpoint``
(default Qwen2 decoder of a preset + SID tokens), loads it with ``from_pretrained`` and trains
with ``SidSFTTrainer`` (TRL SFTTrainer, the recipe's collator and AdamW) on rows from
``recipes.tasks``. The recipe YAML is parsed by ``recipes/sft.py``'s own parser
(``TrlParser((SidSFTArgs, SFTConfig, ModelConfig))``, ``benchmarks.common.parse_sft_recipe``):
every training argument (batch size, lr and schedule, weight decay, max_length, optimiser...) is
the recipe's, only what the measurement needs is overridden (``max_steps``, a ``sequential``
sampler over the planned batches, no evaluation/saving/logging). Compared:

- presets ``tiny`` / ``small`` / ``base`` (seq2seq task, full fine-tuning, 1 torch thread: on 2
  cores shared with other jobs, 2 intra-op threads get descheduled and wait on each other);
- the ``seq2seq`` task (one causal pass per user sequence, loss on every item after the first)
  vs the equivalent sliding-window expansion (one row per target: last ``max_history`` items ->
  next SID) over the same supervised targets: tokens per epoch and time per epoch;
- full fine-tuning vs LoRA (peft, via ``trl.get_peft_config`` as in ``recipes/sft.py``) on ``small``;
- 1 vs 2 torch threads on ``small``;
- ``tiny`` on the recipe's whole task mixture (what ``sft_scientific.yaml`` trains).

Batches are the recipe's own: the full epoch's ``group_by_length`` order is built with
transformers' ``get_length_grouped_indices`` (batch size of the recipe), and W + K of its
full batches are drawn at random and fed in that order (``sequential`` sampler), so the measured
steps are a random sample of a real epoch's batches (same padding). Step time is the
wall time between consecutive ``on_step_end`` callbacks (data loading, collation, forward,
backward, clipping, optimizer and scheduler steps); the first W steps are warm-up. Variants
are interleaved over repeats so load from other jobs on the machine hits all alike; ratios
are paired within a repeat. Writes ``docs/results/training_throughput.{json,md,png}``, with the
machine (``benchmarks.common.machine_info``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import logging
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

from benchmarks.common import describe_machine, machine_info, parse_sft_recipe  # noqa: E402
from data_prep.dataset import RecDataset  # noqa: E402
from data_prep.io import atomic_write_json, atomic_write_text  # noqa: E402
from recipes.tasks import build_mixture, tokenize_rows, training_sequences  # noqa: E402
from sid_tokenizer.prompts import seq2seq_prompt  # noqa: E402
from sid_tokenizer.sid import SidIndex  # noqa: E402

if TYPE_CHECKING:
    from trl import SFTConfig

    from recipes.args import SidSFTArgs

logger = logging.getLogger("training_throughput")


# ---------------------------------------------------------------------------------------------
# rows and token accounting (reusable, unit-tested in tests/test_training_throughput.py)


def sliding_window_rows(
    dataset: RecDataset, index: SidIndex, max_history: int = 20, include_valid: bool = False
) -> list[dict]:
    """The sliding-window expansion of the ``seq2seq`` task: one raw row per supervised target
    ``seq[t]`` (t >= 1) of every training sequence, prompt = ``<|rec|>`` + SIDs of the last
    ``max_history`` items before it, completion = the target's SID (the same format as
    ``recipes.tasks.eval_rows``). Supervises exactly the targets of ``build_seq2seq``."""
    rows = []
    for seq in training_sequences(dataset, include_valid):
        for t in range(1, len(seq)):
            rows.append(
                {
                    "task": "seq2seq_sliding",
                    "messages": [],
                    "prompt": seq2seq_prompt(index, seq[:t], max_history),
                    "completion": index.sid(seq[t]),
                }
            )
    return rows


def token_counts(columns: dict[str, list]) -> dict[str, int]:
    """Rows, (non-padding) tokens and target (loss) tokens of tokenised columns
    (``input_ids``/``labels`` as returned by ``recipes.tasks.tokenize_rows``)."""
    return {
        "rows": len(columns["input_ids"]),
        "tokens": sum(len(x) for x in columns["input_ids"]),
        "target_tokens": sum(sum(1 for v in lab if v != -100) for lab in columns["labels"]),
        "max_len": max((len(x) for x in columns["input_ids"]), default=0),
    }


def seq2seq_tokens_closed_form(seq_lengths: list[int], sid_len: int, max_history: int) -> tuple[int, int]:
    """(seq2seq tokens, sliding-window tokens) per epoch for sequences of these lengths, with
    one ``<|rec|>`` token per row and ``sid_len`` tokens per item; mirrors ``build_seq2seq``
    (chunks of ``max_history`` targets, each after up to ``max_history`` context items) and
    ``sliding_window_rows``. seq2seq grows as O(L), sliding windows as O(L * min(L, H))."""
    one_pass = sliding = 0
    for n in seq_lengths:
        if n < 2:
            continue
        for start in range(1, n, max_history):
            ctx = start - max(0, start - max_history)
            one_pass += 1 + sid_len * (ctx + min(max_history, n - start))
        for t in range(1, n):
            sliding += 1 + sid_len * (min(t, max_history) + 1)
    return one_pass, sliding


# ---------------------------------------------------------------------------------------------
# batches of a real epoch


def epoch_batches(lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """The row indices of every batch of one epoch in the trainer's ``group_by_length`` order."""
    from transformers.trainer_pt_utils import get_length_grouped_indices

    order = get_length_grouped_indices(lengths, batch_size, generator=torch.Generator().manual_seed(seed))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def batch_stats(columns: dict[str, list], batch: list[int]) -> dict[str, int]:
    lens = [len(columns["input_ids"][i]) for i in batch]
    return {
        "examples": len(batch),
        "tokens": sum(lens),
        "padded_tokens": len(batch) * max(lens),
        "target_tokens": sum(sum(1 for v in columns["labels"][i] if v != -100) for i in batch),
    }


@dataclass
class Variant:
    name: str
    preset: str
    data: str  # seq2seq | sliding | mixture
    peft: str = "none"  # none | lora_qv_save_emb | lora_all
    threads: int = 1
    steps: int = 8  # measured steps per repeat


PEFT = {
    # README's recipe for a real LLM: adapters on q/v + fully trained embed_tokens/lm_head (SID rows)
    "lora_qv_save_emb": ["--lora_target_modules", "q_proj", "v_proj"]
    + ["--lora_modules_to_save", "embed_tokens", "lm_head"],
    # adapters only (every linear layer), embeddings frozen: cannot learn the new SID rows
    "lora_all": ["--lora_target_modules", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"]
    + ["down_proj"],
}


def measurement_overrides(workdir: Path, steps: int, peft: str = "none") -> list[str]:
    """CLI overrides on the recipe for a timed run: exactly ``steps`` optimizer steps over the
    planned batches in order, no evaluation, checkpoints or logging; LoRA r=16, alpha=32 with
    the target modules of ``PEFT[peft]`` (``peft="none"``: the recipe's own PEFT settings)."""
    out = ["--output_dir", str(workdir / "trainer"), "--max_steps", str(steps)]
    out += ["--train_sampling_strategy", "sequential", "--eval_strategy", "no", "--save_strategy", "no"]
    out += ["--logging_strategy", "no", "--report_to", "none", "--load_best_model_at_end", "false"]
    out += ["--disable_tqdm", "true"]
    if peft != "none":
        out += ["--use_peft", "true", "--lora_r", "16", "--lora_alpha", "32", *PEFT[peft]]
    return out


def recipe_summary(script_args: SidSFTArgs, training_args: SFTConfig) -> dict:
    """The recipe values this benchmark's report quotes (keys as in earlier JSON outputs)."""
    return {
        "batch_size": training_args.per_device_train_batch_size,
        "learning_rate": training_args.learning_rate,
        "lr_scheduler_type": str(
            getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type)
        ),
        "warmup_steps": training_args.warmup_steps,
        "weight_decay": training_args.weight_decay,
        "max_length": training_args.max_length or 512,  # as recipes/sft.py
        "max_history": script_args.max_history,
        "dataset_dir": script_args.dataset_dir,
        "sid_dir": script_args.sid_dir,
        "sampling": training_args.train_sampling_strategy,
        "optim": str(getattr(training_args.optim, "value", training_args.optim)),
        "include_valid_in_train": script_args.include_valid_in_train,
        "num_train_epochs": training_args.num_train_epochs,
    }


class StepClock:
    """TrainerCallback recording wall time at every optimizer step end."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        clock = self
        self.times: list[float] = []
        self.cpu: list[float] = []

        class _CB(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                clock.times = [time.perf_counter()]
                clock.cpu = [time.process_time()]

            def on_step_end(self, args, state, control, **kw):
                clock.times.append(time.perf_counter())
                clock.cpu.append(time.process_time())

        self.callback = _CB()


def run_variant(
    v: Variant,
    base_dir: Path,
    columns: dict[str, list],
    batches: list[list[int]],
    warmup: int,
    recipe_path: Path,
    workdir: Path,
) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import get_peft_config

    from recipes.sft_trainer import SidSFTTrainer

    torch.set_num_threads(v.threads)
    order = [i for b in batches for i in b]
    ds = Dataset.from_dict(
        {
            "input_ids": [columns["input_ids"][i] for i in order],
            "labels": [columns["labels"][i] for i in order],
        }
    )
    _, args, model_args = parse_sft_recipe(recipe_path, *measurement_overrides(workdir, len(batches), v.peft))
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(
        base_dir,
        dtype=model_args.dtype if model_args.dtype not in (None, "auto") else "auto",
        attn_implementation=model_args.attn_implementation,
    )
    peft_config = get_peft_config(model_args)
    clock = StepClock()
    trainer = SidSFTTrainer(
        model=model,
        args=args,
        train_dataset=ds,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[clock.callback],
        rank_eval=None,
    )
    # the collated batches the trainer actually trained on (shape check against our accounting)
    seen: list[tuple[int, int]] = []
    collate = trainer.data_collator

    def counting_collator(examples):
        out = collate(examples)
        seen.append(tuple(out["input_ids"].shape))
        return out

    trainer.data_collator = counting_collator
    n_params = sum(p.numel() for p in trainer.model.parameters())
    n_train = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    threads = torch.get_num_threads()
    expected = sorted((len(b), max(len(columns["input_ids"][i]) for i in b)) for b in batches)
    if sorted(seen) != expected:
        raise RuntimeError(f"{v.name}: collated batch shapes {sorted(seen)} != planned {expected}")
    step_s = [b - a for a, b in zip(clock.times, clock.times[1:], strict=False)]
    if len(step_s) != len(batches):
        raise RuntimeError(f"{v.name}: {len(step_s)} steps timed, {len(batches)} planned")
    meas = step_s[warmup:]
    stats = [batch_stats(columns, b) for b in batches[warmup:]]
    secs = sum(meas)
    cpu_meas = [b - a for a, b in zip(clock.cpu, clock.cpu[1:], strict=False)][warmup:]
    cpu = sum(cpu_meas)
    res = {
        "variant": v.name,
        "threads": threads,
        "measured_steps": len(meas),
        "warmup_steps": warmup,
        "seconds": secs,
        "cpu_seconds": cpu,
        "loadavg_1min_before": round(load, 2),
        "step_s": [round(x, 4) for x in meas],
        "step_cpu_s": [round(x, 4) for x in cpu_meas],
        "total_train_s": round(total, 2),
        "params": n_params,
        "trainable_params": n_train,
    }
    for k in ("examples", "tokens", "padded_tokens", "target_tokens"):
        res[k] = sum(s[k] for s in stats)
    res["tokens_per_s"] = res["tokens"] / secs
    res["target_tokens_per_s"] = res["target_tokens"] / secs
    res["examples_per_s"] = res["examples"] / secs
    res["tokens_per_cpu_s"] = res["tokens"] / cpu if cpu > 0 else None
    res["mean_step_s"] = secs / len(meas)
    res["mean_step_cpu_s"] = cpu / len(meas)
    del trainer, model
    gc.collect()
    return res


def summarise(results: list[dict], variants: list[Variant], reference: str) -> list[dict]:
    """Per variant: median over repeats of throughputs, and the median paired ratio of
    trained tokens/s to the reference variant (same repeat)."""
    out = []
    by_rep: dict[int, dict[str, dict]] = {}
    for r in results:
        by_rep.setdefault(r["repeat"], {})[r["variant"]] = r
    for v in variants:
        rs = [r for r in results if r["variant"] == v.name]
        if not rs:
            continue
        row = {
            "variant": v.name,
            "preset": v.preset,
            "data": v.data,
            "peft": v.peft,
            "threads": rs[0]["threads"],
            "repeats": len(rs),
            "measured_steps": sum(r["measured_steps"] for r in rs),
            "params": rs[0]["params"],
            "trainable_params": rs[0]["trainable_params"],
        }
        for k in ("tokens_per_s", "target_tokens_per_s", "examples_per_s", "mean_step_s", "tokens_per_cpu_s"):
            vals = [r[k] for r in rs]
            row[k] = statistics.median(vals)
            row[k + "_range"] = [min(vals), max(vals)]
        row["cpu_per_wall"] = statistics.median(r["cpu_seconds"] / r["seconds"] for r in rs)
        row["loadavg_range"] = [
            min(r["loadavg_1min_before"] for r in rs),
            max(r["loadavg_1min_before"] for r in rs),
        ]
        row["padding_fraction"] = 1 - sum(r["tokens"] for r in rs) / sum(r["padded_tokens"] for r in rs)
        for k in ("tokens_per_s", "tokens_per_cpu_s"):
            ratios = [
                by_rep[r["repeat"]][v.name][k] / by_rep[r["repeat"]][reference][k]
                for r in rs
                if reference in by_rep[r["repeat"]]
            ]
            row[k + "_vs_ref"] = statistics.median(ratios) if ratios else None
        out.append(row)
    return out


def fmt(x: float, nd: int = 0) -> str:
    return f"{x:,.{nd}f}"


def machine_line(payload: dict) -> str:
    if "machine" in payload:
        return describe_machine(payload["machine"], ("torch", "transformers", "trl", "peft"))
    # written before benchmarks/common.py: a description string and the versions at the top level
    return (
        f"{payload['hardware']}; torch {payload['torch']}, transformers {payload['transformers']}, "
        f"trl {payload['trl']}, peft {payload['peft']}"
    )


def write_markdown(path: Path, payload: dict) -> None:
    s = payload["summary"]
    ep = payload["epoch"]
    recipe = payload["recipe"]
    lines = [
        "# SFT training throughput (Scientific)",
        "",
        "Variants run with 1 torch thread unless named otherwise (see the 2-thread row).",
        "",
        f"Command: `{payload['command']}`  ",
        f"Date: {payload['date']}; machine: {machine_line(payload)}.",
        "",
        "How to run: `python benchmarks/training_throughput.py --config <SFT recipe YAML> [--repeats N] "
        "[--skip base]` (the recipe's dataset and SID index must exist); `--steps 0.2 --repeats 1 --skip small "
        "base` is a one-minute smoke run; `--rerender` rewrites this file and the plot from the JSON.",
        "",
        f"Real trainer (`SidSFTTrainer`, recipe `{payload['recipe_path']}`"
        + (
            f" parsed by `{payload['recipe_parser']}` as in `recipes/sft.py`"
            if "recipe_parser" in payload
            else ""
        )
        + f": batch {recipe['batch_size']}, max_length {recipe['max_length']}, {recipe.get('optim', 'AdamW')}, "
        f"`{recipe['sampling']}` batches), "
        f"{payload['warmup']} warm-up steps then the measured steps, per repeat; "
        f"{payload['repeats']} repeats with the variants interleaved. Each run's batches are a random "
        "sample of the batches of one real epoch (same padding as in training). Throughput = median over "
        "repeats; *trained tokens* are non-padding tokens, *target tokens* carry the loss. "
        f"'vs ref' = median paired ratio of trained tokens/s (wall clock / per process CPU second) to "
        f"`{payload['reference']}` within a repeat; variants of the same preset and data train on the same "
        "batches within a repeat. *tok per CPU-s* divides by the process's CPU time instead of wall time: for "
        "1-thread runs it is what one core delivers while we hold it, i.e. it removes the time other jobs "
        "held the core (wall tok/s is what this shared machine actually gave).",
        "",
        "| variant | threads | params (trainable) | measured steps | trained tok/s | target tok/s | examples/s "
        "| s/step | padding | CPU/wall | tok per CPU-s | vs ref (wall / CPU) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in s:
        tr = r["tokens_per_s_range"]
        vs = " / ".join(
            "-" if r[k] is None else f"{r[k]:.2f}x"
            for k in ("tokens_per_s_vs_ref", "tokens_per_cpu_s_vs_ref")
        )
        lines.append(
            f"| {r['variant']} | {r['threads']} | {r['params'] / 1e6:.2f}M ({r['trainable_params'] / 1e6:.2f}M) "
            f"| {r['measured_steps']} | {fmt(r['tokens_per_s'])} [{fmt(tr[0])}-{fmt(tr[1])}] "
            f"| {fmt(r['target_tokens_per_s'])} | {fmt(r['examples_per_s'], 1)} | {r['mean_step_s']:.3f} "
            f"| {100 * r['padding_fraction']:.0f}% | {r['cpu_per_wall']:.2f} | {fmt(r['tokens_per_cpu_s'])} "
            f"| {vs} |"
        )
    lines += [
        "",
        "## seq2seq (one causal pass per sequence) vs sliding windows, same supervised targets",
        "",
        f"Training sequences: {ep['sequences']:,} (mean length {ep['mean_seq_len']:.2f}, max {ep['max_seq_len']}), "
        f"SID length {ep['sid_len']}, max_history {ep['max_history']}. Both formats supervise the same "
        f"{ep['seq2seq']['target_tokens']:,} target tokens ({ep['seq2seq']['target_tokens'] // ep['sid_len']:,} "
        "next-item targets) per epoch.",
        "",
        "| format | rows/epoch | tokens/epoch | target tokens/epoch | tokens per target | steps/epoch "
        "| est. epoch time, tiny (wall / CPU) | est. epoch time, small (wall / CPU) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f in ("seq2seq", "sliding"):
        e = ep[f]
        lines.append(
            f"| {f} | {e['rows']:,} | {e['tokens']:,} | {e['target_tokens']:,} "
            f"| {e['tokens'] / e['target_tokens']:.2f} | {e['steps']:,} "
            + "".join(
                f"| {e.get(f'epoch_s_{p}', float('nan')):.0f} s / "
                f"{e.get(f'epoch_cpu_s_{p}', float('nan')):.0f} s "
                for p in ("tiny", "small")
            )
            + "|"
        )
    lines += [
        "",
        f"Sliding windows need **{ep['token_ratio']:.2f}x the tokens** and {ep['row_ratio']:.2f}x the rows of the "
        f"one-pass format for the same targets; estimated time per epoch (tokens/epoch / measured tokens/s) "
        + ", ".join(
            f"**{ep['time_ratio_' + p]:.2f}x** on {p} (CPU time: {ep['time_ratio_cpu_' + p]:.2f}x, "
            f"range over repeats {ep['time_ratio_cpu_' + p + '_range'][0]:.2f}-"
            f"{ep['time_ratio_cpu_' + p + '_range'][1]:.2f}x; steps/epoch x mean s/step gives "
            f"{ep['time_ratio_cpu_' + p + '_by_steps']:.2f}x)"
            for p in ("tiny", "small")
            if f"time_ratio_{p}" in ep
        )
        + " (median paired over repeats). Sequences here are short (mean "
        f"{ep['mean_seq_len']:.1f} items). Per sequence of L items, sliding windows cost O(L * min(L, H)) "
        "tokens (O(L^2) up to the history cap H) against O(L) for one pass, so the gap widens with "
        "longer histories until H caps it near (H + 1) / 2; closed form (`seq2seq_tokens_closed_form`, "
        f"SID length {ep['sid_len']}, H = {ep['max_history']}, tokens per sequence):",
        "",
        "| L (items) | " + " | ".join(str(c["L"]) for c in ep["closed_form"]) + " |",
        "|---|" + "---|" * len(ep["closed_form"]),
        "| seq2seq tokens | " + " | ".join(str(c["seq2seq_tokens"]) for c in ep["closed_form"]) + " |",
        "| sliding tokens | " + " | ".join(str(c["sliding_tokens"]) for c in ep["closed_form"]) + " |",
        "| ratio | " + " | ".join(f"{c['ratio']:.1f}x" for c in ep["closed_form"]) + " |",
        "",
    ]
    if "mixture" in payload:
        m = payload["mixture"]
        lines += [
            "## Recipe mixture (tiny)",
            "",
            f"`{payload['recipe_path']}` task mixture: {m['rows']:,} rows, {m['tokens']:,} tokens, "
            f"{m['steps']:,} steps per epoch; estimated {m['epoch_s'] / 60:.1f} min wall "
            f"({m['epoch_cpu_s'] / 60:.1f} min of CPU time) per epoch of training steps alone ({m['epochs']} epochs: "
            f"{m['epochs'] * m['epoch_s'] / 60:.0f} min wall, without evaluation and checkpointing).",
            "",
        ]
    lines += [
        "Notes: absolute numbers move with the load other jobs put on the 2 shared cores (ranges in "
        "brackets are min-max over repeats; CPU/wall = process CPU seconds per wall second over the measured "
        "steps, 2.0 would be both cores fully ours; 1-min load average before the runs: "
        f"{min(r['loadavg_range'][0] for r in s):.1f}-{max(r['loadavg_range'][1] for r in s):.1f}); "
        "the paired ratios are the steadier quantities. LoRA "
        "`lora_qv_save_emb` is README's recipe for a real LLM (r=16 on q/v plus fully trained "
        "`embed_tokens`/`lm_head` as modules_to_save so the new SID rows learn; peft 0.21 trains them as two "
        "separate, untied copies of the tied matrix, hence more parameters than the full model, and warns that "
        "`ensure_weight_tying` is not set); `lora_all` puts adapters on every linear "
        "layer and freezes embeddings (it cannot learn the SID rows of a from-scratch model; shown for cost only).",
        "",
    ]
    if any(r["threads"] > 1 for r in s):
        lines += [
            "Threads: the 2-thread run was measured under the load above, with the machine's two cores "
            "oversubscribed; it also spends several times the CPU seconds per token, consistent with intra-op "
            "threads waiting at barriers for a peer that another job has descheduled (not verified). Its slowdown "
            "is a property of this shared machine at that load, not of an idle 2-core machine, which this "
            "benchmark could not get.",
            "",
        ]
    lines += [
        "![throughput](training_throughput.png)",
        "",
    ]
    atomic_write_text(path, "\n".join(lines))


def plot(path: Path, payload: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = payload["summary"]
    ep = payload["epoch"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [2, 1]})
    names = [r["variant"] for r in s]
    y = list(range(len(s)))
    vals = [r["tokens_per_s"] for r in s]
    err = [
        [r["tokens_per_s"] - r["tokens_per_s_range"][0] for r in s],
        [r["tokens_per_s_range"][1] - r["tokens_per_s"] for r in s],
    ]
    axes[0].barh([i - 0.2 for i in y], vals, height=0.4, xerr=err, color="tab:blue", label="per wall second")
    axes[0].barh(
        [i + 0.2 for i in y],
        [r["tokens_per_cpu_s"] for r in s],
        height=0.4,
        color="tab:gray",
        label="per process CPU second",
    )
    axes[0].set_yticks(y, names)
    axes[0].invert_yaxis()
    axes[0].set_xlim(0, 1.5 * max(max(r["tokens_per_cpu_s"], r["tokens_per_s_range"][1]) for r in s))
    axes[0].legend(loc="upper right")
    axes[0].set_xlabel("trained (non-padding) tokens/s, median [min-max] over repeats")
    cores = (
        payload["machine"]["cores_usable"] if "machine" in payload else payload["hardware"].split(" CPU")[0]
    )
    axes[0].set_title(f"SFT throughput, {cores} CPU cores")
    labels, secs, cpus = [], [], []
    for p in ("tiny", "small"):
        for f in ("seq2seq", "sliding"):
            if f"epoch_s_{p}" in ep[f]:
                labels.append(f"{p}\n{f}")
                secs.append(ep[f][f"epoch_s_{p}"] / 60)
                cpus.append(ep[f][f"epoch_cpu_s_{p}"] / 60)
    x = list(range(len(labels)))
    axes[1].bar([i - 0.2 for i in x], secs, width=0.4, color="tab:blue", label="wall")
    axes[1].bar([i + 0.2 for i in x], cpus, width=0.4, color="tab:gray", label="CPU")
    axes[1].set_xticks(x, labels)
    axes[1].legend()
    axes[1].set_ylabel("est. minutes per epoch (same targets)")
    axes[1].set_title("one pass vs sliding windows")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--config", default="recipes/configs/sft_scientific.yaml", help="SFT recipe YAML (batching, lr)"
    )
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=float, default=1.0, help="multiplier on each variant's measured steps")
    ap.add_argument("--skip", nargs="*", default=[], help="variant names to leave out (e.g. base)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--budget_s",
        type=float,
        default=540,
        help="start another repeat only if it is expected to end within this wall time",
    )
    ap.add_argument("--out", default="docs/results/training_throughput")
    ap.add_argument(
        "--rerender", action="store_true", help="only rewrite the .md/.png from the existing .json"
    )
    args = ap.parse_args()
    out = ROOT / args.out if not Path(args.out).is_absolute() else Path(args.out)
    if args.rerender:
        payload = json.loads(out.with_suffix(".json").read_text())
        plot(out.with_suffix(".png"), payload)
        write_markdown(out.with_suffix(".md"), payload)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for name in ("transformers", "trl", "peft", "datasets", "sid_tokenizer", "httpx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    t_start = time.perf_counter()
    recipe_path = Path(args.config) if Path(args.config).is_absolute() else ROOT / args.config
    script_args, training_args, model_args = parse_sft_recipe(recipe_path)
    if model_args.model_name_or_path != "default":
        raise SystemExit(
            f"{recipe_path}: model_name_or_path is {model_args.model_name_or_path!r}; this benchmark compares "
            "presets of the offline default model (model_name_or_path: default)"
        )
    recipe = recipe_summary(script_args, training_args)
    include_valid = script_args.include_valid_in_train
    from recipes.model import prepare_base_checkpoint
    from sid_tokenizer.catalog import load_sid_dir

    dataset = RecDataset.load(ROOT / recipe["dataset_dir"])
    index = load_sid_dir(ROOT / recipe["sid_dir"], dataset)
    H, bs, max_len = recipe["max_history"], recipe["batch_size"], recipe["max_length"]

    variants = [
        Variant("tiny seq2seq full", "tiny", "seq2seq", steps=10),
        Variant("small seq2seq full", "small", "seq2seq", steps=6),
        Variant("base seq2seq full", "base", "seq2seq", steps=3),
        Variant("tiny sliding full", "tiny", "sliding", steps=10),
        Variant("small sliding full", "small", "sliding", steps=6),
        Variant("small seq2seq LoRA q,v +emb", "small", "seq2seq", peft="lora_qv_save_emb", steps=5),
        Variant("small seq2seq LoRA all-linear", "small", "seq2seq", peft="lora_all", steps=5),
        Variant("small seq2seq full, 2 threads", "small", "seq2seq", threads=2, steps=4),
        Variant("tiny recipe mixture full", "tiny", "mixture", steps=6),
    ]
    variants = [v for v in variants if v.name not in args.skip and v.preset not in args.skip]
    for v in variants:
        v.steps = max(2, round(v.steps * args.steps))
    reference = "small seq2seq full"

    tmp = Path(tempfile.mkdtemp(prefix="sidrec_tput_"))
    bases, tokenizers = {}, {}
    from transformers import AutoTokenizer

    for preset in dict.fromkeys(v.preset for v in variants):
        t = time.perf_counter()
        bases[preset] = prepare_base_checkpoint(
            tmp / preset / "base",
            dataset,
            index,
            model_args.model_name_or_path,
            preset=preset,
            sid_init=script_args.sid_embedding_init,
            seed=training_args.seed,
            sid_dir=recipe["sid_dir"],
            dataset_dir=recipe["dataset_dir"],
        )
        tokenizers[preset] = AutoTokenizer.from_pretrained(bases[preset])
        logger.info("base checkpoint %s in %.1fs", preset, time.perf_counter() - t)

    # rows -> tokenised columns, per (preset, data); seq2seq/sliding rows are SID tokens only
    rows_by_data = {
        "seq2seq": build_mixture(
            dataset,
            index,
            {"seq2seq": 1.0},
            tokenizers["tiny"],
            seed=script_args.seed_data,
            max_history=H,
            include_valid=include_valid,
        ),
        "sliding": sliding_window_rows(dataset, index, H, include_valid),
    }
    columns: dict[tuple[str, str], dict] = {}
    for v in variants:
        key = (v.preset, v.data)
        if key in columns:
            continue
        if v.data == "mixture":
            rows = build_mixture(
                dataset,
                index,
                script_args.tasks,
                tokenizers[v.preset],
                seed=script_args.seed_data,
                max_history=H,
                include_valid=include_valid,
            )
        else:
            rows = rows_by_data[v.data]
        columns[key] = tokenize_rows(rows, tokenizers[v.preset], max_len)
    counts = {k: token_counts(c) for k, c in columns.items()}
    for (p, d), c in counts.items():
        if d != "mixture" and c != counts[("tiny", d)]:
            raise RuntimeError(f"{p}/{d}: token counts differ across presets: {c} vs {counts[('tiny', d)]}")
    s2s, sw = counts[("tiny", "seq2seq")], counts[("tiny", "sliding")]
    if s2s["target_tokens"] != sw["target_tokens"]:
        raise RuntimeError(f"seq2seq and sliding windows supervise different targets: {s2s} vs {sw}")

    # one epoch's batches per (preset, data); each run gets fresh random batches of it
    rng = random.Random(args.seed)
    epoch = {
        key: epoch_batches([len(x) for x in c["input_ids"]], bs, args.seed) for key, c in columns.items()
    }
    results = []
    picked: dict = {}  # (preset, data), repeat -> batches shared by the variants of that key
    t_loop = time.perf_counter()
    for rep in range(args.repeats):
        spent = time.perf_counter() - t_start
        if rep > 0 and spent + (time.perf_counter() - t_loop) / rep > args.budget_s:
            logger.info("stopping after %d repeats: %.0fs spent, budget %.0fs", rep, spent, args.budget_s)
            break
        order = variants if rep % 2 == 0 else variants[::-1]
        for v in order:
            key = (v.preset, v.data)
            if (key, rep) not in picked:
                # full batches only: a short one in the middle would shift the sequential loader's boundaries
                full = [i for i, b in enumerate(epoch[key]) if len(b) == bs]
                n = args.warmup + max(u.steps for u in variants if (u.preset, u.data) == key)
                picked[(key, rep)] = [epoch[key][i] for i in rng.sample(full, n)]
            batches = picked[(key, rep)][: args.warmup + v.steps]
            t = time.perf_counter()
            r = run_variant(v, bases[v.preset], columns[key], batches, args.warmup, recipe_path, tmp / "runs")
            r["repeat"] = rep
            results.append(r)
            logger.info(
                "rep %d %-32s %7.0f tok/s %7.0f target tok/s %6.1f ex/s %.3f s/step (%d threads) [%.0fs]",
                rep,
                v.name,
                r["tokens_per_s"],
                r["target_tokens_per_s"],
                r["examples_per_s"],
                r["mean_step_s"],
                r["threads"],
                time.perf_counter() - t,
            )

    summary = summarise(results, variants, reference)
    seqs = list(training_sequences(dataset, include_valid))
    sid_len = len(index.vocab.level_sizes)
    ep = {
        "sequences": len(seqs),
        "mean_seq_len": sum(map(len, seqs)) / len(seqs),
        "max_seq_len": max(map(len, seqs)),
        "sid_len": sid_len,
        "max_history": H,
        "batch_size": bs,
    }
    for f, c in (("seq2seq", s2s), ("sliding", sw)):
        ep[f] = dict(c, steps=math.ceil(c["rows"] / bs))
    ep["token_ratio"] = sw["tokens"] / s2s["tokens"]
    ep["row_ratio"] = sw["rows"] / s2s["rows"]
    by = {(r["variant"], r["repeat"]): r for r in results}
    for p in ("tiny", "small"):
        a, b = f"{p} seq2seq full", f"{p} sliding full"
        reps = [k for k in range(args.repeats) if (a, k) in by and (b, k) in by]
        if not reps:
            continue
        # epoch time = tokens per epoch / measured tokens per second (token-weighted: the sampled batches'
        # lengths vary ~10x, so this is steadier than steps per epoch x mean s/step, kept as *_by_steps)
        for kind, col, step_col in (
            ("", "tokens_per_s", "mean_step_s"),
            ("cpu_", "tokens_per_cpu_s", "mean_step_cpu_s"),
        ):
            ratios = [
                (ep["sliding"]["tokens"] / by[(b, k)][col]) / (ep["seq2seq"]["tokens"] / by[(a, k)][col])
                for k in reps
            ]
            ep[f"time_ratio_{kind}{p}"] = statistics.median(ratios)
            ep[f"time_ratio_{kind}{p}_range"] = [min(ratios), max(ratios)]
            by_steps = [
                (ep["sliding"]["steps"] * by[(b, k)][step_col])
                / (ep["seq2seq"]["steps"] * by[(a, k)][step_col])
                for k in reps
            ]
            ep[f"time_ratio_{kind}{p}_by_steps"] = statistics.median(by_steps)
            ep[f"time_ratio_{kind}{p}_by_steps_range"] = [min(by_steps), max(by_steps)]
            for f, name in (("seq2seq", a), ("sliding", b)):
                ep[f][f"epoch_{kind}s_{p}"] = ep[f]["tokens"] / statistics.median(
                    by[(name, k)][col] for k in reps
                )
    ep["closed_form"] = []
    for L in (2, 5, 10, 20, 40, 100):
        one, sl = seq2seq_tokens_closed_form([L], sid_len, H)
        ep["closed_form"].append({"L": L, "seq2seq_tokens": one, "sliding_tokens": sl, "ratio": sl / one})

    payload = {
        "command": "python benchmarks/training_throughput.py " + " ".join(sys.argv[1:]),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        "recipe_path": str(args.config),
        "recipe": recipe,
        "recipe_parser": "TrlParser((SidSFTArgs, SFTConfig, ModelConfig))",
        "warmup": args.warmup,
        "repeats": len({r["repeat"] for r in results}),
        "reference": reference,
        "summary": summary,
        "epoch": ep,
        "runs": results,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    mix = [k for k in columns if k[1] == "mixture"]
    if mix:
        c = counts[mix[0]]
        name = next(v.name for v in variants if v.data == "mixture")
        steps = math.ceil(c["rows"] / bs)
        med = (
            c["tokens"]
            / steps
            / statistics.median(r["tokens_per_s"] for r in results if r["variant"] == name)
        )
        med_cpu = (
            c["tokens"]
            / steps
            / statistics.median(r["tokens_per_cpu_s"] for r in results if r["variant"] == name)
        )
        payload["mixture"] = dict(
            c,
            steps=steps,
            epoch_s=steps * med,
            epoch_cpu_s=steps * med_cpu,
            epochs=training_args.num_train_epochs,
            tasks=script_args.tasks,
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out.with_suffix(".json"), payload)
    plot(out.with_suffix(".png"), payload)
    write_markdown(out.with_suffix(".md"), payload)
    shutil.rmtree(tmp, ignore_errors=True)  # base checkpoints and trainer dirs of this run
    logger.info("wrote %s.{json,md,png} in %.0fs", out, payload["wall_s"])
    print(json.dumps({r["variant"]: round(r["tokens_per_s"]) for r in summary}))


if __name__ == "__main__":
    main()
