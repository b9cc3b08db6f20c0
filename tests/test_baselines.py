from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from data_prep.dataset import Item, RecDataset, leave_one_out
from data_prep.loaders.lcrec import load_lcrec
from eval.baselines import (
    BASELINES,
    Popularity,
    RandomRecommender,
    SASRec,
    SASRecConfig,
    build_baseline,
    evaluate_recommender,
    training_sequences,
)
from eval.baselines_main import BaselineArgs, run_baselines

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Small models on shared CPUs: one thread avoids OpenMP spin-waiting against other jobs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_dataset() -> RecDataset:
    # leave-one-out: train = seq[:-2], valid target = seq[-2], test target = seq[-1]
    sequences = [[0, 1, 2, 3], [1, 2, 0], [1, 3, 4, 2]]
    train, valid, test = leave_one_out(sequences)
    items = [Item(item_id=i, raw_id=f"i{i}") for i in range(6)]
    return RecDataset(
        name="tiny",
        items=items,
        sequences=sequences,
        user_raw_ids=["a", "b", "c"],
        train=train,
        valid=valid,
        test=test,
    )


def test_training_sequences_per_split():
    ds = tiny_dataset()
    assert training_sequences(ds, "valid") == [[0, 1], [1], [1, 3]]
    # test may use everything before the test target: train + the validation targets
    assert training_sequences(ds, "test") == [[0, 1, 2], [1, 2], [1, 3, 4]]
    with pytest.raises(ValueError, match="split"):
        training_sequences(ds, "train")


def test_popularity_ranking_valid_uses_train_only():
    ds = tiny_dataset()
    pop = Popularity()
    pop.fit(ds, "valid")
    # counts 1:3, 0:1, 3:1 (ties -> lower id), then the unseen items 2, 4, 5
    assert pop.rank([[0], [5]], 6) == [[1, 0, 3, 2, 4, 5]] * 2
    res = evaluate_recommender(pop, ds, "valid", ks=(1, 3, 5))
    # valid targets 2, 2, 4 sit at ranks 4, 4, 5
    assert res["HR@3"] == 0.0
    assert res["HR@5"] == pytest.approx(1.0)


def test_history_diagnostics_and_history_filtered_ranking():
    ds = tiny_dataset()
    pop = Popularity()
    pop.fit(ds, "valid")
    plain = evaluate_recommender(pop, ds, "valid", ks=(1, 3, 5))
    # top-1 is item 1 for everyone, and item 1 is in every validation history
    assert plain["history_top1"] == 1.0
    assert plain["history_share"] == pytest.approx((2 / 5 + 1 / 5 + 2 / 5) / 3)
    filtered = evaluate_recommender(pop, ds, "valid", ks=(1, 3, 5), exclude_history=True)
    # histories [0, 1], [1], [1, 3] removed: targets 2, 2, 4 move to ranks 2, 3, 3
    assert filtered["HR@1"] == 0.0
    assert filtered["HR@3"] == pytest.approx(1.0)
    assert filtered["NDCG@3"] == pytest.approx((1 / math.log2(3) + 0.5 + 0.5) / 3)
    assert filtered["history_share"] == 0.0 and filtered["history_top1"] == 0.0


def test_popularity_ranking_test_counts_valid_targets():
    ds = tiny_dataset()
    pop = Popularity()
    pop.fit(ds, "test")
    assert pop.rank([[]], 6) == [[1, 2, 0, 3, 4, 5]]
    res = evaluate_recommender(pop, ds, "test", ks=(1, 3))
    # test targets 3, 0, 2 at ranks 4, 3, 2
    assert res["HR@1"] == 0.0
    assert res["HR@3"] == pytest.approx(2 / 3)
    assert pop.info()["interactions_counted"] == 8


def test_random_is_a_permutation_prefix():
    ds = tiny_dataset()
    rnd = RandomRecommender(seed=1)
    rnd.fit(ds, "valid")
    ranked = rnd.rank([[0], [1]], 10)
    assert all(sorted(r) == list(range(6)) for r in ranked)


def test_registry_builds_every_baseline():
    for name in BASELINES:
        assert hasattr(build_baseline(name), "rank")
    with pytest.raises(ValueError, match="unknown baseline"):
        build_baseline("bert4rec")
    with pytest.raises(ValueError, match="loss"):
        SASRec(SASRecConfig(loss="bpr"))


