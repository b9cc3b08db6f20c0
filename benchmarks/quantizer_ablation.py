"""Quantizer ablation (GRID-style) on Scientific: same SFT recipe and budget, one SID index per quantizer.

    python -m benchmarks.quantizer_ablation [--epochs 16]           # every variant, one after another
    python -m benchmarks.quantizer_ablation --report_only true      # only (re)write the report

For every quantizer (the SID index ``outputs/scientific/sid_<q>``, built if missing by
``python -m sid_tokenizer.build --config sid_tokenizer/configs/scientific_<q>.yaml``) plus a
``random`` control (random *unique* 3 x 256 codes, no semantic structure, imported into
``outputs/ablation/sid_random`` through ``sid_tokenizer.build``'s ``index_path`` mode), each
stage a subprocess of the project's own entry point, its output appended to
``outputs/ablation/logs/<stage>_<q>.log``:

1. ``python recipes/sft.py --config recipes/configs/sft_ablation_scientific.yaml --dataset_dir ...
   --sid_dir ... --output_dir outputs/ablation/<q> --num_train_epochs <epochs>`` (tiny default
   decoder, seq2seq task only, same seed; the best checkpoint on validation NDCG@10 is saved as ``final``);
2. ``python -m eval.evaluate --config eval/configs/scientific_sft.yaml --checkpoint
   outputs/ablation/<q>/final --splits valid test --also_unconstrained false`` on all users;
3. ``python -m benchmarks.quantizer_ablation --per_user_for <q>``: the same beam search again,
   keeping per-user metrics (``per_user.npz``) for paired differences to ``paired_base``;
4. ``docs/results/quantizer_ablation.{json,md,png}``: collisions before resolution, codebook
   utilisation/entropy (each index's ``report.json``), valid/test HR@10 and NDCG@10 with bootstrap
   95% CIs, paired differences, training and evaluation wall time, commands, machine.

Resumable: a stage whose artifact is complete (``index.json``, ``final/``, ``eval/metrics.json``,
``per_user.npz``; each written atomically) is skipped, and a killed training resumes from its last
checkpoint. Stages run with ``--threads`` OpenMP threads (1 by default). To run variants side by
side, start one process per variant with ``--only`` (it runs that variant's stages and writes no
report) under any process runner, then write the report once::

    printf '%s\\n' rkmeans balanced rqvae rvq random \\
        | xargs -P 2 -I{} python -m benchmarks.quantizer_ablation --epochs 16 --only {}
    python -m benchmarks.quantizer_ablation --epochs 16 --report_only true

To keep the code fixed under a run that takes hours while the checkout changes, run it from its
own ``git worktree`` at a pinned commit (with ``outputs`` linked to the shared one).
"""

from __future__ import annotations

import datetime as _dt
import io
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Run as a script (python benchmarks/quantizer_ablation.py), this folder would come first on
# sys.path and benchmarks/sid_tokenizer.py would shadow the sid_tokenizer package.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks.common import describe_machine, evaluate_cmd, machine_info, stage_env  # noqa: E402
from data_prep.io import (  # noqa: E402
    atomic_save_figure,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    read_json,
)

logger = logging.getLogger(__name__)


@dataclass
class AblationArgs:
    quantizers: list[str] = field(
        default_factory=lambda: ["rkmeans", "balanced", "rqvae", "rvq", "random"],
        metadata={"help": "registered quantizers (outputs/scientific/sid_<q>) and/or 'random' (the control)"},
    )
    only: str | None = field(
        default=None, metadata={"help": "run the stages of this one variant and write no report"}
    )
    epochs: int = field(default=16, metadata={"help": "num_train_epochs, the same for every quantizer"})
    threads: int = field(default=1, metadata={"help": "OMP_NUM_THREADS / MKL_NUM_THREADS of every stage"})
    dataset_dir: str = "outputs/scientific/dataset"
    sid_root: str = field(
        default="outputs/scientific", metadata={"help": "holds sid_<q> for real quantizers"}
    )
    output_root: str = "outputs/ablation"
    report_dir: str = "docs/results"
    sft_config: str = "recipes/configs/sft_ablation_scientific.yaml"
    eval_config: str = "eval/configs/scientific_sft.yaml"
    random_seed: int = 0
    report_only: bool = False
    paired: bool = field(
        default=True,
        metadata={
            "help": "also save per-user metrics (a re-run of the same beam search) for paired differences"
        },
    )
    paired_base: str = field(default="rkmeans", metadata={"help": "paired differences are to this quantizer"})
    notes_md: str | None = field(
        default="docs/results/quantizer_ablation.notes.md",
        metadata={"help": "hand-written notes on the run, included under '## Notes' when the file exists"},
    )
    per_user_for: str | None = field(default=None, metadata={"help": "internal: the per-user stage of one q"})


