"""SFT recipe on real data with the tiny default model, constrained decoding and ranking."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data_prep.dataset import RecDataset
from eval.generate import SidRanker, evaluate_examples
from sid_tokenizer.catalog import load_checkpoint
from sid_tokenizer.constrained import SidLogitsProcessor
from sid_tokenizer.prompts import seq2seq_prompt
from sid_tokenizer.vocab import sid_token_ids
from tests.conftest import TRAIN_ONLY, demo_sft_cmd, run_cmd

pytestmark = pytest.mark.slow


def test_sft_writes_checkpoint_with_catalogue_and_ranking_metrics(tiny_sft):
    final = tiny_sft / "final"
    for f in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "sidrec/index.json",
        "sidrec/items.jsonl",
    ):
        assert (final / f).exists(), f
    state = json.loads(sorted(tiny_sft.glob("checkpoint-*/trainer_state.json"))[-1].read_text())
    evals = [r for r in state["log_history"] if "eval_NDCG@10" in r]
    assert evals and all(0.0 <= r["eval_NDCG@10"] <= 1.0 for r in evals)
    losses = [r["loss"] for r in state["log_history"] if "loss" in r]
    assert len(losses) >= 2 and all(np.isfinite(losses))
    assert (tiny_sft / "training_curves.png").stat().st_size > 1000
    # every checkpoint carries the catalogue, so any of them can be evaluated or served
    assert all((c / "sidrec" / "index.json").exists() for c in tiny_sft.glob("checkpoint-*"))


def test_sid_tokens_are_single_tokens_in_vocabulary(tiny_sft):
    model, tok, cat = load_checkpoint(tiny_sft / "final")
    sid = cat.index.sid(0)
    ids = tok(sid, add_special_tokens=False)["input_ids"]
    assert len(ids) == cat.index.vocab.num_levels
    assert tok.decode(ids) == sid
    assert model.get_input_embeddings().weight.shape[0] >= len(tok)
    # not special: GRPO decodes with skip_special_tokens=True and must still see them
    assert tok.decode(ids, skip_special_tokens=True) == sid


def test_constrained_beam_search_returns_distinct_catalogue_items(tiny_sft, scientific_dirs):
    model, tok, cat = load_checkpoint(tiny_sft / "final")
    ds = RecDataset.load(scientific_dirs["dataset"])
    ranker = SidRanker(model, tok, cat.index)
    res = evaluate_examples(ranker, ds.test[:12], num_beams=20, batch_size=6, progress=False)
    valid = set(map(tuple, cat.index.codes.tolist()))
    for row in res["ranking"].sids:
        assert len(row) == 20
        assert all(s is not None and s in valid for s in row)
        assert len(set(row)) == 20  # 20 distinct items
    assert res["valid_rate"] == 1.0
    # the same beams without the trie constraint: validity is measured, not assumed
    free = evaluate_examples(
        ranker, ds.test[:12], num_beams=20, batch_size=6, constrained=False, progress=False
    )
    assert 0.0 <= free["valid_rate"] <= 1.0


def test_fast_beam_search_matches_transformers_generate(tiny_sft, scientific_dirs):
    model, tok, cat = load_checkpoint(tiny_sft / "final")
    ds = RecDataset.load(scientific_dirs["dataset"])
    ranker = SidRanker(model, tok, cat.index)
    prompts = [seq2seq_prompt(cat.index, e.history) for e in ds.test[:6]]
    fast = ranker.rank(prompts, num_beams=10, batch_size=3, progress=False)
    hf = ranker.rank(prompts, num_beams=10, batch_size=3, progress=False, backend="hf")
    # same beams in the same order; HF scores are length-normalised (sum / L)
    assert fast.sids == hf.sids
    L = cat.index.vocab.num_levels
    np.testing.assert_allclose(np.array(fast.scores) / L, np.array(hf.scores), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["greedy", "sample"])
def test_processor_constrains_greedy_and_sampling(tiny_sft, scientific_dirs, mode):
    model, tok, cat = load_checkpoint(tiny_sft / "final")
    ds = RecDataset.load(scientific_dirs["dataset"])
    ranker = SidRanker(model, tok, cat.index)
    prompts = [seq2seq_prompt(cat.index, e.history) for e in ds.test[:8]]
    batch = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    plen = batch["input_ids"].shape[1]
    proc = SidLogitsProcessor(ranker.trie, sid_token_ids(tok, cat.index.vocab), plen, tok.eos_token_id)
    torch.manual_seed(0)
    out = model.generate(
        **batch,
        max_new_tokens=cat.index.vocab.num_levels + 1,
        logits_processor=[proc],
        do_sample=mode == "sample",
        temperature=1.5 if mode == "sample" else None,
        pad_token_id=tok.pad_token_id,
    )
    gen = out[:, plen:]
    sids = ranker.decode_codes(gen[:, : cat.index.vocab.num_levels].numpy())
    assert all(s is not None for s in sids)
    # after a full SID only EOS may follow
    assert (gen[:, cat.index.vocab.num_levels] == tok.eos_token_id).all()


def test_sft_resumes_from_last_checkpoint(tiny_sft, scientific_dirs):
    # the fixture ran 6 steps with checkpoints every 3: ask for 8 steps, it must continue from step 6
    proc = run_cmd(
        [
            *demo_sft_cmd(scientific_dirs, tiny_sft),
            "--max_steps",
            "8",
            "--eval_steps",
            "100",
            "--save_steps",
            "4",
            "--rank_eval_users",
            "0",
            "--max_eval_loss_users",
            "16",
            "--logging_steps",
            "1",
            "--report_to",
            "none",
            "--per_device_train_batch_size",
            "16",
            "--load_best_model_at_end",
            "false",
        ]
    )
    assert "resuming from" in proc.stderr and "checkpoint-6" in proc.stderr
    state = json.loads((tiny_sft / "checkpoint-8" / "trainer_state.json").read_text())
    steps = [r["step"] for r in state["log_history"] if "loss" in r]
    # history from the first run (up to step 6) continues to step 8, not restarted at 0
    assert state["global_step"] == 8 and steps[-1] == 8 and 6 in steps and steps == sorted(steps)


def test_lora_with_new_sid_rows(scientific_dirs, tmp_path):
    out = tmp_path / "lora"
    run_cmd(
        [
            *demo_sft_cmd(scientific_dirs, out),
            "--max_steps",
            "2",
            *TRAIN_ONLY,
            "--use_peft",
            "true",
            "--lora_r",
            "8",
            "--lora_target_modules",
            "q_proj",
            "v_proj",
            "--lora_modules_to_save",
            "embed_tokens",
            "lm_head",
            "--per_device_train_batch_size",
            "8",
        ]
    )
    assert (out / "final_adapter" / "adapter_config.json").exists()
    assert (out / "final" / "config.json").exists()  # merged, servable
    assert (out / "final" / "sidrec" / "index.json").exists()
