"""Item-level ranking metrics (HR@K, NDCG@K) with bootstrap confidence intervals.

The protocol is TIGER/GRID/MiniOneRec: leave-one-out, one target item per example, the model
ranks the full catalogue and returns its top candidates.

A candidate is a *group* of item ids: the items that share one Semantic ID (G >= 1 items; with
collision-free SIDs every group has one item). A hit on a group of G items counts with
probability 1/G, the chance that picking one item of the group uniformly gives the target, so
collisions cannot inflate the metrics::

    HR@k   = sum_u [rank_u <= k] / G_u                    / num_examples
    NDCG@k = sum_u [rank_u <= k] / G_u / log2(rank_u + 1) / num_examples

where ``rank_u`` is the 1-based position of the first group containing the target. An empty
group is an invalid generation (a SID that maps to no catalogue item): it never hits but
occupies its rank. With one target per example the ideal DCG is 1, so NDCG needs no
normalisation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

DEFAULT_KS: tuple[int, ...] = (1, 3, 5, 10, 20)


def metric_names(ks: Sequence[int] = DEFAULT_KS) -> list[str]:
    """Metric names in table order: HR@k, NDCG@k for each k ascending."""
    return [f"{m}@{k}" for k in sorted(ks) for m in ("HR", "NDCG")]


def singleton_groups(ranked_items: Sequence[Sequence[int]]) -> list[list[list[int]]]:
    """Wrap plain ranked item lists (one item per rank) into the group format of `rank_metrics`."""
    return [[[int(i)] for i in items] for items in ranked_items]


def hit_rank_and_weight(candidates: Sequence[Sequence[int]], target: int) -> tuple[int, float]:
    """1-based rank of the first group containing ``target`` and its weight 1/G; (0, 0.0) on a miss."""
    for pos, group in enumerate(candidates, start=1):
        if target in group:
            return pos, 1.0 / len(set(group))
    return 0, 0.0


def rank_metrics(
    ranked: Sequence[Sequence[Sequence[int]]], targets: Sequence[int], ks: Sequence[int] = DEFAULT_KS
) -> dict[str, Any]:
    """Item-level HR@k / NDCG@k of ranked candidate groups against one target per example.

    Args:
        ranked: ``ranked[u]`` is example u's ranked list of candidates, best first; each
            candidate is the list of item ids sharing that SID (``[]`` = invalid generation).
            Lists may be shorter than ``max(ks)`` (missing ranks never hit).
        targets: ``targets[u]`` is example u's target item id.
        ks: cut-offs.

    Returns:
        ``{"HR@k": float, "NDCG@k": float, ... (for each k), "valid_rate": float,
        "num_examples": int, "per_example": {name: np.ndarray of shape (num_examples,)}}``.
        ``valid_rate`` is the mean share of non-empty candidates among each example's
        top ``max(ks)`` candidates (0 for an example with no candidates).
    """
    if len(ranked) != len(targets):
        raise ValueError(f"ranked has {len(ranked)} examples but targets has {len(targets)}")
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    kmax = ks[-1]
    n = len(targets)
    rank = np.zeros(n, dtype=np.int64)
    weight = np.zeros(n, dtype=np.float64)
    valid = np.zeros(n, dtype=np.float64)
    for u, (cands, target) in enumerate(zip(ranked, targets, strict=True)):
        top = cands[:kmax]
        rank[u], weight[u] = hit_rank_and_weight(top, int(target))
        if len(top):
            valid[u] = sum(1 for g in top if len(g) > 0) / len(top)
    # rank 0 (miss) gets a finite dummy discount; its weight is 0 anyway
    gain = weight / np.log2(np.where(rank > 0, rank, 1) + 1.0)
    per_example: dict[str, np.ndarray] = {}
    for k in ks:
        within = (rank > 0) & (rank <= k)
        per_example[f"HR@{k}"] = np.where(within, weight, 0.0)
        per_example[f"NDCG@{k}"] = np.where(within, gain, 0.0)
    per_example["valid_rate"] = valid
    out: dict[str, Any] = {name: float(v.mean()) if n else math.nan for name, v in per_example.items()}
    out["num_examples"] = n
    out["per_example"] = per_example
    return out


def _bootstrap_means(matrix: np.ndarray, n_boot: int, seed: int, chunk: int = 100) -> np.ndarray:
    """Means of ``n_boot`` resamples (with replacement) of the columns of ``matrix`` (m, n) -> (m, n_boot).

    Every row uses the same resamples (paired), so CIs of different metrics are consistent.
    Resamples are drawn as count vectors, so each chunk is one (m, n) @ (n, chunk) product.
    """
    m, n = matrix.shape
    rng = np.random.default_rng(seed)
    out = np.empty((m, n_boot))
    for start in range(0, n_boot, chunk):
        c = min(chunk, n_boot - start)
        idx = rng.integers(0, n, size=(c, n)) + (np.arange(c) * n)[:, None]
        counts = np.bincount(idx.ravel(), minlength=c * n).reshape(c, n)
        out[:, start : start + c] = matrix @ counts.T / n
    return out


def bootstrap_ci(
    per_example: np.ndarray, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap (1 - alpha) confidence interval of the mean of ``per_example`` (n,)."""
    x = np.asarray(per_example, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"per_example must be 1-D, got shape {x.shape}")
    if x.size == 0:
        return math.nan, math.nan
    means = _bootstrap_means(x[None, :], n_boot, seed)[0]
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def metrics_with_ci(
    result: dict[str, Any], n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> dict[str, dict[str, float]]:
    """``{metric: {"value", "ci_low", "ci_high"}}`` for every per-example metric of a `rank_metrics` result.

    All metrics share the same bootstrap resamples.
    """
    per_example: dict[str, np.ndarray] = result["per_example"]
    names = list(per_example)
    if not names:
        return {}
    matrix = np.stack([np.asarray(per_example[k], dtype=np.float64) for k in names])
    if matrix.shape[1] == 0:
        return {k: {"value": math.nan, "ci_low": math.nan, "ci_high": math.nan} for k in names}
    means = _bootstrap_means(matrix, n_boot, seed)
    lows, highs = np.quantile(means, [alpha / 2, 1 - alpha / 2], axis=1)
    return {
        k: {"value": float(matrix[i].mean()), "ci_low": float(lows[i]), "ci_high": float(highs[i])}
        for i, k in enumerate(names)
    }


def paired_difference(diff: np.ndarray, n_boot: int = 1000, seed: int = 0, **labels) -> dict:
    """Summary of per-user differences (model - baseline on the same users): mean, percentile
    bootstrap 95% CI of the mean, users better / worse; ``labels`` (model, split, ...) lead the row."""
    diff = np.asarray(diff, dtype=np.float64)
    low, high = bootstrap_ci(diff, n_boot=n_boot, seed=seed)
    return {
        **labels,
        "users": len(diff),
        "difference": float(diff.mean()),
        "ci_low": low,
        "ci_high": high,
        "better_users": int((diff > 0).sum()),
        "worse_users": int((diff < 0).sum()),
    }