# ---- the random control ---------------------------------------------------------------------
def random_codes(num_items: int, num_levels: int = 3, codebook_size: int = 256, seed: int = 0) -> np.ndarray:
    """(num_items, num_levels) int64 codes drawn uniformly without replacement from the K^L cells.

    Every item gets a distinct SID (no collisions to resolve), with no relation to its content.
    """
    cells = codebook_size**num_levels
    if num_items > cells:
        raise ValueError(
            f"{num_items} items do not fit in {codebook_size}^{num_levels} = {cells} distinct SIDs"
        )
    flat = np.random.default_rng(seed).choice(cells, size=num_items, replace=False)
    return np.stack(np.unravel_index(flat, (codebook_size,) * num_levels), axis=1).astype(np.int64)


def random_assignment_error(embeddings: np.ndarray, codes: np.ndarray) -> float:
    """Relative error of the best additive residual reconstruction for *fixed* codes
    (each codeword = mean residual of its items, level by level), to compare with the quantizers."""
    x = np.asarray(embeddings, dtype=np.float64)
    residual = x.copy()
    for lv in range(codes.shape[1]):
        k = int(codes[:, lv].max()) + 1
        sums = np.zeros((k, x.shape[1]))
        np.add.at(sums, codes[:, lv], residual)
        means = sums / np.maximum(np.bincount(codes[:, lv], minlength=k), 1)[:, None]
        residual -= means[codes[:, lv]]
    return float((residual**2).sum() / (x**2).sum())


RANDOM_LEVELS = (256, 256, 256)


def random_index_path(args: AblationArgs) -> Path:
    return Path(args.output_root) / "sid_random_index.json"


def write_random_index(args: AblationArgs) -> Path:
    """The random control's codes as a third-party ``index.json`` for ``sid_tokenizer.build``."""
    from data_prep.dataset import RecDataset
    from sid_tokenizer.sid import SidIndex, SidVocab

    ds = RecDataset.load(args.dataset_dir)
    codes = random_codes(ds.num_items, len(RANDOM_LEVELS), RANDOM_LEVELS[0], args.random_seed)
    path = random_index_path(args)
    path.parent.mkdir(parents=True, exist_ok=True)
    SidIndex(codes, SidVocab(RANDOM_LEVELS), raw_ids=[it.raw_id for it in ds.items]).save(path)
    return path


# ---- stages ------------------------------------------------------------------------------------
def sid_dir_for(args: AblationArgs, q: str) -> Path:
    return Path(args.output_root) / "sid_random" if q == "random" else Path(args.sid_root) / f"sid_{q}"


def sid_cmd(args: AblationArgs, q: str) -> list[str]:
    cmd = [sys.executable, "-m", "sid_tokenizer.build"]
    if q == "random":
        cmd += ["--index_path", str(random_index_path(args)), "--level_sizes", *map(str, RANDOM_LEVELS)]
        cmd += ["--collision_strategy", "none", "--seed", str(args.random_seed)]
    else:
        cmd += ["--config", f"sid_tokenizer/configs/scientific_{q}.yaml"]
    return cmd + ["--dataset_dir", args.dataset_dir, "--output_dir", str(sid_dir_for(args, q))]


def train_cmd(args: AblationArgs, q: str) -> list[str]:
    cmd = [sys.executable, "recipes/sft.py", "--config", args.sft_config, "--dataset_dir", args.dataset_dir]
    cmd += ["--sid_dir", str(sid_dir_for(args, q)), "--output_dir", f"{args.output_root}/{q}"]
    return cmd + ["--num_train_epochs", str(args.epochs)]


