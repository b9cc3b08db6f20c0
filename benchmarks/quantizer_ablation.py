"""Quantizer ablation (GRID-style) on Scientific: same SFT recipe and budget, one SID index per quantizer.

    python -m benchmarks.quantizer_ablation [--epochs 20] [--parallel 2] [--snapshot true]
    python -m benchmarks.quantizer_ablation --report_only true      # only (re)write the report

For every quantizer (the SID indexes ``outputs/scientific/sid_<q>`` built by
``python -m sid_tokenizer.build --config sid_tokenizer/configs/scientific_<q>.yaml``; built here
if missing) plus a ``random`` control (random *unique* 3 x 256 codes, no semantic structure,
written to ``outputs/ablation/sid_random`` through ``sid_tokenizer.build``'s import mode):

1. train ``recipes/sft.py --config recipes/configs/sft_ablation_scientific.yaml --sid_dir ...
   --output_dir outputs/ablation/<q> --num_train_epochs <epochs>`` (tiny default decoder,
   seq2seq task only, same seed; the best checkpoint on validation NDCG@10 is loaded at the end
   and saved as ``final``);
2. evaluate ``python -m eval.evaluate --config eval/configs/scientific_sft.yaml --checkpoint
   outputs/ablation/<q>/final --splits valid test --also_unconstrained false`` on all users;
3. write ``docs/results/quantizer_ablation.{json,md,png}``: collisions before resolution,
   codebook utilisation/entropy (each index's ``report.json``), valid/test HR@10 and NDCG@10
   with bootstrap 95% CIs, training and evaluation wall time, commands, hardware.

Resumable: a finished stage (``final/`` saved, ``eval/metrics.json`` written) is skipped, a
killed training run resumes from its last checkpoint. At most ``parallel`` stages run at once
(each with one OpenMP thread); evaluations of trained models go before new trainings so that
finished variants are complete first. With ``snapshot`` the stages run on a ``git archive`` of
HEAD (``outputs/ablation/code/<commit>``, its ``outputs`` linked to this checkout's), so
uncommitted edits in the shared working tree cannot change the code under a running ablation.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Run as a script (python benchmarks/quantizer_ablation.py), this folder would come first on
# sys.path and benchmarks/sid_tokenizer.py would shadow the sid_tokenizer package.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402

from data_prep.io import atomic_write_json, atomic_write_text, read_json  # noqa: E402

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
SFT_CONFIG = "recipes/configs/sft_ablation_scientific.yaml"
EVAL_CONFIG = "eval/configs/scientific_sft.yaml"


@dataclass
class AblationArgs:
    quantizers: list[str] = field(
        default_factory=lambda: ["rkmeans", "balanced", "rqvae", "rvq", "random"],
        metadata={"help": "registered quantizers (outputs/scientific/sid_<q>) and/or 'random' (the control)"},
    )
    epochs: int = field(default=16, metadata={"help": "num_train_epochs, the same for every quantizer"})
    parallel: int = field(default=2, metadata={"help": "stages running at once (one OpenMP thread each)"})
    dataset_dir: str = "outputs/scientific/dataset"
    sid_root: str = field(
        default="outputs/scientific", metadata={"help": "holds sid_<q> for real quantizers"}
    )
    output_root: str = "outputs/ablation"
    report_dir: str = "docs/results"
    random_seed: int = 0
    snapshot: bool = field(default=False, metadata={"help": "run the stages on a git archive of HEAD"})
    snapshot_ref: str = field(default="HEAD", metadata={"help": "commit to snapshot (pin it when resuming)"})
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
    poll_seconds: float = 30.0
    priority: str = field(default="eval", metadata={"help": "eval | train: which ready stages start first"})


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


def build_random_sid_dir(
    dataset_dir: str, out_dir: Path, seed: int, num_levels: int = 3, codebook_size: int = 256
) -> Path:
    """Write a SID directory with random unique codes through sid_tokenizer.build's import mode."""
    from data_prep.dataset import RecDataset
    from sid_tokenizer.build import BuildArgs, build
    from sid_tokenizer.sid import SidIndex, SidVocab

    ds = RecDataset.load(dataset_dir)
    codes = random_codes(ds.num_items, num_levels, codebook_size, seed)
    index_path = out_dir.parent / f"{out_dir.name}_index.json"
    index_path.parent.mkdir(parents=True, exist_ok=True)
    SidIndex(codes, SidVocab((codebook_size,) * num_levels), raw_ids=[it.raw_id for it in ds.items]).save(
        index_path
    )
    build(
        BuildArgs(
            dataset_dir=dataset_dir,
            output_dir=str(out_dir),
            index_path=str(index_path),
            level_sizes=[codebook_size] * num_levels,
            collision_strategy="none",
            seed=seed,
        )
    )
    return out_dir


