"""Bring your own data: an items file + an interactions file (CSV or JSON lines), or HF datasets.

Items (``.csv``, ``.tsv``, ``.jsonl``/``.json`` JSON lines, optionally ``.gz``), one row per item:

- ``item_id`` (required): any string (or integer), unique;
- ``title`` (required, non-empty);
- ``description``, ``brand`` (optional text; a JSON/Python list of strings is joined);
- ``categories`` (optional): a list, ``"a|b|c"`` or ``"a, b, c"``;
- any other column is kept in ``Item.extra`` (and usable in the text template as ``{column}``).

Interactions, one row per event:

- ``user_id``, ``item_id`` (required; every item id must be in the items file);
- ``timestamp`` (required): epoch seconds, epoch milliseconds or ISO-8601 (``2024-03-02``,
  ``2024-03-02T14:05:00Z``; no offset means UTC);
- ``event``, ``rating`` (optional; ``events`` / ``min_rating`` filter on them, rows without
  a rating are kept).

Ids of any shape are mapped to dense integers (sorted raw ids); raw ids are kept in the
dataset directory. Filtering and the split are ``data_prep.kcore.build_dataset`` (time
window, de-duplication, k-core, users left with < 3 interactions dropped and counted in
``meta.json["filtering"]["users_dropped_short"]``, leave-one-out or temporal split).

Every problem is a ``DataError`` naming the file, the line (the row number for in-memory
sources) and the column: a missing required column, a duplicate item id, an item without a
title, an interaction with an unknown item or an unparsable timestamp, a wrong type, an
empty result after filtering.

Python API (Hugging Face ``datasets``, pandas DataFrames or lists of dicts instead of files)::

    from datasets import load_dataset
    from data_prep.loaders.generic import load_generic
    from data_prep.prepare import PrepareArgs, prepare

    items = load_dataset("csv", data_files="items.csv", split="train")
    events = load_dataset("json", data_files="events.jsonl")  # a DatasetDict: splits are concatenated
    ds = load_generic(items, events, name="shop", min_interactions=5)
    prepare(PrepareArgs(output_dir="outputs/shop/dataset"), dataset=ds)
"""

from __future__ import annotations

import ast
import json
import logging
import math
import numbers
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from data_prep.dataset import Item, RecDataset
from data_prep.io import DataError, iter_jsonl, read_csv
from data_prep.kcore import FilterOptions, Interaction, build_dataset, parse_time
from data_prep.text import field_text, split_categories

if TYPE_CHECKING:
    from data_prep.prepare import PrepareArgs

logger = logging.getLogger(__name__)

ITEM_REQUIRED = ("item_id", "title")
ITEM_KNOWN = (*ITEM_REQUIRED, "description", "brand", "categories")
INTER_REQUIRED = ("user_id", "item_id", "timestamp")
INTER_KNOWN = (*INTER_REQUIRED, "event", "rating")

Source = str | Path | Any  # a path, a datasets.Dataset / DatasetDict, a pandas DataFrame or a list of dicts


class _Table:
    """Rows of one input with a label for errors: (line or row number, row dict)."""

    def __init__(self, label: str, columns: list[str] | None, rows: Iterator[tuple[int, dict]]) -> None:
        self.label, self.columns, self.rows = label, columns, rows

    def require(self, required: tuple[str, ...]) -> None:
        """Fail on a missing required column (tables with a header: CSV, HF datasets)."""
        if self.columns is None:
            return
        missing = [c for c in required if c not in self.columns]
        if missing:
            hints = [f"{c!r} for {m!r}" for m in missing for c in self.columns if c.strip().lower() == m]
            hint = f" (column names are case-sensitive: rename {', '.join(hints)})" if hints else ""
            if len(self.columns) == 1 and any(sep in self.columns[0] for sep in ";|\t"):
                hint = " (one column only: is the file separated by ';' or tabs? use .tsv for tabs)"
            raise DataError(
                self.label,
                f"missing required column(s) {missing}; the columns are {self.columns}{hint}",
                line=1,
                field=missing[0],
            )