def eval_cmd(args: AblationArgs, q: str) -> list[str]:
    run = f"{args.output_root}/{q}"
    return evaluate_cmd(args.eval_config, f"{run}/final", ["valid", "test"], q, f"{run}/eval")


def per_user_cmd(args: AblationArgs, q: str) -> list[str]:
    cmd = [sys.executable, "-m", "benchmarks.quantizer_ablation", "--per_user_for", q]
    return cmd + ["--output_root", args.output_root, "--dataset_dir", args.dataset_dir]


def sid_done(args: AblationArgs, q: str) -> bool:
    return (sid_dir_for(args, q) / "index.json").exists()


def train_done(args: AblationArgs, q: str) -> bool:
    final = Path(args.output_root) / q / "final"
    return (final / "config.json").exists() and (final / "sidrec").is_dir()


def eval_done(args: AblationArgs, q: str) -> bool:
    return (Path(args.output_root) / q / "eval" / "metrics.json").exists()


def per_user_done(args: AblationArgs, q: str) -> bool:
    return (Path(args.output_root) / q / "per_user.npz").exists()


STAGES = {  # in order; each: (command, artifact complete?)
    "sid": (sid_cmd, sid_done),
    "train": (train_cmd, train_done),
    "eval": (eval_cmd, eval_done),
    "peruser": (per_user_cmd, per_user_done),
}


def pending_stages(args: AblationArgs, q: str) -> list[str]:
    """The stages of ``q`` whose artifact is not complete yet, in the order they run."""
    names = [s for s in STAGES if s != "peruser" or args.paired]
    return [s for s in names if not STAGES[s][1](args, q)]


PER_USER_METRICS = ("NDCG@10", "HR@10", "NDCG@20", "HR@20")


def per_user_stage(args: AblationArgs, q: str) -> Path:
    """Rank all valid/test users again with the code eval.evaluate runs (deterministic beam
    search, same defaults) and save per-user metrics for paired differences."""
    import torch

    from data_prep.dataset import RecDataset
    from eval.generate import SidRanker, evaluate_examples
    from sid_tokenizer.catalog import load_checkpoint

    torch.manual_seed(0)  # as eval.evaluate (seed 0)
    ckpt = Path(args.output_root) / q / "final"
    model, tokenizer, catalogue = load_checkpoint(str(ckpt))
    ranker = SidRanker(model, tokenizer, catalogue.index)
    dataset = RecDataset.load(args.dataset_dir)
    arrays: dict[str, np.ndarray] = {}
    for split in ("valid", "test"):
        examples = list(getattr(dataset, split))
        res = evaluate_examples(ranker, examples, 20, 20, 32, constrained=True)
        for m in PER_USER_METRICS:
            arrays[f"{split}/{m}"] = np.asarray(res["per_example"][m], dtype=np.float64)
        arrays[f"{split}/target"] = np.asarray([e.target for e in examples])
        logger.info("%s %s: NDCG@10 %.4f (%d users)", q, split, res["NDCG@10"], len(examples))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    out = Path(args.output_root) / q / "per_user.npz"
    atomic_write_bytes(out, buf.getvalue())
    return out


def _times_path(args: AblationArgs, q: str) -> Path:
    return Path(args.output_root) / q / "stage_times.json"


def _record_time(args: AblationArgs, q: str, stage: str, seconds: float, cmd: list[str]) -> None:
    path = _times_path(args, q)
    times = read_json(path) if path.exists() else {}
    entry = times.setdefault(stage, {"seconds": 0.0, "attempts": []})
    entry["seconds"] = round(entry["seconds"] + seconds, 1)
    entry["attempts"].append(
        {
            "seconds": round(seconds, 1),
            "command": " ".join(cmd[1:]),
            "finished": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "threads": args.threads,
            "load_average": [round(v, 2) for v in os.getloadavg()],
        }
    )
    atomic_write_json(path, times)


