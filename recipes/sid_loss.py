"""SID-restricted next-token loss: at positions whose label is a SID token of level ``l``, the
softmax runs over that level's SID tokens only (the only tokens constrained decoding can emit
there); every other labelled position keeps the full vocabulary.

The logits are computed from the hidden states and the matching rows of the output layer, so no
full ``[B, T, V]`` logits tensor is built: SID positions cost ``K_l`` logits each (256 for a
3x256 index instead of V), and text positions are projected in chunks whose logits are
recomputed in the backward pass (``torch.utils.checkpoint``), so at most one chunk of
``[chunk, V]`` logits is alive at a time. This matters for a 151k-vocabulary LLM.

Equivalence (tested in float64, values and gradients): the loss equals a full-vocabulary cross
entropy in which, at SID positions, every logit outside the label's level is set to -inf.

Usage (shapes: hidden ``[B, T, H]``, weight ``[V, H]``, labels ``[B, T]`` aligned with the
input ids, ``-100`` = no loss; the shift to next-token labels happens inside)::

    levels = SidLevels.from_tokenizer(tokenizer, index.vocab)
    out = sid_restricted_loss(hidden, lm_head.weight, labels, levels)
    out.loss.backward()
"""

from __future__ import annotations

import functools
import types
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
# text positions per projection chunk: [chunk, V] float32 logits is ~600 MB for V = 151k
TEXT_CHUNK = 1024


