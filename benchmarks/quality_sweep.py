"""Budgeted quality sweep on Scientific (issue 13): one change at a time from one base recipe,
selected and compared on ALL validation users, then a final model for the test split.

    python -m benchmarks.quality_sweep                          # every variant, then the report
    printf '%s\\n' tiny_e16 wide_e16 | xargs -P 2 -I{} python -m benchmarks.quality_sweep --only {}
    python -m benchmarks.quality_sweep --final tiny_e32         # final model of a chosen variant
    python -m benchmarks.quality_sweep --report_only true       # (re)write the report

Every variant trains ``recipes/configs/sft_sweep_scientific.yaml`` (tiny offline default decoder,
RQ-VAE SIDs, seq2seq task, SID-restricted loss, 16 epochs, checkpoints selected on validation
NDCG@10 over all 8,317 validation users, 8 times per run) with the variant's CLI overrides
(``python recipes/sft.py --config ... --output_dir outputs/sweep/<v> <overrides>``), then
``python -m eval.evaluate --splits valid`` ranks all validation users with full-catalogue
constrained beam search (bootstrap 95% CIs). The test split is not looked at during the sweep.

``--final <v>``: variant ``v`` is retrained on train + validation targets
(``--include_valid_in_train true``) for its best epoch count, without evaluation, and that model,
plus the validation-selected model of the sweep, are tested once on all test users
(``outputs/sweep/final_<v>``). The report puts both next to Popularity and SASRec
(``docs/results/baselines_scientific.json``).

Resumable: a stage whose artifact is complete (``final/``, ``eval/metrics.json``) is skipped and a
killed training resumes from its last checkpoint. Writes ``docs/results/quality_sweep.{json,md,png}``
(command, machine, date inside).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Run as a script, this folder would come first on sys.path and benchmarks/sid_tokenizer.py would
# shadow the sid_tokenizer package.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import describe_machine, evaluate_cmd, machine_info, stage_env  # noqa: E402
from data_prep.io import atomic_save_figure, atomic_write_json, atomic_write_text, read_json  # noqa: E402

logger = logging.getLogger(__name__)

# name -> (what changes, CLI overrides of the base recipe). One change at a time from tiny_e16.
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "tiny_e16": ("base recipe: tiny (128 x 2 layers), lr 3e-3 cosine, 16 epochs", []),
    "tiny_e16_seed1": (
        "the base recipe with seed 1 (init and data order): the run-to-run spread",
        ["--seed", "1"],
    ),
    "tiny_e16_full_loss": (
        "full-vocabulary softmax instead of the SID-restricted loss",
        ["--sid_restricted_loss", "false"],
    ),
    "tiny_e32": ("32 epochs", ["--num_train_epochs", "32"]),
    "wide_e16": ("wider: 256 x 2 layers (4 heads)", ["--model_preset", "wide"]),
    "deep_e16": ("deeper: 128 x 4 layers (the deep preset)", ["--model_preset", "deep"]),
    "small_e16": ("wider and deeper: 256 x 4 layers (the small preset)", ["--model_preset", "small"]),
    "tiny_e16_lr1e-3": ("learning rate 1e-3", ["--learning_rate", "1e-3"]),
    "tiny_e16_align": (
        "+ SID<->title alignment tasks (title2sid 0.5, sid2title 0.25 rows per item)",
        ["--config_tasks", '{"seq2seq": 1.0, "title2sid": 0.5, "sid2title": 0.25}'],
    ),
    "wide_e32": ("wider (256 x 2) and 32 epochs", ["--model_preset", "wide", "--num_train_epochs", "32"]),
    "tiny_e16_untied": (
        "output layer untied from the input embeddings (SASRec: untied 0.0660 vs tied 0.0588 test NDCG@10)",
        ["--untie_word_embeddings", "true"],
    ),
    "tiny_e16_drop0.1": (
        "training-only dropout 0.1 on the embeddings and on each attention/MLP branch",
        ["--embedding_dropout", "0.1", "--residual_dropout", "0.1"],
    ),
    "tiny_e32_drop0.1": (
        "dropout 0.1 (embeddings and branches) and 32 epochs: dropout needs more steps",
        ["--embedding_dropout", "0.1", "--residual_dropout", "0.1", "--num_train_epochs", "32"],
    ),
    "tiny_e48_drop0.1": (
        "dropout 0.1 and 48 epochs: its retrain was the best Scientific test row at 32",
        ["--embedding_dropout", "0.1", "--residual_dropout", "0.1", "--num_train_epochs", "48"],
    ),
    # the SID-source ablation: the same recipe on RQ-VAE SIDs of other item embeddings
    "sid_behaviour": (
        "SIDs from behaviour embeddings (PPMI-SVD of the training sequences, 64-d) instead of text",
        ["--sid_dir", "outputs/scientific/sid_rqvae_behaviour"],
    ),
    "sid_rqvae_64": (
        "RQ-VAE 3 x 64 codes instead of 3 x 256 (4,344 items: each code shared by more items)",
        ["--sid_dir", "outputs/scientific/sid_rqvae_64"],
    ),
    "sid_rqvae_128": (
        "RQ-VAE 3 x 128 codes instead of 3 x 256",
        ["--sid_dir", "outputs/scientific/sid_rqvae_128"],
    ),
    "sid_fused": (
        "SIDs from text + behaviour embeddings fused (L2-normalised, concatenated, behaviour weight 0.5)",
        ["--sid_dir", "outputs/scientific/sid_rqvae_fused"],
    ),
}
# SID indexes a variant needs beyond the base recipe's: sid_dir -> sid_tokenizer.build overrides
SID_BUILDS: dict[str, list[str]] = {
    "outputs/scientific/sid_rqvae_behaviour": ["--embedding_source", "behaviour", "--behaviour_dim", "64"],
    "outputs/scientific/sid_rqvae_fused": ["--embedding_source", "fused", "--behaviour_weight", "0.5"],
    "outputs/scientific/sid_rqvae_64": ["--codebook_size", "64"],
    "outputs/scientific/sid_rqvae_128": ["--codebook_size", "128"],
}
SID_CONFIG = "sid_tokenizer/configs/scientific_rqvae.yaml"
METRICS = ("HR@10", "NDCG@10", "HR@20", "NDCG@20", "valid_rate")


@dataclass
class SweepArgs:
    variants: list[str] = field(
        default_factory=lambda: list(VARIANTS), metadata={"help": f"variants to run, of {list(VARIANTS)}"}
    )
    only: str | None = field(default=None, metadata={"help": "run this one variant and write no report"})
    final: str | None = field(
        default=None,
        metadata={"help": "train the final model of this variant (train + valid targets) and test it"},
    )
    threads: int = field(default=1, metadata={"help": "OMP_NUM_THREADS / MKL_NUM_THREADS of every stage"})
    sft_config: str = "recipes/configs/sft_sweep_scientific.yaml"
    eval_config: str = "eval/configs/scientific_sft.yaml"
    output_root: str = "outputs/sweep"
    report_dir: str = "docs/results"
    baselines_json: str = "docs/results/baselines_scientific.json"
    report_only: bool = False


# ---- stages ------------------------------------------------------------------------------------
def run_dir(args: SweepArgs, name: str) -> Path:
    return Path(args.output_root) / name


def train_cmd(args: SweepArgs, name: str, extra: list[str] | None = None) -> list[str]:
    """``recipes/sft.py`` with the variant's overrides. A dict-valued field (``tasks``) cannot be
    given on the command line: ``--config_tasks JSON`` writes the base recipe with that field
    replaced to ``<run>/recipe.yaml`` and trains from it."""
    import yaml

    base = name.removeprefix("final_")
    overrides, config = list(VARIANTS[base][1]), args.sft_config
    if "--config_tasks" in overrides:
        i = overrides.index("--config_tasks")
        recipe = yaml.safe_load((ROOT / args.sft_config).read_text())
        recipe["tasks"] = json.loads(overrides[i + 1])
        del overrides[i : i + 2]
        config = str(run_dir(args, name) / "recipe.yaml")
        atomic_write_text(ROOT / config, yaml.safe_dump(recipe, sort_keys=False))
    cmd = [sys.executable, "recipes/sft.py", "--config", config]
    return cmd + ["--output_dir", str(run_dir(args, name)), *overrides, *(extra or [])]


def eval_cmd(args: SweepArgs, checkpoint: Path, splits: list[str], name: str, out: Path) -> list[str]:
    return evaluate_cmd(args.eval_config, checkpoint, splits, name, out) + [
        "--baselines_json",
        args.baselines_json,
    ]


def _run(args: SweepArgs, name: str, stage: str, cmd: list[str], done: Path) -> None:
    """Run ``cmd`` unless ``done`` exists; log to outputs/sweep/logs, record the wall time."""
    if done.exists():
        logger.info("%s %s: complete (%s)", name, stage, done)
        return
    logs = Path(args.output_root) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{stage}_{name}.log"
    logger.info("%s %s: %s >> %s", name, stage, " ".join(cmd[1:]), log)
    t0 = time.time()
    with open(log, "a") as fh:
        env = stage_env(args.threads, ROOT, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    seconds = time.time() - t0
    if rc != 0 or not done.exists():
        raise SystemExit(f"{name} {stage} failed (exit status {rc}) after {seconds:.0f} s; see {log}")
    times_path = run_dir(args, name) / "stage_times.json"
    times = read_json(times_path) if times_path.exists() else {}
    times.setdefault(stage, []).append(
        {
            "seconds": round(seconds, 1),
            "command": " ".join(cmd[1:]),
            "threads": args.threads,
            "load_average": [round(v, 2) for v in os.getloadavg()],
            "finished": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        }
    )
    atomic_write_json(times_path, times)
    logger.info("%s %s done in %.1f min", name, stage, seconds / 60)


def run_variant(args: SweepArgs, name: str) -> None:
    run = run_dir(args, name)
    overrides = VARIANTS[name][1]
    for sid_dir, build in SID_BUILDS.items():
        if sid_dir in overrides:
            cmd = [
                sys.executable,
                "-m",
                "sid_tokenizer.build",
                "--config",
                SID_CONFIG,
                "--output_dir",
                sid_dir,
            ]
            _run(args, name, "sid", cmd + build, Path(sid_dir) / "meta.json")
    _run(args, name, "train", train_cmd(args, name), run / "final" / "sidrec" / "meta.json")
    _run(
        args,
        name,
        "eval",
        eval_cmd(args, run / "final", ["valid"], name, run / "eval"),
        run / "eval" / "metrics.json",
    )


def _best_epoch(curve: list[tuple[float, float]]) -> int:
    return int(round(max(curve, key=lambda p: p[1])[0]))


def best_epoch(args: SweepArgs, name: str) -> int:
    """The epoch whose checkpoint the sweep run kept (best validation NDCG@10 on all users)."""
    curve = trainer_state(run_dir(args, name)).get("curve")
    if not curve:
        raise SystemExit(f"{run_dir(args, name)}: no validation curve; run the variant first")
    return _best_epoch(curve)


def final_overrides(epochs: int) -> list[str]:
    """Train + validation targets, ``epochs`` epochs, no evaluation (the validation users are
    training data now), the last checkpoint is the model."""
    extra = ["--include_valid_in_train", "true", "--num_train_epochs", str(epochs), "--eval_strategy", "no"]
    extra += ["--save_strategy", "epoch", "--load_best_model_at_end", "false", "--rank_eval_users", "0"]
    return extra + ["--save_total_limit", "1"]


def run_final(args: SweepArgs, name: str) -> None:
    """Retrain ``name`` on train + validation targets for its best epoch count, then test it and
    the validation-selected sweep model once on all test users."""
    run_variant(args, name)
    epochs = best_epoch(args, name)
    final = f"final_{name}"
    out = run_dir(args, final)
    _run(
        args,
        final,
        "train",
        train_cmd(args, final, final_overrides(epochs)),
        out / "final" / "sidrec" / "meta.json",
    )
    _run(
        args,
        final,
        "test",
        eval_cmd(args, out / "final", ["test"], final, out / "test"),
        out / "test" / "metrics.json",
    )
    sweep_test = run_dir(args, name) / "test"
    cmd = eval_cmd(args, run_dir(args, name) / "final", ["test"], name, sweep_test)
    _run(args, name, "test", cmd, sweep_test / "metrics.json")


# ---- report ------------------------------------------------------------------------------------
def trainer_state(run: Path) -> dict[str, Any]:
    """Validation curve (epoch, NDCG@10 on all validation users), eval loss and steps of a run."""
    states = sorted(
        run.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[1])
    )
    if not states:
        return {}
    state = read_json(states[-1])
    hist = state["log_history"]
    return {
        "curve": [(h["epoch"], h["eval_NDCG@10"]) for h in hist if "eval_NDCG@10" in h],
        "loss_curve": [(h["epoch"], h["eval_loss"]) for h in hist if "eval_loss" in h],
        "steps": state.get("global_step"),
        "epochs": state.get("epoch"),
        "best_checkpoint": state.get("best_model_checkpoint"),
    }


def _metrics(path: Path, key: str) -> dict[str, Any] | None:
    if not path.exists():
        return None
    r = read_json(path)["results"].get(key)
    return {m: r["metrics"][m] for m in METRICS} | {"users": r["extra"]["users"]} if r else None


def _seconds(run: Path, stage: str) -> float | None:
    path = run / "stage_times.json"
    entries = read_json(path).get(stage, []) if path.exists() else []
    return round(sum(e["seconds"] for e in entries), 1) if entries else None


def collect(args: SweepArgs) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for name in args.variants:
        run = ROOT / run_dir(args, name)
        valid = _metrics(run / "eval" / "metrics.json", f"{name}/valid")
        state = trainer_state(run)
        if valid is None and not state.get("curve"):
            continue
        rows[name] = {
            "change": VARIANTS[name][0],
            "overrides": VARIANTS[name][1],
            "valid": valid,
            "test": _metrics(run / "test" / "metrics.json", f"{name}/test"),
            "best_epoch": _best_epoch(state["curve"]) if state.get("curve") else None,
            **state,
            "train_seconds": _seconds(run, "train"),
            "eval_seconds": _seconds(run, "eval"),
            "params": _params(run / "final"),
        }
        final = ROOT / run_dir(args, f"final_{name}")
        test = _metrics(final / "test" / "metrics.json", f"final_{name}/test")
        if test:
            rows[name]["final"] = {"test": test, "train_seconds": _seconds(final, "train")}
    return rows


def _params(ckpt: Path) -> dict[str, int] | None:
    """Parameters of a checkpoint (all tensors of its safetensors files)."""
    cfg_path = ckpt / "config.json"
    if not cfg_path.exists():
        return None
    from safetensors import safe_open

    total = 0
    for f in ckpt.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():  # noqa: SIM118 (safe_open has no __iter__)
                total += math.prod(st.get_slice(k).get_shape())
    return {"total": total}


def selection_by_loss(row: dict[str, Any]) -> dict[str, float] | None:
    """What selecting on validation loss would have kept, next to selecting on NDCG@10."""
    ndcg = dict(row.get("curve") or [])
    loss = {e: v for e, v in row.get("loss_curve") or [] if e in ndcg}
    if len(loss) < 3:
        return None
    loss_epoch = min(loss, key=loss.get)
    ndcg_epoch = max(ndcg, key=ndcg.get)
    epochs = sorted(loss)

    def ranks(values: list[float]) -> list[int]:
        order = sorted(range(len(values)), key=values.__getitem__)
        out = [0] * len(values)
        for r, i in enumerate(order):
            out[i] = r
        return out

    a, b = ranks([-loss[e] for e in epochs]), ranks([ndcg[e] for e in epochs])
    n = len(epochs)
    spearman = 1 - 6 * sum((x - y) ** 2 for x, y in zip(a, b, strict=True)) / (n * (n * n - 1))
    return {
        "loss_epoch": loss_epoch,
        "ndcg_at_loss": ndcg[loss_epoch],
        "ndcg_epoch": ndcg_epoch,
        "ndcg_best": ndcg[ndcg_epoch],
        "spearman": spearman,
    }


def _ci(m: dict[str, float] | None) -> str:
    return f"{m['value']:.4f} [{m['ci_low']:.4f}, {m['ci_high']:.4f}]" if m else "-"


def references(args: SweepArgs) -> dict[str, dict[str, Any]]:
    path = ROOT / args.baselines_json
    if not path.exists():
        return {}
    res = read_json(path)["results"]
    return {
        k: {m: res[k]["metrics"][m] for m in ("HR@10", "NDCG@10")}
        for k in res
        if k.split("/")[0] in ("popularity", "sasrec")
    }


def write_report(args: SweepArgs, rows: dict[str, Any]) -> None:
    out = ROOT / args.report_dir
    refs = references(args)
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    info = machine_info()
    meta = {
        "generated": info["date"],
        "command": "python -m benchmarks.quality_sweep " + " ".join(sys.argv[1:]),
        "args": asdict(args),
        "train_command": " ".join(train_cmd(args, "tiny_e16")[1:]) + " <overrides>",
        "repo_commit_at_report": commit,
        "machine": info,
        "references": refs,
    }
    atomic_write_json(out / "quality_sweep.json", {"meta": meta, "results": rows})
    names = [n for n in args.variants if n in rows]
    lines = [
        "# Quality sweep on Scientific: one change at a time, selected on all validation users",
        "",
        f"Generated {meta['generated']} by `{meta['command']}` at commit {commit[:12]} on "
        f"{describe_machine(info)}. Each stage ran with {args.threads} OpenMP thread(s), side by side with other "
        "runs, so the minutes are shared-machine wall time (the notes say what shared the machine).",
        "",
        f"Base recipe `{args.sft_config}`: the tiny offline default decoder, RQ-VAE 3x256 SIDs, seq2seq task "
        "only, SID-restricted loss, batch 32, lr 3e-3 cosine, 16 epochs, seed 42; validation NDCG@10 on all "
        "8,317 validation users at every eighth of the run, the best checkpoint kept. Then `python -m eval.evaluate "
        f"--config {args.eval_config} --splits valid` (full-catalogue constrained beam search, 20 beams, "
        "bootstrap 95% CIs). The test split was not looked at during the sweep.",
        "",
        "| variant | change | valid NDCG@10 | valid HR@10 | best epoch | train min | params |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in names:
        r = rows[n]
        if r["valid"] is None:  # stopped before the end: the last in-training evaluation (all users)
            e, v = r["curve"][-1]
            lines.append(f"| {n} | {r['change']} | {v:.4f} (not finished: epoch {e:g}) | - | - | - | - |")
            continue
        mins = f"{r['train_seconds'] / 60:.1f}" if r.get("train_seconds") else "-"
        params = f"{r['params']['total'] / 1e6:.2f}M" if r.get("params") else "-"
        lines.append(
            f"| {n} | {r['change']} | {_ci(r['valid']['NDCG@10'])} | {_ci(r['valid']['HR@10'])} | "
            f"{r.get('best_epoch')} / {int(round(r.get('epochs') or 0))} | {mins} | {params} |"
        )
    for key, label in (("popularity/valid", "*Popularity*"), ("sasrec/valid", "*SASRec (CE, tied)*")):
        if key in refs:
            lines.append(f"| {label} | | {_ci(refs[key]['NDCG@10'])} | {_ci(refs[key]['HR@10'])} | | | |")
    picks = [(n, selection_by_loss(rows[n])) for n in names]
    picks = [(n, p) for n, p in picks if p]
    if picks:
        lines += [
            "",
            "## Selecting on validation loss instead (lever 5)",
            "",
            "Per run: the checkpoint with the lowest validation loss (2,000 users, a forward pass) against the one "
            "with the highest NDCG@10 on all validation users (beam search), and Spearman's rank correlation of "
            "-loss with NDCG@10 over the run's 8 checkpoints.",
            "",
            "| variant | best by NDCG@10: epoch (NDCG@10) | best by loss: epoch (NDCG@10) | NDCG@10 lost | Spearman |",
            "|---|---|---|---|---|",
        ]
        for n, p in picks:
            lines.append(
                f"| {n} | {p['ndcg_epoch']:g} ({p['ndcg_best']:.4f}) | {p['loss_epoch']:g} ({p['ndcg_at_loss']:.4f}) | "
                f"{p['ndcg_best'] - p['ndcg_at_loss']:.4f} | {p['spearman']:+.2f} |"
            )
    finals = [n for n in names if rows[n].get("final") or rows[n].get("test")]
    if finals:
        lines += [
            "",
            "## Final models on the test split (all 8,317 test users)",
            "",
            "`--final <variant>`: the variant's validation-selected model, and the same recipe retrained on "
            "train + validation targets (`include_valid_in_train: true`) for the best epoch count, each "
            "tested once.",
            "",
            "| model | test NDCG@10 | test HR@10 | test HR@20 |",
            "|---|---|---|---|",
        ]
        for n in finals:
            r = rows[n]
            if r.get("test"):
                t = r["test"]
                lines.append(
                    f"| {n}, validation-selected | {_ci(t['NDCG@10'])} | {_ci(t['HR@10'])} | {t['HR@20']['value']:.4f} |"
                )
            if r.get("final"):
                t = r["final"]["test"]
                lines.append(
                    f"| {n}, retrained on train + valid targets ({r['best_epoch']} epochs) | {_ci(t['NDCG@10'])} | "
                    f"{_ci(t['HR@10'])} | {t['HR@20']['value']:.4f} |"
                )
        for key, label in (("popularity/test", "*Popularity*"), ("sasrec/test", "*SASRec (CE, tied)*")):
            if key in refs:
                lines.append(f"| {label} | {_ci(refs[key]['NDCG@10'])} | {_ci(refs[key]['HR@10'])} | |")
    notes = out / "quality_sweep.notes.md"
    if notes.exists():
        lines += ["", "## Notes", "", notes.read_text().strip()]
    lines += ["", "![sweep](quality_sweep.png)", ""]
    atomic_write_text(out / "quality_sweep.md", "\n".join(lines))
    _plot(names, rows, refs, out / "quality_sweep.png")


def _plot(names: list[str], rows: dict[str, Any], refs: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 4.8))
    done = [n for n in names if rows[n]["valid"]]
    vals = [rows[n]["valid"]["NDCG@10"] for n in done]
    ax1.bar(
        range(len(done)),
        [v["value"] for v in vals],
        yerr=[[v["value"] - v["ci_low"] for v in vals], [v["ci_high"] - v["value"] for v in vals]],
        capsize=3,
    )
    for key, style in (("popularity/valid", ":"), ("sasrec/valid", "--")):
        if key in refs:
            ax1.axhline(refs[key]["NDCG@10"]["value"], ls=style, color="k", label=key.split("/")[0])
    ax1.set_xticks(range(len(done)), done, rotation=25, ha="right")
    ax1.set_title("validation NDCG@10 (all users), 95% CI")
    ax1.legend()
    for i, n in enumerate(names):  # 20 distinct colours, then another line style: no two runs alike
        if rows[n].get("curve"):
            style = {"color": plt.cm.tab20(i % 20), "linestyle": ("-", "--", ":")[i // 20 % 3]}
            ax2.plot(*zip(*rows[n]["curve"], strict=True), marker=".", label=n, **style)
    ax2.set_xlabel("epoch")
    ax2.set_title("validation NDCG@10 during training (all users)")
    ax2.legend(fontsize=7, ncol=2, loc="lower right")
    atomic_save_figure(fig, path, dpi=110)


def main() -> None:
    from trl import TrlParser

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    (args,) = TrlParser((SweepArgs,)).parse_args_and_config()
    os.chdir(ROOT)
    unknown = [v for v in [*args.variants, args.only, args.final] if v and v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    if args.final:
        run_final(args, args.final)
    elif args.only:
        run_variant(args, args.only)
        return
    elif not args.report_only:
        for name in args.variants:
            run_variant(args, name)
    write_report(args, collect(args))
    logger.info("wrote %s/quality_sweep.{json,md,png}", args.report_dir)


if __name__ == "__main__":
    main()
