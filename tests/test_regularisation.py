"""Quality-sweep levers on the model itself: an untied output layer and training-only dropout."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from recipes.model import add_training_dropout, untie_word_embeddings
from tests.conftest import TRAIN_ONLY, demo_sft_cmd, run_cmd, tiny_qwen2


def _qwen() -> torch.nn.Module:
    return tiny_qwen2(97, hidden_size=64, num_hidden_layers=2, num_key_value_heads=2, intermediate_size=128)


def test_untie_gives_an_independent_output_layer_that_survives_save_and_load(tmp_path):
    model = _qwen()
    emb = model.get_input_embeddings().weight
    assert model.lm_head.weight is emb
    assert untie_word_embeddings(model) is True
    assert model.lm_head.weight is not emb and torch.equal(model.lm_head.weight, emb)
    assert model.config.tie_word_embeddings is False
    # one optimiser step on a loss of the head only moves the head, not the embeddings
    before = emb.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model.lm_head.weight.square().sum().backward()
    opt.step()
    assert torch.equal(emb, before) and not torch.equal(model.lm_head.weight, emb)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is not loaded.get_input_embeddings().weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert torch.equal(loaded.get_input_embeddings().weight, emb)
    # a model that is already untied is left alone
    assert untie_word_embeddings(loaded) is False


def test_training_dropout_is_active_in_train_mode_only_and_hooks_every_branch():
    model = _qwen()
    ids = torch.randint(0, 97, (2, 9))
    model.eval()
    with torch.no_grad():
        reference = model(ids).logits
    handles = add_training_dropout(model, embedding=0.2, residual=0.3)
    assert len(handles) == 1 + 2 * model.config.num_hidden_layers  # embeddings + o_proj/down_proj per layer
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference)  # eval mode: untouched
        model.train()
        a, b = model(ids).logits, model(ids).logits
    assert not torch.allclose(a, reference) and not torch.allclose(a, b)
    for h in handles:
        h.remove()
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(ids).logits, reference)


def test_training_dropout_refuses_bad_rates_and_unknown_layouts():
    with pytest.raises(ValueError, match="residual_dropout=1.0"):
        add_training_dropout(_qwen(), residual=1.0)
    with pytest.raises(ValueError, match="embedding_dropout=-0.1"):
        add_training_dropout(_qwen(), embedding=-0.1)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="GPT2LMHeadModel has no self_attn.o_proj"):
        add_training_dropout(gpt2, residual=0.1)
    assert len(add_training_dropout(gpt2, embedding=0.1)) == 1  # embeddings work on any model


@pytest.mark.slow
def test_sft_with_untied_head_and_dropout_saves_a_servable_untied_model(scientific_dirs, tmp_path):
    out = tmp_path / "sft"
    run_cmd(
        [
            *demo_sft_cmd(scientific_dirs, out),
            "--max_steps",
            "6",
            *TRAIN_ONLY,
            "--per_device_train_batch_size",
            "8",
            "--untie_word_embeddings",
            "true",
            "--embedding_dropout",
            "0.1",
            "--residual_dropout",
            "0.1",
        ]
    )
    base = AutoModelForCausalLM.from_pretrained(out / "base")
    final = AutoModelForCausalLM.from_pretrained(out / "final")
    assert base.config.tie_word_embeddings and not final.config.tie_word_embeddings
    head, emb = final.lm_head.weight, final.get_input_embeddings().weight
    assert head is not emb and not torch.equal(head, emb)
    # both matrices trained away from the base's single tied matrix
    assert not torch.equal(emb, base.get_input_embeddings().weight)
    assert not torch.equal(head, base.get_input_embeddings().weight)
