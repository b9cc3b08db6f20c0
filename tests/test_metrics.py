from __future__ import annotations

import json
import math

import numpy as np
import pytest

from data_prep.io import DataError
from eval.metrics import (
    bootstrap_ci,
    hit_rank_and_weight,
    metric_names,
    metrics_with_ci,
    rank_metrics,
    singleton_groups,
)
from eval.report import (
    MergeReportsArgs,
    merge_metrics_reports,
    metrics_markdown,
    read_metrics_report,
    write_metrics_report,
)


def test_rank_one_gives_ndcg_one():
    res = rank_metrics([[[7], [3], [9]]], [7], ks=(1, 3))
    assert res["HR@1"] == 1.0 and res["NDCG@1"] == 1.0
    assert res["HR@3"] == 1.0 and res["NDCG@3"] == 1.0
    assert res["num_examples"] == 1


def test_rank_three():
    res = rank_metrics([[[1], [2], [7], [4]]], [7], ks=(1, 3, 5))
    assert res["HR@1"] == 0.0 and res["NDCG@1"] == 0.0
    assert res["HR@3"] == 1.0
    assert res["NDCG@3"] == pytest.approx(1 / math.log2(4)) == pytest.approx(0.5)
    assert res["NDCG@5"] == pytest.approx(0.5)


def test_group_of_two_at_rank_two_counts_half():
    res = rank_metrics([[[1], [5, 7], [4]]], [7], ks=(1, 3))
    assert res["HR@1"] == 0.0
    assert res["HR@3"] == pytest.approx(0.5)
    assert res["NDCG@3"] == pytest.approx(0.5 / math.log2(3))


def test_miss_is_zero():
    res = rank_metrics([[[1], [2], [3]]], [9], ks=(1, 3, 10))
    assert all(res[n] == 0.0 for n in metric_names((1, 3, 10)))


def test_invalid_candidates_occupy_ranks_and_never_hit():
    # two invalid generations before the target: target sits at rank 3
    res = rank_metrics([[[], [], [7]]], [7], ks=(1, 3))
    assert res["HR@1"] == 0.0
    assert res["HR@3"] == 1.0 and res["NDCG@3"] == pytest.approx(0.5)
    assert res["valid_rate"] == pytest.approx(1 / 3)
    assert rank_metrics([[[], []]], [7], ks=(2,))["HR@2"] == 0.0


def test_target_beyond_k_and_short_lists():
    res = rank_metrics([[[1], [2], [3], [4], [5], [7]], [[7]], []], [7, 7, 7], ks=(5, 10))
    # example 0: rank 6 -> only @10; example 1: rank 1; example 2: no candidates
    assert res["HR@5"] == pytest.approx(1 / 3)
    assert res["HR@10"] == pytest.approx(2 / 3)
    assert res["NDCG@10"] == pytest.approx((1 / math.log2(7) + 1) / 3)
    assert res["per_example"]["HR@10"].tolist() == [1.0, 1.0, 0.0]
    assert res["valid_rate"] == pytest.approx(2 / 3)


def test_only_first_group_containing_target_counts():
    assert hit_rank_and_weight([[1, 2], [7], [7]], 7) == (2, 1.0)
    assert hit_rank_and_weight([[3, 7, 7]], 7) == (1, 0.5)  # duplicate ids are one item
    assert hit_rank_and_weight([[1]], 7) == (0, 0.0)


def test_averages_over_examples():
    ranked = singleton_groups([[7, 1], [1, 7], [1, 2]])
    res = rank_metrics(ranked, [7, 7, 7], ks=(1, 2))
    assert res["HR@1"] == pytest.approx(1 / 3)
    assert res["HR@2"] == pytest.approx(2 / 3)
    assert res["NDCG@2"] == pytest.approx((1 + 1 / math.log2(3)) / 3)
    assert set(res["per_example"]) == {"HR@1", "NDCG@1", "HR@2", "NDCG@2", "valid_rate"}


def test_mismatched_lengths_and_bad_ks_raise():
    with pytest.raises(ValueError, match="targets"):
        rank_metrics([[[1]]], [1, 2])
    with pytest.raises(ValueError, match="ks"):
        rank_metrics([[[1]]], [1], ks=(0,))


def test_properties_on_random_rankings():
    rng = np.random.default_rng(0)
    ks = (1, 3, 5, 10, 20)
    ranked, targets = [], []
    for _ in range(300):
        groups = [rng.choice(50, size=rng.integers(0, 4), replace=False).tolist() for _ in range(25)]
        ranked.append(groups)
        targets.append(int(rng.integers(0, 50)))
    res = rank_metrics(ranked, targets, ks=ks)
    for a, b in zip(ks, ks[1:], strict=False):
        assert res[f"HR@{a}"] <= res[f"HR@{b}"] + 1e-12
        assert res[f"NDCG@{a}"] <= res[f"NDCG@{b}"] + 1e-12
    for k in ks:
        assert (res["per_example"][f"NDCG@{k}"] <= res["per_example"][f"HR@{k}"] + 1e-12).all()
        assert 0.0 <= res[f"NDCG@{k}"] <= res[f"HR@{k}"] <= 1.0
    assert res["HR@20"] > 0


