"""kill -9 in the middle of SFT, rerun the same command: it resumes and finishes intact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from sid_tokenizer.llm import load_checkpoint
from tests.conftest import ROOT, run_cmd

pytestmark = pytest.mark.slow


def test_sft_survives_kill_9(scientific_dirs, tmp_path):
    out = tmp_path / "sft_kill"
    cmd = [sys.executable, "recipes/sft.py", "--config", "recipes/configs/sft_demo.yaml",
           "--dataset_dir", str(scientific_dirs["dataset"]), "--sid_dir", str(scientific_dirs["sid"]),
           "--output_dir", str(out), "--max_steps", "60", "--save_steps", "3", "--eval_strategy", "no",
           "--load_best_model_at_end", "false", "--rank_eval_users", "0", "--logging_steps", "1",
           "--report_to", "none", "--per_device_train_batch_size", "8", "--save_total_limit", "2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 600
    try:
        while not (out / "checkpoint-6" / "trainer_state.json").exists():
            assert proc.poll() is None, "training ended before it could be killed"
            assert time.time() < deadline, "no checkpoint-6 within 10 minutes"
            time.sleep(0.5)
        time.sleep(0.3)  # kill while training (and possibly writing) continues
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "final").exists()
    # no half-written base checkpoint or temporary directories left in a state that breaks the rerun
    result = run_cmd(cmd)
    assert "resuming from" in result.stderr
    state = json.loads(sorted(out.glob("checkpoint-*/trainer_state.json"),
                              key=lambda p: int(p.parent.name.split("-")[1]))[-1].read_text())
    assert state["global_step"] == 60
    model, tok, cat = load_checkpoint(out / "final")
    assert len(cat.index) == 4344 and model.config.vocab_size >= len(tok)
