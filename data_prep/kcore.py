"""Interaction logs -> filtered, split ``RecDataset``: shared by the raw Amazon and generic loaders.

Steps, in order (``build_dataset``), each counted in ``meta.json["filtering"]``:

1. time window: keep ``start_time <= t < end_time`` (ISO dates/times, UTC when no offset);
2. de-duplicate (user, item): keep the chronologically first, stable on equal timestamps
   (file order decides);
3. iterative k-core: drop users and items with fewer than ``k`` interactions until none is left;
4. users with fewer than 3 interactions (possible only for ``k < 3``) are dropped and counted:
   leave-one-out needs a training item, a validation target and a test target;
5. dense ids (raw ids sorted), chronological sequences, then the split:
   ``leave_one_out`` (last -> test, second-to-last -> valid) or ``temporal`` (global time
   cutoffs: interactions at/after ``test_start`` are test targets, those in
   ``[valid_start, test_start)`` valid targets, the rest training; every target's history is the
   user's full earlier sequence; defaults are the 80% / 90% quantiles of the timestamps, i.e.
   MiniOneRec's 8:1:1).
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import numbers
import os
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

from data_prep.dataset import Example, Item, RecDataset, check_no_leakage, leave_one_out
from data_prep.io import DataError

logger = logging.getLogger(__name__)

SPLITS = ("leave_one_out", "temporal")
MIN_SEQUENCE_LENGTH = 3
# Interaction logs are after 1970 and before 2100: anything else is a placeholder (9999-12-31),
# a unit error or corruption, and would silently reorder every sequence it is part of.
MIN_TIME = 0.0
MAX_TIME = _dt.datetime(2100, 1, 1, tzinfo=_dt.UTC).timestamp()
# Epoch numbers are read in the unit that puts them in the window: seconds for 1970..2100, and
# milliseconds, microseconds or nanoseconds for 1980..2100 (each value on its own, so a log may
# mix them). The later start of the finer units keeps them apart from seconds: the year 9999 in
# seconds (2.5e11) would read as 1978 in milliseconds, and is an error instead.
MIN_SUBSECOND_TIME = _dt.datetime(1980, 1, 1, tzinfo=_dt.UTC).timestamp()
_UNITS = (
    (1.0, "seconds", MIN_TIME),
    (1e3, "milliseconds", MIN_SUBSECOND_TIME),
    (1e6, "microseconds", MIN_SUBSECOND_TIME),
    (1e9, "nanoseconds", MIN_SUBSECOND_TIME),
)


@dataclass(slots=True)
class Interaction:
    """One event of the log; ``line`` is where it was read (for error messages)."""

    user: str
    item: str
    time: float  # epoch seconds, UTC
    line: int = 0


@dataclass
class FilterOptions:
    """What ``build_dataset`` keeps and how it splits (see the module docstring)."""

    min_interactions: int = 5
    start_time: str | None = None
    end_time: str | None = None
    split: str = "leave_one_out"
    valid_start: str | None = None
    test_start: str | None = None

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split {self.split!r}: expected one of {SPLITS}")
        if self.min_interactions < 1:
            raise ValueError(f"min_interactions {self.min_interactions}: expected >= 1")
        if self.split != "temporal" and (self.valid_start or self.test_start):
            raise ValueError("valid_start/test_start only apply to split: temporal")


def parse_time(
    value: Any,
    path: str | os.PathLike,
    line: int | None = None,
    key: str | None = None,
    field: str = "timestamp",
) -> float:
    """Epoch seconds, ms, us or ns (told apart by magnitude, see ``_UNITS``) or ISO-8601 -> epoch seconds.

    ISO values without an offset are taken as UTC. Times must lie in [1970-01-01, 2100-01-01)
    (``MIN_TIME``, ``MAX_TIME``). Anything else is a DataError naming the file, line and field.
    """
    if isinstance(value, bool) or value is None:
        raise DataError(
            path,
            f"timestamp {value!r}: expected epoch seconds/ms or ISO-8601",
            line=line,
            key=key,
            field=field,
        )
    if isinstance(value, _dt.datetime):  # e.g. a timestamp column typed by pandas / HF datasets
        return _in_range(value, value, path, line, key, field)
    if isinstance(value, _dt.date):
        return _in_range(_dt.datetime(value.year, value.month, value.day), value, path, line, key, field)
    if isinstance(value, numbers.Real):  # int, float and numpy scalars
        return _epoch(float(value), value, path, line, key, field)
    if isinstance(value, str):
        text = value.strip()
        try:
            number = float(text)
        except ValueError:
            number = None
        if number is not None:
            return _epoch(number, value, path, line, key, field)
        try:
            parsed = _dt.datetime.fromisoformat(text)
        except ValueError:
            raise DataError(
                path,
                f"unparsable timestamp {value!r}: expected epoch seconds/ms or "
                "ISO-8601 such as 2024-03-02T14:05:00Z",
                line=line,
                key=key,
                field=field,
            ) from None
        return _in_range(parsed, value, path, line, key, field)
    raise DataError(
        path,
        f"timestamp of type {type(value).__name__}: expected a number or a string",
        line=line,
        key=key,
        field=field,
    )


def _epoch(
    number: float,
    value: Any,
    path: str | os.PathLike,
    line: int | None,
    key: str | None,
    field: str,
) -> float:
    if not math.isfinite(number) or number < 0:
        raise DataError(
            path, f"timestamp {value!r} is not a valid epoch time", line=line, key=key, field=field
        )
    for scale, _name, floor in _UNITS:
        seconds = number / scale
        if floor <= seconds < MAX_TIME:
            return seconds
    readings = ", ".join(f"{iso_or_far(number / scale)} as {name}" for scale, name, _ in _UNITS)
    raise DataError(
        path,
        f"timestamp {value!r} is no plausible epoch time ({readings}): expected seconds for "
        f"{iso(MIN_TIME)[:10]}..{iso(MAX_TIME)[:10]} or ms/us/ns for {iso(MIN_SUBSECOND_TIME)[:10]}.."
        f"{iso(MAX_TIME)[:10]}",
        line=line,
        key=key,
        field=field,
    )


def iso_or_far(t: float) -> str:
    return iso(t)[:10] if -62135596800 <= t < 253402300800 else ("after 9999" if t > 0 else "before 0001")


def _in_range(
    parsed: _dt.datetime, value: Any, path: str | os.PathLike, line: int | None, key: str | None, field: str
) -> float:
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=_dt.UTC)
    try:
        seconds = parsed.timestamp()
    except (OverflowError, OSError, ValueError):
        seconds = math.inf
    if not MIN_TIME <= seconds < MAX_TIME:
        raise DataError(
            path,
            f"timestamp {value!r} is outside {iso(MIN_TIME)[:10]}..{iso(MAX_TIME)[:10]} "
            "(a placeholder date or a unit error?)",
            line=line,
            key=key,
            field=field,
        )
    return seconds


def option_time(value: str | None, name: str) -> float | None:
    """Parse an ISO date option (``start_time``, ``valid_start``, ...) to epoch seconds."""
    if value is None or value == "":
        return None
    try:  # an option may lie outside the data's plausible range (end_time: 9999-12-31 = no bound)
        parsed = _dt.datetime.fromisoformat(str(value).strip())
    except ValueError:
        return parse_time(str(value), "<config>", field=name)
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=_dt.UTC)).timestamp()


def iso(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.UTC).isoformat(timespec="seconds")


def filter_time_window(
    inters: list[Interaction], start: float | None, end: float | None
) -> list[Interaction]:
    if start is None and end is None:
        return inters
    lo = -math.inf if start is None else start
    hi = math.inf if end is None else end
    return [x for x in inters if lo <= x.time < hi]


def deduplicate(inters: list[Interaction]) -> list[Interaction]:
    """Chronological (stable) order; a repeated (user, item) keeps its first occurrence."""
    seen: set[tuple[str, str]] = set()
    out = []
    for x in sorted(inters, key=lambda x: x.time):
        pair = (x.user, x.item)
        if pair not in seen:
            seen.add(pair)
            out.append(x)
    return out


def kcore(inters: list[Interaction], k: int) -> tuple[list[Interaction], int]:
    """Iteratively drop users and items with fewer than ``k`` interactions; returns (kept, rounds)."""
    rounds = 0
    while True:
        users = Counter(x.user for x in inters)
        items = Counter(x.item for x in inters)
        kept = [x for x in inters if users[x.user] >= k and items[x.item] >= k]
        if len(kept) == len(inters):
            return kept, rounds
        inters, rounds = kept, rounds + 1


def _quantile_time(times: list[float], q: float) -> float:
    ordered = sorted(times)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def temporal_split(
    sequences: list[list[int]], times: list[list[float]], valid_start: float, test_start: float
) -> tuple[list[list[int]], list[Example], list[Example], int]:
    """Global-cutoff split; returns (train, valid, test, targets skipped for lack of history)."""
    if not valid_start <= test_start:
        raise ValueError(f"valid_start {iso(valid_start)} is after test_start {iso(test_start)}")
    train, valid, test = [], [], []
    no_history = 0
    for u, (seq, ts) in enumerate(zip(sequences, times, strict=True)):
        train.append([i for i, t in zip(seq, ts, strict=True) if t < valid_start])
        for p, (item, t) in enumerate(zip(seq, ts, strict=True)):
            if t < valid_start:
                continue
            if p == 0:  # a user's very first event has nothing to predict it from
                no_history += 1
                continue
            (valid if t < test_start else test).append(Example(u, list(seq[:p]), item))
    return train, valid, test, no_history


def build_dataset(
    name: str,
    inters: list[Interaction],
    catalogue: dict[str, Item],
    options: FilterOptions,
    source: dict[str, Any],
    path: str | os.PathLike,
    stats: dict[str, Any] | None = None,
) -> RecDataset:
    """Filter ``inters`` (items must be keys of ``catalogue``) and split them into a RecDataset.

    ``catalogue`` maps raw item id -> Item (its ``item_id`` is reassigned densely here; items
    left without interactions are dropped and counted). ``path`` is the interactions file named
    in errors (e.g. an empty result). ``stats`` are earlier counts to record beside these.
    """
    stats = dict(stats or {})
    stats["interactions_read"] = stats.get("interactions_read", len(inters))
    start, end = option_time(options.start_time, "start_time"), option_time(options.end_time, "end_time")
    n = len(inters)
    inters = filter_time_window(inters, start, end)
    stats["outside_time_window"] = n - len(inters)
    n = len(inters)
    inters = deduplicate(inters)
    stats["duplicate_user_item"] = n - len(inters)
    n = len(inters)
    inters, rounds = kcore(inters, options.min_interactions)
    stats.update(kcore_k=options.min_interactions, kcore_rounds=rounds, kcore_removed=n - len(inters))
    if not inters:
        window = f" in [{options.start_time or '-inf'}, {options.end_time or '+inf'})" if start or end else ""
        raise DataError(
            path,
            f"no interactions left after filtering{window}: {stats['interactions_read']} "
            f"read, {stats['kcore_removed']} removed by the {options.min_interactions}-core "
            "(every user and item needs that many interactions); lower min_interactions or "
            "widen the time window",
            field="min_interactions",
        )

    by_user: dict[str, list[Interaction]] = defaultdict(list)
    for x in inters:  # already chronological and stable from deduplicate()
        by_user[x.user].append(x)
    short = sorted(u for u, xs in by_user.items() if len(xs) < MIN_SEQUENCE_LENGTH)
    stats["users_dropped_short"] = len(short)
    if short:
        logger.warning(
            "%s: dropped %d user(s) with fewer than %d interactions after filtering "
            "(leave-one-out needs train, valid and test items), e.g. %s",
            path,
            len(short),
            MIN_SEQUENCE_LENGTH,
            short[:5],
        )
        for u in short:
            del by_user[u]
    if not by_user:
        raise DataError(
            path, f"no user has {MIN_SEQUENCE_LENGTH} or more interactions after filtering", field="user_id"
        )

    used = {x.item for xs in by_user.values() for x in xs}
    stats["catalogue_items_dropped"] = len(catalogue) - len(used)
    raw_items = sorted(used)
    dense = {r: d for d, r in enumerate(raw_items)}
    items = []
    for r in raw_items:
        it = catalogue[r]
        it.item_id = dense[r]
        items.append(it)
    users = sorted(by_user)
    sequences = [[dense[x.item] for x in by_user[u]] for u in users]
    times = [[x.time for x in by_user[u]] for u in users]

    meta: dict[str, Any] = {
        "source": source,
        "split": options.split,
        "has_text": any(it.title for it in items),
    }
    if options.split == "leave_one_out":
        train, valid, test = leave_one_out(sequences)
    else:
        all_times = [t for ts in times for t in ts]
        vs = option_time(options.valid_start, "valid_start")
        vs = _quantile_time(all_times, 0.8) if vs is None else vs
        ts_ = option_time(options.test_start, "test_start")
        ts_ = _quantile_time(all_times, 0.9) if ts_ is None else ts_
        train, valid, test, no_history = temporal_split(sequences, times, vs, ts_)
        stats["targets_without_history"] = no_history
        meta["temporal"] = {
            "valid_start": iso(vs),
            "test_start": iso(ts_),
            "users_without_train_items": sum(1 for s in train if not s),
        }
        if not test:
            raise DataError(
                path, f"temporal split: no interaction at or after test_start {iso(ts_)}", field="test_start"
            )
    stats["time_range"] = [iso(inters[0].time), iso(inters[-1].time)]
    meta["filtering"] = stats
    meta["options"] = {k: getattr(options, k) for k in options.__dataclass_fields__}
    logger.info(
        "%s: %d users, %d items, %d interactions after filtering (%s)",
        name,
        len(users),
        len(items),
        sum(map(len, sequences)),
        ", ".join(f"{k}={v}" for k, v in stats.items()),
    )
    return RecDataset(
        name=name,
        items=items,
        sequences=sequences,
        user_raw_ids=users,
        train=train,
        valid=valid,
        test=test,
        meta=meta,
    )


def _position(seq: list[int], history: list[int], target: int) -> int | None:
    """First position ``p`` with ``seq[p] == target`` preceded by ``history`` (which may be capped)."""
    h = len(history)
    for p in range(h, len(seq)):
        if seq[p] == target and seq[p - h : p] == history:
            return p
    return None


def check_split_positions(ds: RecDataset, check_valid: bool = True) -> None:
    """Leakage check for any split whose histories are windows of the user's sequence.

    Each training sequence must be a prefix of the user's sequence that ends before the
    position of every test (and, with ``check_valid``, valid) target. Histories may be capped
    (MiniOneRec keeps the last 10 items), so a target's position is found by matching its
    history; a (history, target) pair that also occurs inside the training prefix is leakage.
    """
    for u, train in enumerate(ds.train):
        if ds.sequences[u][: len(train)] != train:
            raise AssertionError(f"user {u}: training sequence is not a prefix of the user's sequence")
    splits = [("test", ds.test)] + ([("valid", ds.valid)] if check_valid else [])
    for split, examples in splits:
        for e in examples:
            p = _position(ds.sequences[e.user_id], e.history, e.target)
            if p is None:
                raise AssertionError(
                    f"user {e.user_id}: {split} target {e.target} after history "
                    f"{e.history[-3:]}... is not in the user's sequence"
                )
            if p < len(ds.train[e.user_id]):
                raise AssertionError(
                    f"user {e.user_id}: {split} target at position {p} is inside the "
                    f"training sequence (length {len(ds.train[e.user_id])})"
                )


def check_split(ds: RecDataset) -> None:
    """Leakage check matching ``ds.meta["split"]`` (leave-one-out or a temporal split)."""
    if ds.meta.get("split", "leave_one_out") == "leave_one_out":
        check_no_leakage(ds)
    else:
        check_split_positions(ds, check_valid=not ds.meta.get("valid_in_train", False))
