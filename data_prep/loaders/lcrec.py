"""LC-Rec format: ``X.inter.json`` (user -> chronological item ids) + optional ``X.item.json``.

``X.item.json`` maps item id -> {title, description, brand, categories}. Without it
(e.g. Amazon 2014 Beauty as distributed by LETTER/CollisionGenRec) the dataset is
interactions-only; a third-party ``X.index.json`` can still supply the SIDs.
"""

from __future__ import annotations

from pathlib import Path

from data_prep.dataset import Item, RecDataset, leave_one_out
from data_prep.io import DataError, read_json
from data_prep.text import field_text


def _sort_ids(ids: list[str]) -> list[str]:
    # ASCII digits only: "²".isdigit() is True but int("²") fails
    numeric = all(i.lstrip("-").isascii() and i.lstrip("-").isdigit() for i in ids)
    return sorted(ids, key=int) if numeric else list(ids)


def read_catalogue(item_path: str | Path, require_title: bool = True) -> dict[str, dict]:
    """Read an LC-Rec ``item.json``; each entry must be an object with a non-empty title."""
    raw = read_json(item_path)
    if not isinstance(raw, dict):
        raise DataError(item_path, f"expected an object of item id -> fields, got {type(raw).__name__}")
    out = {}
    for key, fields in raw.items():
        if not isinstance(fields, dict):
            raise DataError(item_path, f"expected an object of fields, got {type(fields).__name__}", key=key)
        title = field_text(fields.get("title"), item_path, key=str(key), field="title")
        for name in ("description", "brand"):
            field_text(fields.get(name), item_path, key=str(key), field=name)
        field_text(fields.get("categories"), item_path, key=str(key), field="categories", categories=True)
        if require_title and not title:
            raise DataError(item_path, "item has no title", key=key, field="title")
        out[str(key)] = fields
    return out


def item_from_fields(item_path: str | Path | None, item_id: int, raw_id: str, fields: dict) -> Item:
    """An ``Item`` from one catalogue entry (fields already checked by ``read_catalogue``)."""

    def text(name: str, categories: bool = False):
        return field_text(fields.get(name), item_path or "", key=raw_id, field=name, categories=categories)

    return Item(
        item_id=item_id,
        raw_id=raw_id,
        title=text("title"),
        description=text("description"),
        brand=text("brand"),
        categories=text("categories", categories=True),
    )


def read_interactions(inter_path: str | Path, min_len: int = 3) -> dict[str, list[str]]:
    """Read ``inter.json``: user -> chronological list of item ids (ints or strings)."""
    raw = read_json(inter_path)
    if not isinstance(raw, dict):
        raise DataError(inter_path, f"expected an object of user id -> item list, got {type(raw).__name__}")
    out = {}
    for user, seq in raw.items():
        if not isinstance(seq, list):
            raise DataError(inter_path, f"expected a list of item ids, got {type(seq).__name__}", key=user)
        if len(seq) < min_len:
            raise DataError(
                inter_path,
                f"history of {len(seq)} item(s); leave-one-out needs at least {min_len} (train, valid, test)",
                key=user,
            )
        for pos, i in enumerate(seq):
            if not isinstance(i, int | str) or isinstance(i, bool):
                raise DataError(
                    inter_path, f"item id at position {pos} is {i!r}, expected int or string", key=user
                )
        out[str(user)] = [str(i) for i in seq]
    return out


def load_lcrec(
    inter_path: str | Path, item_path: str | Path | None = None, name: str | None = None, min_len: int = 3
) -> RecDataset:
    """Load an LC-Rec dataset; with ``item_path`` None the dataset is interactions-only."""
    inter_path = Path(inter_path)
    interactions = read_interactions(inter_path, min_len=min_len)
    if item_path is not None:
        catalogue = read_catalogue(item_path)
        raw_ids = _sort_ids(list(catalogue))
    else:
        catalogue = {}
        raw_ids = _sort_ids(sorted({i for seq in interactions.values() for i in seq}))
    dense = {r: d for d, r in enumerate(raw_ids)}
    items = []
    for r in raw_ids:
        f = catalogue.get(r, {})
        items.append(item_from_fields(item_path, dense[r], r, f))
    users = _sort_ids(list(interactions))
    sequences = []
    for u in users:
        seq = []
        for pos, r in enumerate(interactions[u]):
            if r not in dense:
                raise DataError(
                    inter_path, f"item id {r!r} at position {pos} is not in the catalogue {item_path}", key=u
                )
            seq.append(dense[r])
        sequences.append(seq)
    train, valid, test = leave_one_out(sequences)
    source = {"format": "lcrec", "inter": str(inter_path), "items": str(item_path) if item_path else None}
    return RecDataset(
        name=name or inter_path.name.split(".")[0],
        items=items,
        sequences=sequences,
        user_raw_ids=users,
        train=train,
        valid=valid,
        test=test,
        meta={"source": source, "split": "leave_one_out", "has_text": item_path is not None},
    )
