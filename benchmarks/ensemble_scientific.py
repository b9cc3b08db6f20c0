"""Seed ensembles on Scientific (issue 13): do N seeds of the best sweep recipe, ranked by ONE
constrained beam search over their averaged next-token distributions (``eval/ensemble.py``), beat
each seed alone?

    python -m benchmarks.ensemble_scientific                          # every stage, then the report
    printf '%s\\n' train_s42 train_s1 | xargs -P 2 -I{} python -m benchmarks.ensemble_scientific --only {}
    python -m benchmarks.ensemble_scientific --report_only true

Protocol (the test split is looked at once, after the choice is made on validation):
1. ``train_s<seed>``: the recipe (``recipes/configs/sft_sweep_scientific.yaml`` + the sweep
   variant's overrides, default ``tiny_e32_drop0.1``) for ``epochs`` epochs on the training
   targets, no evaluation during training, the last checkpoint is the model; one run per seed.
2. Validation (all 8,317 users): each seed alone, and the ensemble of all seeds in both modes
   (``prob``: mixture, ``logprob``: product of experts).
3. ``retrain_s<seed>``: the same recipe on train + validation targets (``include_valid_in_train``).
4. Test (all users): each retrained seed alone, and their ensemble in the mode that won on
   validation.

Resumable: a stage whose artifact is complete is skipped. Writes
``docs/results/ensemble_scientific.{json,md,png}`` (command, machine, date inside).
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import describe_machine, evaluate_cmd, machine_info  # noqa: E402
from benchmarks.quality_sweep import VARIANTS, SweepArgs, _run  # noqa: E402
from data_prep.io import atomic_save_figure, atomic_write_json, atomic_write_text, read_json  # noqa: E402

logger = logging.getLogger(__name__)
METRICS = ("HR@10", "NDCG@10", "HR@20", "NDCG@20", "valid_rate")
MODES = ("prob", "logprob")


@dataclass
class EnsembleArgs:
    variant: str = field(
        default="tiny_e32_drop0.1", metadata={"help": f"recipe: a sweep variant of {list(VARIANTS)}"}
    )
    epochs: int = field(
        default=28, metadata={"help": "epochs of every run (the variant's selected epoch count)"}
    )
    seeds: list[int] = field(default_factory=lambda: [42, 1, 2])
    only: str | None = field(
        default=None, metadata={"help": "run one stage: train_s<seed> | retrain_s<seed>"}
    )
    threads: int = field(default=1, metadata={"help": "OMP_NUM_THREADS / MKL_NUM_THREADS of every stage"})
    sft_config: str = "recipes/configs/sft_sweep_scientific.yaml"
    eval_config: str = "eval/configs/scientific_sft.yaml"
    output_root: str = "outputs/ensemble"
    report_dir: str = "docs/results"
    baselines_json: str = "docs/results/baselines_scientific.json"
    sasrec_retrain_json: str = "docs/results/baselines_scientific_sasrec_retrain.json"
    report_only: bool = False


def _sweep_args(args: EnsembleArgs) -> SweepArgs:
    return SweepArgs(threads=args.threads, output_root=args.output_root)


def variant_overrides(variant: str) -> list[str]:
    """The sweep variant's overrides without its epoch count (``epochs`` sets it)."""
    out = list(VARIANTS[variant][1])
    if "--num_train_epochs" in out:
        i = out.index("--num_train_epochs")
        del out[i : i + 2]
    return out


def train_cmd(args: EnsembleArgs, kind: str, seed: int) -> list[str]:
    """``kind`` train (training targets) or retrain (train + validation targets): the sft.py command."""
    run = Path(args.output_root) / f"{kind}_s{seed}"
    cmd = [sys.executable, "recipes/sft.py", "--config", args.sft_config, "--output_dir", str(run)]
    cmd += [*variant_overrides(args.variant), "--num_train_epochs", str(args.epochs), "--seed", str(seed)]
    cmd += ["--eval_strategy", "no", "--save_strategy", "epoch", "--load_best_model_at_end", "false"]
    cmd += ["--rank_eval_users", "0", "--save_total_limit", "1"]
    return cmd + ["--include_valid_in_train", "true" if kind == "retrain" else "false"]


