"""The dataset directory every later stage reads: items, chronological sequences and splits.

Layout of a dataset directory::

    items.jsonl      one item per line: item_id (dense int, = line index), raw_id, title,
                     description, brand, categories (list), extra (dict), text (encoder input)
    sequences.jsonl  one user per line: user_id (dense int), raw_id, items (chronological item ids)
    train.jsonl      user_id, items: the training part of each sequence (no valid/test target)
    valid.jsonl      user_id, history, target
    test.jsonl       user_id, history, target
    meta.json        source, counts, split protocol, text template

Leave-one-out (the TIGER/GRID/LC-Rec protocol): the last item is the test target, the
second-to-last the validation target, the rest is training. ``RecDataset.train_sequences``
never contains a valid or test target of the same user.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from data_prep.io import (
    DataError,
    atomic_directory,
    atomic_write_json,
    atomic_write_jsonl,
    iter_jsonl,
    read_json,
)

STAGE = "data_prep.prepare"  # meta.json "stage" of a dataset directory
# What every dataset directory holds (also how one written before meta.json had "stage" is recognized).
DATASET_FILES = ("meta.json", "items.jsonl", "sequences.jsonl", "train.jsonl", "valid.jsonl", "test.jsonl")
_EXAMPLE = ("user_id", "history", "target")


@dataclass
class Item:
    item_id: int
    raw_id: str
    title: str = ""
    description: str = ""
    brand: str = ""
    categories: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    text: str = ""


@dataclass
class Example:
    """One next-item prediction case: the user's history (chronological) and the target."""

    user_id: int
    history: list[int]
    target: int


@dataclass
class RecDataset:
    name: str
    items: list[Item]
    sequences: list[list[int]]
    user_raw_ids: list[str]
    train: list[list[int]]
    valid: list[Example]
    test: list[Example]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_items(self) -> int:
        return len(self.items)

    @property
    def num_users(self) -> int:
        return len(self.sequences)

    @property
    def num_interactions(self) -> int:
        return sum(len(s) for s in self.sequences)

    def item_by_raw_id(self) -> dict[str, int]:
        return {it.raw_id: it.item_id for it in self.items}

    def counts(self) -> dict[str, int]:
        return {
            "users": self.num_users,
            "items": self.num_items,
            "interactions": self.num_interactions,
            "valid_examples": len(self.valid),
            "test_examples": len(self.test),
            "train_sequences": len(self.train),
        }

    def save(
        self, path: str | Path, extra_meta: dict[str, Any] | None = None, inputs: list[str | Path] = ()
    ) -> Path:
        """Write the dataset directory atomically (all files or none).

        An existing ``path`` is replaced only when it is an earlier dataset directory (or empty)
        and holds none of ``inputs`` (``data_prep.io.check_output_dir``).
        """
        path = Path(path)
        with atomic_directory(path, stage=STAGE, inputs=inputs, legacy_files=DATASET_FILES) as tmp:
            self.write(tmp, extra_meta)
        return path

    def write(self, directory: str | Path, extra_meta: dict[str, Any] | None = None) -> None:
        """Write the dataset files into an existing (staging) directory; ``save`` is the atomic form."""
        directory = Path(directory)
        meta = dict(self.meta)
        meta.update(extra_meta or {})
        meta.update(
            stage=STAGE,
            name=self.name,
            counts=self.counts(),
            created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        )
        atomic_write_jsonl(directory / "items.jsonl", (asdict(it) for it in self.items))
        atomic_write_jsonl(
            directory / "sequences.jsonl",
            (
                {"user_id": u, "raw_id": self.user_raw_ids[u], "items": s}
                for u, s in enumerate(self.sequences)
            ),
        )
        atomic_write_jsonl(
            directory / "train.jsonl", ({"user_id": u, "items": s} for u, s in enumerate(self.train))
        )
        for split in ("valid", "test"):
            atomic_write_jsonl(directory / f"{split}.jsonl", (asdict(e) for e in getattr(self, split)))
        atomic_write_json(directory / "meta.json", meta)
        self.meta = meta

    @classmethod
    def load(cls, path: str | Path) -> RecDataset:
        path = Path(path)
        if not (path / "meta.json").exists():
            raise DataError(
                path,
                "not a sidrec dataset directory (meta.json missing); "
                "run `python -m data_prep.prepare --config ...` first",
            )
        meta = read_json(path / "meta.json")
        items = []
        for lineno, row in iter_jsonl(path / "items.jsonl", check_keys=False):
            try:
                it = Item(**row)
            except TypeError as e:
                raise DataError(path / "items.jsonl", f"not an item row: {e}", line=lineno) from None
            if it.item_id != len(items):
                raise DataError(
                    path / "items.jsonl",
                    f"item_id {it.item_id} out of order, expected {len(items)}",
                    line=lineno,
                    field="item_id",
                )
            items.append(it)

        def rows(name: str, *fields: str) -> list[tuple[int, dict]]:
            out = list(iter_jsonl(path / name, check_keys=False))
            for lineno, row in out:
                missing = [f for f in fields if f not in row]
                if missing:
                    raise DataError(path / name, "missing field", line=lineno, field=missing[0])
            return out

        sequences, raw_users = [], []
        for _, row in rows("sequences.jsonl", "items", "raw_id"):
            sequences.append(row["items"])
            raw_users.append(row["raw_id"])
        train = [row["items"] for _, row in rows("train.jsonl", "items")]
        valid = [
            Example(row["user_id"], row["history"], row["target"])
            for _, row in rows("valid.jsonl", *_EXAMPLE)
        ]
        test = [
            Example(row["user_id"], row["history"], row["target"]) for _, row in rows("test.jsonl", *_EXAMPLE)
        ]
        return cls(
            name=meta.get("name", path.name),
            items=items,
            sequences=sequences,
            user_raw_ids=raw_users,
            train=train,
            valid=valid,
            test=test,
            meta=meta,
        )


def leave_one_out(sequences: list[list[int]]) -> tuple[list[list[int]], list[Example], list[Example]]:
    """Split chronological sequences: last item -> test, second-to-last -> valid, rest -> train.

    Every sequence needs at least 3 items (callers validate and report before this).
    """
    train, valid, test = [], [], []
    for u, seq in enumerate(sequences):
        if len(seq) < 3:
            raise ValueError(f"user {u}: sequence of {len(seq)} items; leave-one-out needs >= 3")
        train.append(list(seq[:-2]))
        valid.append(Example(u, list(seq[:-2]), seq[-2]))
        test.append(Example(u, list(seq[:-1]), seq[-1]))
    return train, valid, test


def check_no_leakage(ds: RecDataset) -> None:
    """Raise if a user's training sequence contains positions of its valid/test targets."""
    valid_by_user = {e.user_id: e for e in ds.valid}
    for e in ds.test:
        train = ds.train[e.user_id] if e.user_id < len(ds.train) else []
        if len(train) >= len(e.history):
            raise AssertionError(f"user {e.user_id}: training sequence reaches the test position")
        v = valid_by_user.get(e.user_id)
        if v is not None and len(train) > len(v.history):
            raise AssertionError(f"user {e.user_id}: training sequence reaches the validation position")
