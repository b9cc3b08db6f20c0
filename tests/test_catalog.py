"""Self-contained checkpoint catalogues (sidrec/): a moved checkpoint still maps SIDs to items and
takes new items without the SID directory it was trained from; format-1 checkpoints still load."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from data_prep.dataset import RecDataset
from data_prep.io import read_json
from sid_tokenizer.catalog import (
    Catalogue,
    CatalogueFiles,
    checkpoint_dataset_dir,
    checkpoint_sid_dir,
    load_sid_dir,
    save_catalogue,
)
from sid_tokenizer.new_items import add_items


@pytest.fixture()
def moved_checkpoint(scientific_dirs, tmp_path) -> tuple[Path, Path]:
    """A catalogue written from copies of the dataset / SID dirs, then moved while those copies
    are deleted: nothing outside the checkpoint is left to follow."""
    src_sid = tmp_path / "sid_copy"
    shutil.copytree(scientific_dirs["sid"], src_sid)
    ds = RecDataset.load(scientific_dirs["dataset"])
    first = tmp_path / "first" / "ckpt"
    save_catalogue(
        first, ds, load_sid_dir(src_sid, ds), sid_dir=src_sid, dataset_dir=scientific_dirs["dataset"]
    )
    moved = tmp_path / "elsewhere" / "ckpt"
    moved.parent.mkdir()
    os.replace(first, moved)
    shutil.rmtree(src_sid)
    return moved, Path(scientific_dirs["sid"])


def test_catalogue_records_resolved_paths_and_carries_the_quantizer(moved_checkpoint, scientific_dirs):
    ckpt, _ = moved_checkpoint
    meta = read_json(ckpt / "sidrec" / "meta.json")
    assert meta["format_version"] == 2 and Path(meta["dataset_dir"]).is_absolute()
    assert meta["torch_threads"] >= 1 and "torch" in meta["versions"]
    assert checkpoint_dataset_dir(ckpt) == Path(scientific_dirs["dataset"]).resolve()
    assert checkpoint_sid_dir(ckpt) == ckpt / "sidrec" / "sid"
    assert (ckpt / "sidrec" / "sid" / "quantizer").is_dir()
    cat = Catalogue.load(ckpt)
    assert len(cat.raw_ids) == 4344 and cat.index.codes.shape == (4344, 3)


def test_moved_checkpoint_takes_new_items_from_its_own_quantizer(moved_checkpoint, tmp_path, monkeypatch):
    ckpt, sid = moved_checkpoint
    monkeypatch.chdir(tmp_path)  # no working-directory-relative path can help
    before = Catalogue.load(ckpt)
    new = tmp_path / "new.jsonl"
    new.write_text(json.dumps({"raw_id": "N1", "title": "Digital caliper 6 inch"}) + "\n")
    emb = np.load(next((sid.parent / "dataset" / "embeddings").glob("*.npy")))[:1] * 1.01
    (row,) = add_items(ckpt, new, embeddings=emb)
    after = Catalogue.load(ckpt)
    assert after.raw_ids[-1] == "N1" and after.index.sid(len(after.raw_ids) - 1) == row["sid"]
    assert tuple(after.index.codes[-1].tolist()) not in set(map(tuple, before.index.codes.tolist()))


def test_format_1_checkpoint_still_loads(moved_checkpoint, scientific_dirs, tmp_path, monkeypatch):
    """Checkpoints written before format 2: relative paths, no sidrec/sid/."""
    ckpt, sid = moved_checkpoint
    shutil.rmtree(ckpt / "sidrec" / "sid")
    meta = read_json(ckpt / "sidrec" / "meta.json")
    root = Path(scientific_dirs["root"])
    meta.update(format_version=1, dataset_dir="dataset", sid_dir="sid_rkmeans")
    for k in ("versions", "torch_threads"):
        meta.pop(k)
    (ckpt / "sidrec" / "meta.json").write_text(json.dumps(meta))
    monkeypatch.chdir(root)  # format 1 paths are relative to the run's working directory
    assert len(Catalogue.load(ckpt).raw_ids) == 4344
    assert checkpoint_sid_dir(ckpt) == Path("sid_rkmeans") and checkpoint_dataset_dir(ckpt) == Path("dataset")
    assert RecDataset.load(checkpoint_dataset_dir(ckpt)).num_items == 4344


def test_catalogue_files_detect_changes(moved_checkpoint):
    ckpt, _ = moved_checkpoint
    files = CatalogueFiles(ckpt)
    assert files.changed()  # nothing loaded yet
    files.load()
    assert not files.changed()
    path = ckpt / "sidrec" / "items.jsonl"
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert files.changed()
