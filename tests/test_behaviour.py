"""Behaviour embeddings (PPMI-SVD of training sequences) and text/behaviour fusion as SID sources,
on the vendored Scientific data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data_prep.behaviour import cooccurrence, fuse, l2_normalise, ppmi_svd
from data_prep.dataset import RecDataset
from data_prep.embed import embeddings_path
from sid_tokenizer.build import BuildArgs, build
from sid_tokenizer.catalog import load_sid_dir

ENCODER = "sentence-transformers/all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def scientific(scientific_dirs) -> RecDataset:
    return RecDataset.load(scientific_dirs["dataset"])


def neighbour_hit_rate(emb: np.ndarray, ds: RecDataset, users: int = 1500, k: int = 20) -> float:
    """Share of validation targets among the k nearest items (cosine) of the last history item."""
    e = l2_normalise(emb)
    hits = 0
    for ex in ds.valid[:users]:
        s = e @ e[ex.history[-1]]
        s[ex.history[-1]] = -np.inf
        hits += ex.target in np.argpartition(-s, k)[:k]
    return hits / users


def test_cooccurrence_counts_window_pairs():
    c = cooccurrence([[0, 1, 2], [2, 2, 3]], num_items=4, window=2).toarray()
    assert np.allclose(c, c.T)
    assert c[0, 1] == 1.0 and c[0, 2] == 0.5 and c[1, 2] == 1.0  # weight 1/distance
    assert c[2, 3] == 1.0 + 0.5 and c[2, 2] == 0.0  # repeats are not self pairs
    with pytest.raises(ValueError, match="out of range"):
        cooccurrence([[0, 7]], num_items=4)


def test_ppmi_svd_on_scientific_captures_behaviour(scientific):
    ds = scientific
    emb, info = ppmi_svd(ds.train, ds.num_items, dim=32, seed=0)
    assert emb.shape == (ds.num_items, 32) and emb.dtype == np.float32 and np.isfinite(emb).all()
    again, _ = ppmi_svd(ds.train, ds.num_items, dim=32, seed=0)
    np.testing.assert_array_equal(emb, again)  # deterministic (fixed SVD start vector and signs)
    assert info["pairs"] > 10_000 and info["items_without_cooccurrence"] < 0.01 * ds.num_items
    # the next item is far more often a behaviour neighbour of the last one than chance (20 / 4344)
    hr = neighbour_hit_rate(emb, ds)
    assert hr > 10 * 20 / ds.num_items, hr
    with pytest.raises(ValueError, match="dim must be"):
        ppmi_svd(ds.train, ds.num_items, dim=ds.num_items)


def test_fuse_weights_squared_distances():
    rng = np.random.default_rng(0)
    t, b = rng.normal(size=(50, 8)), rng.normal(size=(50, 3))
    for w in (0.0, 0.3, 1.0):
        f = fuse(t, b, w)
        assert f.shape == (50, 11)
        np.testing.assert_allclose(np.linalg.norm(f, axis=1), 1.0, rtol=1e-5)
        d = ((f[:, None] - f[None]) ** 2).sum(-1)
        dt = ((l2_normalise(t)[:, None] - l2_normalise(t)[None]) ** 2).sum(-1)
        db = ((l2_normalise(b)[:, None] - l2_normalise(b)[None]) ** 2).sum(-1)
        np.testing.assert_allclose(d, (1 - w) * dt + w * db, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="behaviour_weight"):
        fuse(t, b, 1.5)
    with pytest.raises(ValueError, match="rows"):
        fuse(t, b[:10])


@pytest.mark.parametrize("source", ["behaviour", "fused"])
def test_build_sids_from_behaviour_and_fused_sources(scientific_dirs, tmp_path, source):
    out = tmp_path / source
    args = BuildArgs(
        dataset_dir=str(scientific_dirs["dataset"]),
        output_dir=str(out),
        encoder=ENCODER,
        embedding_source=source,
        behaviour_dim=32,
        behaviour_weight=0.5,
        num_levels=3,
        codebook_size=64,
        num_threads=1,
        kmeans_niter=10,
    )
    build(args)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["inputs"]["embedding_source"] == source
    assert meta["inputs"]["embedding_dim"] == (32 if source == "behaviour" else 384 + 32)
    assert meta["inputs"]["behaviour_embeddings"]["method"] == "ppmi_svd"
    assert ("embeddings" in meta["inputs"]) == (source == "fused")
    index = load_sid_dir(out, RecDataset.load(scientific_dirs["dataset"]))
    assert len(index) == 4344 and meta["counts"]["collisions_after"] == 0
    # a behaviour .npy from elsewhere (e.g. SASRec item embeddings) is quantized as given
    emb = np.load(embeddings_path(scientific_dirs["dataset"], ENCODER))[:, :16]
    np.save(tmp_path / "ext.npy", emb)
    build(
        BuildArgs(
            **{
                **args.__dict__,
                "output_dir": str(tmp_path / "ext"),
                "behaviour_embeddings_file": str(tmp_path / "ext.npy"),
            }
        )
    )
    ext = json.loads((tmp_path / "ext" / "meta.json").read_text())["inputs"]
    assert (
        ext["behaviour_embeddings"] == str(tmp_path / "ext.npy")
        and len(ext["behaviour_embeddings_sha256"]) == 64
    )


def test_build_rejects_unknown_source():
    with pytest.raises(ValueError, match="embedding_source 'clicks'"):
        BuildArgs(embedding_source="clicks")