def train(args: EnsembleArgs, kind: str, seed: int) -> Path:
    """Run (or skip, when complete) one training stage; the model dir."""
    run = Path(args.output_root) / f"{kind}_s{seed}"
    _run(
        _sweep_args(args),
        run.name,
        "train",
        train_cmd(args, kind, seed),
        run / "final" / "sidrec" / "meta.json",
    )
    return run / "final"


def eval_cmd(args: EnsembleArgs, name: str, models: list[Path], split: str, mode: str = "prob") -> list[str]:
    """``eval.evaluate`` of one model, or of several as one ensemble in ``mode``."""
    out = Path(args.output_root) / "eval" / f"{name}_{split}"
    cmd = evaluate_cmd(args.eval_config, models[0], [split], name, out)
    if len(models) > 1:
        cmd += ["--ensemble", *map(str, models[1:]), "--ensemble_mode", mode]
    return cmd


def evaluate(args: EnsembleArgs, name: str, models: list[Path], split: str, mode: str = "prob") -> Path:
    metrics = Path(args.output_root) / "eval" / f"{name}_{split}" / "metrics.json"
    _run(_sweep_args(args), name, f"eval_{split}", eval_cmd(args, name, models, split, mode), metrics)
    return metrics


def _metrics(path: Path, key: str) -> dict[str, Any] | None:
    if not path.exists():
        return None
    r = read_json(path)["results"][key]
    return {m: r["metrics"][m] for m in METRICS} | {
        "users": r["extra"]["users"],
        "seconds": r["extra"]["seconds"],
    }


def ensemble_name(mode: str, n: int) -> str:
    return f"ensemble{n}_{mode}"


def run_all(args: EnsembleArgs) -> None:
    trained = [train(args, "train", s) for s in args.seeds]
    for s, model in zip(args.seeds, trained, strict=True):
        evaluate(args, f"seed{s}", [model], "valid")
    for mode in MODES:
        evaluate(args, ensemble_name(mode, len(trained)), trained, "valid", mode)
    mode = best_mode(args)
    retrained = [train(args, "retrain", s) for s in args.seeds]
    for s, model in zip(args.seeds, retrained, strict=True):
        evaluate(args, f"retrain_seed{s}", [model], "test")
    evaluate(args, "retrain_" + ensemble_name(mode, len(retrained)), retrained, "test", mode)


def best_mode(args: EnsembleArgs) -> str:
    scores = {}
    for mode in MODES:
        name = ensemble_name(mode, len(args.seeds))
        m = _metrics(Path(args.output_root) / "eval" / f"{name}_valid" / "metrics.json", f"{name}/valid")
        if m is None:
            raise SystemExit(f"{name}: no validation metrics yet; run the validation stages first")
        scores[mode] = m["NDCG@10"]["value"]
    return max(scores, key=scores.get)


# ---- report ------------------------------------------------------------------------------------
def collect(args: EnsembleArgs) -> dict[str, Any]:
    ev = Path(args.output_root) / "eval"
    n = len(args.seeds)
    rows: dict[str, Any] = {"valid": {}, "test": {}}
    for s in args.seeds:
        rows["valid"][f"seed {s}"] = _metrics(ev / f"seed{s}_valid" / "metrics.json", f"seed{s}/valid")
        rows["test"][f"seed {s}"] = _metrics(
            ev / f"retrain_seed{s}_test" / "metrics.json", f"retrain_seed{s}/test"
        )
    for mode in MODES:
        name = ensemble_name(mode, n)
        rows["valid"][f"ensemble of {n} ({mode})"] = _metrics(
            ev / f"{name}_valid" / "metrics.json", f"{name}/valid"
        )
        rows["test"][f"ensemble of {n} ({mode})"] = _metrics(
            ev / f"retrain_{name}_test" / "metrics.json", f"retrain_{name}/test"
        )
    base = read_json(ROOT / args.baselines_json)["results"]
    retrain = ROOT / args.sasrec_retrain_json
    base_retrain = read_json(retrain)["results"] if retrain.exists() else {}
    for split in ("valid", "test"):
        for label, key, src in (
            ("Popularity", "popularity", base),
            ("SASRec (CE, tied), validation-selected", "sasrec", base),
            (
                "SASRec (CE, tied), retrained on train + valid",
                "sasrec",
                base_retrain if split == "test" else {},
            ),
        ):
            r = src.get(f"{key}/{split}")
            if r:
                rows[split][f"*{label}*"] = {m: r["metrics"][m] for m in METRICS if m in r["metrics"]}
        rows[split] = {k: v for k, v in rows[split].items() if v}
    return rows


