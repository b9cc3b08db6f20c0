"""benchmarks/quality_sweep.py: every variant's command is what recipes/sft.py parses (with the
change it claims), the checkpoint it keeps is the best on validation, and the final model is
retrained on train + validation targets for that many epochs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.common import parse_sft_recipe
from benchmarks.quality_sweep import SID_BUILDS, VARIANTS, SweepArgs, best_epoch, final_overrides, train_cmd
from recipes.model import PRESETS

BASE = "recipes/configs/sft_sweep_scientific.yaml"


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_variant_parses_and_changes_only_what_it_says(name: str, tmp_path: Path):
    args = SweepArgs(output_root=str(tmp_path))
    cmd = train_cmd(args, name)
    assert cmd[1:3] == ["recipes/sft.py", "--config"]
    script, training, _ = parse_sft_recipe(cmd[3], *cmd[4:])
    base_script, base_training, _ = parse_sft_recipe(BASE)
    assert training.output_dir == str(tmp_path / name)
    changed = {
        k
        for k in (
            "model_preset",
            "tasks",
            "sid_restricted_loss",
            "sid_dir",
            "untie_word_embeddings",
            "embedding_dropout",
            "residual_dropout",
        )
        if getattr(script, k) != getattr(base_script, k)
    }
    changed |= {
        k
        for k in ("num_train_epochs", "learning_rate", "seed")
        if getattr(training, k) != getattr(base_training, k)
    }
    flags = {o.lstrip("-").removeprefix("config_") for o in VARIANTS[name][1] if o.startswith("--")}
    assert changed == flags, (name, changed, flags)
    if script.model_preset != base_script.model_preset:
        p = PRESETS[script.model_preset]  # vLLM CPU attention needs head_dim >= 32
        assert p.hidden_size // p.num_attention_heads >= 32
    if script.sid_dir != base_script.sid_dir:
        assert script.sid_dir in SID_BUILDS
    # selection on ALL validation users, 8 times per run
    assert script.rank_eval_users >= 8317 and training.eval_steps == 0.125 == training.save_steps
    assert training.metric_for_best_model == "eval_NDCG@10" and training.load_best_model_at_end


def test_best_epoch_is_the_best_validation_checkpoint_and_the_final_trains_that_long(tmp_path: Path):
    args = SweepArgs(output_root=str(tmp_path))
    ckpt = tmp_path / "tiny_e32" / "checkpoint-4192"
    ckpt.mkdir(parents=True)
    hist = [
        {"epoch": 4.0 * i, "eval_NDCG@10": v, "eval_loss": 3.0 - i / 10}
        for i, v in enumerate([0.03, 0.05, 0.058, 0.056], 1)
    ]
    (ckpt / "trainer_state.json").write_text(
        json.dumps({"log_history": hist, "global_step": 4192, "epoch": 16.0})
    )
    assert best_epoch(args, "tiny_e32") == 12
    cmd = train_cmd(args, "final_tiny_e32", final_overrides(best_epoch(args, "tiny_e32")))
    script, training, _ = parse_sft_recipe(cmd[3], *cmd[4:])
    assert script.include_valid_in_train and training.num_train_epochs == 12
    assert training.eval_strategy == "no" and not training.load_best_model_at_end
    assert training.output_dir == str(tmp_path / "final_tiny_e32")
    with pytest.raises(SystemExit, match="no validation curve"):
        best_epoch(args, "wide_e16")


def test_selection_by_loss_reports_what_the_loss_would_have_kept():
    from benchmarks.quality_sweep import selection_by_loss

    row = {
        "curve": [(2.0, 0.030), (4.0, 0.045), (6.0, 0.050), (8.0, 0.048)],
        "loss_curve": [(2.0, 3.9), (4.0, 3.6), (6.0, 3.55), (8.0, 3.50)],  # still falling at epoch 8
    }
    p = selection_by_loss(row)
    assert p["loss_epoch"] == 8.0 and p["ndcg_epoch"] == 6.0
    assert p["ndcg_best"] - p["ndcg_at_loss"] == pytest.approx(0.002)
    assert p["spearman"] == pytest.approx(0.8)  # ranks of -loss 0,1,2,3 vs NDCG 0,1,3,2
    assert selection_by_loss({"curve": row["curve"][:2], "loss_curve": row["loss_curve"][:2]}) is None


def test_retraining_sequences_are_the_test_histories_and_hold_no_test_target(scientific_dirs):
    """The final models' data (``include_valid_in_train``) on real Scientific data: each user's
    training sequence is exactly the history the test split reads, ending with the validation
    target, and never the test target; without the flag it is the validation history."""
    from data_prep.dataset import RecDataset
    from recipes.tasks import training_sequences

    ds = RecDataset.load(scientific_dirs["dataset"])
    valid = {e.user_id: e for e in ds.valid}
    test = {e.user_id: e for e in ds.test}
    with_valid, without = training_sequences(ds, True), training_sequences(ds, False)
    assert len(with_valid) == len(test) == ds.num_users
    for u, seq in enumerate(with_valid):
        assert seq == list(test[u].history) and seq[-1] == valid[u].target
        assert without[u] == list(valid[u].history)
        assert test[u].target not in seq[len(without[u]) :]  # only the validation target was added
