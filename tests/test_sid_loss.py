"""SID-restricted loss == full softmax with the other levels' logits at -inf (values and gradients)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from recipes.sid_loss import SidLevels, sid_restricted_loss
from tests.conftest import tiny_qwen2

V, H = 40, 6
# three levels: two contiguous ranges and one scattered set of ids (tokens added out of order)
LEVELS = [list(range(10, 18)), list(range(18, 23)), [25, 31, 27, 39, 33, 30]]


def reference_loss(hidden, weight, bias, labels, levels, num_items=None):
    """Full [B, T, V] logits; at SID-labelled positions every id outside the label's level is -inf."""
    logits = hidden[:, :-1] @ weight.T + (0 if bias is None else bias)
    target = labels[:, 1:]
    allowed = torch.ones(*target.shape, V, dtype=torch.bool)
    for ids in levels:
        in_level = torch.isin(target, torch.tensor(ids))
        row = torch.zeros(V, dtype=torch.bool)
        row[ids] = True
        allowed[in_level] = row
    logits = logits.masked_fill(~allowed, float("-inf"))
    nll = F.cross_entropy(logits.reshape(-1, V), target.reshape(-1), ignore_index=-100, reduction="sum")
    n = (target != -100).sum() if num_items is None else num_items
    return nll / n


def random_case(seed: int, with_bias: bool):
    g = torch.Generator().manual_seed(seed)
    b, t = 3, 9
    hidden = torch.randn(b, t, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True) if with_bias else None
    sid = torch.tensor([i for lv in LEVELS for i in lv])
    text = torch.tensor([i for i in range(V) if i not in set(sid.tolist())])
    kind = torch.randint(0, 3, (b, t), generator=g)  # 0 ignored, 1 text, 2 SID
    labels = torch.where(
        kind == 1,
        text[torch.randint(0, len(text), (b, t), generator=g)],
        sid[torch.randint(0, len(sid), (b, t), generator=g)],
    )
    labels = labels.masked_fill(kind == 0, -100)
    return hidden, weight, bias, labels


@pytest.mark.parametrize("seed,with_bias,text_chunk", [(0, False, 1024), (1, True, 3), (2, False, 1)])
def test_restricted_loss_matches_masked_full_softmax(seed, with_bias, text_chunk):
    hidden, weight, bias, labels = random_case(seed, with_bias)
    assert ((labels[:, 1:] >= 10) & (labels[:, 1:] != -100)).any() and (
        (labels[:, 1:] >= 0) & (labels[:, 1:] < 10)
    ).any()
    params = [hidden, weight] + ([bias] if with_bias else [])

    ref = reference_loss(hidden, weight, bias, labels, LEVELS)
    ref_grads = torch.autograd.grad(ref, params)
    out = sid_restricted_loss(
        hidden, weight, labels, SidLevels.from_ids(LEVELS), bias=bias, text_chunk=text_chunk
    )
    grads = torch.autograd.grad(out.loss, params)

    torch.testing.assert_close(out.loss, ref, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    # the restricted loss is a different objective from the plain full softmax (it would be a weak test otherwise)
    full = F.cross_entropy(
        (hidden[:, :-1] @ weight.T + (0 if bias is None else bias)).reshape(-1, V),
        labels[:, 1:].reshape(-1),
        ignore_index=-100,
    )
    assert out.loss < full - 1e-3
    # per-position outputs: log-probs sum to -loss * count; ignored positions are zero
    mask = labels[:, 1:] != -100
    assert torch.equal(out.label_mask, mask)
    torch.testing.assert_close(-out.log_probs.sum() / mask.sum(), out.loss)
    assert (out.log_probs[~mask] == 0).all() and (out.entropy[mask] > 0).all()


def test_num_items_in_batch_and_all_ignored_batch():
    hidden, weight, _, labels = random_case(3, False)
    levels = SidLevels.from_ids(LEVELS)
    out = sid_restricted_loss(hidden, weight, labels, levels, num_items_in_batch=50)
    torch.testing.assert_close(out.loss, reference_loss(hidden, weight, None, labels, LEVELS, num_items=50))
    empty = sid_restricted_loss(hidden, weight, torch.full_like(labels, -100), levels)
    assert empty.loss.item() == 0.0
    empty.loss.backward()  # a differentiable zero, as the Trainer needs for an all-prompt micro-batch
    assert hidden.grad is not None and (hidden.grad == 0).all()


def test_bad_inputs_are_named():
    hidden, weight, _, labels = random_case(4, False)
    with pytest.raises(ValueError, match="outside the output layer's 40 rows"):
        sid_restricted_loss(hidden, weight, labels, SidLevels.from_ids([[10, 11], [45]]))
    with pytest.raises(ValueError, match="repeat"):
        SidLevels.from_ids([[10, 11], [11, 12]])
    with pytest.raises(ValueError, match=r"hidden \[B, T, H\]"):
        sid_restricted_loss(hidden[0], weight, labels, SidLevels.from_ids(LEVELS))
    with pytest.raises(ValueError, match="token ids in"):
        sid_restricted_loss(hidden, weight, labels.masked_fill(labels == 12, 99), SidLevels.from_ids(LEVELS))


def test_patched_model_forward_matches_masked_logits_of_the_model():
    """``add_sid_loss_forward`` on a real (tiny, random) Qwen2 causal LM: same loss and gradients as
    the model's own logits with the other levels masked, and an unchanged forward without the flag."""
    from recipes.sid_loss import add_sid_loss_forward

    model = tiny_qwen2(V).double()
    _, _, _, labels = random_case(5, False)
    input_ids = labels.clamp(min=0)
    attention_mask = torch.ones_like(input_ids)
    ref_logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    add_sid_loss_forward(model, SidLevels.from_ids(LEVELS))
    torch.testing.assert_close(model(input_ids=input_ids, attention_mask=attention_mask).logits, ref_logits)

    ref = reference_loss(ref_logits, torch.eye(V, dtype=torch.float64), None, labels, LEVELS)
    ref_grad = torch.autograd.grad(ref, model.lm_head.weight)[0]
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, sid_restricted_loss=True)
    grad = torch.autograd.grad(out.loss, model.lm_head.weight)[0]
    torch.testing.assert_close(out.loss, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-10)