def test_sasrec_ranks_full_catalogue_without_padding_or_history_filter():
    ds = tiny_dataset()
    model = SASRec(SASRecConfig(hidden_size=8, epochs=2, patience=5, max_len=3), seed=0)
    model.fit(ds, "valid")
    ranked = model.rank([[0, 1, 2, 3, 4], [], [5]], 6)
    # all 6 catalogue items, no padding id (-1), history items included
    assert all(sorted(r) == list(range(6)) for r in ranked)
    assert model.info()["epochs_run"] == 2
    bce = SASRec(SASRecConfig(hidden_size=8, epochs=1, loss="bce"), seed=0)
    bce.fit(ds, "valid")
    assert all(sorted(r) == list(range(6)) for r in bce.rank([[1, 2]], 6))
    model_retrain = SASRec(SASRecConfig(hidden_size=8, epochs=2, test_protocol="retrain"), seed=0)
    model_retrain.fit(ds, "test")  # fits on valid first to pick the epoch count, then retrains
    assert model_retrain.fitted_split == "test"


def test_sasrec_beats_random_on_scientific():
    data = ROOT / "data" / "scientific"
    full = load_lcrec(data / "Scientific.inter.json", data / "Scientific.item.json")
    # real Scientific data, first 3,000 users (full 4,344-item catalogue) to stay well under a minute
    n = 3000
    ds = RecDataset(
        name="scientific-3k",
        items=full.items,
        sequences=full.sequences[:n],
        user_raw_ids=full.user_raw_ids[:n],
        train=full.train[:n],
        valid=full.valid[:n],
        test=full.test[:n],
    )
    model = SASRec(SASRecConfig(epochs=2, batch_size=64, bf16=True), seed=0)
    model.fit(ds, "valid")
    assert model.history[1]["loss"] < model.history[0]["loss"]
    res = evaluate_recommender(model, ds, "valid", ks=(10,))
    random_hr10 = 10 / ds.num_items  # expectation of a uniform ranking: 0.0023
    assert res["HR@10"] > 5 * random_hr10, res["HR@10"]
    assert res["NDCG@10"] == pytest.approx(model.best_valid_ndcg10)


def test_baselines_main_writes_report(tmp_path):
    ds_dir = tiny_dataset().save(tmp_path / "dataset")
    args = BaselineArgs(
        history_filtered_rows=True,
        dataset_dir=str(ds_dir),
        output_dir=str(tmp_path / "out"),
        baselines=["random", "popularity", "sasrec"],
        ks=[1, 3],
        n_boot=50,
        torch_threads=1,
    )
    results = run_baselines(args, SASRecConfig(hidden_size=8, epochs=1))
    models = ("random", "popularity", "sasrec")
    assert set(results) == {
        f"{m}{suffix}/{s}" for m in models for s in ("valid", "test") for suffix in ("", "_history_filtered")
    }
    assert results["sasrec_history_filtered/test"]["model"] == "sasrec (history filtered)"
    report = json.loads((tmp_path / "out" / "baselines.json").read_text())
    assert report["results"]["popularity/test"]["metrics"]["HR@3"]["value"] == pytest.approx(2 / 3)
    assert report["meta"]["counts"]["users"] == 3
    md = (tmp_path / "out" / "baselines.md").read_text()
    assert "| popularity | 0.0000 [0.0000, 0.0000] |" in md
    assert (tmp_path / "out" / "baselines.png").exists()
    assert (tmp_path / "out" / "per_example" / "sasrec_test.npy").exists()


@pytest.mark.parametrize(
    "path", sorted((ROOT / "eval" / "configs").glob("*baselines*.yaml")), ids=lambda p: p.name
)
def test_shipped_configs_parse(path):
    from trl import TrlParser

    args, sasrec = TrlParser((BaselineArgs, SASRecConfig)).parse_yaml_file(str(path))
    for name in args.baselines:
        build_baseline(name, sasrec, args.seed)
    assert set(args.splits) <= {"valid", "test"}
    assert yaml.safe_load(path.read_text())["dataset_dir"] == args.dataset_dir