def test_bootstrap_ci_contains_mean_and_shrinks_with_n():
    rng = np.random.default_rng(1)
    small = (rng.random(200) < 0.1).astype(float)
    large = (rng.random(20000) < 0.1).astype(float)
    lo_s, hi_s = bootstrap_ci(small, n_boot=500)
    lo_l, hi_l = bootstrap_ci(large, n_boot=500)
    assert lo_s <= small.mean() <= hi_s
    assert lo_l <= large.mean() <= hi_l
    assert hi_l - lo_l < hi_s - lo_s
    # normal approximation of the CI half-width of a Bernoulli(0.1) mean at n = 20000
    assert (hi_l - lo_l) / 2 == pytest.approx(1.96 * math.sqrt(0.09 / 20000), rel=0.2)
    assert bootstrap_ci(large, n_boot=500, seed=3) == bootstrap_ci(large, n_boot=500, seed=3)
    assert bootstrap_ci(np.ones(10)) == (1.0, 1.0)
    assert all(math.isnan(x) for x in bootstrap_ci(np.zeros(0)))


def test_metrics_with_ci_matches_single_metric_bootstrap():
    res = rank_metrics(singleton_groups([[1, 2, 3]] * 50 + [[4, 5, 6]] * 50), [2] * 70 + [9] * 30, ks=(1, 3))
    table = metrics_with_ci(res, n_boot=300, seed=5)
    assert set(table) == {"HR@1", "NDCG@1", "HR@3", "NDCG@3", "valid_rate"}
    assert table["HR@3"]["value"] == pytest.approx(0.5)
    assert table["HR@3"]["ci_low"] <= 0.5 <= table["HR@3"]["ci_high"]
    assert (table["HR@3"]["ci_low"], table["HR@3"]["ci_high"]) == pytest.approx(
        bootstrap_ci(res["per_example"]["HR@3"], n_boot=300, seed=5)
    )
    assert table["HR@1"] == {"value": 0.0, "ci_low": 0.0, "ci_high": 0.0}


def test_report_writes_json_markdown_and_png(tmp_path):
    res = rank_metrics(singleton_groups([[1, 2, 3]] * 10), [2] * 4 + [9] * 6, ks=(1, 3))
    cells = metrics_with_ci(res, n_boot=100)
    results = {
        "pop/test": {"model": "pop", "split": "test", "metrics": cells, "extra": {"fit_seconds": 0.5}},
        "pop/valid": {"model": "pop", "split": "valid", "metrics": cells, "extra": {}},
        "llm": {"split": "test", "metrics": {"HR@3": {"value": 0.25, "ci_low": 0.2, "ci_high": 0.3}}},
    }
    paths = write_metrics_report(results, tmp_path / "sub" / "report", meta={"dataset": "toy"}, title="Toy")
    assert [p.name for p in paths] == ["report.json", "report.md", "report.png"]
    assert json.loads(paths[0].read_text())["results"]["llm"]["metrics"]["HR@3"]["value"] == 0.25
    md = paths[1].read_text()
    assert md.index("## test") < md.index("## valid")
    header = next(line for line in md.splitlines() if line.startswith("| model"))
    assert header.split(" | ")[1:5] == ["HR@1", "NDCG@1", "HR@3", "NDCG@3"]
    assert "| pop | 0.0000 [0.0000, 0.0000] | 0.0000 [0.0000, 0.0000] | 0.4000 [" in md
    assert "| llm | – | – | 0.2500 [0.2000, 0.3000] |" in md
    assert "fit_seconds=0.5" in md
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "HR@3" in metrics_markdown(results, metrics=["HR@3"])


def test_merge_reports_concatenates_rows_and_keeps_meta(tmp_path):
    cell = {"value": 0.1, "ci_low": 0.05, "ci_high": 0.15}
    a = {"pop/test": {"model": "pop", "split": "test", "metrics": {"HR@10": cell}}}
    b = {"llm/test": {"model": "llm", "split": "test", "metrics": {"HR@10": dict(cell, value=0.2)}}}
    write_metrics_report(a, tmp_path / "a", meta={"run": "a"}, plot=False, notes=["protocol note"])
    write_metrics_report(b, tmp_path / "b", meta={"run": "b"}, plot=False)
    args = MergeReportsArgs(
        inputs=[str(tmp_path / "a.json"), str(tmp_path / "b.json")],
        output_prefix=str(tmp_path / "merged"),
        title="All",
    )
    merged = merge_metrics_reports(args)
    assert list(merged) == ["pop/test", "llm/test"]
    results, meta = read_metrics_report(tmp_path / "merged.json")
    assert results["llm/test"]["metrics"]["HR@10"]["value"] == 0.2
    assert meta["merged_from"][str(tmp_path / "b.json")]["run"] == "b"
    assert meta["torch_threads"] >= 1 and "torch" in meta["versions"]  # provenance of every report
    md = (tmp_path / "merged.md").read_text()
    assert "| llm | 0.2000 [0.0500, 0.1500] |" in md
    assert md.startswith("# All") and "protocol note" in md
    (tmp_path / "bad.json").write_text('{"results": {"x": {}}}')
    with pytest.raises(DataError, match="metrics"):
        read_metrics_report(tmp_path / "bad.json")
