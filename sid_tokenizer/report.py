"""Quality figures of a SID assignment: per-level code usage, prefix counts, reconstruction error.

``level_usage`` gives, per level, the share of the codebook that any item uses and the
normalised entropy of the code distribution (1.0 = every code equally often); ``plot_usage``
draws the sorted code-usage curve of each level (a flat curve is a balanced codebook).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from data_prep.io import atomic_save_figure
from sid_tokenizer.sid import LEVEL_PREFIXES


def level_usage(codes: np.ndarray, level_sizes: tuple[int, ...]) -> list[dict[str, Any]]:
    """codes (N, L) -> per level: used codes, utilisation (used / K), normalised entropy,
    largest code's share, and distinct prefixes up to and including that level."""
    codes = np.asarray(codes, dtype=np.int64)
    out = []
    for lv, size in enumerate(level_sizes):
        counts = np.bincount(codes[:, lv], minlength=size)
        p = counts[counts > 0] / counts.sum()
        entropy = float(-(p * np.log(p)).sum())
        out.append(
            {
                "level": LEVEL_PREFIXES[lv],
                "codebook_size": int(size),
                "used_codes": int((counts > 0).sum()),
                "utilisation": float((counts > 0).sum() / size),
                "entropy_norm": entropy / float(np.log(size)) if size > 1 else 1.0,
                "max_code_share": float(counts.max() / counts.sum()),
                "distinct_prefixes": int(len(np.unique(codes[:, : lv + 1], axis=0))),
            }
        )
    return out


def reconstruction_error(x: np.ndarray, x_hat: np.ndarray) -> dict[str, float]:
    """MSE per element and relative error sum ||x - x_hat||^2 / sum ||x||^2."""
    x = np.asarray(x, dtype=np.float64)
    err = ((x - np.asarray(x_hat, dtype=np.float64)) ** 2).sum()
    return {"mse": float(err / x.size), "relative": float(err / max((x**2).sum(), 1e-12))}


def plot_usage(codes: np.ndarray, level_sizes: tuple[int, ...], path: str | Path, title: str = "") -> None:
    """Write a PNG: per level, items per code sorted in decreasing order (atomic write)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    codes = np.asarray(codes, dtype=np.int64)
    n = len(level_sizes)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.0), squeeze=False)
    for lv, (ax, size) in enumerate(zip(axes[0], level_sizes, strict=True)):
        counts = np.sort(np.bincount(codes[:, lv], minlength=size))[::-1]
        ax.bar(np.arange(size), counts, width=1.0, color="C0")
        ax.axhline(len(codes) / size, color="C3", lw=1, ls="--", label="uniform")
        used = int((counts > 0).sum())
        ax.set_title(f"level {LEVEL_PREFIXES[lv]}: {used}/{size} codes used", fontsize=9)
        ax.set_xlabel("code rank")
        if lv == 0:
            ax.set_ylabel("items")
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    atomic_save_figure(fig, path, dpi=100)