def open_table(source: Source, what: str) -> _Table:
    """A file (CSV/TSV/JSON lines, maybe gzipped), a ``datasets.Dataset``/``DatasetDict`` or a list of dicts."""
    if isinstance(source, str | Path):
        path = Path(source)
        if not path.exists():
            raise DataError(path, f"{what} file not found")
        kind = path.name.removesuffix(".gz").rsplit(".", 1)[-1].lower()
        if kind in ("csv", "tsv"):
            columns, rows = read_csv(path, delimiter="\t" if kind == "tsv" else ",")
            return _Table(str(path), columns, rows)
        if kind in ("jsonl", "json", "ndjson"):
            return _Table(str(path), None, iter_jsonl(path, allow_nan=False))
        raise DataError(path, f"unknown file type {kind!r}: expected .csv, .tsv or .jsonl (optionally .gz)")
    if hasattr(source, "to_dict") and hasattr(source, "columns"):  # a pandas DataFrame
        columns = [str(c) for c in source.columns]
        return _Table(
            f"<DataFrame {what}>",
            columns,
            ((i, row) for i, row in enumerate(source.to_dict("records"), start=1)),
        )
    import datasets  # only for in-memory sources: importing it takes a second

    if isinstance(source, datasets.DatasetDict):  # its splits are concatenated (the split is redone here)
        splits = list(source.keys())
        tables = [open_table(source[s], f"{what}[{s}]") for s in splits]
        columns = tables[0].columns if tables else []

        def chained() -> Iterator[tuple[int, dict]]:
            offset = 0
            for t in tables:
                n = 0
                for n, row in t.rows:
                    yield offset + n, row
                offset += n

        return _Table(
            f"<datasets.DatasetDict {what} (splits {splits}; rows counted across splits)>", columns, chained()
        )
    if isinstance(source, datasets.Dataset):
        return _Table(
            f"<datasets.Dataset {what}>",
            list(source.column_names),
            ((i, dict(row)) for i, row in enumerate(source, start=1)),
        )
    if isinstance(source, Iterable):

        def rows() -> Iterator[tuple[int, dict]]:
            for i, row in enumerate(source, start=1):
                if not isinstance(row, dict):
                    raise DataError(
                        f"<{what} rows>", f"expected a dict per row, got {type(row).__name__}", line=i
                    )
                yield i, row

        return _Table(f"<{what} rows>", None, rows())
    raise TypeError(
        f"{what}: expected a file path, a datasets.Dataset/DatasetDict or a list of dicts, "
        f"got {type(source).__name__}"
    )


def _missing(value: Any) -> bool:
    """None, blank text, or NaN (how pandas and HF datasets represent an empty cell)."""
    if isinstance(value, float):
        return math.isnan(value)
    return value is None or (isinstance(value, str) and value.strip() == "")


def _id(table: _Table, line: int, row: dict, name: str) -> str:
    if name not in row:
        raise DataError(table.label, f"missing required field {name!r}", line=line, field=name)
    value = row[name]
    if isinstance(value, bool) or not isinstance(value, str | numbers.Integral):
        raise DataError(
            table.label,
            f"id {value!r} has type {type(value).__name__}: expected a string or an integer",
            line=line,
            field=name,
        )
    text = str(int(value)) if isinstance(value, numbers.Integral) else value.strip()
    if not text:
        raise DataError(table.label, "empty id", line=line, field=name)
    return sys.intern(text)  # ids repeat on many rows: one string each


def _text(table: _Table, line: int, row: dict, name: str, key: str | None = None) -> str:
    value = row.get(name)
    if _missing(value):
        return ""
    if isinstance(value, numbers.Number) and not isinstance(value, bool):  # incl. numpy scalars
        value = int(value) if isinstance(value, numbers.Integral) else float(value)  # type: ignore[arg-type]
    if not isinstance(value, str | list | tuple | int | float):
        raise DataError(
            table.label,
            f"expected text or a list of strings, got {type(value).__name__} {value!r}"[:200],
            line=line,
            key=key,
            field=name,
        )
    return field_text(value, table.label, line=line, key=key, field=name)  # type: ignore[return-value]


