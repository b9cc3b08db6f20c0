"""The SFT trainer: TRL's SFTTrainer plus ranking metrics at each evaluation."""

from __future__ import annotations

import logging

import torch
from trl import SFTTrainer

from recipes.training import RankingEvalMixin
from sid_tokenizer.sid import SidVocab

logger = logging.getLogger(__name__)


class SidSFTTrainer(RankingEvalMixin, SFTTrainer):
    """SFTTrainer whose evaluation also reports full-catalogue ranking metrics; parameters marked
    by ``trainable_sid_rows_only`` get no weight decay (decoupled decay would move frozen rows)."""

    def get_decay_parameter_names(self, model) -> list[str]:
        rows_only = {
            n for n, p in model.named_parameters(remove_duplicate=False) if getattr(p, _ROWS_ONLY, False)
        }
        return [n for n in super().get_decay_parameter_names(model) if n not in rows_only]


# attribute set on an embedding matrix whose gradient is masked to the SID rows
_ROWS_ONLY = "_sidrec_sid_rows_only"


def trainable_sid_rows_only(model, tokenizer, vocab: SidVocab) -> None:
    """Freeze all parameters except the input/output embedding rows of the SID tokens.

    The embedding matrices stay trainable with their gradient masked to the SID rows (a hook), so
    Adam's moments of every other row stay zero and their update is exactly zero. AdamW's
    decoupled weight decay does not look at gradients: it would shrink the frozen rows at every
    step (2.4e-4 in 3 steps at weight_decay 0.1), so the matrices are marked and
    ``SidSFTTrainer`` leaves them out of weight decay (the SID rows are trained without decay).
    """
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
        setattr(w, _ROWS_ONLY, True)
        keep = torch.zeros(w.shape[0], 1, dtype=w.dtype)
        keep[ids] = 1
        w.register_hook(lambda g, keep=keep: g * keep.to(g.device))
    n = sum(int(ids.numel()) * w.shape[1] for w in mats.values())
    logger.info("training only the %d SID embedding rows (%d parameters)", len(ids), n)