def run_variant(args: AblationArgs, q: str) -> None:
    """Run the pending stages of ``q`` one after another; stop at the first that fails."""
    env = stage_env(args.threads, ROOT)
    logs = Path(args.output_root) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    todo = pending_stages(args, q)
    logger.info("%s: stages to run %s", q, todo or "none (all complete)")
    for stage in todo:
        make_cmd, done = STAGES[stage]
        if stage == "sid" and q == "random":
            write_random_index(args)
        cmd = make_cmd(args, q)
        log = logs / f"{stage}_{q}.log"
        (Path(args.output_root) / q).mkdir(parents=True, exist_ok=True)
        logger.info("%s %s: %s >> %s", q, stage, " ".join(cmd[1:]), log)
        t0 = time.time()
        with open(log, "a") as fh:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
        seconds = time.time() - t0
        if rc != 0 or not done(args, q):
            raise SystemExit(f"{q} {stage} failed (exit status {rc}) after {seconds:.0f} s; see {log}")
        _record_time(args, q, stage, seconds, cmd)
        logger.info("%s %s done in %.1f min", q, stage, seconds / 60)


# ---- report ------------------------------------------------------------------------------------
def _trainer_state(run_dir: Path) -> dict[str, Any]:
    ckpts = sorted(
        run_dir.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[1])
    )
    return read_json(ckpts[-1]) if ckpts else {}


def collect(args: AblationArgs) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for q in args.quantizers:
        sid = ROOT / sid_dir_for(args, q)
        run = ROOT / args.output_root / q
        if not (sid / "report.json").exists():
            continue
        rep = read_json(sid / "report.json")
        row: dict[str, Any] = {
            "sid_dir": str(sid_dir_for(args, q)),
            "collisions_before": rep["collisions_before"],
            "collisions_after": rep["collisions_after"]["collisions"],
            "moved_by_resolution": rep.get("resolution", {}).get("moved", 0),
            "usage_before": rep["usage_before"],
            "reconstruction_relative": (rep.get("reconstruction") or {}).get("relative"),
            "quantizer_fit_seconds": rep.get("seconds", {}).get("fit"),
        }
        if q == "random":
            from data_prep.embed import DEFAULT_ENCODER, embeddings_path, load_embeddings
            from sid_tokenizer.catalog import load_sid_dir

            emb = load_embeddings(embeddings_path(args.dataset_dir, DEFAULT_ENCODER))
            row["reconstruction_relative"] = random_assignment_error(emb, load_sid_dir(sid).codes)
            row["reconstruction_note"] = "codewords = mean residual of the randomly assigned items"
        times = read_json(_times_path(args, q)) if _times_path(args, q).exists() else {}
        row["train_seconds"] = times.get("train", {}).get("seconds")
        row["eval_seconds"] = times.get("eval", {}).get("seconds")
        row["train_attempts"] = len(times.get("train", {}).get("attempts", []))
        state = _trainer_state(run)
        if state:
            curve = [(h["epoch"], h["eval_NDCG@10"]) for h in state["log_history"] if "eval_NDCG@10" in h]
            row.update(
                best_checkpoint=state.get("best_model_checkpoint"),
                best_valid_ndcg10_selection_users=state.get("best_metric"),
                epochs_trained=state.get("epoch"),
                steps=state.get("global_step"),
                valid_curve=curve,
                best_epoch=next((e for e, v in curve if v == state.get("best_metric")), None),
            )
            losses = [h["eval_loss"] for h in state["log_history"] if "eval_loss" in h]
            row["final_eval_loss"] = losses[-1] if losses else None
        metrics_path = run / "eval" / "metrics.json"
        if metrics_path.exists():
            res = read_json(metrics_path)["results"]
            for split in ("valid", "test"):
                r = res.get(f"{q}/{split}")
                if r:
                    row[split] = {
                        m: r["metrics"][m] for m in ("HR@10", "NDCG@10", "HR@20", "NDCG@20", "valid_rate")
                    }
                    row[split]["users"] = r["extra"]["users"]
                    row[split]["eval_seconds"] = r["extra"]["seconds"]
            for key in ("popularity/test", "sasrec/test", "popularity/valid", "sasrec/valid"):
                if key in res:
                    rows.setdefault("_references", {})[key] = {
                        m: res[key]["metrics"][m] for m in ("HR@10", "NDCG@10")
                    }
        rows[q] = row
    rows["_paired"] = paired_rows(args)
    return rows


