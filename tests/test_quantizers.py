"""Quantizers (fit/encode/save/load), collision resolution, the build entry point and its configs."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest

from data_prep.dataset import Item, RecDataset, leave_one_out
from data_prep.embed import embeddings_path
from data_prep.io import DataError
from sid_tokenizer.build import BuildArgs, assign_new_items, build
from sid_tokenizer.catalog import load_sid_dir
from sid_tokenizer.collisions import (
    CollisionError,
    add_dedup_level,
    collision_stats,
    pick_free_codes,
    resolve_collisions,
)
from sid_tokenizer.quantizers import QUANTIZERS, Quantizer, ResidualKMeans, capacity_assign, make_quantizer
from tests.conftest import SHARED

ROOT = Path(__file__).resolve().parents[1]
SCI_EMB = ROOT / "data/scientific/embeddings/all-MiniLM-L6-v2.npy"
LCREC_INDEX = SHARED / "amazon18-scientific" / "indexes" / "rkmeans_native" / "Scientific.index.json"

# tiny settings so every method trains in about a second on 2 shared cores
SMALL = {
    "num_levels": 3,
    "codebook_size": 8,
    "num_threads": 1,
    "kmeans_niter": 10,
    "epochs": 3,
    "batch_size": 128,
    "init_batch": 512,
    "hidden_dims": [32, 16],
    "latent_dim": 8,
}


def mixture(n: int = 600, dim: int = 16, centres: int = 12, seed: int = 0) -> np.ndarray:
    """Unit-norm points around random centres (so clustering has structure)."""
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, dim))
    x = c[rng.integers(0, centres, n)] + 0.3 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    return mixture()


# ---- quantizers ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(QUANTIZERS))
def test_quantizer_fit_encode_save_load(name, x, tmp_path):
    q = make_quantizer(name, **{**SMALL, "epochs": 40 if name == "rqvae" else 3})
    codes = q.fit_encode(x)
    assert codes.shape == (len(x), 3) and codes.dtype == np.int64
    assert codes.min() >= 0 and codes.max() < 8
    assert q.level_sizes == (8, 8, 8)
    x_hat = q.decode(codes)
    assert x_hat.shape == x.shape
    rel = ((x - x_hat) ** 2).sum() / (x**2).sum()
    assert rel < 0.9, f"{name}: relative reconstruction error {rel:.3f}"
    # 8^3 cells: every level is used, and a fitted quantizer separates most items
    assert all(len(np.unique(codes[:, lv])) >= 4 for lv in range(3))
    new = mixture(50, seed=9)
    q.save(tmp_path / "q")
    loaded = Quantizer.load(tmp_path / "q")
    assert type(loaded) is type(q) and loaded.config == q.config
    np.testing.assert_array_equal(loaded.encode(new), q.encode(new))
    np.testing.assert_allclose(loaded.decode(codes[:20]), q.decode(codes[:20]), atol=1e-5)
    assert not list(tmp_path.glob("q/*.tmp"))


def test_balanced_clusters_respect_capacity(x):
    q = make_quantizer("balanced", **SMALL)
    codes = q.fit_encode(x)
    cap = int(np.ceil(len(x) / 8))
    for lv in range(3):
        sizes = np.bincount(codes[:, lv], minlength=8)
        assert sizes.max() <= cap and sizes.sum() == len(x)
    # rkmeans on the same data is less even at the first level
    rk = make_quantizer("rkmeans", **SMALL).fit_encode(x)
    assert np.bincount(rk[:, 0], minlength=8).std() >= np.bincount(codes[:, 0], minlength=8).std()


def test_capacity_assign_is_feasible_and_greedy_when_unconstrained():
    rng = np.random.default_rng(1)
    dist = rng.random((1000, 16)).astype(np.float32)
    dist[:, 3] *= 0.01  # everybody wants cluster 3
    codes = capacity_assign(dist, 63)
    assert (codes >= 0).all() and np.bincount(codes, minlength=16).max() <= 63
    np.testing.assert_array_equal(capacity_assign(dist, 1000), dist.argmin(1))
    with pytest.raises(ValueError, match="capacity"):
        capacity_assign(dist, 10)


def test_quantizer_errors(x, tmp_path):
    with pytest.raises(ValueError, match="unknown quantizer 'nope'"):
        make_quantizer("nope")
    with pytest.raises(ValueError, match="no field"):
        make_quantizer("rkmeans", strict=True, epochs=3)
    with pytest.raises(RuntimeError, match="not fitted"):
        make_quantizer("rkmeans").encode(x)
    with pytest.raises(ValueError, match="fewer than codebook_size"):
        make_quantizer("rkmeans", codebook_size=256).fit(x[:100])
    q = make_quantizer("rkmeans", **SMALL).fit(x)
    with pytest.raises(ValueError, match="dimension 8, the quantizer was fitted on 16"):
        q.encode(x[:, :8])
    with pytest.raises(ValueError, match="out of range"):
        q.decode(np.full((2, 3), 8))
    q.save(tmp_path / "rk")
    meta = json.loads((tmp_path / "rk/quantizer.json").read_text())
    meta["name"] = "kmeans++"
    (tmp_path / "rk/quantizer.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"quantizer.json field 'name': unknown quantizer 'kmeans\+\+'"):
        Quantizer.load(tmp_path / "rk")
    make_quantizer("rvq", **SMALL).fit(x).save(tmp_path / "rvq")
    with pytest.raises(DataError, match="holds a 'rvq' quantizer, not 'rkmeans'"):
        ResidualKMeans.load(tmp_path / "rvq")


# ---- collisions ----------------------------------------------------------------------------
def test_collision_stats_and_extra_level():
    codes = np.array([[0, 1], [0, 1], [2, 2], [0, 1], [2, 2], [3, 0]])
    stats = collision_stats(codes)
    assert stats["collisions"] == 3 and stats["colliding_items"] == 5 and stats["max_group_size"] == 3
    assert stats["distinct_sids"] == 3 and stats["collision_rate"] == 0.5
    out, size = add_dedup_level(codes)
    assert size == 3
    assert out[:, 2].tolist() == [0, 1, 0, 2, 1, 0]
    assert collision_stats(out)["collisions"] == 0


@pytest.mark.parametrize("name", ["rkmeans", "rqvae"])
def test_reassign_removes_collisions_and_keeps_length(name, x):
    q = make_quantizer(name, **{**SMALL, "codebook_size": 6})  # 216 cells, clustered items: collisions
    x_small = x[:60]
    codes = q.fit(x).encode(x_small)
    before = collision_stats(codes)
    assert before["collisions"] > 0
    out, sizes, info = resolve_collisions(codes, "reassign", q.level_sizes, x_small, q)
    assert out.shape == codes.shape and sizes == (6, 6, 6)
    assert collision_stats(out)["collisions"] == 0
    assert out.min() >= 0 and out.max() < 6
    # items that did not collide and were not displaced keep their SID; only the last level moves
    # unless an item had to be re-routed over the previous level
    unique_before = np.unique(codes, axis=0, return_counts=True)
    singles = {tuple(r) for r, c in zip(*unique_before, strict=True) if c == 1}
    keep = np.array([tuple(r) in singles for r in codes.tolist()])
    np.testing.assert_array_equal(out[keep], codes[keep])
    assert (out[:, 0] == codes[:, 0]).all()
    if info["rerouted"] == 0:
        assert (out[:, :2] == codes[:, :2]).all()
    ext, ext_sizes, _ = resolve_collisions(codes, "extra_level", q.level_sizes)
    assert ext.shape == (60, 4) and ext_sizes[-1] == before["max_group_size"]
    assert collision_stats(ext)["collisions"] == 0


def test_reassign_is_min_cost_and_reroutes_overflow(x):
    q = make_quantizer("rkmeans", **{**SMALL, "num_levels": 2, "codebook_size": 4}).fit(x)
    # six items forced onto one SID: four fit the prefix's last-level codes, two must re-route
    codes = np.tile(q.encode(x[:1]), (6, 1))
    out, _, info = resolve_collisions(codes, "reassign", q.level_sizes, x[:6], q)
    assert collision_stats(out)["collisions"] == 0 and info["rerouted"] == 2
    stay = out[:, 0] == codes[0, 0]
    assert stay.sum() == 4
    cost = q.level_distances(x[:6], codes, 1)
    chosen = cost[np.flatnonzero(stay), out[stay, 1]].sum()
    from itertools import permutations

    best = min(
        sum(cost[i, c] for i, c in zip(rows, range(4), strict=True)) for rows in permutations(range(6), 4)
    )
    assert chosen == pytest.approx(best, rel=1e-5)
    with pytest.raises(CollisionError, match="extra_level"):
        resolve_collisions(codes, "reassign", q.level_sizes, x[:6], q, reroute=False)
    with pytest.raises(CollisionError, match="extra_level"):  # 20 items, only 16 SIDs exist
        resolve_collisions(np.tile(codes[:1], (20, 1)), "reassign", q.level_sizes, x[:20], q)
    with pytest.raises(CollisionError, match="needs the quantizer"):
        resolve_collisions(codes, "reassign", q.level_sizes)


def test_pick_free_codes_prefers_nearest_free_code():
    codes = np.array([[1, 2], [1, 2], [0, 0]])
    costs = np.array([[5.0, 4.0, 0.0, 1.0], [5.0, 4.0, 0.0, 1.0], [0.0, 1.0, 2.0, 3.0]])
    taken = {(1, 2), (1, 3)}
    out = pick_free_codes(codes, costs, taken)
    assert out.tolist() == [[1, 1], [1, 0], [0, 0]]
    assert {(1, 1), (1, 0), (0, 0)} <= taken


# ---- build entry point ---------------------------------------------------------------------
def make_dataset(path: Path, emb: np.ndarray) -> Path:
    n = len(emb)
    items = [Item(item_id=i, raw_id=f"item{i}", title=f"t{i}") for i in range(n)]
    rng = np.random.default_rng(0)
    sequences = [rng.choice(n, 5, replace=False).tolist() for _ in range(30)]
    train, valid, test = leave_one_out(sequences)
    ds = RecDataset("toy", items, sequences, [f"u{u}" for u in range(30)], train, valid, test)
    ds.save(path)
    p = embeddings_path(path, "sentence-transformers/all-MiniLM-L6-v2")
    p.parent.mkdir(parents=True, exist_ok=True)
    np.save(p, emb)
    return path


def build_args(tmp_path: Path, **kw) -> BuildArgs:
    options = {k: v for k, v in SMALL.items() if k in {f.name for f in fields(BuildArgs)}}
    options.update(dataset_dir=str(tmp_path / "ds"), output_dir=str(tmp_path / "sid"))
    options.update(kw)
    return BuildArgs(**options)


@pytest.mark.parametrize("strategy", ["reassign", "extra_level"])
def test_build_writes_sid_directory(strategy, x, tmp_path):
    make_dataset(tmp_path / "ds", x[:300])
    # 16 x 16 prefixes for 300 items: every prefix keeps free last-level codes for new items
    out = build(build_args(tmp_path, quantizer="balanced", codebook_size=16, collision_strategy=strategy))
    assert {p.name for p in out.iterdir()} == {
        "index.json",
        "quantizer",
        "report.json",
        "report.png",
        "meta.json",
    }
    report = json.loads((out / "report.json").read_text())
    assert report["collisions_before"]["collisions"] > 0
    assert report["collisions_after"]["collisions"] == 0
    assert len(report["usage"]) == (3 if strategy == "reassign" else 4)
    assert 0 < report["usage"][0]["utilisation"] <= 1 and 0 < report["usage"][0]["entropy_norm"] <= 1
    assert report["reconstruction"]["relative"] < 1
    assert set(report["seconds"]) >= {"load", "fit", "resolve_collisions", "write"}
    meta = json.loads((out / "meta.json").read_text())
    assert meta["counts"]["collisions_after"] == 0 and meta["inputs"]["num_items"] == 300
    index = load_sid_dir(out, RecDataset.load(tmp_path / "ds"))
    assert index.raw_ids[:2] == ["item0", "item1"] and index.num_collisions() == 0
    assert list(json.loads((out / "index.json").read_text()))[:2] == ["item0", "item1"]
    # new items get SIDs from the saved quantizer, avoiding the existing ones where possible
    new = mixture(20, seed=3)
    new_codes = assign_new_items(out, new)
    assert new_codes.shape == (20, index.codes.shape[1])
    if strategy == "reassign":
        existing = {tuple(r) for r in index.codes.tolist()}
        fresh = [tuple(r) for r in new_codes.tolist()]
        assert len(set(fresh)) == 20 and not existing & set(fresh)
    else:
        combined = np.concatenate([index.codes, new_codes])
        assert collision_stats(combined)["collisions"] == 0


def test_build_import_mode_and_bad_inputs(x, tmp_path):
    make_dataset(tmp_path / "ds", x[:100])
    sid = {f"item{i}": [f"<a_{i % 7}>", f"<b_{i % 3}>", f"<c_{i % 2}>"] for i in range(100)}
    (tmp_path / "third_party.json").write_text(json.dumps(sid))
    out = build(
        build_args(tmp_path, index_path=str(tmp_path / "third_party.json"), collision_strategy="none")
    )
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "import" and report["level_sizes"] == [8, 4, 2]
    assert report["collisions_after"]["collisions"] == 100 - 42 and report["reconstruction"] is None
    assert not (out / "quantizer").exists()
    with pytest.raises(DataError, match="no quantizer"):
        assign_new_items(out, x[:2])
    with pytest.raises(CollisionError, match="use extra_level"):
        build(
            build_args(tmp_path, index_path=str(tmp_path / "third_party.json"), collision_strategy="reassign")
        )
    # an index missing a catalogue item
    del sid["item5"]
    (tmp_path / "missing.json").write_text(json.dumps(sid))
    with pytest.raises(DataError, match=r"missing.json \[key 'item5'\]: catalogue item has no SID"):
        build(build_args(tmp_path, index_path=str(tmp_path / "missing.json")))
    # SIDs of the wrong shape
    sid["item5"] = ["<a_1>", "<b_1>"]
    (tmp_path / "short.json").write_text(json.dumps(sid))
    with pytest.raises(DataError, match="short.json.*2 levels, others have 3"):
        build(build_args(tmp_path, index_path=str(tmp_path / "short.json")))
    # embedding rows != catalogue items; the failed build leaves the previous output untouched
    np.save(embeddings_path(tmp_path / "ds", "sentence-transformers/all-MiniLM-L6-v2"), x[:99])
    with pytest.raises(DataError, match="all-MiniLM-L6-v2.npy: 99 embedding rows but the catalogue has 100"):
        build(build_args(tmp_path))
    assert json.loads((out / "report.json").read_text())["method"] == "import"
    with pytest.raises(ValueError, match="collision_strategy 'dedup'"):
        build_args(tmp_path, collision_strategy="dedup")


def test_shipped_configs_parse_and_name_real_quantizers():
    from trl import TrlParser

    configs = sorted((ROOT / "sid_tokenizer/configs").glob("*.yaml"))
    assert {c.stem for c in configs} >= {f"scientific_{q}" for q in QUANTIZERS} | {"beauty_rkmeans_zcr"}
    for cfg in configs:
        (args,) = TrlParser((BuildArgs,)).parse_args_and_config(["--config", str(cfg)])
        assert args.output_dir.startswith("outputs/")
        if args.index_path is None:
            q = make_quantizer(args.quantizer, **args.quantizer_options())
            assert q.config.codebook_size == 256 and q.config.num_levels == 3
        else:
            assert (ROOT / args.index_path).resolve().name == "Beauty.index.json"
    (args,) = TrlParser((BuildArgs,)).parse_args_and_config(
        [
            "--config",
            str(ROOT / "sid_tokenizer/configs/scientific_rqvae.yaml"),
            "--epochs",
            "7",
            "--hidden_dims",
            "64",
            "32",
        ]
    )
    assert args.epochs == 7 and args.hidden_dims == [64, 32]


# ---- the real Scientific embeddings --------------------------------------------------------
@pytest.mark.skipif(not SCI_EMB.exists(), reason=f"Scientific embeddings not vendored at {SCI_EMB}")
def test_rkmeans_on_scientific_zero_collisions():
    emb = np.load(SCI_EMB)
    assert emb.shape == (4344, 384)
    q = make_quantizer("rkmeans", num_threads=1, kmeans_niter=10)
    codes = q.fit_encode(emb)
    before = collision_stats(codes)
    assert 0 < before["collision_rate"] < 0.5
    assert len(np.unique(codes[:, 0])) == 256
    out, _, _ = resolve_collisions(codes, "reassign", q.level_sizes, emb, q)
    assert collision_stats(out)["collisions"] == 0 and out.shape == (4344, 3) and out.max() < 256


@pytest.mark.skipif(not LCREC_INDEX.exists(), reason=f"LC-Rec index not available at {LCREC_INDEX}")
def test_import_lcrec_index_with_extra_level(tmp_path):
    emb = np.zeros((4344, 4), dtype=np.float32)
    ds = make_dataset(tmp_path / "ds", emb)
    # the LC-Rec index is keyed by dense ids "0".."4343"
    items_path = ds / "items.jsonl"
    rows = [json.loads(line) for line in items_path.read_text().splitlines()]
    items_path.write_text("".join(json.dumps({**r, "raw_id": str(r["item_id"])}) + "\n" for r in rows))
    out = build(build_args(tmp_path, index_path=str(LCREC_INDEX), collision_strategy="extra_level"))
    report = json.loads((out / "report.json").read_text())
    assert report["collisions_before"]["collisions"] > 0 and report["collisions_after"]["collisions"] == 0
    assert report["level_sizes"][:4] == [256] * 4 and len(report["level_sizes"]) == 5
    assert load_sid_dir(out).codes.shape == (4344, 5)
