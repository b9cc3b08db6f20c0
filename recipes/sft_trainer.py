"""The SFT trainer: TRL's SFTTrainer plus ranking metrics at each evaluation."""

from __future__ import annotations

import logging

import torch
from trl import SFTTrainer

from recipes.training import RankingEvalMixin
from sid_tokenizer.sid import SidVocab

logger = logging.getLogger(__name__)


class SidSFTTrainer(RankingEvalMixin, SFTTrainer):
    """SFTTrainer whose evaluation also reports full-catalogue ranking metrics."""


def trainable_sid_rows_only(model, tokenizer, vocab: SidVocab) -> None:
    """Freeze all parameters except the input/output embedding rows of the SID tokens."""
    ids = torch.tensor(tokenizer.convert_tokens_to_ids(vocab.tokens()), dtype=torch.long)
    for p in model.parameters():
        p.requires_grad_(False)
    mats = {
        id(m.weight): m.weight
        for m in (model.get_input_embeddings(), model.get_output_embeddings())
        if m is not None
    }
    for w in mats.values():
        w.requires_grad_(True)
        keep = torch.zeros(w.shape[0], 1, dtype=w.dtype)
        keep[ids] = 1
        w.register_hook(lambda g, keep=keep: g * keep.to(g.device))
    n = sum(int(ids.numel()) * w.shape[1] for w in mats.values())
    logger.info("training only the %d SID embedding rows (%d parameters)", len(ids), n)
