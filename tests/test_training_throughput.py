"""Token accounting of benchmarks/training_throughput.py: one causal pass vs sliding windows."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest

from data_prep.dataset import Example, Item, RecDataset
from recipes.model import build_default_model
from recipes.tasks import build_mixture, tokenize_rows
from sid_tokenizer.prompts import REC_TOKEN, seq2seq_prompt
from sid_tokenizer.sid import SidIndex, SidVocab
from sid_tokenizer.vocab import add_sid_tokens
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "bench_training_throughput", ROOT / "benchmarks" / "training_throughput.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def toy():
    """12 items with 3-level SIDs; training sequences of 1, 2, 5 and 25 items (max_history 20)."""
    items = [Item(item_id=i, raw_id=f"r{i}", title=f"widget number {i}") for i in range(12)]
    train = [[0], [1, 2], [3, 4, 5, 6, 7], [i % 12 for i in range(25)]]
    valid = [Example(user_id=u, history=s, target=8) for u, s in enumerate(train)]
    ds = RecDataset(
        "toy", items, [s + [8, 9] for s in train], [f"u{u}" for u in range(4)], train, valid, valid
    )
    codes = np.stack([np.arange(12) % 4, np.arange(12) // 4, np.arange(12) % 3], 1)
    index = SidIndex(codes, SidVocab((4, 3, 3)), raw_ids=[it.raw_id for it in items])
    model, tok = build_default_model(ds, "tiny")
    add_sid_tokens(model, tok, index.vocab)
    return ds, index, tok


def test_sliding_window_rows_one_per_target_with_capped_history(bench, toy):
    ds, index, _ = toy
    rows = bench.sliding_window_rows(ds, index, max_history=20)
    assert len(rows) == 0 + 1 + 4 + 24
    assert rows[0]["prompt"] == REC_TOKEN + index.sid(1) and rows[0]["completion"] == index.sid(2)
    last = rows[-1]  # target = 25th item, history = the 20 items before it
    seq = ds.train[3]
    assert (
        last["prompt"]
        == seq2seq_prompt(index, seq[:24], 20)
        == REC_TOKEN + "".join(index.sid(i) for i in seq[4:24])
    )
    assert last["completion"] == index.sid(seq[24])


def test_one_pass_and_sliding_windows_supervise_the_same_targets(bench, toy):
    ds, index, tok = toy
    one = bench.token_counts(
        tokenize_rows(build_mixture(ds, index, {"seq2seq": 1.0}, tok, max_history=20), tok)
    )
    sw = bench.token_counts(tokenize_rows(bench.sliding_window_rows(ds, index, 20), tok))
    # 29 next-item targets x 3 SID tokens in both formats
    assert one["target_tokens"] == sw["target_tokens"] == 87
    # one pass: L=2 -> 7, L=5 -> 16, L=25 -> two chunks 64 + 73 (second chunk re-reads 20 context items)
    assert (one["rows"], one["tokens"], one["max_len"]) == (4, 7 + 16 + 64 + 73, 73)
    # sliding: sum over targets of 1 + 3 * (min(t, 20) + 1)
    assert (sw["rows"], sw["tokens"], sw["max_len"]) == (29, 7 + 46 + 966, 64)
    assert bench.seq2seq_tokens_closed_form([len(s) for s in ds.train], 3, 20) == (
        one["tokens"],
        sw["tokens"],
    )


def test_closed_form_grows_linearly_vs_quadratically_until_the_history_cap(bench):
    f = bench.seq2seq_tokens_closed_form
    assert f([20], 3, 20) == (61, 646)
    assert f([10], 3, 20) == (31, 171)
    assert f([1], 3, 20) == (0, 0)
    ratios = [f([L], 3, 20)[1] / f([L], 3, 20)[0] for L in (5, 10, 20, 100)]
    assert ratios[0] < ratios[1] < ratios[2] and ratios[3] == pytest.approx(10.58, abs=0.01)


def test_epoch_batches_cover_every_row_once(bench):
    lengths = [5, 60, 7, 33, 12, 9, 40, 2, 18, 25, 3]
    batches = bench.epoch_batches(lengths, 4, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert [len(b) for b in batches].count(4) == 2 and max(lengths[i] for i in batches[0]) == 60


def test_recipe_is_parsed_as_recipes_sft_parses_it(bench, tmp_path):
    """Training arguments are the recipe's (recipes/sft.py's parser and defaults); only what the
    timing needs is overridden; LoRA variants get their adapters through ModelConfig."""
    import yaml
    from peft import LoraConfig
    from trl import get_peft_config

    path = ROOT / "recipes" / "configs" / "sft_scientific.yaml"
    cfg = yaml.safe_load(path.read_text())
    script, training, model = bench.parse_sft_recipe(path, *bench.measurement_overrides(tmp_path, 7))
    for key in (
        "per_device_train_batch_size",
        "learning_rate",
        "warmup_steps",
        "weight_decay",
        "max_length",
        "seed",
    ):
        assert getattr(training, key) == cfg[key], key
    assert script.tasks == cfg["tasks"] and script.max_history == cfg["max_history"]
    assert training.max_steps == 7 and training.output_dir == str(tmp_path / "trainer")
    assert training.train_sampling_strategy == "sequential" and training.report_to == []
    assert (
        training.eval_strategy == "no"
        and training.save_strategy == "no"
        and not training.load_best_model_at_end
    )
    assert get_peft_config(model) is None
    summary = bench.recipe_summary(*bench.parse_sft_recipe(path)[:2])  # what the report quotes
    assert summary["batch_size"] == 32 and summary["lr_scheduler_type"] == "cosine"
    assert summary["sampling"] == "group_by_length" and summary["num_train_epochs"] == cfg["num_train_epochs"]
    _, _, model = bench.parse_sft_recipe(path, *bench.measurement_overrides(tmp_path, 7, "lora_qv_save_emb"))
    lora = get_peft_config(model)
    assert isinstance(lora, LoraConfig) and set(lora.target_modules) == {"q_proj", "v_proj"}
    assert lora.modules_to_save == ["embed_tokens", "lm_head"] and (lora.r, lora.lora_alpha) == (16, 32)
    with pytest.raises(ValueError, match="per_device_train_batchsize"):
        bad = tmp_path / "bad.yaml"
        bad.write_text(path.read_text() + "per_device_train_batchsize: 8\n")
        bench.parse_sft_recipe(bad)


def test_report_names_the_machine_for_new_and_earlier_json(bench, tmp_path):
    """The committed JSON (written before benchmarks/common.py) still renders; a new payload
    carries machine_info() and the report line is built from it."""
    import json

    payload = json.loads((ROOT / "docs" / "results" / "training_throughput.json").read_text())
    bench.write_markdown(tmp_path / "old.md", payload)
    old = (tmp_path / "old.md").read_text()
    assert payload["hardware"] in old and f"peft {payload['peft']}" in old
    payload["machine"] = bench.machine_info()
    bench.write_markdown(tmp_path / "new.md", payload)
    new = (tmp_path / "new.md").read_text()
    line = next(x for x in new.splitlines() if x.startswith("Date:"))
    assert f"{payload['machine']['cores_usable']} CPU cores" in line
    assert f"torch {payload['machine']['versions']['torch']}" in line and "peft" in line
