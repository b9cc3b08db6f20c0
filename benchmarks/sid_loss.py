"""SFT step throughput and peak memory: full-vocabulary loss (TRL's fused LM head) vs the
SID-restricted loss (``recipes.sid_loss``), through ``SidSFTTrainer`` on the demo recipe's batches.

    python benchmarks/sid_loss.py [--config recipes/configs/sft_demo.yaml] [--steps 30] [--repeats 2]

The demo recipe's task mixture is built on the vendored Scientific data (RK-Means SIDs), the
epoch's ``group_by_length`` batches are drawn once, and each (variant, repeat) trains the same
``warmup + steps`` batches from the same base checkpoint in a fresh child process (so its peak
RSS is its own; variants interleave over repeats so load from other jobs hits both alike). Step
time is the wall time between ``on_step_end`` callbacks after the warm-up steps; tokens/s counts
non-padding input tokens. Memory: the child's peak RSS minus its RSS before ``train()``, plus the
logits each loss builds per step (full: TRL on CPU projects every position of the padded batch onto
V; restricted: K_l per SID-labelled position, V per text-labelled position). Writes
``docs/results/sid_loss.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402

from data_prep.dataset import RecDataset  # noqa: E402
from data_prep.io import atomic_write_json, atomic_write_text  # noqa: E402

VARIANTS = ("full", "restricted")


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def prepare(work: Path, config: Path, num_batches: int, seed: int, overrides: dict | None = None) -> dict:
    """Dataset, SIDs, base checkpoint and the tokenised batches (saved as JSON for the children).
    ``overrides``: recipe keys replaced (``model_name_or_path``, ``per_device_train_batch_size``,
    ``max_length``), e.g. the 151k-vocabulary ``qwen2.5-0.5b-random-2layer``."""
    from transformers import AutoTokenizer
    from transformers.trainer_pt_utils import get_length_grouped_indices

    from recipes.model import prepare_base_checkpoint
    from recipes.tasks import build_mixture, tokenize_rows
    from sid_tokenizer.catalog import load_sid_dir

    recipe = {**yaml.safe_load(config.read_text()), **(overrides or {})}
    ds_dir, sid_dir = work / "dataset", work / "sid"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for cmd in (
        [
            "-m",
            "data_prep.prepare",
            "--config",
            "data_prep/configs/scientific.yaml",
            "--output_dir",
            str(ds_dir),
        ],
        [
            "-m",
            "sid_tokenizer.build",
            "--config",
            "sid_tokenizer/configs/scientific_rkmeans.yaml",
            "--dataset_dir",
            str(ds_dir),
            "--output_dir",
            str(sid_dir),
        ],
    ):
        subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env, check=True, capture_output=True)
    dataset = RecDataset.load(ds_dir)
    index = load_sid_dir(sid_dir, dataset)
    base = prepare_base_checkpoint(
        work / "base",
        dataset,
        index,
        recipe.get("model_name_or_path") or "default",
        preset=recipe["model_preset"],
        seed=recipe["seed"],
        sid_dir=str(sid_dir),
        dataset_dir=str(ds_dir),
    )
    tokenizer = AutoTokenizer.from_pretrained(base)
    rows = build_mixture(
        dataset, index, recipe["tasks"], tokenizer, seed=0, max_history=recipe["max_history"]
    )
    cols = tokenize_rows(rows, tokenizer, recipe["max_length"])
    bs = recipe["per_device_train_batch_size"]
    order = get_length_grouped_indices(
        [len(x) for x in cols["input_ids"]], bs, generator=torch.Generator().manual_seed(seed)
    )
    batches = [order[i : i + bs] for i in range(0, len(order) - bs + 1, bs)]
    picked = [
        batches[i]
        for i in torch.randperm(len(batches), generator=torch.Generator().manual_seed(seed))[
            :num_batches
        ].tolist()
    ]
    flat = [i for b in picked for i in b]
    data = {
        "input_ids": [cols["input_ids"][i] for i in flat],
        "labels": [cols["labels"][i] for i in flat],
        "batch_size": bs,
        "recipe": recipe,
        "base": str(base),
        "vocab_size": len(tokenizer),
        "level_sizes": list(index.vocab.level_sizes),
    }
    atomic_write_json(work / "batches.json", data)
    return data


def child(work: Path, variant: str, warmup: int, threads: int) -> dict:
    """One training run of ``variant`` on the saved batches; returns timings and memory."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig

    from recipes.sft_trainer import SidSFTTrainer
    from recipes.sid_loss import SidLevels
    from sid_tokenizer.sid import SidVocab

    torch.set_num_threads(threads)
    data = json.loads((work / "batches.json").read_text())
    recipe, bs = data["recipe"], data["batch_size"]
    tokenizer = AutoTokenizer.from_pretrained(data["base"])
    model = AutoModelForCausalLM.from_pretrained(data["base"], dtype="auto")
    levels = SidLevels.from_tokenizer(tokenizer, SidVocab(tuple(data["level_sizes"])))
    ds = Dataset.from_dict({"input_ids": data["input_ids"], "labels": data["labels"]})
    steps = len(data["input_ids"]) // bs
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            times.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter())

    args = SFTConfig(
        output_dir=str(work / f"trainer_{variant}"),
        max_steps=steps,
        per_device_train_batch_size=bs,
        learning_rate=recipe["learning_rate"],
        lr_scheduler_type=recipe["lr_scheduler_type"],
        warmup_steps=recipe["warmup_steps"],
        weight_decay=recipe["weight_decay"],
        max_length=recipe["max_length"],
        train_sampling_strategy="sequential",
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        seed=recipe["seed"],
        dataloader_num_workers=0,
        bf16=False,
        disable_tqdm=True,
        gradient_checkpointing=False,
    )
    trainer = SidSFTTrainer(
        model=model,
        args=args,
        train_dataset=ds,
        processing_class=tokenizer,
        callbacks=[Clock()],
        rank_eval=None,
        sid_levels=levels if variant == "restricted" else None,
    )
    before = rss_mib()
    trainer.train()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    step_s = [b - a for a, b in zip(times[warmup:-1], times[warmup + 1 :], strict=True)]
    measured = range(warmup, steps)
    tokens = sum(len(data["input_ids"][i]) for s in measured for i in range(s * bs, (s + 1) * bs))
    # logits built per step by each loss (elements), over the measured batches
    sid_lo = min(levels.ids[0].tolist())
    logit_elems = []
    for s in measured:
        rows = range(s * bs, (s + 1) * bs)
        width = max(len(data["input_ids"][i]) for i in rows)
        if variant == "full":
            logit_elems.append(bs * (width - 1) * data["vocab_size"])
        else:
            lab = [t for i in rows for t in data["labels"][i][1:] if t != -100]
            n_sid = sum(1 for t in lab if t >= sid_lo)
            logit_elems.append(n_sid * max(data["level_sizes"]) + (len(lab) - n_sid) * data["vocab_size"])
    return {
        "variant": variant,
        "threads": torch.get_num_threads(),
        "steps_measured": len(step_s),
        "step_seconds_median": statistics.median(step_s),
        "tokens_per_second": tokens / sum(step_s),
        "rss_before_train_mib": round(before, 1),
        "peak_rss_mib": round(peak, 1),
        "train_rss_growth_mib": round(peak - before, 1),
        "logits_mib_per_step_mean": round(4 * statistics.mean(logit_elems) / 2**20, 2),
        "load_1min": os.getloadavg()[0],
    }


