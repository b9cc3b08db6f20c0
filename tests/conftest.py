"""Shared fixtures: a prepared Scientific dataset dir and its RK-Means SIDs (built once per session)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"


def load_recipe(name: str):
    """Import ``recipes/<name>.py`` (recipes are scripts, not a package) as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"recipe_{name}", ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


def run_cmd(args: list[str], cwd: Path = ROOT, timeout: int = 1200) -> subprocess.CompletedProcess:
    """Run a project command; fail with its output when it fails."""
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\n"
            f"STDERR:\n{proc.stderr[-6000:]}"
        )
    return proc


# recipes/sft.py overrides for a run that only trains: no ranking, no eval, no best-model reload, no logs
TRAIN_ONLY = [
    "--rank_eval_users",
    "0",
    "--eval_strategy",
    "no",
    "--load_best_model_at_end",
    "false",
    "--report_to",
    "none",
]


def tiny_qwen2(vocab_size: int, seed: int = 0, **config):
    """A randomly initialised Qwen2 causal LM small enough for unit tests (tied embeddings unless
    ``tie_word_embeddings=False``); ``config`` overrides the shape."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shape = {
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "intermediate_size": 64,
        "tie_word_embeddings": True,
        **config,
    }
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab_size, **shape))


def demo_sft_cmd(dirs: dict[str, Path], output_dir: Path) -> list[str]:
    """``python recipes/sft.py`` with the demo recipe on the session's Scientific dataset / SIDs
    into ``output_dir``; tests append their own overrides."""
    return [
        sys.executable,
        "recipes/sft.py",
        "--config",
        "recipes/configs/sft_demo.yaml",
        "--dataset_dir",
        str(dirs["dataset"]),
        "--sid_dir",
        str(dirs["sid"]),
        "--output_dir",
        str(output_dir),
    ]


@pytest.fixture(scope="session")
def scientific_dirs(tmp_path_factory) -> dict[str, Path]:
    """outputs of `data_prep.prepare` (vendored embeddings reused) and `sid_tokenizer.build` (rkmeans)."""
    base = tmp_path_factory.mktemp("scientific")
    ds, sid = base / "dataset", base / "sid_rkmeans"
    run_cmd(
        [
            sys.executable,
            "-m",
            "data_prep.prepare",
            "--config",
            "data_prep/configs/scientific.yaml",
            "--output_dir",
            str(ds),
        ]
    )
    run_cmd(
        [
            sys.executable,
            "-m",
            "sid_tokenizer.build",
            "--config",
            "sid_tokenizer/configs/scientific_rkmeans.yaml",
            "--dataset_dir",
            str(ds),
            "--output_dir",
            str(sid),
        ]
    )
    return {"dataset": ds, "sid": sid, "root": base}


@pytest.fixture(scope="session")
def scientific_rqvae_dirs(scientific_dirs) -> dict[str, Path]:
    """The demo's SIDs: RQ-VAE (``sid_tokenizer/configs/scientific_rqvae.yaml``, one thread, ~1 min)
    on the session's Scientific dataset."""
    sid = scientific_dirs["root"] / "sid_rqvae"
    cmd = [
        sys.executable,
        "-m",
        "sid_tokenizer.build",
        "--config",
        "sid_tokenizer/configs/scientific_rqvae.yaml",
    ]
    run_cmd([*cmd, "--dataset_dir", str(scientific_dirs["dataset"]), "--output_dir", str(sid)], timeout=900)
    return {**scientific_dirs, "sid": sid}


@pytest.fixture(scope="session")
def tiny_sft(scientific_dirs) -> Path:
    """A tiny default model trained a few steps with the SFT recipe on real Scientific data."""
    out = scientific_dirs["root"] / "sft"
    run_cmd(
        [
            *demo_sft_cmd(scientific_dirs, out),
            "--max_steps",
            "6",
            "--eval_steps",
            "3",
            "--save_steps",
            "3",
            "--rank_eval_users",
            "8",
            "--max_eval_loss_users",
            "32",
            "--logging_steps",
            "2",
            "--report_to",
            "none",
            "--per_device_train_batch_size",
            "16",
        ]
    )
    return out
