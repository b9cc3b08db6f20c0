"""MiniOneRec format: ``X.item.json`` + ``X.index.json`` + their valid/test CSVs, SIDs kept.

Inputs (github.com/AkaliKong/MiniOneRec, ``data/Amazon/...``):

- ``index/X.item.json``: item id -> {title, description, brand, categories}; descriptions are
  Python-list reprs (``"['...']"``), unwrapped by ``clean_text`` (``ast.literal_eval``, never ``eval``).
- ``index/X.index.json``: item id -> their SID tokens ``["<a_1>", "<b_2>", "<c_3>"]``; copied
  into the dataset directory as ``sids/index.json`` (``meta.json["sid_index"]``).
- ``valid/X.csv`` and ``test/X.csv`` with columns ``user_id, history_item_title, item_title,
  history_item_id, item_id, history_item_sid, item_sid``: one row per prediction, history capped
  at the last 10 items, list columns as Python-list reprs (parsed with ``ast.literal_eval``).
  Every ``item_sid`` / ``history_item_sid`` must equal the index's SID of that item id.

Split: MiniOneRec's temporal split (all interactions ordered by time, 8:1:1 by time). The
test examples are the test CSV rows and the valid examples the valid CSV rows, as given.
Their ``train`` CSV is not available here, so the training sequence of a user is what the
valid CSV shows of that user: the first valid row's history followed by every valid target,
in row order (rows of one user are sliding windows, checked to be consistent). That never
contains a test target, but it does contain every valid target: ``meta.json`` records
``valid_in_train: true`` and valid metrics are then optimistic (use test). Users that only
appear in the test CSV have an empty training sequence. ``sequences`` are the longest
chronological sequences the two CSVs show (valid part + test part, joined on their overlap).
"""

from __future__ import annotations

import ast
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from data_prep.dataset import Example, RecDataset
from data_prep.io import DataError
from data_prep.io import read_csv as read_csv_rows
from data_prep.loaders.lcrec import _sort_ids, item_from_fields, read_catalogue
from data_prep.sid_json import read_sid_index_json, sid_token

if TYPE_CHECKING:
    from data_prep.prepare import PrepareArgs

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("user_id", "history_item_id", "item_id", "item_sid")
SID_INDEX_FILE = "sids/index.json"


@dataclass
class CsvRow:
    line: int
    user: str
    history: list[int]
    target: int


def _parse_list(path: Path, line: int, field: str, text: str) -> list:
    try:
        value = ast.literal_eval(text)  # literals only: never eval() file contents
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise DataError(
            path,
            f"malformed list {text[:60]!r}: expected a Python list literal such as [12, 7]",
            line=line,
            field=field,
        ) from None
    if not isinstance(value, list):
        raise DataError(path, f"expected a list, got {type(value).__name__}", line=line, field=field)
    return value


def _item_id(path: Path, line: int, field: str, value: object, catalogue: dict[str, int]) -> int:
    text = str(value).strip()
    if isinstance(value, bool) or not isinstance(value, int | str) or not (text.isascii() and text.isdigit()):
        raise DataError(path, f"item id {value!r} is not a non-negative integer", line=line, field=field)
    raw = str(int(value))
    if raw not in catalogue:
        raise DataError(
            path, f"item id {raw} is not in the catalogue ({len(catalogue)} items)", line=line, field=field
        )
    return catalogue[raw]


def read_csv(path: str | Path, catalogue: dict[str, int], sids: list[str]) -> list[CsvRow]:
    """Read a MiniOneRec valid/test CSV; ``catalogue`` maps raw id -> dense id, ``sids`` dense id -> SID."""
    path = Path(path)
    rows = []
    header, records = read_csv_rows(path)  # decoding, duplicate columns, extra fields: DataErrors
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise DataError(
            path, f"missing required column(s) {missing}; header is {header}", line=1, field=missing[0]
        )
    for line, rec in records:
        short = [c for c in REQUIRED_COLUMNS if rec[c] is None]
        if short:
            raise DataError(
                path,
                f"row has fewer fields than the {len(header)} columns of the header",
                line=line,
                field=short[0],
            )
        user = rec["user_id"].strip()
        if not user:
            raise DataError(path, "empty user id", line=line, field="user_id")
        history = [
            _item_id(path, line, "history_item_id", i, catalogue)
            for i in _parse_list(path, line, "history_item_id", rec["history_item_id"])
        ]
        if not history:
            raise DataError(
                path,
                "empty history: every row needs at least one earlier item",
                line=line,
                field="history_item_id",
            )
        target = _item_id(path, line, "item_id", rec["item_id"].strip(), catalogue)
        if rec["item_sid"].strip() != sids[target]:
            raise DataError(
                path,
                f"item_sid {rec['item_sid']!r} differs from the index's SID "
                f"{sids[target]!r} of item {rec['item_id']}",
                line=line,
                field="item_sid",
            )
        if rec.get("history_item_sid"):
            hist_sids = _parse_list(path, line, "history_item_sid", rec["history_item_sid"])
            expected = [sids[i] for i in history]
            if hist_sids != expected:
                pos = next(
                    (k for k, (a, b) in enumerate(zip(hist_sids, expected, strict=False)) if a != b),
                    min(len(hist_sids), len(expected)),
                )
                raise DataError(
                    path,
                    f"history_item_sid differs from the index at position {pos} "
                    f"({len(hist_sids)} SIDs for {len(expected)} items)",
                    line=line,
                    field="history_item_sid",
                )
        rows.append(CsvRow(line, user, history, target))
    if not rows:
        raise DataError(path, "no data rows")
    return rows


