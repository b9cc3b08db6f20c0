"""New items after training: SIDs from the saved quantizer, appended to a checkpoint's catalogue.

``python recipes/serve.py --checkpoint <ckpt> --add_items new_items.jsonl --add_only true`` or
``add_items(checkpoint, items_jsonl)``; a running server with ``reload_seconds`` > 0 picks the
items up without a restart (``sid_tokenizer.vllm_processor``). No retraining: the SID tokens
already exist, and the model ranks the new items through their codes.
"""

from __future__ import annotations

import fcntl
import json
import logging
import time
from pathlib import Path

import numpy as np

from data_prep.io import DataError, atomic_write_json, atomic_write_text, iter_jsonl, read_json
from sid_tokenizer.catalog import Catalogue, checkpoint_sid_dir

logger = logging.getLogger(__name__)


def add_items(
    checkpoint: str | Path,
    items_jsonl: str | Path,
    sid_dir: str | Path | None = None,
    embeddings: np.ndarray | None = None,
    encoder: str | None = None,
) -> list[dict]:
    """Give new items SIDs with the saved quantizer and append them to ``<checkpoint>/sidrec``.

    items_jsonl: one object per line with ``raw_id`` and ``title`` (``categories``, ``brand``,
    ``description`` or a ready ``text`` optional). Their text is embedded with the SID
    directory's encoder (``embeddings`` (M, D) skips that) and ``assign_new_items`` picks free
    SIDs; a SID already taken by an earlier addition is moved to the nearest free last-level
    code too. ``index.json`` is replaced before ``items.jsonl`` (each atomically), so a reader
    never sees an item without a SID. Returns the new rows (with ``sid``).
    """
    from data_prep.dataset import Item
    from data_prep.embed import DEFAULT_ENCODER, encode_texts
    from data_prep.text import field_text, render_item_text
    from sid_tokenizer.build import assign_new_items
    from sid_tokenizer.collisions import pick_free_codes
    from sid_tokenizer.quantizers import Quantizer

    ckpt = Path(checkpoint)
    d = ckpt / "sidrec"
    with open(d / ".add_items.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one writer at a time
        meta = read_json(d / "meta.json")
        cat = Catalogue.load(ckpt)
        sid_dir = checkpoint_sid_dir(ckpt, sid_dir)
        if not (sid_dir / "meta.json").exists():
            raise DataError(
                d / "meta.json", f"SID directory {str(sid_dir)!r} not found; pass sid_dir", field="sid_dir"
            )
        known = set(cat.raw_ids)
        rows, items = [], []
        for lineno, obj in iter_jsonl(items_jsonl):
            raw = obj.get("raw_id")
            if not isinstance(raw, str | int) or not str(raw).strip():
                raise DataError(
                    items_jsonl, "expected a non-empty string raw_id", line=lineno, field="raw_id"
                )
            raw = str(raw).strip()
            if raw in known:
                raise DataError(
                    items_jsonl, f"item {raw!r} is already in the catalogue", line=lineno, field="raw_id"
                )
            title = obj.get("title")
            if not isinstance(title, str) or not title.strip():
                raise DataError(items_jsonl, "expected a non-empty title", line=lineno, field="title")
            known.add(raw)

            def text(name: str, categories: bool = False, obj=obj, lineno=lineno, raw=raw):
                # cleaned like catalogue items; a JSON object is a DataError, not its repr
                return field_text(
                    obj.get(name), items_jsonl, line=lineno, key=raw, field=name, categories=categories
                )

            item = Item(
                item_id=len(cat.raw_ids) + len(rows),
                raw_id=raw,
                title=text("title"),
                description=text("description"),
                brand=text("brand"),
                categories=text("categories", categories=True),
            )
            if not item.title:
                raise DataError(items_jsonl, "expected a non-empty title", line=lineno, field="title")
            if obj.get("text") is not None and not isinstance(obj["text"], str):
                raise DataError(items_jsonl, "expected text", line=lineno, key=raw, field="text")
            item.text = str(obj.get("text") or "") or render_item_text(item)
            rows.append(obj)
            items.append(item)
        if not items:
            raise DataError(items_jsonl, "no items to add")
        if embeddings is None:
            sid_meta = read_json(sid_dir / "meta.json")
            enc = encoder or sid_meta.get("config", {}).get("encoder") or DEFAULT_ENCODER
            embeddings = encode_texts([it.text for it in items], enc)
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if embeddings.shape[0] != len(items):
            raise ValueError(f"{embeddings.shape[0]} embedding rows for {len(items)} new items")
        codes = assign_new_items(sid_dir, embeddings, existing_codes=cat.index.codes)
        taken = set(map(tuple, cat.index.codes.tolist()))
        clash = [i for i, row in enumerate(codes.tolist()) if tuple(row) in taken]
        if clash and read_json(sid_dir / "meta.json").get("collision_strategy") != "extra_level":
            quantizer = Quantizer.load(sid_dir / "quantizer")
            costs = quantizer.level_distances(embeddings, codes, codes.shape[1] - 1)
            codes = pick_free_codes(codes, costs, taken)
        sizes = np.asarray(cat.index.vocab.level_sizes)
        if codes.shape[1] != len(sizes) or (codes >= sizes).any():
            raise DataError(
                sid_dir,
                f"new SIDs {codes.tolist()} do not fit the checkpoint's codebooks "
                f"{sizes.tolist()}: the model has no tokens for them",
            )
        vocab = cat.index.vocab
        index = read_json(d / "index.json")
        out = []
        for item, row in zip(items, codes.tolist(), strict=True):
            index[item.raw_id] = [vocab.token(lv, c) for lv, c in enumerate(row)]
            out.append(
                {
                    "item_id": item.item_id,
                    "raw_id": item.raw_id,
                    "title": item.title,
                    "categories": item.categories,
                    "sid": vocab.format(row),
                }
            )
        atomic_write_json(d / "index.json", index, indent=None)
        old = (d / "items.jsonl").read_text(encoding="utf-8")
        if old and not old.endswith("\n"):
            old += "\n"
        new = "".join(
            json.dumps({k: r[k] for k in ("item_id", "raw_id", "title", "categories")}, ensure_ascii=False)
            + "\n"
            for r in out
        )
        atomic_write_text(d / "items.jsonl", old + new)
        meta["num_items"] = len(cat.raw_ids) + len(out)
        meta.setdefault("added_items", []).append(
            {"file": str(items_jsonl), "count": len(out), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        )
        atomic_write_json(d / "meta.json", meta)
    logger.info("added %d item(s) to %s", len(out), d)
    return out


def set_items_active(checkpoint: str | Path, raw_ids: list[str], active: bool = False) -> list[str]:
    """Deactivate (``active=False``) or reactivate items of ``<checkpoint>/sidrec``.

    A deactivated item keeps its row, id and SID (the model's vocabulary and the dataset's item
    ids stay aligned; evaluation is unchanged), but serving never returns it: the processor's
    trie, the ranking route and the export leave it out. ``items.jsonl`` rows get
    ``"active": false`` (the key is dropped again on reactivation), written atomically; a running
    server picks the change up on its next catalogue check. Unknown ids raise DataError.
    Returns the ids whose state changed.
    """
    d = Path(checkpoint) / "sidrec"
    wanted = {str(r).strip() for r in raw_ids}
    with open(d / ".add_items.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the same writer lock as add_items
        rows = [obj for _, obj in iter_jsonl(d / "items.jsonl")]
        missing = sorted(wanted - {str(r.get("raw_id")) for r in rows})
        if missing:
            raise DataError(d / "items.jsonl", f"unknown item id(s) {missing[:5]}", field="raw_id")
        changed = []
        for r in rows:
            if str(r["raw_id"]) in wanted and bool(r.get("active", True)) != active:
                changed.append(str(r["raw_id"]))
                if active:
                    r.pop("active", None)
                else:
                    r["active"] = False
        if changed:
            if not active and all(r.get("active", True) is False for r in rows):
                raise DataError(d / "items.jsonl", "deactivating every item would leave nothing to serve")
            atomic_write_text(
                d / "items.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            )
            meta = read_json(d / "meta.json")
            meta["num_active_items"] = sum(bool(r.get("active", True)) for r in rows)
            meta.setdefault("item_state_changes", []).append(
                {"active": active, "count": len(changed), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            )
            atomic_write_json(d / "meta.json", meta)
    logger.info("%s %d item(s) in %s", "reactivated" if active else "deactivated", len(changed), d)
    return changed


def remove_items(checkpoint: str | Path, raw_ids: list[str]) -> list[str]:
    """Take items out of serving (``set_items_active(..., active=False)``)."""
    return set_items_active(checkpoint, raw_ids, active=False)