# ---- stages ------------------------------------------------------------------------------------
def sid_dir_for(args: AblationArgs, q: str) -> Path:
    return Path(args.output_root) / "sid_random" if q == "random" else Path(args.sid_root) / f"sid_{q}"


def train_cmd(args: AblationArgs, q: str) -> list[str]:
    return [
        sys.executable,
        "recipes/sft.py",
        "--config",
        SFT_CONFIG,
        "--sid_dir",
        str(sid_dir_for(args, q)),
        "--output_dir",
        f"{args.output_root}/{q}",
        "--num_train_epochs",
        str(args.epochs),
    ]


def eval_cmd(args: AblationArgs, q: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "eval.evaluate",
        "--config",
        EVAL_CONFIG,
        "--checkpoint",
        f"{args.output_root}/{q}/final",
        "--splits",
        "valid",
        "test",
        "--also_unconstrained",
        "false",
        "--model_name",
        q,
        "--output_dir",
        f"{args.output_root}/{q}/eval",
    ]


def per_user_cmd(args: AblationArgs, q: str) -> list[str]:
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        "--per_user_for",
        q,
        "--output_root",
        args.output_root,
        "--dataset_dir",
        args.dataset_dir,
    ]


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
    import io

    from data_prep.io import atomic_write_bytes

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    out = Path(args.output_root) / q / "per_user.npz"
    atomic_write_bytes(out, buf.getvalue())
    return out


def per_user_done(args: AblationArgs, q: str) -> bool:
    return (Path(args.output_root) / q / "per_user.npz").exists()


def train_done(args: AblationArgs, q: str) -> bool:
    final = Path(args.output_root) / q / "final"
    return (final / "config.json").exists() and (final / "sidrec").is_dir()


def eval_done(args: AblationArgs, q: str) -> bool:
    return (Path(args.output_root) / q / "eval" / "metrics.json").exists()


