"""Metric reports: JSON + markdown tables with confidence intervals + a PNG plot of HR@K / NDCG@K.

``results`` is shared by every evaluation in the project (baselines, LLM runs)::

    {row_key: {"model": "sasrec",            # display name (default: row_key)
               "split": "test",              # one table per split in the markdown
               "metrics": {"HR@10": {"value": .., "ci_low": .., "ci_high": ..}, ...},
               "extra": {...}}}              # anything JSON-serialisable (timings, config, ...)

Row keys must be unique, so a model evaluated on two splits needs two keys
(e.g. ``"sasrec/valid"`` and ``"sasrec/test"``). Reports of separate runs (baselines, LLM
checkpoints) are combined with ``python -m eval.report --inputs a.json b.json --output_prefix p``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_prep.io import DataError, atomic_save_figure, atomic_write_json, atomic_write_text, read_json
from data_prep.provenance import run_info

_AT_K = re.compile(r"^(?P<family>[A-Za-z_]+)@(?P<k>\d+)$")
_SPLIT_ORDER = {"test": 0, "valid": 1}


def _metric_sort_key(name: str) -> tuple:
    """Order columns as HR@1, NDCG@1, HR@3, ... then every other metric by name."""
    m = _AT_K.match(name)
    if m is None:
        return (1, 0, 0, name)
    family = {"HR": 0, "NDCG": 1}.get(m["family"], 2)
    return (0, int(m["k"]), family, m["family"])


def _ordered_metrics(results: dict[str, dict[str, Any]], metrics: Sequence[str] | None) -> list[str]:
    if metrics is not None:
        return list(metrics)
    names = {name for r in results.values() for name in r.get("metrics", {})}
    return sorted(names, key=_metric_sort_key)


def _fmt(cell: dict[str, float] | None, digits: int) -> str:
    if not cell or cell.get("value") is None or math.isnan(cell["value"]):
        return "–"
    text = f"{cell['value']:.{digits}f}"
    low, high = cell.get("ci_low"), cell.get("ci_high")
    if low is not None and high is not None and not (math.isnan(low) or math.isnan(high)):
        text += f" [{low:.{digits}f}, {high:.{digits}f}]"
    return text


def _scalar_extras(extra: dict[str, Any]) -> str:
    parts = []
    for k, v in extra.items():
        if isinstance(v, float):
            parts.append(f"{k}={v:.4g}")
        elif isinstance(v, int | str | bool):
            parts.append(f"{k}={v}")
    return ", ".join(parts)


def _splits(results: dict[str, dict[str, Any]]) -> list[str]:
    splits = {r.get("split", "") for r in results.values()}
    return sorted(splits, key=lambda s: (_SPLIT_ORDER.get(s, 2), s))


def metrics_markdown(
    results: dict[str, dict[str, Any]],
    metrics: Sequence[str] | None = None,
    title: str | None = None,
    notes: Sequence[str] = (),
    digits: int = 4,
) -> str:
    """Markdown: one table per split (test first), rows = models, cells = ``value [ci_low, ci_high]``."""
    names = _ordered_metrics(results, metrics)
    lines: list[str] = []
    if title:
        lines += [f"# {title}", ""]
    if notes:
        for note in notes:
            lines += [note, ""]
    for split in _splits(results):
        rows = [(key, r) for key, r in results.items() if r.get("split", "") == split]
        lines += [f"## {split or 'results'}", ""]
        lines.append("| model | " + " | ".join(names) + " |")
        lines.append("|---|" + "---|" * len(names))
        for key, r in rows:
            cells = [_fmt(r.get("metrics", {}).get(n), digits) for n in names]
            lines.append(f"| {r.get('model', key)} | " + " | ".join(cells) + " |")
        extras = [(r.get("model", key), _scalar_extras(r.get("extra", {}))) for key, r in rows]
        extras = [(m, e) for m, e in extras if e]
        if extras:
            lines.append("")
            lines += [f"- {m}: {e}" for m, e in extras]
        lines.append("")
    return "\n".join(lines)


def plot_metrics(
    results: dict[str, dict[str, Any]], path: str | Path, families: Sequence[str] = ("HR", "NDCG")
) -> None:
    """PNG: one panel per (split, metric family), metric@K against K, one line per model, CI as band."""
    import matplotlib

    matplotlib.use("Agg")

    import matplotlib.pyplot as plt

    splits = _splits(results)
    fig, axes = plt.subplots(
        len(splits), len(families), figsize=(5 * len(families), 3.6 * len(splits)), squeeze=False
    )
    for row, split in enumerate(splits):
        for col, family in enumerate(families):
            ax = axes[row][col]
            for key, r in results.items():
                if r.get("split", "") != split:
                    continue
                points = []
                for name, cell in r.get("metrics", {}).items():
                    m = _AT_K.match(name)
                    if m and m["family"] == family:
                        points.append((int(m["k"]), cell["value"], cell.get("ci_low"), cell.get("ci_high")))
                if not points:
                    continue
                points.sort()
                ks = [p[0] for p in points]
                line = ax.plot(ks, [p[1] for p in points], marker="o", label=r.get("model", key))[0]
                if all(p[2] is not None and p[3] is not None for p in points):
                    ax.fill_between(
                        ks,
                        [p[2] for p in points],
                        [p[3] for p in points],
                        color=line.get_color(),
                        alpha=0.15,
                        linewidth=0,
                    )
            ax.set_title(f"{family}@K ({split})" if split else f"{family}@K")
            ax.set_xlabel("K")
            ax.set_ylabel(f"{family}@K")
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.set_xscale("log", base=2)
                ticks = sorted({int(x) for ln in ax.lines for x in ln.get_xdata()})
                ax.set_xticks(ticks, [str(t) for t in ticks])
                ax.legend(fontsize=8)
    atomic_save_figure(fig, path, dpi=120)


def write_metrics_report(
    results: dict[str, dict[str, Any]],
    path_prefix: str | Path,
    meta: dict[str, Any] | None = None,
    metrics: Sequence[str] | None = None,
    title: str | None = None,
    notes: Sequence[str] = (),
    plot: bool = True,
) -> list[Path]:
    """Write ``<prefix>.json`` ({"meta", "results"}), ``<prefix>.md`` and ``<prefix>.png``, atomically each.

    Returns the written paths.
    """
    prefix = Path(path_prefix)
    paths = [prefix.with_name(prefix.name + ".json"), prefix.with_name(prefix.name + ".md")]
    atomic_write_json(
        paths[0],
        {"meta": {**run_info(), **(meta or {})}, "title": title, "notes": list(notes), "results": results},
    )
    atomic_write_text(paths[1], metrics_markdown(results, metrics, title=title, notes=notes))
    if plot:
        paths.append(prefix.with_name(prefix.name + ".png"))
        plot_metrics(results, paths[2])
    return paths


def read_metrics_report(path: str | Path) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Load a ``<prefix>.json`` written by `write_metrics_report` -> (results, meta)."""
    report = read_json(path)
    if not isinstance(report, dict) or not isinstance(report.get("results"), dict):
        raise DataError(path, "not a metrics report: expected an object with a 'results' object")
    for key, row in report["results"].items():
        if not isinstance(row, dict) or not isinstance(row.get("metrics"), dict):
            raise DataError(path, "row has no 'metrics' object", key=key, field="metrics")
    return report["results"], report.get("meta", {})