def _fmt(m: dict[str, Any] | None, key: str) -> str:
    if not m or key not in m:
        return ""
    v = m[key]
    return (
        f"{v['value']:.4f} [{v['ci_low']:.4f}, {v['ci_high']:.4f}]" if "ci_low" in v else f"{v['value']:.4f}"
    )


def write_report(args: EnsembleArgs, command: str) -> None:
    rows = collect(args)
    info = machine_info()
    meta = {
        "generated": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": command,
        "machine": info,
        "variant": args.variant,
        "overrides": variant_overrides(args.variant),
        "epochs": args.epochs,
        "seeds": args.seeds,
        "threads": args.threads,
    }
    prefix = ROOT / args.report_dir / "ensemble_scientific"
    atomic_write_json(prefix.with_suffix(".json"), {"meta": meta, "rows": rows})
    lines = [
        "# Seed ensembles on Scientific: one constrained beam search over averaged distributions",
        "",
        f"Generated {meta['generated']} by `{command}` on {describe_machine(info)}.",
        "",
        f"Recipe: `{args.sft_config}` + `{' '.join(variant_overrides(args.variant))}` (sweep variant "
        f"`{args.variant}`), {args.epochs} epochs, seeds {', '.join(map(str, args.seeds))}, no evaluation during "
        "training (the last checkpoint is the model). Validation rows: trained on the training targets; "
        "test rows: retrained on train + validation targets (`include_valid_in_train`), the ensemble in the mode "
        "that won on validation. `python -m eval.evaluate ... --ensemble <more checkpoints> --ensemble_mode "
        "prob|logprob`: all 8,317 users, full-catalogue constrained beam search, 20 beams, bootstrap 95% CIs.",
        "",
    ]
    for split in ("valid", "test"):
        lines += [
            f"## {split}",
            "",
            "| model | NDCG@10 | HR@10 | HR@20 | ranking s |",
            "|---|---|---|---|---|",
        ]
        for label, m in rows[split].items():
            secs = f"{m['seconds']:.0f}" if m.get("seconds") is not None else ""
            lines.append(
                f"| {label} | {_fmt(m, 'NDCG@10')} | {_fmt(m, 'HR@10')} | {_fmt(m, 'HR@20')} | {secs} |"
            )
        lines.append("")
    notes = prefix.with_name("ensemble_scientific.notes.md")
    if notes.exists():
        lines += ["## Notes", "", notes.read_text().strip(), ""]
    atomic_write_text(prefix.with_suffix(".md"), "\n".join(lines))
    _plot(rows, prefix.with_suffix(".png"))
    logger.info("wrote %s.{json,md,png}", prefix)


def _plot(rows: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, split in zip(axes, ("valid", "test"), strict=True):
        labels = list(rows[split])
        vals = [rows[split][k]["NDCG@10"]["value"] for k in labels]
        lo = [v - rows[split][k]["NDCG@10"].get("ci_low", v) for k, v in zip(labels, vals, strict=True)]
        hi = [rows[split][k]["NDCG@10"].get("ci_high", v) - v for k, v in zip(labels, vals, strict=True)]
        colors = [
            "tab:gray" if k.startswith("*") else "tab:orange" if "ensemble" in k else "tab:blue"
            for k in labels
        ]
        ax.barh(labels, vals, xerr=[lo, hi], color=colors, capsize=3)
        ax.invert_yaxis()
        ax.set_title(f"Scientific {split}, all users")
        ax.set_xlabel("NDCG@10 (95% CI)")
    fig.tight_layout()
    atomic_save_figure(fig, path)
    plt.close(fig)


def main() -> None:
    from trl import TrlParser

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    (args,) = TrlParser((EnsembleArgs,)).parse_args_and_config()
    os.chdir(ROOT)
    if args.only:
        kind, _, seed = args.only.partition("_s")
        if kind not in ("train", "retrain") or not seed.lstrip("-").isdigit():
            raise SystemExit(f"--only {args.only!r}: train_s<seed> or retrain_s<seed>")
        train(args, kind, int(seed))
        return
    if not args.report_only:
        run_all(args)
    write_report(args, "python -m benchmarks.ensemble_scientific " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
