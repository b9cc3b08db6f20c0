"""benchmarks/quantizer_ablation.py: the random-SID control, which stages a rerun skips, that its
commands are what the entry points parse, and (slow) the whole driver on a toy catalogue."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from benchmarks.common import parse_sft_recipe
from benchmarks.quantizer_ablation import (
    AblationArgs,
    eval_cmd,
    pending_stages,
    random_assignment_error,
    random_codes,
    sid_cmd,
    train_cmd,
)
from data_prep.io import read_json
from tests.conftest import ROOT, run_cmd


def test_random_codes_are_unique_and_in_range():
    codes = random_codes(4344, num_levels=3, codebook_size=256, seed=0)
    assert codes.shape == (4344, 3) and codes.dtype == np.int64
    assert codes.min() >= 0 and codes.max() < 256
    assert len({tuple(r) for r in codes.tolist()}) == len(codes)
    np.testing.assert_array_equal(codes, random_codes(4344, seed=0))
    assert not np.array_equal(codes, random_codes(4344, seed=1))
    # a full small grid: every cell exactly once
    full = random_codes(64, num_levels=3, codebook_size=4, seed=3)
    assert len({tuple(r) for r in full.tolist()}) == 64
    with pytest.raises(ValueError, match="do not fit"):
        random_codes(65, num_levels=3, codebook_size=4)


def test_random_assignment_error_is_relative():
    x = np.random.default_rng(0).normal(size=(200, 8))
    codes = random_codes(200, num_levels=2, codebook_size=16, seed=0)
    err = random_assignment_error(x, codes)
    assert 0.0 < err < 1.0
    # codes that identify every item reconstruct exactly at the last level
    exact = np.stack([np.zeros(200, dtype=np.int64), np.arange(200)], axis=1)
    assert random_assignment_error(x, exact) < 1e-12


def test_rerun_skips_exactly_the_stages_whose_artifact_is_complete(tmp_path: Path):
    args = AblationArgs(sid_root=str(tmp_path / "sids"), output_root=str(tmp_path / "abl"))
    run = tmp_path / "abl" / "rqvae"
    assert pending_stages(args, "rqvae") == ["sid", "train", "eval", "peruser"]
    (tmp_path / "sids" / "sid_rqvae").mkdir(parents=True)
    assert pending_stages(args, "rqvae") == [
        "sid",
        "train",
        "eval",
        "peruser",
    ]  # an empty dir is not an index
    (tmp_path / "sids" / "sid_rqvae" / "index.json").write_text("{}")
    assert pending_stages(args, "rqvae") == ["train", "eval", "peruser"]
    (run / "checkpoint-5").mkdir(parents=True)  # a killed training: run it again (it resumes)
    (run / "final").mkdir()
    (run / "final" / "config.json").write_text("{}")
    assert pending_stages(args, "rqvae") == ["train", "eval", "peruser"]  # final/ without sidrec/
    (run / "final" / "sidrec").mkdir()
    assert pending_stages(args, "rqvae") == ["eval", "peruser"]
    (run / "eval").mkdir()
    (run / "eval" / "metrics.json").write_text("{}")
    assert pending_stages(args, "rqvae") == ["peruser"]
    args.paired = False
    assert pending_stages(args, "rqvae") == []
    args.paired = True
    (run / "per_user.npz").write_bytes(b"")
    assert pending_stages(args, "rqvae") == []
    # the random control's index lives under output_root
    assert pending_stages(args, "random")[0] == "sid"


def test_stage_commands_parse_as_the_entry_points_parse_them():
    from trl import TrlParser

    from eval.evaluate import EvalArgs
    from sid_tokenizer.build import BuildArgs

    args = AblationArgs(epochs=3, dataset_dir="data/ds", output_root="runs/abl", sid_root="runs/sids")
    cmd = train_cmd(args, "balanced")
    assert cmd[1] == "recipes/sft.py"
    script, training, _ = parse_sft_recipe(ROOT / args.sft_config, *cmd[4:])
    assert (script.dataset_dir, script.sid_dir) == ("data/ds", "runs/sids/sid_balanced")
    assert (training.output_dir, training.num_train_epochs) == ("runs/abl/balanced", 3)
    assert script.tasks == {"seq2seq": 1.0}  # the rest is the ablation recipe's
    cmd = eval_cmd(args, "random")
    assert cmd[1:3] == ["-m", "eval.evaluate"]
    (ev,) = TrlParser((EvalArgs,)).parse_args_and_config(cmd[3:])
    assert (ev.checkpoint, ev.output_dir, ev.model_name) == (
        "runs/abl/random/final",
        "runs/abl/random/eval",
        "random",
    )
    assert ev.splits == ["valid", "test"] and ev.also_unconstrained is False
    (b,) = TrlParser((BuildArgs,)).parse_args_and_config(sid_cmd(args, "random")[3:])
    assert (b.index_path, b.output_dir, b.level_sizes) == (
        "runs/abl/sid_random_index.json",
        "runs/abl/sid_random",
        [256] * 3,
    )
    assert b.collision_strategy == "none" and b.dataset_dir == "data/ds"
    (b,) = TrlParser((BuildArgs,)).parse_args_and_config(sid_cmd(args, "rvq")[3:])
    assert (b.quantizer, b.output_dir, b.dataset_dir) == ("rvq", "runs/sids/sid_rvq", "data/ds")


def toy_dataset(path: Path, items: int = 48, users: int = 36) -> Path:
    """A dataset directory with random item embeddings: sequences of 5-8 items, leave-one-out."""
    from data_prep.dataset import Example, Item, RecDataset
    from data_prep.embed import DEFAULT_ENCODER, embeddings_path

    rng = np.random.default_rng(0)
    seqs = [list(rng.choice(items, size=int(rng.integers(5, 9)), replace=False)) for _ in range(users)]
    seqs = [[int(i) for i in s] for s in seqs]
    ds = RecDataset(
        "toy",
        [Item(item_id=i, raw_id=f"r{i}", title=f"gadget {i} model {i % 7}") for i in range(items)],
        seqs,
        [f"u{u}" for u in range(users)],
        [s[:-2] for s in seqs],
        [Example(u, s[:-2], s[-2]) for u, s in enumerate(seqs)],
        [Example(u, s[:-1], s[-1]) for u, s in enumerate(seqs)],
    )
    ds.save(path)
    emb = embeddings_path(path, DEFAULT_ENCODER)
    emb.parent.mkdir(parents=True, exist_ok=True)
    np.save(emb, rng.normal(size=(items, 16)).astype(np.float32))
    return path


@pytest.mark.slow
def test_driver_runs_every_stage_once_then_only_writes_the_report(tmp_path: Path):
    """rkmeans (index built beforehand) and the random control on a 48-item toy catalogue: SID
    build, SFT, evaluation, per-user metrics and the report; a rerun starts no stage."""
    ds = toy_dataset(tmp_path / "ds")
    run_cmd(
        [sys.executable, "-m", "sid_tokenizer.build", "--dataset_dir", str(ds), "--quantizer", "rkmeans"]
        + ["--codebook_size", "8", "--output_dir", str(tmp_path / "sids" / "sid_rkmeans")]
    )
    sft = yaml.safe_load((ROOT / "recipes/configs/sft_ablation_scientific.yaml").read_text())
    sft.update(per_device_train_batch_size=16, rank_eval_users=6, max_eval_loss_users=12, report_to="none")
    sft.update(warmup_steps=0, logging_steps=1)
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(sft))
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump({"num_beams": 10, "batch_size": 16}))
    cmd = [sys.executable, "-m", "benchmarks.quantizer_ablation", "--quantizers", "rkmeans", "random"]
    cmd += ["--epochs", "2", "--dataset_dir", str(ds), "--sid_root", str(tmp_path / "sids")]
    cmd += ["--output_root", str(tmp_path / "abl"), "--report_dir", str(tmp_path / "report")]
    cmd += ["--sft_config", str(tmp_path / "sft.yaml"), "--eval_config", str(tmp_path / "eval.yaml")]
    cmd += ["--notes_md", str(tmp_path / "no_notes.md")]
    run_cmd(cmd, timeout=900)
    for q in ("rkmeans", "random"):
        times = read_json(tmp_path / "abl" / q / "stage_times.json")
        assert sorted(times) == (
            ["eval", "peruser", "sid", "train"] if q == "random" else ["eval", "peruser", "train"]
        )
        assert all(len(t["attempts"]) == 1 for t in times.values())
    report = read_json(tmp_path / "report" / "quantizer_ablation.json")
    for q in ("rkmeans", "random"):
        row = report["results"][q]
        assert row["test"]["users"] == 36 and 0.0 <= row["test"]["NDCG@10"]["value"] <= 1.0
        assert row["epochs_trained"] == 2 and len(row["valid_curve"]) == 2
    assert report["results"]["random"]["collisions_before"]["collisions"] == 0
    paired = report["meta"]["paired_differences"]
    assert {(r["model"], r["split"], r["metric"]) for r in paired} == {
        ("random", s, m) for s in ("valid", "test") for m in ("NDCG@10", "HR@10")
    }
    assert report["meta"]["machine"]["cores_usable"] >= 1 and report["meta"]["machine"]["versions"]["torch"]
    md = (tmp_path / "report" / "quantizer_ablation.md").read_text()
    assert "| rkmeans |" in md and "| random |" in md and "xargs -P" in md
    assert (tmp_path / "report" / "quantizer_ablation.png").stat().st_size > 0

    before = {q: (tmp_path / "abl" / q / "stage_times.json").read_text() for q in ("rkmeans", "random")}
    proc = run_cmd(cmd, timeout=300)
    assert proc.stderr.count("stages to run none (all complete)") == 2
    assert before == {
        q: (tmp_path / "abl" / q / "stage_times.json").read_text() for q in ("rkmeans", "random")
    }


def test_failed_stage_stops_the_run_and_names_its_log(tmp_path: Path):
    """A stage that exits non-zero (here: a SID build for a dataset that does not exist) stops
    the driver with the stage, the exit status and the log to read."""
    cmd = [sys.executable, "-m", "benchmarks.quantizer_ablation", "--only", "rkmeans"]
    cmd += ["--dataset_dir", str(tmp_path / "missing"), "--sid_root", str(tmp_path / "sids")]
    cmd += ["--output_root", str(tmp_path / "abl")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    log = tmp_path / "abl" / "logs" / "sid_rkmeans.log"
    assert "rkmeans sid failed (exit status" in proc.stderr and str(log) in proc.stderr
    assert "missing" in log.read_text()
    assert not (tmp_path / "abl" / "rkmeans" / "stage_times.json").exists()