def _model_text(payload: dict) -> str:
    model = payload.get("model", "default")
    return f"offline default `{payload['preset']}` decoder" if model == "default" else f"`{model}`"


def write_markdown(path: Path, payload: dict) -> None:
    s = payload["summary"]
    lines = [
        "# SFT throughput and memory: full-vocabulary vs SID-restricted loss",
        "",
        f"Command: `{payload['command']}`  ",
        f"Machine: {payload['machine']}; measured {payload['date']} (load average during runs: "
        f"{payload['load_range'][0]:.1f}-{payload['load_range'][1]:.1f}, so absolute speeds are those of a busy box; "
        "the ratio is paired per repeat).  ",
        f"Model: {_model_text(payload)}, vocabulary {payload['vocab_size']:,} "
        f"(SID levels {payload['level_sizes']}); batches: {payload['steps']} measured + {payload['warmup']} warm-up "
        f"steps of the demo recipe's task mixture (batch {payload.get('batch_size', 32)}, max_length "
        f"{payload.get('max_length', 192)}, group_by_length), same batches for both losses; "
        f"{payload['threads']} torch thread(s).",
        "",
        "| loss | step s (median) | tokens/s | peak RSS MiB | RSS growth in train() MiB | logits MiB/step |",
        "|---|---|---|---|---|---|",
    ]
    for v in VARIANTS:
        r = s[v]
        lines.append(
            f"| {v} | {r['step_seconds_median']:.3f} | {r['tokens_per_second']:.0f} | {r['peak_rss_mib']:.0f} | "
            f"{r['train_rss_growth_mib']:.0f} | {r['logits_mib_per_step_mean']:.1f} |"
        )
    lines += [
        "",
        f"Restricted / full tokens/s (paired per repeat): {', '.join(f'{x:.2f}x' for x in s['speedup_per_repeat'])}.",
        "",
        "Full = TRL 1.16's fused LM head (on CPU it projects every position of the padded batch onto the whole "
        "vocabulary, in chunks); restricted = `recipes.sid_loss` (SID-labelled positions: the label level's "
        "rows only; text labels: full vocabulary, chunked and recomputed in backward)."
        + (
            " The 151k-vocabulary model: `--model qwen2.5-0.5b-random-2layer` ([sid_loss_151k.md](sid_loss_151k.md))."
            if payload.get("model", "default") == "default"
            else ""
        ),
    ]
    atomic_write_text(path, "\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="recipes/configs/sft_demo.yaml")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_prefix", default="docs/results/sid_loss")
    p.add_argument(
        "--model", help="model_name_or_path instead of the recipe's (e.g. qwen2.5-0.5b-random-2layer)"
    )
    p.add_argument("--batch_size", type=int, help="per_device_train_batch_size instead of the recipe's")
    p.add_argument("--max_length", type=int, help="max_length instead of the recipe's")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(Path(a.workdir), a.child, a.warmup, a.threads)))
        return
    with tempfile.TemporaryDirectory(prefix="sid_loss_bench_") as tmp:
        work = Path(tmp)
        over = {
            "model_name_or_path": a.model,
            "per_device_train_batch_size": a.batch_size,
            "max_length": a.max_length,
        }
        data = prepare(
            work, ROOT / a.config, a.steps + a.warmup, a.seed, {k: v for k, v in over.items() if v}
        )
        runs = []
        for rep in range(a.repeats):
            for v in VARIANTS if rep % 2 == 0 else VARIANTS[::-1]:
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--child",
                        v,
                        "--workdir",
                        str(work),
                        "--warmup",
                        str(a.warmup),
                        "--threads",
                        str(a.threads),
                    ],
                    cwd=ROOT,
                    env={**os.environ, "PYTHONPATH": str(ROOT)},
                    check=True,
                    capture_output=True,
                    text=True,
                )
                runs.append({**json.loads(out.stdout.strip().splitlines()[-1]), "repeat": rep})
                print(runs[-1], flush=True)
    summary: dict = {}
    for v in VARIANTS:
        rs = [r for r in runs if r["variant"] == v]
        summary[v] = {
            k: statistics.median(r[k] for r in rs) for k in rs[0] if isinstance(rs[0][k], int | float)
        }
    summary["speedup_per_repeat"] = [
        next(r["tokens_per_second"] for r in runs if r["repeat"] == rep and r["variant"] == "restricted")
        / next(r["tokens_per_second"] for r in runs if r["repeat"] == rep and r["variant"] == "full")
        for rep in range(a.repeats)
    ]
    loads = [r["load_1min"] for r in runs]
    payload = {
        "command": "python benchmarks/sid_loss.py " + " ".join(sys.argv[1:]),
        "machine": "2 shared CPU cores",
        "cpu": platform.processor() or platform.machine(),
        "date": dt.date.today().isoformat(),
        "torch": torch.__version__,
        "preset": data["recipe"]["model_preset"],
        "model": data["recipe"].get("model_name_or_path") or "default",
        "batch_size": data["batch_size"],
        "max_length": data["recipe"]["max_length"],
        "vocab_size": data["vocab_size"],
        "level_sizes": data["level_sizes"],
        "steps": a.steps,
        "warmup": a.warmup,
        "threads": a.threads,
        "load_range": [min(loads), max(loads)],
        "runs": runs,
        "summary": summary,
    }
    atomic_write_json(ROOT / f"{a.output_prefix}.json", payload)
    write_markdown(ROOT / f"{a.output_prefix}.md", payload)


if __name__ == "__main__":
    main()