def make_snapshot(output_root: str, ref: str = "HEAD") -> Path:
    """git archive ``ref`` into <output_root>/code/<commit> with ``outputs`` linked to ours."""
    commit = subprocess.run(
        ["git", "rev-parse", ref], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    dest = (ROOT / output_root / "code" / commit[:12]).resolve()
    if not (dest / "pyproject.toml").exists():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", commit], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    link = dest / "outputs"
    if not link.exists():
        link.symlink_to((ROOT / "outputs").resolve(), target_is_directory=True)
    return dest


def _times_path(args: AblationArgs, q: str) -> Path:
    return Path(args.output_root) / q / "stage_times.json"


def _record_time(args: AblationArgs, q: str, stage: str, seconds: float, cmd: list[str], cwd: str) -> None:
    path = _times_path(args, q)
    times = read_json(path) if path.exists() else {}
    entry = times.setdefault(stage, {"seconds": 0.0, "attempts": []})
    entry["seconds"] = round(entry["seconds"] + seconds, 1)
    entry["attempts"].append(
        {
            "seconds": round(seconds, 1),
            "cwd": cwd,
            "command": " ".join(cmd[1:]),
            "finished": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "load_average": list(os.getloadavg()),
        }
    )
    atomic_write_json(path, times)


def _progress(log: Path) -> str:
    """Last tqdm counter (e.g. '1234/5240 [10:01<...]') or last line of a stage log."""
    if not log.exists():
        return "starting"
    with open(log, "rb") as f:
        f.seek(max(0, log.stat().st_size - 4000))
        tail = f.read().decode("utf-8", "replace").replace("\r", "\n").strip().splitlines()
    return tail[-1][-110:] if tail else "starting"


class _Adopted:
    """A stage process started by an earlier driver: alive while /proc/<pid> runs its command."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def poll(self) -> int | None:
        return None if _pid_alive(self.pid) else 0


def _pid_alive(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode("utf-8", "replace")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state != "Z" and any(k in cmdline for k in ("recipes/sft.py", "eval.evaluate", "--per_user_for"))


def _running_path(args: AblationArgs, q: str, stage: str) -> Path:
    return ROOT / args.output_root / q / f"{stage}.running.json"


def _running_info(args: AblationArgs, q: str, stage: str) -> dict[str, Any] | None:
    """The pid file of a stage, if its process is still alive (a stale file is removed)."""
    path = _running_path(args, q, stage)
    if not path.exists():
        return None
    info = read_json(path)
    if _pid_alive(int(info["pid"])):
        return info
    path.unlink(missing_ok=True)
    return None


def run_stages(args: AblationArgs) -> None:
    cwd = make_snapshot(args.output_root, args.snapshot_ref) if args.snapshot else ROOT
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(cwd),
    }
    logs = ROOT / args.output_root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for q in args.quantizers:  # SID indexes first (seconds; rqvae ~2 min if it has to be built)
        sid = ROOT / sid_dir_for(args, q)
        if (sid / "index.json").exists():
            continue
        if q == "random":
            logger.info("building the random control index %s", sid)
            build_random_sid_dir(args.dataset_dir, sid, args.random_seed)
        else:
            cmd = [
                sys.executable,
                "-m",
                "sid_tokenizer.build",
                "--config",
                f"sid_tokenizer/configs/scientific_{q}.yaml",
            ]
            logger.info("building %s: %s", sid, " ".join(cmd))
            subprocess.run(cmd, cwd=cwd, env=env, check=True)
    running: dict[tuple[str, str], tuple[Any, float, list[str], Path]] = {}
    for q in args.quantizers:  # stages still running from an earlier (killed) driver: wait for them
        for stage in ("train", "eval", "peruser"):
            info = _running_info(args, q, stage)
            if info is not None:
                logger.info("adopting %s %s (pid %d, started %s)", q, stage, info["pid"], info["started"])
                running[(q, stage)] = (_Adopted(info["pid"]), info["t0"], info["cmd"], Path(info["log"]))
    pending = [
        (q, "train") for q in args.quantizers if not train_done(args, q) and (q, "train") not in running
    ]
    pending += [
        (q, "eval")
        for q in args.quantizers
        if train_done(args, q) and not eval_done(args, q) and (q, "eval") not in running
    ]
    if args.paired:
        pending += [
            (q, "peruser")
            for q in args.quantizers
            if train_done(args, q) and not per_user_done(args, q) and (q, "peruser") not in running
        ]
    failed: list[tuple[str, str]] = []
    start = time.time()
    logger.info("stages to run: %s (cwd %s)", pending, cwd)
    while pending or running:
        for key, (proc, t0, cmd, log) in list(running.items()):
            rc = proc.poll()
            if rc is None:
                continue
            del running[key]
            q, stage = key
            _running_path(args, q, stage).unlink(missing_ok=True)
            seconds = time.time() - t0
            if isinstance(proc, _Adopted):  # no exit status: judge by the stage's output
                done = {"train": train_done, "eval": eval_done, "peruser": per_user_done}[stage]
                rc = 0 if done(args, q) else 1
            if rc != 0:
                logger.error("%s %s FAILED (rc %d) after %.0f s; see %s", q, stage, rc, seconds, log)
                failed.append(key)
                continue
            _record_time(args, q, stage, seconds, cmd, str(cwd))
            logger.info("%s %s done in %.1f min", q, stage, seconds / 60)
            if stage == "train":
                pending.append((q, "eval"))
                if args.paired:
                    pending.append((q, "peruser"))
        # "eval": evaluations first (a finished variant is worth more than a started one);
        # "train": trainings first (fewer idle slots at the end, all results come later)
        first = "eval" if args.priority == "eval" else "train"
        order = {"train": 1, "eval": 1, "peruser": 2}
        order[first] = 0
        pending.sort(key=lambda k: (order[k[1]], args.quantizers.index(k[0])))
        while pending and len(running) < args.parallel:
            q, stage = pending.pop(0)
            cmd = {"train": train_cmd, "eval": eval_cmd, "peruser": per_user_cmd}[stage](args, q)
            log = logs / f"{stage}_{q}.log"
            (ROOT / args.output_root / q).mkdir(parents=True, exist_ok=True)
            logger.info("start %s %s: %s > %s", q, stage, " ".join(cmd[1:]), log)
            with open(log, "a") as fh:
                proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
            t0 = time.time()
            atomic_write_json(
                _running_path(args, q, stage),
                {
                    "pid": proc.pid,
                    "t0": t0,
                    "started": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                    "cmd": cmd,
                    "log": str(log),
                },
            )
            running[(q, stage)] = (proc, t0, cmd, log)
        if running:
            time.sleep(args.poll_seconds)
            elapsed = (time.time() - start) / 60
            for (q, stage), (_, t0, _, log) in running.items():
                logger.info(
                    "[%5.1f min] %s %s (%.1f min): %s",
                    elapsed,
                    q,
                    stage,
                    (time.time() - t0) / 60,
                    _progress(log),
                )
    if failed:
        raise SystemExit(f"failed stages: {failed}")


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


def hardware() -> dict[str, Any]:
    import torch
    import transformers
    import trl

    cpu = ""
    try:
        cpu = next(
            line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": "none",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "threads_per_job": 1,
        "load_average_at_report": [round(v, 2) for v in os.getloadavg()],
    }


def _ci(m: dict[str, float]) -> str:
    return f"{m['value']:.4f} [{m['ci_low']:.4f}, {m['ci_high']:.4f}]"


def _overlap(a: dict[str, float], b: dict[str, float]) -> bool:
    return a["ci_low"] <= b["ci_high"] and b["ci_low"] <= a["ci_high"]


def write_report(args: AblationArgs, rows: dict[str, Any]) -> None:
    refs = rows.pop("_references", {})
    paired = rows.pop("_paired", [])
    qs = [q for q in args.quantizers if q in rows]
    done = [q for q in qs if "test" in rows[q]]
    out = ROOT / args.report_dir
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    snapshots = sorted(p.name for p in (ROOT / args.output_root / "code").glob("*")) if args.snapshot else []
    meta = {
        "generated": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.quantizer_ablation " + " ".join(sys.argv[1:]),
        "args": asdict(args),
        "train_command": " ".join(train_cmd(args, "<q>")[1:]).replace(
            str(sid_dir_for(args, "<q>")), "<sid_dir>"
        ),
        "eval_command": " ".join(eval_cmd(args, "<q>")[1:]),
        "repo_commit_at_report": commit,
        "code_snapshots": snapshots,
        "hardware": hardware(),
        "references": refs,
        "paired_differences": paired,
    }
    atomic_write_json(out / "quantizer_ablation.json", {"meta": meta, "results": rows})

    hw = meta["hardware"]
    lines = [
        "# Quantizer ablation: downstream recommendation per SID tokenizer (Scientific)",
        "",
        f"Generated {meta['generated']} by `{meta['command']}` on {hw['cores']} CPU cores ({hw['cpu']}; no GPU; "
        f"shared with other jobs, load average {hw['load_average_at_report']} when the report was written), "
        f"torch {hw['torch']}, transformers {hw['transformers']}, trl {hw['trl']}; every stage ran with one "
        f"OpenMP thread, {args.parallel} stages at a time"
        + (f", on a `git archive` of commit {', '.join(snapshots)}" if snapshots else "")
        + ".",
        "",
        "Same recipe and budget for every SID index: the tiny offline default decoder trained from scratch, "
        "**seq2seq task only** (an epoch of the full SFT mixture of `sft_scientific.yaml` took ~7.5 min in "
        "the README's run, against ~0.8 min for seq2seq alone on a quiet machine and ~1.3-2 min under this "
        f"run's load), {args.epochs} epochs, seed 42, batch 32, lr 3e-3 cosine; validation NDCG@10 on 500 "
        "validation users after every epoch, the best epoch's weights saved as `final`. Then full-catalogue "
        "constrained beam search (20 beams) on **all** 8,317 validation and test users; item-level "
        "HR@10/NDCG@10 with bootstrap 95% CIs (1,000 resamples).",
        "",
        "```bash",
        "python " + meta["train_command"],
        "python " + meta["eval_command"],
        "```",
        "",
        "`random` is a control: random *unique* 3x256 codes (no collisions, no semantic structure), "
        f"seed {args.random_seed}, imported through `sid_tokenizer.build`'s `index_path` mode into "
        "`outputs/ablation/sid_random`.",
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
        "Train/eval minutes are wall time on the shared machine (two stages side by side, plus other "
        "people's jobs): they track the machine's load at the time, not the SIDs (see the notes).",
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
    fig.tight_layout()
    import io

    from data_prep.io import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def main() -> None:
    from trl import TrlParser

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    (args,) = TrlParser((AblationArgs,)).parse_args_and_config()
    os.chdir(ROOT)
    unknown = [
        q
        for q in args.quantizers
        if q != "random"
        and not (Path(f"sid_tokenizer/configs/scientific_{q}.yaml").exists() or sid_dir_for(args, q).exists())
    ]
    if unknown:
        raise SystemExit(f"no SID index or build config for {unknown}")
    if args.per_user_for:
        per_user_stage(args, args.per_user_for)
        return
    if not args.report_only:
        run_stages(args)
    write_report(args, collect(args))
    logger.info("wrote %s/quantizer_ablation.{json,md,png}", args.report_dir)


if __name__ == "__main__":
    main()
