"""kill -9 in the middle of training (SFT, GRPO, DPO incl. pair mining), rerun the same command:
it resumes from the last complete checkpoint and finishes intact, with no temporary files left."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sid_tokenizer.catalog import load_checkpoint
from tests.conftest import ROOT, demo_sft_cmd

pytestmark = pytest.mark.slow


def test_sft_survives_kill_9(scientific_dirs, tmp_path):
    out, max_steps = tmp_path / "sft_kill", 30
    cmd = [
        *demo_sft_cmd(scientific_dirs, out),
        "--max_steps",
        str(max_steps),
        "--save_steps",
        "3",
        "--eval_strategy",
        "no",
        "--load_best_model_at_end",
        "false",
        "--rank_eval_users",
        "0",
        "--logging_steps",
        "1",
        "--report_to",
        "none",
        "--per_device_train_batch_size",
        "8",
        "--save_total_limit",
        "2",
    ]
    _kill_9_when(cmd, tmp_path / "run1.log", _saved(out, 6), "checkpoint-6", delay=0.3)
    assert not (out / "final").exists()
    last = _checkpoints(out)[-1]
    if _state(last) is not None:  # the kill missed a save: leave one interrupted like a real kill would
        last = out / f"checkpoint-{int(last.name.split('-')[1]) + 3}"
        shutil.copytree(_checkpoints(out)[-1], last)
        (last / "trainer_state.json").write_text((last / "trainer_state.json").read_text()[:100])
    complete = int(_checkpoints(out)[-2].name.split("-")[1])

    # rerun the same command: drops the interrupted checkpoint, resumes from the last complete one
    log = _run(cmd, tmp_path / "run2.log")
    assert _resumed_from(log) == complete and f"removing incomplete {last}" in log
    _assert_finished_intact(out, max_steps)
    _rerun_after_completion_then_restage_final(cmd, out, max_steps, tmp_path)


# ---------------------------------------------------------------- RL (recipes/rl.py)


def _env() -> dict:
    # the recipes are scripts: make the repo importable whatever the install
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }


def _run(cmd: list[str], log: Path) -> str:
    """Run to completion; the combined output (also kept in ``log``)."""
    proc = subprocess.run(
        cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900
    )
    log.write_text(proc.stdout)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-6000:]}"
    return proc.stdout


def _kill_9_when(cmd: list[str], log: Path, ready, what: str, delay: float = 0.0) -> None:
    """Start ``cmd`` in its own session, wait until ``ready()``, then SIGKILL its process group."""
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=_env(), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.time() + 600
    try:
        while not ready():
            assert proc.poll() is None, f"ended before {what}:\n{log.read_text()[-4000:]}"
            assert time.time() < deadline, f"no {what} within 10 minutes"
            time.sleep(0.05)
        time.sleep(delay)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _state(ckpt: Path) -> dict | None:
    try:
        return json.loads((ckpt / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return None


def _checkpoints(out: Path) -> list[Path]:
    return sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def _saved(out: Path, step: int):
    return lambda: _state(out / f"checkpoint-{step}") is not None


def _assert_finished_intact(out: Path, max_steps: int) -> dict:
    """Every checkpoint complete, the last one at max_steps with one log row per step, final/
    a loadable sidrec checkpoint, nothing temporary left."""
    ckpts = _checkpoints(out)
    assert ckpts and all(_state(c) is not None for c in ckpts), ckpts
    state = _state(ckpts[-1])
    assert state["global_step"] == max_steps == int(ckpts[-1].name.split("-")[1])
    # resumed from the checkpoint's log: the steps run before the kill past it are not logged twice
    assert [r["step"] for r in state["log_history"] if "loss" in r] == list(range(1, max_steps + 1))
    model, tok, cat = load_checkpoint(out / "final")
    assert len(cat.index) == 4344 and model.config.vocab_size >= len(tok)
    assert (out / "final" / "sidrec" / "meta.json").exists()
    assert (out / "training_curves.png").stat().st_size > 1000
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temporary files left"
    return state


def _rerun_after_completion_then_restage_final(
    cmd: list[str], out: Path, max_steps: int, tmp_path: Path
) -> None:
    """A finished run rerun: nothing trained (a Trainer resumed at max_steps runs one step more),
    final/ and the logs untouched. Then a kill while final/ was being staged (after the last
    checkpoint): the rerun saves final/ again from the checkpoints, byte-identical."""
    weights = (out / "final" / "model.safetensors").read_bytes()
    history = _state(_checkpoints(out)[-1])["log_history"]
    log = _run(cmd, tmp_path / "rerun_done.log")
    assert f"training already finished at step {max_steps}" in log and "resuming from" not in log
    assert _state(_checkpoints(out)[-1])["log_history"] == history
    _assert_finished_intact(out, max_steps)
    assert (out / "final" / "model.safetensors").read_bytes() == weights

    os.replace(out / "final", out / ".final.partial")
    (out / ".final.partial" / "model.safetensors").write_bytes(weights[:1000])
    log = _run(cmd, tmp_path / "rerun_staged.log")
    assert "saving final/ from" in log and "resuming from" not in log
    _assert_finished_intact(out, max_steps)
    assert (out / "final" / "model.safetensors").read_bytes() == weights


def _rl_cmd(config: str, tiny_sft: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "recipes/rl.py",
        "--config",
        config,
        "--model_name_or_path",
        str(tiny_sft / "final"),
        "--output_dir",
        str(out),
        "--save_steps",
        "3",
        "--eval_steps",
        "3",
        "--save_total_limit",
        "2",
        "--rank_eval_users",
        "8",
        "--rank_eval_beams",
        "10",
        "--logging_steps",
        "1",
        "--report_to",
        "none",
        *extra,
    ]


def _resumed_from(log: str) -> int:
    steps = re.findall(r"resuming from \S*checkpoint-(\d+)", log)
    assert len(steps) == 1, log[-4000:]
    return int(steps[0])


def test_grpo_survives_kill_9(tiny_sft, tmp_path):
    out, max_steps = tmp_path / "grpo_kill", 30
    cmd = _rl_cmd(
        "recipes/configs/grpo_demo.yaml",
        tiny_sft,
        out,
        "--max_steps",
        str(max_steps),
        "--rollout",
        "beam",
        "--num_generations",
        "4",
        "--per_device_train_batch_size",
        "8",
        "--per_device_eval_batch_size",
        "8",
        "--num_train_prompts",
        "64",
        "--eval_prompts",
        "4",
        "--eval_on_start",
        "true",
    )
    _kill_9_when(cmd, tmp_path / "run1.log", _saved(out, 6), "checkpoint-6", delay=0.3)
    assert not (out / "final").exists()

    log = _run(cmd, tmp_path / "run2.log")
    assert _resumed_from(log) >= 6
    state = _assert_finished_intact(out, max_steps)
    # the start was evaluated once, by the first run (a resumed run does not re-run eval_on_start)
    assert sum(1 for r in state["log_history"] if "eval_NDCG@10" in r and r["step"] == 0) == 1
    _rerun_after_completion_then_restage_final(cmd, out, max_steps, tmp_path)


def test_dpo_survives_kill_9_while_mining_and_training(tiny_sft, tmp_path):
    out, max_steps, prompts, negatives = tmp_path / "dpo_kill", 24, 24, 2
    cmd = _rl_cmd(
        "recipes/configs/dpo_demo.yaml",
        tiny_sft,
        out,
        "--max_steps",
        str(max_steps),
        "--num_train_prompts",
        str(prompts),
        "--eval_prompts",
        "8",
        "--num_negatives",
        str(negatives),
        "--mining_beams",
        "5",
        "--mining_batch_size",
        "8",
        "--per_device_train_batch_size",
        "4",
        "--per_device_eval_batch_size",
        "8",
    )
    pairs = out / "pairs_train.jsonl"

    def complete_pairs() -> list[dict]:
        rows = [json.loads(line) for line in pairs.read_text().splitlines()]
        assert len(rows) == prompts * negatives and all(
            {"prompt", "chosen", "rejected"} <= set(r) for r in rows
        )
        return rows

    # 1. killed while mining the training pairs
    run1 = tmp_path / "run1.log"
    _kill_9_when(cmd, run1, lambda: "mining pairs_train.jsonl" in run1.read_text(), "mining")
    if pairs.exists():  # the kill came after the (atomic) write: the cache is whole
        complete_pairs()
    # what a kill inside the atomic write leaves: a truncated temporary file next to the cache
    out.mkdir(exist_ok=True)
    (out / ".pairs_eval.jsonl.k9.tmp").write_text('{"prompt": "<|rec|><a_1>", "cho')

    # 2. rerun: mines again (never reads the truncated file), killed during training
    run2 = tmp_path / "run2.log"
    _kill_9_when(cmd, run2, _saved(out, 6), "checkpoint-6", delay=0.3)
    assert not (out / "final").exists()
    assert not (out / ".pairs_eval.jsonl.k9.tmp").exists()
    mined = complete_pairs()
    assert len((out / "pairs_eval.jsonl").read_text().splitlines()) == 8 * negatives
    mtime = pairs.stat().st_mtime
    last = _checkpoints(out)[-1]
    if _state(last) is not None:  # the kill missed a save: leave one interrupted like a real kill would
        last = out / f"checkpoint-{int(last.name.split('-')[1]) + 3}"
        shutil.copytree(_checkpoints(out)[-1], last)
        state_file = last / "trainer_state.json"
        state_file.write_text(state_file.read_text()[:100])
    complete = int(_checkpoints(out)[-2].name.split("-")[1])

    # 3. rerun: drops the interrupted checkpoint, resumes from the last complete one, reuses the pairs
    log = _run(cmd, tmp_path / "run3.log")
    assert _resumed_from(log) == complete and f"removing incomplete {last}" in log
    assert "reusing mined pairs" in log and pairs.stat().st_mtime == mtime and complete_pairs() == mined
    state = _assert_finished_intact(out, max_steps)
    assert any("rewards/margins" in r for r in state["log_history"])

    # 4. rerun after completion: nothing to do
    log = _run(cmd, tmp_path / "run4.log")
    assert f"training already finished at step {max_steps}" in log and "resuming from" not in log
    _assert_finished_intact(out, max_steps)
