"""DDP for real: recipes/sft.py under ``accelerate launch`` with 2 CPU processes (gloo)."""

from __future__ import annotations

import json
import sys

import pytest

from recipes.server import free_port
from tests.conftest import ROOT, run_cmd


@pytest.mark.slow
def test_sft_runs_on_two_processes_and_saves_once(scientific_dirs, tmp_path):
    out = tmp_path / "ddp"
    proc = run_cmd(
        [
            sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "accelerate_configs" / "cpu_ddp.yaml"), "--main_process_port", str(free_port()),
            "recipes/sft.py", "--config", "recipes/configs/sft_demo.yaml",
            "--dataset_dir", str(scientific_dirs["dataset"]), "--sid_dir", str(scientific_dirs["sid"]),
            "--output_dir", str(out), "--max_steps", "3", "--per_device_train_batch_size", "4",
            "--eval_steps", "3", "--save_steps", "3", "--rank_eval_users", "4", "--max_eval_loss_users", "8",
            "--logging_steps", "1", "--report_to", "none", "--max_length", "64", "--use_cpu", "true",
        ],
        timeout=900,
    )  # fmt: skip
    log = proc.stdout + proc.stderr
    # both ranks ran the recipe in one gloo process group of 2
    for rank in (0, 1):
        assert f"process {rank} of 2 (DistributedType.MULTI_CPU, backend gloo)" in log
    assert log.count("reusing base checkpoint") == 1  # rank 0 built base/, rank 1 reused it
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and any("eval_NDCG@10" in r for r in state["log_history"])
    # final/ written once by the main process: complete, and no staging or per-rank copies left
    final = out / "final"
    assert (final / "model.safetensors").is_file() and (final / "sidrec" / "index.json").is_file()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith((".", "final"))) == ["final"]
    assert len(list(out.rglob("model.safetensors"))) == 3  # base/, checkpoint-3/, final/