@dataclass
class MergeReportsArgs:
    inputs: list[str] = field(
        default_factory=list, metadata={"help": "report JSON files; a later file's rows replace equal keys"}
    )
    output_prefix: str = field(default="outputs/report", metadata={"help": "writes <prefix>.{json,md,png}"})
    title: str | None = field(default=None, metadata={"help": "markdown title (default: the first input's)"})
    metrics: list[str] | None = field(default=None, metadata={"help": "table columns (default: all)"})
    notes: list[str] = field(
        default_factory=list, metadata={"help": "lines under the title (default: the first input's)"}
    )


def merge_metrics_reports(args: MergeReportsArgs) -> dict[str, dict[str, Any]]:
    """Concatenate the rows of several reports (e.g. baselines + an LLM run) into one report.

    The merged meta keeps each input's meta under its path, so every row stays traceable.
    """
    if not args.inputs:
        raise ValueError("inputs: give at least one report JSON")
    results: dict[str, dict[str, Any]] = {}
    metas: dict[str, Any] = {}
    for path in args.inputs:
        rows, meta = read_metrics_report(path)
        results.update(rows)
        metas[str(path)] = meta
    first = read_json(args.inputs[0])
    write_metrics_report(
        results,
        args.output_prefix,
        meta={"merged_from": metas},
        metrics=args.metrics,
        title=args.title if args.title is not None else first.get("title"),
        notes=args.notes or first.get("notes") or (),
    )
    return results


def main() -> None:
    """``python -m eval.report --inputs a.json b.json --output_prefix docs/results/x``."""
    import logging

    from trl import TrlParser

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    (args,) = TrlParser((MergeReportsArgs,)).parse_args_and_config()
    merge_metrics_reports(args)
    logging.getLogger(__name__).info("wrote %s.{json,md,png}", args.output_prefix)


if __name__ == "__main__":
    main()