def parse_categories(value: Any, label: str = "", line: int | None = None) -> list[str]:
    """A list, a JSON/Python list literal, ``"a|b|c"`` or ``"a, b, c"`` -> category names."""
    if _missing(value):
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("[") and text.endswith("]"):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                try:
                    value = ast.literal_eval(text)  # literals only
                except (ValueError, SyntaxError, MemoryError, RecursionError):
                    raise DataError(
                        label, f"malformed list {text[:60]!r}", line=line, field="categories"
                    ) from None
        elif "|" in text:
            return split_categories(text.split("|"))
        else:
            return split_categories(text)
    if not isinstance(value, list | tuple):
        raise DataError(
            label, f"expected a list or a string, got {type(value).__name__}", line=line, field="categories"
        )
    return field_text(list(value), label, line=line, field="categories", categories=True)  # type: ignore[return-value]


def read_items(source: Source) -> tuple[dict[str, Item], str]:
    """Items table -> (raw id -> Item with ``item_id`` -1 until filtering assigns dense ids, label)."""
    table = open_table(source, "items")
    table.require(ITEM_REQUIRED)
    items: dict[str, Item] = {}
    first_line: dict[str, int] = {}
    for line, row in tqdm(table.rows, desc="reading items", unit=" rows", mininterval=2):
        raw = _id(table, line, row, "item_id")
        if raw in items:
            raise DataError(
                table.label,
                f"duplicate item id (first on line {first_line[raw]}); each item may appear once",
                line=line,
                key=raw,
                field="item_id",
            )
        if "title" not in row:
            raise DataError(table.label, "missing required field 'title'", line=line, key=raw, field="title")
        title = _text(table, line, row, "title", raw)
        if not title:
            raise DataError(
                table.label,
                "item has no title (every item needs one: it is the item text)",
                line=line,
                key=raw,
                field="title",
            )
        extra = {k: v for k, v in row.items() if k not in ITEM_KNOWN and not _missing(v)}
        for k, v in extra.items():
            if isinstance(v, dict | set) or (isinstance(v, float) and not math.isfinite(v)):
                raise DataError(
                    table.label,
                    f"extra column value {v!r} is not text, a number or a list"[:200]
                    + " (flatten a JSON object into columns)",
                    line=line,
                    key=raw,
                    field=k,
                )
        items[raw] = Item(
            item_id=-1,
            raw_id=raw,
            title=title,
            description=_text(table, line, row, "description", raw),
            brand=_text(table, line, row, "brand", raw),
            categories=parse_categories(row.get("categories"), table.label, line),
            extra=extra,
        )
        first_line[raw] = line
    if not items:
        raise DataError(table.label, "no items")
    # Every item gets every extra column ("" where missing) so a text template naming one works.
    extra_columns = [c for c in table.columns or [] if c not in ITEM_KNOWN]
    extra_columns += sorted({k for it in items.values() for k in it.extra} - set(extra_columns))
    for it in items.values():
        it.extra = {c: it.extra.get(c, "") for c in extra_columns}
    return items, table.label


