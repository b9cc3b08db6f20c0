"""SID collisions (items sharing a full SID): statistics and two ways to remove them.

``extra_level`` (TIGER / GRID): append a dedup level numbering the items 0, 1, 2, ... within
each group of identical SIDs; its size is the largest group. SIDs get one token longer.

``reassign``: keep the SID length. Within each last-level prefix holding a collision, the
colliding items are matched to the prefix's free last-level codes by minimum-cost assignment
(``scipy.optimize.linear_sum_assignment``), cost = squared distance of the item's last-level
residual to the code's centroid. Items left over (more colliders than free codes) are
re-routed to their next-nearest code at the previous level whose prefix still has a free
last-level code; if even that fails a ``CollisionError`` recommends ``extra_level``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.optimize import linear_sum_assignment

if TYPE_CHECKING:
    from sid_tokenizer.quantizers import Quantizer

logger = logging.getLogger(__name__)

STRATEGIES = ("none", "extra_level", "reassign")


class CollisionError(ValueError):
    """Collisions that a strategy cannot remove."""


def collision_stats(codes: np.ndarray) -> dict[str, Any]:
    """codes (N, L) -> counts of shared SIDs.

    ``collisions`` = items that share their SID with an earlier item (N - distinct SIDs);
    ``colliding_items`` = all items in groups of 2 or more.
    """
    codes = np.asarray(codes, dtype=np.int64)
    _, counts = np.unique(codes, axis=0, return_counts=True)
    n = len(codes)
    collisions = n - len(counts)
    return {
        "items": n,
        "distinct_sids": len(counts),
        "collisions": int(collisions),
        "collision_rate": collisions / n if n else 0.0,
        "colliding_items": int(counts[counts > 1].sum()),
        "colliding_groups": int((counts > 1).sum()),
        "max_group_size": int(counts.max()) if n else 0,
    }


def _group_ids(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """rows (N, L) -> (group id per row (N,), group sizes)."""
    if rows.shape[1] == 0:
        return np.zeros(len(rows), dtype=np.int64), np.array([len(rows)])
    _, inverse, counts = np.unique(rows, axis=0, return_inverse=True, return_counts=True)
    return inverse.reshape(-1), counts


def add_dedup_level(codes: np.ndarray) -> tuple[np.ndarray, int]:
    """Append a level numbering items 0, 1, ... within each group of equal SIDs (item order).

    Returns (codes (N, L + 1), size of the new level = largest group).
    """
    codes = np.asarray(codes, dtype=np.int64)
    group, counts = _group_ids(codes)
    order = np.argsort(group, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(len(codes), dtype=np.int64)
    rank[order] = np.arange(len(codes)) - starts[group[order]]
    return np.concatenate([codes, rank[:, None]], axis=1), int(counts.max())


def _occupied(codes: np.ndarray, items: np.ndarray) -> dict[tuple[int, ...], set[int]]:
    """prefix (first L-1 codes) -> set of last-level codes taken by ``items``."""
    occ: dict[tuple[int, ...], set[int]] = {}
    for row in codes[items].tolist():
        occ.setdefault(tuple(row[:-1]), set()).add(row[-1])
    return occ


def reassign_last_level(
    codes: np.ndarray, embeddings: np.ndarray, quantizer: Quantizer, reroute: bool = True
) -> tuple[np.ndarray, dict[str, int]]:
    """Remove collisions by changing last-level codes (and, if needed, previous-level codes).

    codes (N, L) from ``quantizer`` for ``embeddings`` (N, D). Returns (new codes (N, L),
    counts: items moved within their prefix, items re-routed to another prefix).
    """
    codes = np.asarray(codes, dtype=np.int64).copy()
    num_levels = codes.shape[1]
    k_last = quantizer.level_sizes[-1]
    group, counts = _group_ids(codes)
    colliding = np.flatnonzero(counts[group] > 1)
    info = {"moved": 0, "rerouted": 0}
    if len(colliding) == 0:
        return codes, info
    occupied = _occupied(codes, np.flatnonzero(counts[group] == 1))
    # cost of every last-level code for every colliding item, computed in one batch
    cost_all = quantizer.level_distances(embeddings[colliding], codes[colliding], num_levels - 1)
    prefix_group, _ = _group_ids(codes[colliding, :-1])
    overflow: list[int] = []
    for g in np.unique(prefix_group):
        rows = np.flatnonzero(prefix_group == g)
        movers = colliding[rows]
        prefix = tuple(codes[movers[0], :-1].tolist())
        taken = occupied.setdefault(prefix, set())
        free = np.setdiff1d(np.arange(k_last), np.fromiter(taken, dtype=np.int64, count=len(taken)))
        r, c = linear_sum_assignment(cost_all[rows][:, free])
        new = free[c]
        info["moved"] += int((codes[movers[r], -1] != new).sum())
        codes[movers[r], -1] = new
        taken.update(new.tolist())
        overflow.extend(np.setdiff1d(movers, movers[r]).tolist())
    if overflow:
        if not reroute or num_levels < 2:
            raise CollisionError(
                f"{len(overflow)} item(s) share a prefix that has no free last-level code "
                f"(codebook size {k_last}); use collision_strategy=extra_level or a larger "
                "codebook"
            )
        for i in overflow:
            _reroute(i, codes, embeddings, quantizer, occupied)
        info["rerouted"] = len(overflow)
        logger.info(
            "re-routed %d item(s) over level %d: their prefix had no free last-level code",
            len(overflow),
            num_levels - 2,
        )
    return codes, info


def _reroute(
    i: int,
    codes: np.ndarray,
    embeddings: np.ndarray,
    quantizer: Quantizer,
    occupied: dict[tuple[int, ...], set[int]],
) -> None:
    """Move item i to its nearest previous-level code whose prefix has a free last-level code."""
    num_levels = codes.shape[1]
    k_last = quantizer.level_sizes[-1]
    x = embeddings[i : i + 1]
    prev = quantizer.level_distances(x, codes[i : i + 1], num_levels - 2)[0]
    for c in np.argsort(prev, kind="stable"):
        trial = codes[i].copy()
        trial[num_levels - 2] = c
        taken = occupied.setdefault(tuple(trial[:-1].tolist()), set())
        if len(taken) >= k_last:
            continue
        last = quantizer.level_distances(x, trial[None], num_levels - 1)[0]
        last[list(taken)] = np.inf
        trial[-1] = int(np.argmin(last))
        codes[i] = trial
        taken.add(int(trial[-1]))
        return
    raise CollisionError(
        f"item {i}: every prefix over level {num_levels - 2} is full; use collision_strategy=extra_level"
    )


def resolve_collisions(
    codes: np.ndarray,
    strategy: str,
    level_sizes: tuple[int, ...],
    embeddings: np.ndarray | None = None,
    quantizer: Quantizer | None = None,
    reroute: bool = True,
) -> tuple[np.ndarray, tuple[int, ...], dict[str, Any]]:
    """Apply ``strategy`` (one of ``STRATEGIES``) -> (codes, level sizes, info).

    ``extra_level`` always appends the dedup level (also without collisions, so the SID length
    does not depend on the data); ``reassign`` needs the quantizer and the embeddings.
    """
    codes = np.asarray(codes, dtype=np.int64)
    level_sizes = tuple(int(s) for s in level_sizes)
    info: dict[str, Any] = {"strategy": strategy}
    if strategy == "none":
        remaining = collision_stats(codes)["collisions"]
        if remaining:
            logger.warning("collision_strategy=none: %d item(s) share a SID with another item", remaining)
        return codes, level_sizes, info
    if strategy == "extra_level":
        out, size = add_dedup_level(codes)
        info["dedup_level_size"] = size
        return out, (*level_sizes, size), info
    if strategy == "reassign":
        if quantizer is None or embeddings is None:
            raise CollisionError(
                "collision_strategy=reassign needs the quantizer and the item embeddings "
                "(an imported index has neither); use extra_level or none"
            )
        out, moved = reassign_last_level(codes, embeddings, quantizer, reroute=reroute)
        info.update(moved)
        left = collision_stats(out)["collisions"]
        if left:  # cannot happen: every mover got a free code; guard the invariant anyway
            raise CollisionError(f"reassign left {left} collision(s)")
        return out, level_sizes, info
    raise ValueError(f"unknown collision_strategy {strategy!r}; choose one of {STRATEGIES}")


def pick_free_codes(
    codes: np.ndarray, last_costs: np.ndarray, taken_sids: set[tuple[int, ...]]
) -> np.ndarray:
    """For new items: keep each SID if free, else the cheapest free last-level code of its prefix.

    codes (M, L) from ``Quantizer.encode``; last_costs (M, K) from ``level_distances`` at the
    last level; ``taken_sids`` (updated in place) holds the SIDs already in use. An item whose
    whole prefix is taken keeps its colliding SID (logged).
    """
    out = np.asarray(codes, dtype=np.int64).copy()
    for i, row in enumerate(out.tolist()):
        sid = tuple(row)
        if sid in taken_sids:
            for c in np.argsort(last_costs[i], kind="stable").tolist():
                cand = (*sid[:-1], c)
                if cand not in taken_sids:
                    sid = cand
                    break
            else:
                logger.warning(
                    "new item %d: every last-level code of prefix %s is taken; it shares SID %s",
                    i,
                    sid[:-1],
                    sid,
                )
        out[i] = sid
        taken_sids.add(sid)
    return out
