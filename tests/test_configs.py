"""Every shipped YAML recipe parses into its dataclasses; every accelerate config loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.conftest import load_recipe

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "path", sorted((ROOT / "recipes" / "configs").glob("sft_*.yaml")), ids=lambda p: p.name
)
def test_sft_recipes_parse(path):
    from trl import ModelConfig, SFTConfig, TrlParser

    from recipes.tasks import TASKS

    sft = load_recipe("sft")
    script, train, model = TrlParser((sft.SidSFTArgs, SFTConfig, ModelConfig)).parse_args_and_config(
        ["--config", str(path), "--use_cpu", "true"]
    )
    assert set(script.tasks) <= set(TASKS)
    assert train.output_dir and model.model_name_or_path
    assert not train.bf16 or "cpu" not in path.name


EVAL_CONFIGS = [
    p
    for p in sorted((ROOT / "eval" / "configs").glob("*.yaml"))
    if "checkpoint" in yaml.safe_load(p.read_text())
]  # baselines configs: test_baselines


@pytest.mark.parametrize("path", EVAL_CONFIGS, ids=lambda p: p.name)
def test_eval_configs_parse(path):
    from trl import TrlParser

    from eval.evaluate import EvalArgs

    (args,) = TrlParser((EvalArgs,)).parse_args_and_config(["--config", str(path)])
    assert set(args.splits) <= {"valid", "test"}


@pytest.mark.parametrize("path", sorted((ROOT / "accelerate_configs").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_load(path):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))
    assert cfg.distributed_type is not None
    assert cfg.num_processes >= 1
    if "deepspeed" in path.name:
        assert cfg.deepspeed_config["zero_stage"] == int(path.stem[-1])
    if path.name == "fsdp.yaml":
        assert cfg.fsdp_config["fsdp_version"] == 2