def paired_rows(args: AblationArgs) -> list[dict[str, Any]]:
    """Per-user differences (q - paired_base) on the same users, percentile bootstrap 95% CI."""
    from eval.metrics import paired_difference

    base_path = ROOT / args.output_root / args.paired_base / "per_user.npz"
    if not base_path.exists():
        return []
    base = dict(np.load(base_path))
    out = []
    for q in args.quantizers:
        path = ROOT / args.output_root / q / "per_user.npz"
        if q == args.paired_base or not path.exists():
            continue
        cur = dict(np.load(path))
        for split in ("valid", "test"):
            if not np.array_equal(cur[f"{split}/target"], base[f"{split}/target"]):
                raise ValueError(f"{path}: {split} users differ from {base_path}")
            for m in ("NDCG@10", "HR@10"):
                diff = cur[f"{split}/{m}"] - base[f"{split}/{m}"]
                row = paired_difference(
                    diff, n_boot=1000, seed=0, model=q, baseline=args.paired_base, split=split, metric=m
                )
                out.append({**row, "model_mean": float(cur[f"{split}/{m}"].mean())})
    return out


def _ci(m: dict[str, float]) -> str:
    return f"{m['value']:.4f} [{m['ci_low']:.4f}, {m['ci_high']:.4f}]"


def _overlap(a: dict[str, float], b: dict[str, float]) -> bool:
    return a["ci_low"] <= b["ci_high"] and b["ci_low"] <= a["ci_high"]


def recipe_text(args: AblationArgs) -> str:
    """What every variant trains and how it is evaluated, read from the two configs with the
    entry points' own parsers."""
    from trl import TrlParser

    from benchmarks.common import parse_sft_recipe
    from eval.evaluate import EvalArgs

    script, training, model = parse_sft_recipe(args.sft_config)
    (ev,) = TrlParser((EvalArgs,)).parse_args_and_config(["--config", args.eval_config])
    name = model.model_name_or_path
    decoder = f"the {script.model_preset} offline default decoder" if name == "default" else f"`{name}`"
    sched = getattr(training.lr_scheduler_type, "value", training.lr_scheduler_type)
    every = getattr(training.eval_strategy, "value", training.eval_strategy)
    return (
        f"`{args.sft_config}`, {decoder}, tasks {', '.join(script.tasks)}, {args.epochs} epochs, seed "
        f"{training.seed}, batch {training.per_device_train_batch_size}, lr {training.learning_rate:g} {sched}; "
        f"validation NDCG@10 on {script.rank_eval_users} validation users at every evaluation ({every}), "
        "the best checkpoint saved as `final`. Then full-catalogue constrained beam search "
        f"({ev.num_beams} beams, `{args.eval_config}`) on **all** validation and test users; item-level "
        f"HR@10/NDCG@10 with bootstrap 95% CIs ({ev.n_boot:,} resamples)"
    )


