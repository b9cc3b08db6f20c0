"""The checkpoint catalogue: what a sidrec checkpoint knows about its items, and how to read it.

A sidrec checkpoint is a normal transformers model directory (``from_pretrained`` works, and
vLLM can serve it) plus a ``sidrec/`` folder that makes it self-contained:

    sidrec/index.json    item raw id -> SID tokens (LC-Rec / MiniOneRec format)
    sidrec/items.jsonl   item id, raw id, title, categories (the answer's titles)
    sidrec/meta.json     level sizes, prompt format, resolved dataset / SID dir paths (provenance)
    sidrec/sid/          the SID stage's meta.json and fitted quantizer: new items get SIDs from
                         here, so a checkpoint moved to another machine can still take new items

``meta.json`` records ``dataset_dir`` / ``sid_dir`` as absolute paths (``format_version`` 2).
Checkpoints written before (``format_version`` 1, paths relative to the working directory of
the run, no ``sid/``) still load: their paths resolve against the working directory.

``load_sid_dir`` reads a SID stage directory (``sid_tokenizer.build`` output);
``CatalogueFiles`` is the one change detector behind every reload (serving processor, client).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from data_prep.dataset import RecDataset
from data_prep.io import DataError, atomic_write_json, atomic_write_jsonl, read_json
from data_prep.provenance import run_info
from sid_tokenizer.prompts import REC_TOKEN
from sid_tokenizer.sid import SidIndex

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
CATALOGUE_DIR = "sidrec"
SID_SUBDIR = "sid"  # copy of the SID stage's meta.json + quantizer/ inside sidrec/


def load_sid_dir(sid_dir: str | Path, dataset: RecDataset | None = None) -> SidIndex:
    """The SID index written by ``sid_tokenizer.build`` (``<sid_dir>/index.json``).

    With ``dataset`` the index is aligned to (and checked against) the dataset's items: every
    catalogue item needs a SID. Level sizes come from ``meta.json`` when present.
    """
    sid_dir = Path(sid_dir)
    meta_path = sid_dir / "meta.json"
    level_sizes = None
    if meta_path.exists():
        sizes = read_json(meta_path).get("level_sizes")
        if sizes is not None and (not isinstance(sizes, list) or not sizes):
            raise DataError(meta_path, "expected a non-empty list of codebook sizes", field="level_sizes")
        level_sizes = tuple(sizes) if sizes else None
    if dataset is not None:
        raw_ids = [it.raw_id for it in dataset.items]
    else:  # index.json keeps catalogue order
        raw_ids = list(read_json(sid_dir / "index.json"))
    return SidIndex.load(sid_dir / "index.json", raw_ids=raw_ids, level_sizes=level_sizes)


def save_catalogue(
    output_dir: str | Path,
    dataset: RecDataset,
    index: SidIndex,
    sid_dir: str | Path | None,
    dataset_dir: str | Path | None,
) -> None:
    """Write ``<output_dir>/sidrec/`` so a checkpoint maps SIDs to items (and takes new items) on its own."""
    d = Path(output_dir) / CATALOGUE_DIR
    d.mkdir(parents=True, exist_ok=True)
    index.save(d / "index.json")
    atomic_write_jsonl(
        d / "items.jsonl",
        (
            {"item_id": it.item_id, "raw_id": it.raw_id, "title": it.title, "categories": it.categories}
            for it in dataset.items
        ),
    )
    if sid_dir is not None and (Path(sid_dir) / "meta.json").exists():
        sub = d / SID_SUBDIR
        sub.mkdir(exist_ok=True)
        shutil.copy2(Path(sid_dir) / "meta.json", sub / "meta.json")
        if (Path(sid_dir) / "quantizer").is_dir():
            shutil.copytree(Path(sid_dir) / "quantizer", sub / "quantizer", dirs_exist_ok=True)
    atomic_write_json(
        d / "meta.json",
        {
            "level_sizes": list(index.vocab.level_sizes),
            "sid_dir": str(Path(sid_dir).resolve()) if sid_dir is not None else None,
            "dataset_dir": str(Path(dataset_dir).resolve()) if dataset_dir is not None else None,
            "num_items": len(index),
            "rec_token": REC_TOKEN,
            "format_version": FORMAT_VERSION,
            **run_info(),
        },
    )


def copy_catalogue(src_checkpoint: str | Path, dst_checkpoint: str | Path) -> None:
    shutil.copytree(
        Path(src_checkpoint) / CATALOGUE_DIR, Path(dst_checkpoint) / CATALOGUE_DIR, dirs_exist_ok=True
    )


def catalogue_meta(checkpoint: str | Path) -> dict:
    path = Path(checkpoint) / CATALOGUE_DIR / "meta.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {checkpoint} is not a sidrec checkpoint (no sidrec/)")
    return read_json(path)


def checkpoint_dataset_dir(checkpoint: str | Path, override: str | Path | None = None) -> Path:
    """The dataset directory a checkpoint was trained on (``override`` wins), as recorded in
    ``sidrec/meta.json`` (absolute since format 2; format 1 paths are relative to the working dir)."""
    if override is not None:
        return Path(override)
    recorded = catalogue_meta(checkpoint).get("dataset_dir")
    if not recorded:
        raise DataError(
            Path(checkpoint) / CATALOGUE_DIR / "meta.json", "no dataset_dir recorded; pass dataset_dir"
        )
    return Path(recorded)


def checkpoint_sid_dir(checkpoint: str | Path, override: str | Path | None = None) -> Path:
    """Where a checkpoint's quantizer lives: ``override``, else ``sidrec/sid/`` (self-contained
    checkpoints), else the recorded ``sid_dir`` (format 1 checkpoints)."""
    if override is not None:
        return Path(override)
    inside = Path(checkpoint) / CATALOGUE_DIR / SID_SUBDIR
    if (inside / "meta.json").exists():
        return inside
    return Path(catalogue_meta(checkpoint).get("sid_dir") or "")


@dataclass
class Catalogue:
    """What a checkpoint knows about its items: SID index + titles/categories."""

    index: SidIndex
    titles: list[str]
    categories: list[list[str]]
    raw_ids: list[str]
    # False for items taken out of serving (sid_tokenizer.new_items.remove_items); they keep
    # their id and SID, and evaluation ignores the flag
    active: list[bool] = field(default_factory=list)

    @classmethod
    def load(cls, checkpoint_dir: str | Path) -> Catalogue:
        d = Path(checkpoint_dir) / CATALOGUE_DIR
        meta = catalogue_meta(checkpoint_dir)
        rows = []
        with open(d / "items.jsonl", encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DataError(d / "items.jsonl", f"invalid JSON: {e.msg}", line=lineno) from None
        raw_ids = [r["raw_id"] for r in rows]
        index = SidIndex.load(d / "index.json", raw_ids=raw_ids, level_sizes=tuple(meta["level_sizes"]))
        active = [r.get("active", True) for r in rows]
        bad = [n for n, a in enumerate(active) if not isinstance(a, bool)]
        if bad:
            raise DataError(
                d / "items.jsonl",
                f"expected true or false, got {active[bad[0]]!r}",
                key=raw_ids[bad[0]],
                field="active",
            )
        return cls(
            index=index,
            titles=[r["title"] for r in rows],
            categories=[r.get("categories", []) for r in rows],
            raw_ids=raw_ids,
            active=active,
        )


class CatalogueFiles:
    """Change detection for ``<checkpoint>/sidrec``: a stamp of the files a reload reads."""

    FILES = ("index.json", "items.jsonl", "meta.json")

    def __init__(self, checkpoint: str | Path) -> None:
        self.checkpoint = Path(checkpoint)
        self.dir = self.checkpoint / CATALOGUE_DIR
        self.stamp: tuple = ()

    def current(self) -> tuple:
        return tuple(os.stat(self.dir / f).st_mtime_ns for f in self.FILES)

    def changed(self) -> bool:
        try:
            return self.current() != self.stamp
        except FileNotFoundError:
            return False

    def load(self) -> Catalogue:
        """Load the catalogue and remember the stamp of what was loaded."""
        stamp = self.current()
        cat = Catalogue.load(self.checkpoint)
        self.stamp = stamp
        return cat


class LiveCatalogue:
    """The one reload owner for a checkpoint's catalogue (serving processor, API server, client).

    ``value`` is ``build(Catalogue)`` of the last catalogue that loaded; ``refresh()`` reloads
    when the files changed (checked at most every ``reload_seconds``). A reload that fails -- a
    file half-written by hand, unreadable, or rejected by ``build`` -- keeps the last good value,
    records ``error`` and is retried only when the files change again, so a server and its
    clients keep answering with the same catalogue while someone fixes the files. The first load
    raises: there is nothing to fall back on.
    """

    def __init__(
        self,
        checkpoint: str | Path,
        reload_seconds: float = 0.0,
        build: Callable[[Catalogue], Any] | None = None,
    ) -> None:
        self.files = CatalogueFiles(checkpoint)
        self.reload_seconds = reload_seconds
        self._build = build or (lambda cat: cat)
        self._lock = threading.Lock()
        self._checked = time.monotonic()
        self.error: str | None = None
        self.value = self._build(self.files.load())

    def refresh(self, force: bool = False) -> bool:
        """True when a new catalogue was loaded."""
        now = time.monotonic()
        if not force and now - self._checked < self.reload_seconds:
            return False
        self._checked = now
        if not self.files.changed():
            return False
        with self._lock:
            try:
                stamp = self.files.current()
                value = self._build(Catalogue.load(self.files.checkpoint))
            except Exception as e:  # noqa: BLE001 - any broken edit: keep serving the last good one
                self.error = f"{type(e).__name__}: {e}"
                logger.warning(
                    "reloading %s failed; keeping the last good catalogue: %s", self.files.dir, self.error
                )
                try:  # don't retry the same broken files on every call
                    self.files.stamp = self.files.current()
                except FileNotFoundError:
                    pass
                return False
            self.value, self.files.stamp, self.error = value, stamp, None
        return True


def load_checkpoint(path: str | Path, device: str | None = None, dtype: torch.dtype | None = None):
    """(model, tokenizer, Catalogue) from a sidrec checkpoint directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto")
    if device:
        model.to(device)
    model.eval()
    return model, tokenizer, Catalogue.load(path)
