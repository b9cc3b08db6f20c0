"""Ensembles of sidrec checkpoints for ranking: one beam search over averaged next-token distributions.

    python -m eval.evaluate --config eval/configs/scientific_sft.yaml \
        --checkpoint outputs/a/final --ensemble outputs/b/final outputs/c/final

Members must share the tokenizer and the SID index (the same ``sid_dir``; seeds or recipes of one
model family), so a SID token means the same item in every member. At each step of
``eval.generate.sid_beam_search`` every member runs on its own KV cache and the ensemble returns
``log(mean_i p_i)`` (``mode="prob"``, a mixture) or ``mean_i log p_i`` (``mode="logprob"``, a
normalised product of experts); the beam search, the trie constraint and the metrics are unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sid_tokenizer.catalog import Catalogue

MODES = ("prob", "logprob")


class EnsembleCache:
    """The members' KV caches side by side; beam bookkeeping is applied to each."""

    def __init__(self, caches: list[Any]) -> None:
        self.caches = caches

    def batch_repeat_interleave(self, repeats: int) -> None:
        for c in self.caches:
            c.batch_repeat_interleave(repeats)

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        for c in self.caches:
            c.reorder_cache(beam_idx)


@dataclass
class EnsembleOutput:
    logits: torch.Tensor  # (B, T, V) normalised log-probabilities
    past_key_values: EnsembleCache | None


class EnsembleLM(nn.Module):
    """Causal LMs with one vocabulary behind one ``forward``: what ``sid_beam_search`` calls."""

    def __init__(self, models: list[nn.Module], mode: str = "prob") -> None:
        super().__init__()
        if len(models) < 2:
            raise ValueError(f"an ensemble needs at least 2 models, got {len(models)}")
        if mode not in MODES:
            raise ValueError(f"ensemble mode {mode!r}: one of {MODES}")
        sizes = {m.config.vocab_size for m in models}
        if len(sizes) != 1:
            raise ValueError(f"ensemble members have different vocabulary sizes {sorted(sizes)}")
        self.members = nn.ModuleList(models)
        self.mode = mode
        self.config = models[0].config
        self.eval()  # an inference wrapper: nn.Module starts in training mode, which would enable dropout

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: EnsembleCache | None = None,
        use_cache: bool = True,
        **kwargs: Any,
    ) -> EnsembleOutput:
        caches = past_key_values.caches if past_key_values is not None else [None] * len(self.members)
        logps, new_caches = [], []
        for model, cache in zip(self.members, caches, strict=True):
            out = model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=use_cache,
                **kwargs,
            )
            logps.append(torch.log_softmax(out.logits.float(), dim=-1))
            new_caches.append(out.past_key_values)
        stacked = torch.stack(logps)
        if self.mode == "prob":
            logits = torch.logsumexp(stacked, dim=0) - math.log(len(logps))
        else:
            logits = torch.log_softmax(stacked.mean(0), dim=-1)
        return EnsembleOutput(logits, EnsembleCache(new_caches) if use_cache else None)


def check_members(paths: list[str], tokenizers: list[Any], catalogues: list[Catalogue]) -> None:
    """Same vocabulary and the same SID -> items map in every member, else a clear error."""
    ref_vocab, ref_map = tokenizers[0].get_vocab(), catalogues[0].index.sid_to_items
    for path, tok, cat in zip(paths[1:], tokenizers[1:], catalogues[1:], strict=True):
        if tok.get_vocab() != ref_vocab:
            raise ValueError(f"{path}: tokenizer differs from {paths[0]}'s; ensemble members must share it")
        if cat.index.sid_to_items != ref_map:
            raise ValueError(
                f"{path}: SID index differs from {paths[0]}'s; ensemble members must use the same sid_dir"
            )