def write_report(args: AblationArgs, rows: dict[str, Any]) -> None:
    refs = rows.pop("_references", {})
    paired = rows.pop("_paired", [])
    qs = [q for q in args.quantizers if q in rows]
    done = [q for q in qs if "test" in rows[q]]
    out = ROOT / args.report_dir
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    meta = {
        "generated": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.quantizer_ablation " + " ".join(sys.argv[1:]),
        "args": asdict(args),
        "train_command": " ".join(train_cmd(args, "<q>")[1:]).replace(
            str(sid_dir_for(args, "<q>")), "<sid_dir>"
        ),
        "eval_command": " ".join(eval_cmd(args, "<q>")[1:]),
        "repo_commit_at_report": commit,
        "machine": machine_info(),
        "references": refs,
        "paired_differences": paired,
    }
    atomic_write_json(out / "quantizer_ablation.json", {"meta": meta, "results": rows})

    lines = [
        "# Quantizer ablation: downstream recommendation per SID tokenizer (Scientific)",
        "",
        f"Generated {meta['generated']} by `{meta['command']}` at commit {commit[:12]}. Machine when the "
        f"report was written: {describe_machine(meta['machine'])}. Stages run with {args.threads} OpenMP "
        "thread(s) each; their wall times and the load average at the end of each are in "
        "`<output_root>/<q>/stage_times.json`.",
        "",
        f"Same recipe and budget for every SID index: {recipe_text(args)}. Each variant's stages:",
        "",
        "```bash",
        "python " + meta["train_command"],
        "python " + meta["eval_command"],
        "```",
        "",
        "How to run: `python -m benchmarks.quantizer_ablation --epochs E` runs every variant's missing "
        "stages one after another (a complete artifact is skipped, a killed training resumes); to run "
        "variants side by side, one process per variant with `--only <q>`, e.g. "
        "`printf '%s\\n' rkmeans balanced rqvae rvq random | xargs -P 2 -I{} python -m "
        "benchmarks.quantizer_ablation --epochs E --only {}`, then `--report_only true`.",
        "",
        "`random` is a control: random *unique* 3x256 codes (no collisions, no semantic structure), "
        f"seed {args.random_seed}, imported through `sid_tokenizer.build`'s `index_path` mode into "
        f"`{sid_dir_for(args, 'random')}`.",
        "",
        "## Downstream results",
        "",
        "| SIDs | valid NDCG@10 | valid HR@10 | test NDCG@10 | test HR@10 | best epoch | train min | eval min |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for q in qs:
        r = rows[q]
        cells = [q]
        for split in ("valid", "test"):
            if split in r:
                cells += [_ci(r[split]["NDCG@10"]), _ci(r[split]["HR@10"])]
            else:
                cells += ["-", "-"]
        be = r.get("best_epoch")
        cells.append(f"{be:g} / {r.get('epochs_trained', 0):g}" if be is not None else "-")
        cells.append(f"{r['train_seconds'] / 60:.1f}" if r.get("train_seconds") else "-")
        cells.append(f"{r['eval_seconds'] / 60:.1f}" if r.get("eval_seconds") else "-")
        lines.append("| " + " | ".join(cells) + " |")
    for key, label in (("popularity/test", "Popularity"), ("sasrec/test", "SASRec (CE, tied)")):
        if key in refs:
            v = key.replace("/test", "/valid")
            valid = refs.get(v, {})
            lines.append(
                f"| *{label}* | {_ci(valid['NDCG@10']) if valid else '-'} | "
                f"{_ci(valid['HR@10']) if valid else '-'} | {_ci(refs[key]['NDCG@10'])} | "
                f"{_ci(refs[key]['HR@10'])} | | | |"
            )
    lines += [
        "",
        "Train/eval minutes are wall time: on a shared machine they track its load at the time "
        "(stage_times.json), not the SIDs.",
        "",
    ]
    lines += [
        "## The SID indexes",
        "",
        "Before collision resolution (`reassign` for the four quantizers; `random` has none by construction).",
        "",
        "| SIDs | collisions before | moved by reassign | distinct prefixes a/ab/abc | utilisation a/b/c | "
        "entropy a/b/c | rel. error |",
        "|---|---|---|---|---|---|---|",
    ]
    for q in qs:
        r = rows[q]
        c, u = r["collisions_before"], r["usage_before"]
        rel = r.get("reconstruction_relative")
        lines.append(
            f"| {q} | {c['collisions']} ({100 * c['collision_rate']:.2f}%) | {r['moved_by_resolution']} | "
            + " / ".join(str(x["distinct_prefixes"]) for x in u)
            + " | "
            + " / ".join(f"{x['utilisation']:.2f}" for x in u)
            + " | "
            + " / ".join(f"{x['entropy_norm']:.2f}" for x in u)
            + " | "
            + (f"{rel:.3f}{'*' if q == 'random' else ''}" if rel is not None else "-")
            + " |"
        )
    if "random" in qs:
        lines += [
            "",
            "\\* random: codewords fitted as the mean residual of the randomly assigned items "
            "(the best additive reconstruction for those fixed codes).",
        ]
    if paired:
        lines += [
            "",
            f"## Paired per-user differences to {args.paired_base} (same users)",
            "",
            "Each model's per-user HR/NDCG from a second run of the same deterministic beam search "
            "(`--per_user_for`, the code `eval.evaluate` runs), minus the "
            f"{args.paired_base} model's on the same user; mean with a percentile bootstrap 95% CI "
            "(1,000 resamples of users). Far tighter than comparing the unpaired CIs above.",
            "",
            "| model - base | split | metric | mean difference [95% CI] | users better / worse |",
            "|---|---|---|---|---|",
        ]
        for r in paired:
            lines.append(
                f"| {r['model']} - {r['baseline']} | {r['split']} | {r['metric']} | "
                f"{r['difference']:+.4f} [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}] | "
                f"{r['better_users']} / {r['worse_users']} |"
            )
    lines += ["", "## Reading", ""] + _reading(done, rows) + _paired_reading(paired) + [""]
    if len(done) < len(qs):
        lines += [f"Not finished: {', '.join(q for q in qs if q not in done)}.", ""]
    if args.notes_md and (ROOT / args.notes_md).exists():
        lines += ["## Notes", "", (ROOT / args.notes_md).read_text().strip(), ""]
    lines += ["![quantizer ablation](quantizer_ablation.png)", ""]
    atomic_write_text(out / "quantizer_ablation.md", "\n".join(lines))
    _plot(qs, rows, out / "quantizer_ablation.png")


def _reading(done: list[str], rows: dict[str, Any]) -> list[str]:
    """Plain statements derived from the numbers (CI overlaps), no judgement beyond them."""
    if not done:
        return ["No variant finished yet."]
    out = []
    for split in ("test", "valid"):
        best = max(done, key=lambda q: rows[q][split]["NDCG@10"]["value"])
        overl = [
            q for q in done if q != best and _overlap(rows[q][split]["NDCG@10"], rows[best][split]["NDCG@10"])
        ]
        apart = [q for q in done if q != best and q not in overl]
        out.append(
            f"- {split}: highest NDCG@10 {best} ({rows[best][split]['NDCG@10']['value']:.4f}); 95% CIs overlap "
            f"with {', '.join(overl) or 'none'}; clearly below (CIs disjoint): {', '.join(apart) or 'none'}."
        )
    return out


def _paired_reading(paired: list[dict[str, Any]]) -> list[str]:
    out = []
    for r in paired:
        if r["metric"] != "NDCG@10":
            continue
        verdict = "above" if r["ci_low"] > 0 else "below" if r["ci_high"] < 0 else "not distinguishable from"
        out.append(
            f"- paired, {r['split']}: {r['model']} is {verdict} {r['baseline']} on NDCG@10 "
            f"({r['difference']:+.4f} [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}])."
        )
    return out


def _plot(qs: list[str], rows: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, metric in zip(axes[:2], ("NDCG@10", "HR@10"), strict=True):
        width = 0.38
        for j, split in enumerate(("valid", "test")):
            xs, vals, err = [], [], [[], []]
            for i, q in enumerate(qs):
                m = rows[q].get(split, {}).get(metric)
                if m is None:
                    continue
                xs.append(i + (j - 0.5) * width)
                vals.append(m["value"])
                err[0].append(m["value"] - m["ci_low"])
                err[1].append(m["ci_high"] - m["value"])
            ax.bar(xs, vals, width, yerr=err, capsize=3, label=f"{split} (all users)")
        ax.set_xticks(range(len(qs)), qs)
        ax.set_title(f"{metric}, 95% bootstrap CI")
        ax.legend()
    ax = axes[2]
    for q in qs:
        curve = rows[q].get("valid_curve")
        if curve:
            ax.plot(*zip(*curve, strict=True), marker=".", label=q)
    ax.set_xlabel("epoch")
    ax.set_title("validation NDCG@10 during training (500 users)")
    ax.legend()
    atomic_save_figure(fig, path, dpi=110)


def main() -> None:
    from trl import TrlParser

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    (args,) = TrlParser((AblationArgs,)).parse_args_and_config()
    os.chdir(ROOT)
    if args.per_user_for:
        per_user_stage(args, args.per_user_for)
        return
    variants = [args.only] if args.only else args.quantizers
    unknown = [
        q
        for q in variants
        if q != "random"
        and not (Path(f"sid_tokenizer/configs/scientific_{q}.yaml").exists() or sid_dir_for(args, q).exists())
    ]
    if unknown:
        raise SystemExit(f"no SID index or build config for {unknown}")
    if not args.report_only:
        for q in variants:
            run_variant(args, q)
    if not args.only:
        write_report(args, collect(args))
        logger.info("wrote %s/quantizer_ablation.{json,md,png}", args.report_dir)


if __name__ == "__main__":
    main()