@dataclass(frozen=True)
class SidLevels:
    """Token ids of the SID tokens, one 1-D int64 tensor per level (level order, code order)."""

    ids: tuple[torch.Tensor, ...]

    def __post_init__(self) -> None:
        if not self.ids:
            raise ValueError("SidLevels needs at least one level of token ids")
        seen: set[int] = set()
        for lv, t in enumerate(self.ids):
            if t.ndim != 1 or t.numel() == 0 or t.dtype != torch.long:
                raise ValueError(
                    f"SID level {lv}: expected a non-empty 1-D int64 tensor of token ids, got "
                    f"shape {tuple(t.shape)} dtype {t.dtype}"
                )
            ids = set(t.tolist())
            if len(ids) != t.numel() or ids & seen:
                raise ValueError(f"SID level {lv}: token ids repeat within or across levels")
            if min(ids) < 0:
                raise ValueError(f"SID level {lv}: negative token id {min(ids)}")
            seen |= ids

    @classmethod
    def from_ids(cls, levels: Sequence[Sequence[int] | np.ndarray | torch.Tensor]) -> SidLevels:
        return cls(tuple(torch.as_tensor(np.asarray(lv), dtype=torch.long).reshape(-1) for lv in levels))

    @classmethod
    def from_tokenizer(cls, tokenizer, vocab) -> SidLevels:
        """The levels of ``vocab`` (a ``SidVocab``) as ids of ``tokenizer`` (which must hold them)."""
        from sid_tokenizer.vocab import sid_token_ids

        return cls.from_ids(sid_token_ids(tokenizer, vocab))

    def lookup(self, vocab_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(level_of, code_of), both ``[vocab_size]`` int64: the level of each token id (-1 for
        non-SID tokens) and its position inside that level."""
        top = max(int(t.max()) for t in self.ids)
        if top >= vocab_size:
            raise ValueError(f"SID token id {top} is outside the output layer's {vocab_size} rows")
        level_of = torch.full((vocab_size,), -1, dtype=torch.long, device=device)
        code_of = torch.zeros(vocab_size, dtype=torch.long, device=device)
        for lv, t in enumerate(self.ids):
            t = t.to(device)
            level_of[t] = lv
            code_of[t] = torch.arange(t.numel(), device=device)
        return level_of, code_of


@dataclass
class SidLossOutput:
    """``loss`` (scalar) plus per-position tensors over the shifted labels ``[B, T-1]`` (zero where
    ``label_mask`` is False): ``log_probs`` of the label, ``entropy`` and ``is_top1`` of the
    distribution the loss used (restricted at SID positions)."""

    loss: torch.Tensor
    log_probs: torch.Tensor
    entropy: torch.Tensor
    is_top1: torch.Tensor
    label_mask: torch.Tensor


def _rows(weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``weight[ids]``; a view (narrow) when the ids are contiguous, as ``add_sid_tokens`` makes them."""
    lo, n = int(ids[0]), ids.numel()
    if int(ids[-1]) - lo + 1 == n and bool((ids == torch.arange(lo, lo + n, device=ids.device)).all()):
        return weight.narrow(0, lo, n)
    return weight.index_select(0, ids)


def _token_stats(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per row of ``logits [N, K]``: log-prob of ``target [N]``, entropy, target is the argmax."""
    logp = torch.log_softmax(
        logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, -1
    )
    picked = logp.gather(1, target[:, None]).squeeze(1)
    entropy = -(logp.exp() * logp).sum(-1)
    top1 = (logits.argmax(-1) == target).to(picked.dtype)
    return picked, entropy, top1


def _text_chunk(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor):
    return _token_stats(F.linear(h, weight, bias), target)


def sid_token_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    levels: SidLevels,
    bias: torch.Tensor | None = None,
    text_chunk: int = TEXT_CHUNK,
    lookup: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, ...]:
    """Flat form. hidden ``[N, H]``, labels ``[N]`` (every label valid, no ``-100``) ->
    (log_probs, entropy, is_top1), each ``[N]``, with SID labels scored within their level."""
    if hidden.ndim != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(
            f"expected hidden [N, H] and labels [N], got {tuple(hidden.shape)} and {tuple(labels.shape)}"
        )
    if weight.ndim != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"output layer weight {tuple(weight.shape)} does not match hidden size {hidden.shape[1]}"
        )
    level_of, code_of = lookup if lookup is not None else levels.lookup(weight.shape[0], hidden.device)
    n = labels.numel()
    dtype = torch.float32 if hidden.dtype in (torch.float16, torch.bfloat16) else hidden.dtype
    zero = hidden[:, 0].to(dtype) * 0  # [N] zeros connected to the graph (an all-empty batch still backprops)
    out = [zero, zero, zero.detach()]
    if n and (int(labels.min()) < 0 or int(labels.max()) >= weight.shape[0]):
        raise ValueError(
            f"labels must be token ids in [0, {weight.shape[0]}), got {int(labels.min())}..{int(labels.max())}"
        )
    label_level = level_of[labels]
    parts: list[tuple[torch.Tensor, tuple[torch.Tensor, ...]]] = []
    for lv, ids in enumerate(levels.ids):
        pos = (label_level == lv).nonzero().squeeze(1)
        if pos.numel():
            rows = _rows(weight, ids.to(weight.device))
            b = None if bias is None else bias.index_select(0, ids.to(bias.device))
            parts.append((pos, _token_stats(F.linear(hidden[pos], rows, b), code_of[labels[pos]])))
    text = (label_level < 0).nonzero().squeeze(1)
    for start in range(0, text.numel(), text_chunk):
        pos = text[start : start + text_chunk]
        args = (hidden[pos], weight, bias, labels[pos])
        # recompute the [chunk, V] logits in backward instead of keeping them for every chunk
        stats = (
            checkpoint(_text_chunk, *args, use_reentrant=False)
            if torch.is_grad_enabled()
            else _text_chunk(*args)
        )
        parts.append((pos, stats))
    for pos, stats in parts:
        out = [o.index_put((pos,), s.to(dtype)) for o, s in zip(out, stats, strict=True)]
    return tuple(out)


def sid_restricted_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    levels: SidLevels,
    bias: torch.Tensor | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    shift: bool = True,
    text_chunk: int = TEXT_CHUNK,
    lookup: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> SidLossOutput:
    """Causal-LM loss with SID-restricted softmax.

    hidden ``[B, T, H]`` (last hidden states), weight ``[V, H]`` (+ bias ``[V]``) of the output
    layer, labels ``[B, T]`` aligned with the inputs (``shift=True``: position t predicts label
    t+1, as transformers' causal-LM loss) or already shifted (``shift=False``); ``-100`` = no loss.
    The loss is the sum of label negative log-likelihoods over ``num_items_in_batch`` (the
    Trainer's token count under gradient accumulation) or over the number of labelled positions.
    ``lookup``: ``levels.lookup(V, device)``, cached by the caller across batches.
    """
    if hidden.ndim != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(
            f"expected hidden [B, T, H] and labels [B, T], got {tuple(hidden.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if shift:
        hidden, labels = hidden[:, :-1], labels[:, 1:]
    labels = labels.to(hidden.device)
    mask = labels != IGNORE_INDEX
    stats = sid_token_log_probs(
        hidden[mask], weight, labels[mask], levels, bias=bias, text_chunk=text_chunk, lookup=lookup
    )
    # masked_scatter keeps an all-ignored micro-batch connected to the graph (a differentiable zero)
    log_probs, entropy, is_top1 = (s.new_zeros(mask.shape).masked_scatter(mask, s) for s in stats)
    denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    loss = -log_probs.sum() / torch.as_tensor(denom, device=log_probs.device)
    return SidLossOutput(loss=loss, log_probs=log_probs, entropy=entropy, is_top1=is_top1, label_mask=mask)


def add_sid_loss_forward(model, levels: SidLevels) -> None:
    """Patch ``model.forward`` (a transformers causal LM, before or after PEFT wrapping: pass the
    underlying model) so that ``model(input_ids=..., attention_mask=..., labels=labels,
    sid_restricted_loss=True, num_items_in_batch=n)`` runs the backbone and returns the
    ``SidLossOutput`` of ``sid_restricted_loss`` instead of logits. Without the flag the forward
    is unchanged (generation, TRL's fused LM head). Calling through the wrapped model keeps DDP
    and PEFT in the loop, as TRL's ``add_fused_lm_head`` does."""
    text_config = model.config.get_text_config()
    for name in ("final_logit_softcapping", "logit_scale", "output_multiplier", "logits_scaling"):
        if getattr(text_config, name, None) not in (None, 1.0):
            raise ValueError(
                f"sid_restricted_loss does not support models with {name}={getattr(text_config, name)}"
            )
    inner = model.forward
    cache: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    @functools.wraps(type(model).forward)
    def forward(self, *args, sid_restricted_loss: bool = False, **kwargs):
        if not sid_restricted_loss:
            return inner(*args, **kwargs)
        labels = kwargs.pop("labels")
        num_items = kwargs.pop("num_items_in_batch", None)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        head = self.get_output_embeddings()
        key = (head.weight.shape[0], str(head.weight.device))
        if key not in cache:
            cache[key] = levels.lookup(head.weight.shape[0], head.weight.device)
        return _sid_restricted_loss(
            hidden.to(head.weight.device),
            head.weight,
            labels,
            levels,
            bias=head.bias,
            num_items_in_batch=num_items,
            lookup=cache[key],
        )

    model.forward = types.MethodType(forward, model)


_sid_restricted_loss = sid_restricted_loss  # the patched forward's keyword shadows the function name