def read_interactions(
    source: Source,
    catalogue: dict[str, Item],
    items_label: str,
    events: Iterable[str] = (),
    min_rating: float | None = None,
) -> tuple[list[Interaction], dict[str, int], str]:
    """Interactions table -> (interactions, counts of filtered rows, label); items must be in ``catalogue``."""
    table = open_table(source, "interactions")
    table.require(INTER_REQUIRED)
    keep_events = set(events)
    inters: list[Interaction] = []
    counts = {"interactions_read": 0, "filtered_event": 0, "filtered_rating": 0}
    for line, row in tqdm(table.rows, desc="reading interactions", unit=" rows", mininterval=2):
        counts["interactions_read"] += 1
        user = _id(table, line, row, "user_id")
        item = _id(table, line, row, "item_id")
        if item not in catalogue:
            raise DataError(
                table.label,
                f"unknown item id {item!r}: not in the items file {items_label}",
                line=line,
                field="item_id",
            )
        if "timestamp" not in row:
            raise DataError(table.label, "missing required field 'timestamp'", line=line, field="timestamp")
        t = parse_time(row["timestamp"], table.label, line=line, field="timestamp")
        if keep_events:
            event = row.get("event")
            if _missing(event) or str(event).strip() not in keep_events:
                counts["filtered_event"] += 1
                continue
        rating = row.get("rating")
        if not _missing(rating):
            try:
                value = float(rating) if not isinstance(rating, bool) else None
            except (TypeError, ValueError):
                value = None
            if value is None:
                raise DataError(table.label, f"rating {rating!r} is not a number", line=line, field="rating")
            if not math.isfinite(value):  # NaN compares False with min_rating: it would pass any filter
                raise DataError(
                    table.label, f"rating {rating!r} is not a finite number", line=line, field="rating"
                )
            if min_rating is not None and value < min_rating:
                counts["filtered_rating"] += 1
                continue
        inters.append(Interaction(user, item, t, line))
    if counts["interactions_read"] == 0:
        raise DataError(table.label, "no interactions")
    return inters, counts, table.label


def load_generic(
    items: Source,
    interactions: Source | None = None,
    *,
    name: str | None = None,
    min_interactions: int = 5,
    start_time: str | None = None,
    end_time: str | None = None,
    split: str = "leave_one_out",
    valid_start: str | None = None,
    test_start: str | None = None,
    events: Iterable[str] = (),
    min_rating: float | None = None,
) -> RecDataset:
    """Load items + interactions (paths, HF datasets or lists of dicts) into a filtered, split RecDataset.

    With ``interactions`` None, ``items`` may be a ``DatasetDict`` with an ``items`` and an
    ``interactions`` split. Options are those of ``data_prep.kcore.FilterOptions`` plus the
    ``events`` / ``min_rating`` row filters.
    """
    if interactions is None:
        if hasattr(items, "keys") and {"items", "interactions"} <= set(items.keys()):
            items, interactions = items["items"], items["interactions"]
        else:
            raise ValueError(
                "load_generic needs interactions (or a DatasetDict with 'items' and 'interactions' splits)"
            )
    options = FilterOptions(min_interactions, start_time, end_time, split, valid_start, test_start)
    catalogue, items_label = read_items(items)
    inters, counts, inter_label = read_interactions(interactions, catalogue, items_label, events, min_rating)
    for key in ("filtered_event", "filtered_rating"):
        if counts[key]:
            logger.info("%s: %d rows dropped by %s", inter_label, counts[key], key.removeprefix("filtered_"))
    if name is None:
        name = Path(interactions).parent.name if isinstance(interactions, str | Path) else "dataset"
    source = {
        "format": "generic",
        "items": items_label,
        "interactions": inter_label,
        "events": sorted(set(events)),
        "min_rating": min_rating,
    }
    return build_dataset(name or "dataset", inters, catalogue, options, source, inter_label, stats=counts)


def load_from_args(args: PrepareArgs) -> RecDataset:
    """``format: generic``: ``item_path`` (items) and ``inter_path`` (interactions)."""
    if args.inter_path is None or args.item_path is None:
        raise ValueError(
            "format generic needs item_path (items .csv/.jsonl) and inter_path (interactions .csv/.jsonl)"
        )
    return load_generic(
        args.item_path,
        args.inter_path,
        name=args.name,
        min_interactions=args.min_interactions,
        start_time=args.start_time,
        end_time=args.end_time,
        split=args.split,
        valid_start=args.valid_start,
        test_start=args.test_start,
        events=args.events,
        min_rating=args.min_rating,
    )
