"""The SFT trainer: TRL's SFTTrainer plus ranking metrics at each evaluation and, optionally, the
SID-restricted loss (``recipes.sid_loss``: at SID-labelled positions the softmax runs over that
level's SID tokens only, the set constrained decoding chooses from)."""

from __future__ import annotations

import logging

import torch
from trl import SFTTrainer

from recipes.sid_loss import SidLevels, add_sid_loss_forward
from recipes.training import RankingEvalMixin
from sid_tokenizer.sid import SidVocab

logger = logging.getLogger(__name__)


class SidSFTTrainer(RankingEvalMixin, SFTTrainer):
    """SFTTrainer whose evaluation also reports full-catalogue ranking metrics; parameters marked
    by ``trainable_sid_rows_only`` get no weight decay (decoupled decay would move frozen rows).

    ``sid_levels`` (``SidLevels.from_tokenizer``): train (and report eval loss) with the
    SID-restricted loss instead of the full-vocabulary one; entropy and token accuracy are then
    those of the restricted distributions at SID positions."""

    def __init__(self, *a, sid_levels: SidLevels | None = None, **kw) -> None:
        super().__init__(*a, **kw)
        self.sid_levels = sid_levels
        if sid_levels is None:
            return
        args = self.args
        if args.label_smoothing_factor or self.compute_loss_func is not None or args.loss_type != "nll":
            raise ValueError(
                "sid_restricted_loss supports the plain NLL loss only: unset label_smoothing_factor, "
                f"compute_loss_func and loss_type={args.loss_type!r}"
            )
        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        add_sid_loss_forward(model, sid_levels)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.sid_levels is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        # through the (DDP/PEFT-)wrapped model, as TRL's fused head is called
        out = model(**inputs, sid_restricted_loss=True, num_items_in_batch=num_items_in_batch)
        loss = out.loss
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients, the token count is global
        gather = self.accelerator.gather_for_metrics
        n = gather(out.label_mask.sum()).sum()
        for key, per_token in (("entropy", out.entropy.detach()), ("mean_token_accuracy", out.is_top1)):
            self._metrics[mode][key].append((gather(per_token.sum()).sum() / n).item() if n > 0 else 0.0)
        if mode == "train":
            self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item()
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return (loss, out) if return_outputs else loss

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
