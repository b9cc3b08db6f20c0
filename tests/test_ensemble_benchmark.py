"""benchmarks/ensemble_scientific.py: the training stages are the sweep recipe that recipes/sft.py
parses (train and retrain differ only in the validation targets), the ensemble evaluation is what
eval.evaluate parses, and the ensemble mode is chosen on validation metrics, never on test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.common import parse_sft_recipe
from benchmarks.ensemble_scientific import (
    EnsembleArgs,
    best_mode,
    ensemble_name,
    eval_cmd,
    train_cmd,
    variant_overrides,
)
from benchmarks.quality_sweep import VARIANTS


def test_train_and_retrain_stages_parse_and_differ_only_in_the_validation_targets(tmp_path: Path):
    args = EnsembleArgs(output_root=str(tmp_path), seeds=[42, 7])
    assert "--num_train_epochs" not in variant_overrides(args.variant)
    assert "--num_train_epochs" in VARIANTS[args.variant][1]  # the sweep's own count is replaced
    parsed = {}
    for kind in ("train", "retrain"):
        cmd = train_cmd(args, kind, 7)
        assert cmd[1:3] == ["recipes/sft.py", "--config"]
        parsed[kind] = parse_sft_recipe(cmd[3], *cmd[4:])
    (s_tr, t_tr, _), (s_re, t_re, _) = parsed["train"], parsed["retrain"]
    assert not s_tr.include_valid_in_train and s_re.include_valid_in_train
    assert t_tr.output_dir == str(tmp_path / "train_s7") and t_re.output_dir == str(tmp_path / "retrain_s7")
    for t in (t_tr, t_re):
        assert t.num_train_epochs == args.epochs == 28 and t.seed == 7
        assert t.eval_strategy == "no" and not t.load_best_model_at_end and t.save_total_limit == 1
    for s in (s_tr, s_re):
        assert s.embedding_dropout == 0.1 == s.residual_dropout  # the variant's change is kept
        assert s.rank_eval_users == 0
    ignore = {"include_valid_in_train"}
    assert {k: v for k, v in vars(s_tr).items() if k not in ignore} == {
        k: v for k, v in vars(s_re).items() if k not in ignore
    }


def test_ensemble_evaluation_parses_with_eval_evaluate_and_names_every_member(tmp_path: Path):
    from trl import TrlParser

    from eval.evaluate import EvalArgs

    args = EnsembleArgs(output_root=str(tmp_path))
    models = [tmp_path / f"train_s{s}" / "final" for s in (42, 1, 2)]
    cmd = eval_cmd(args, "ensemble3_logprob", models, "valid", "logprob")
    assert cmd[1:3] == ["-m", "eval.evaluate"]
    (ev,) = TrlParser((EvalArgs,)).parse_args_and_config(cmd[3:])
    assert ev.checkpoint == str(models[0]) and ev.ensemble == [str(m) for m in models[1:]]
    assert ev.ensemble_mode == "logprob" and ev.splits == ["valid"] and ev.backend == "sid_beam"
    assert ev.output_dir == str(tmp_path / "eval" / "ensemble3_logprob_valid")
    (single,) = TrlParser((EvalArgs,)).parse_args_and_config(eval_cmd(args, "seed42", models[:1], "test")[3:])
    assert single.ensemble == [] and single.splits == ["test"]


def _write_metrics(root: Path, name: str, split: str, ndcg: float) -> None:
    out = root / "eval" / f"{name}_{split}"
    out.mkdir(parents=True)
    metric = {"value": ndcg, "ci_low": ndcg - 0.004, "ci_high": ndcg + 0.004}
    result = {"metrics": dict.fromkeys(("HR@10", "NDCG@10", "HR@20", "NDCG@20", "valid_rate"), metric)}
    result["extra"] = {"users": 8317, "seconds": 90.0}
    (out / "metrics.json").write_text(json.dumps({"results": {f"{name}/{split}": result}}))


def test_the_mode_is_chosen_on_validation_and_test_metrics_cannot_sway_it(tmp_path: Path):
    args = EnsembleArgs(output_root=str(tmp_path), seeds=[42, 1, 2])
    with pytest.raises(SystemExit, match="no validation metrics"):
        best_mode(args)
    _write_metrics(tmp_path, ensemble_name("prob", 3), "valid", 0.0610)
    _write_metrics(tmp_path, ensemble_name("logprob", 3), "valid", 0.0625)
    # a test file that would favour the other mode is never read
    _write_metrics(tmp_path, "retrain_" + ensemble_name("prob", 3), "test", 0.0900)
    assert best_mode(args) == "logprob"