def _join_rows(path: Path, rows: list[CsvRow]) -> dict[str, list[int]]:
    """Per user (rows in file order): first history + every target, checking the windows agree."""
    seqs: dict[str, list[int]] = {}
    for r in rows:
        seq = seqs.get(r.user)
        if seq is None:
            seqs[r.user] = r.history + [r.target]
            continue
        if seq[-len(r.history) :] != r.history:
            raise DataError(
                path,
                f"history of user {r.user!r} does not continue the user's earlier rows "
                f"(expected it to end with {seq[-3:]}); rows of a user must be in time order",
                line=r.line,
                field="history_item_id",
            )
        seq.append(r.target)
    return seqs


def load_minionerec(
    item_path: str | Path,
    valid_csv: str | Path,
    test_csv: str | Path,
    index_path: str | Path | None = None,
    name: str | None = None,
) -> RecDataset:
    """Load MiniOneRec's catalogue, SID index and valid/test CSVs (split: see the module docstring).

    ``index_path`` defaults to ``X.index.json`` beside ``X.item.json``.
    """
    item_path, valid_csv, test_csv = Path(item_path), Path(valid_csv), Path(test_csv)
    if index_path is None:
        index_path = item_path.with_name(item_path.name.replace(".item.json", ".index.json"))
    index_path = Path(index_path)
    catalogue = read_catalogue(item_path)
    raw_ids = _sort_ids(list(catalogue))
    dense = {r: d for d, r in enumerate(raw_ids)}
    _, codes, _ = read_sid_index_json(index_path, raw_ids=raw_ids)
    sids = ["".join(sid_token(lv, c) for lv, c in enumerate(row)) for row in codes.tolist()]
    items = [item_from_fields(item_path, dense[r], r, catalogue[r]) for r in raw_ids]

    valid_rows = read_csv(valid_csv, dense, sids)
    test_rows = read_csv(test_csv, dense, sids)
    valid_seqs = _join_rows(valid_csv, valid_rows)
    test_seqs = _join_rows(test_csv, test_rows)
    users = sorted(set(valid_seqs) | set(test_seqs))
    uid = {u: i for i, u in enumerate(users)}

    first_test_history = {}
    for r in test_rows:
        first_test_history.setdefault(r.user, r.history)
    sequences, train, unjoined = [], [], 0
    for u in users:
        v, t = valid_seqs.get(u, []), test_seqs.get(u, [])
        overlap = len(first_test_history[u]) if u in test_seqs else 0
        if v and t and v[-overlap:] != t[:overlap]:
            unjoined += 1  # the two CSVs disagree on this user's past; keep both parts
            overlap = 0
        if not v:
            overlap = 0
        sequences.append(v + t[overlap:])
        train.append(list(v))
    if unjoined:
        logger.warning(
            "%d user(s): the test CSV history does not continue the valid CSV rows; their "
            "sequences are the two parts concatenated",
            unjoined,
        )
    valid = [Example(uid[r.user], r.history, r.target) for r in valid_rows]
    test = [Example(uid[r.user], r.history, r.target) for r in test_rows]
    no_train = sum(1 for s in train if not s)
    logger.info(
        "MiniOneRec %s: %d users (%d without a training sequence), %d valid rows, %d test rows",
        item_path.name,
        len(users),
        no_train,
        len(valid),
        len(test),
    )
    source = {
        "format": "minionerec",
        "items": str(item_path),
        "index": str(index_path),
        "valid_csv": str(valid_csv),
        "test_csv": str(test_csv),
    }
    meta = {
        "source": source,
        "split": "minionerec_temporal",
        "split_note": (
            "MiniOneRec's temporal split: valid/test examples are the CSV rows (history capped "
            "at 10 as given); their train CSV is not available, so training sequences are the "
            "valid CSV rows' first history + targets (valid targets are in training: valid "
            "metrics are optimistic, report test)"
        ),
        "valid_in_train": True,
        "users_without_train_sequence": no_train,
        "users_with_unjoined_sequences": unjoined,
        "has_text": True,
        "sid_index": SID_INDEX_FILE,
        "sid_index_source": str(index_path),
        "sid_collisions": len(codes) - len(set(map(tuple, codes.tolist()))),
    }
    return RecDataset(
        name=name or item_path.name.split(".")[0],
        items=items,
        sequences=sequences,
        user_raw_ids=users,
        train=train,
        valid=valid,
        test=test,
        meta=meta,
    )


def load_from_args(args: PrepareArgs) -> RecDataset:
    """``format: minionerec``: ``item_path``, ``valid_csv``, ``test_csv``, optional ``sid_index_path``."""
    missing = [f for f in ("item_path", "valid_csv", "test_csv") if getattr(args, f) is None]
    if missing:
        raise ValueError(f"format minionerec needs {missing} (X.item.json, valid/X.csv, test/X.csv)")
    return load_minionerec(
        args.item_path, args.valid_csv, args.test_csv, index_path=args.sid_index_path, name=args.name
    )
