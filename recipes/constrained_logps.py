"""Log-probs under the SID constraint, for the RL trainers (GRPO policy/reference, DPO margins).

TRL computes per-token log-probs with ``model(..., labels=..., fused_lm_head=True)``;
``add_constrained_lm_head`` replaces that head so the log-probs are taken under the
*constrained* next-token distribution (logits outside the allowed set masked, then
renormalised): the distribution the rollouts were drawn from and the one served. Without it
the importance ratios, KL and DPO margins would be measured on a full-vocabulary
distribution that also counts mass on tokens that can never be emitted.
"""

from __future__ import annotations

import logging
import types

import torch

from sid_tokenizer.constrained import SidConstraint

logger = logging.getLogger(__name__)

_MASKED = -1e9  # finite, so 0 * log p stays 0 (an -inf would give NaN gradients through the entropy)


def constrained_logps(
    logits: torch.Tensor, tokens: torch.Tensor, allowed: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per-token statistics of ``tokens`` under ``logits`` renormalised over ``allowed``.

    logits (N, V) float, tokens (N,), allowed (N, V) bool. A token outside its allowed set (a
    completion that left the catalogue, e.g. from an unconstrained generator) is scored under
    the unconstrained distribution instead. Returns (N,) tensors: ``log_probs``, ``entropy``,
    and without gradient ``is_top1``, ``log_sum_sq_probs``, ``mean_logits`` (over the full
    vocabulary), ``off_trie`` (bool): the fields of TRL's ``FusedCausalLMOutput``.
    """
    off = ~allowed.gather(1, tokens[:, None]).squeeze(1)
    use = logits.masked_fill(~allowed & ~off[:, None], _MASKED)
    logp_all = torch.log_softmax(use, dim=-1)
    logp = logp_all.gather(1, tokens[:, None]).squeeze(1)
    out = {"log_probs": logp, "entropy": -(logp_all.exp() * logp_all).sum(-1), "off_trie": off}
    with torch.no_grad():
        out["is_top1"] = use.argmax(-1) == tokens
        out["log_sum_sq_probs"] = torch.logsumexp(2 * logp_all, dim=-1)
        out["mean_logits"] = logits.mean(-1)
    return out


def add_constrained_lm_head(model, constraint: SidConstraint, temperature: float = 1.0) -> None:
    """Make ``model(..., labels=labels, fused_lm_head=True)`` (how TRL's GRPO/DPO trainers score
    completions) return log-probs and entropies of the label tokens under the SID-constrained
    distribution. The completion of a row is its run of labels != -100; position t of that run
    is constrained by the trie given the t tokens before it. Without ``fused_lm_head`` the
    model's own forward runs (generation is unchanged). Patch the object TRL patched (the base
    model under PEFT), after the trainer is built.
    """
    from trl.trainer.utils import FusedCausalLMOutput

    text_config = model.config.get_text_config()
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier"):
        if getattr(text_config, attr, None) not in (None, 1, 1.0):
            raise NotImplementedError(f"constrained log-probs assume a plain linear LM head; {attr} is set")
    cls_forward = type(model).forward

    def forward(
        self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs
    ):
        if not fused_lm_head:
            extra = {
                k: v
                for k, v in (
                    ("labels", labels),
                    ("shift_labels", shift_labels),
                    ("num_items_in_batch", num_items_in_batch),
                )
                if v is not None
            }
            return cls_forward(self, *args, **kwargs, **extra)
        if shift_labels is not None:
            raise NotImplementedError(
                "constrained log-probs do not support pre-shifted labels (context parallel)"
            )
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        labels = labels[:, 1:].to(hidden.device)
        mask = labels != -100  # (B, T-1)
        rows, cols = mask.nonzero(as_tuple=True)
        depth = (mask.long().cumsum(1) - 1)[rows, cols]  # position inside the row's completion
        tokens = labels[rows, cols]
        width = int(depth.max()) + 1 if len(depth) else 0
        completions = torch.full(
            (mask.shape[0], width), constraint.eos_token_id, dtype=torch.long, device=hidden.device
        )
        completions[rows, depth] = tokens
        lm_head = self.get_output_embeddings()
        logits = lm_head(hidden[rows, cols]).float() / temperature  # (N, V)
        allowed = constraint.allowed(completions, logits.shape[-1])[rows, depth]
        stats = constrained_logps(logits, tokens, allowed)
        off = stats.pop("off_trie")
        if off.any():
            logger.warning(
                "%d of %d completion tokens are outside the SID constraint; scored unconstrained",
                int(off.sum()),
                len(off),
            )
        # (B, T-1) like TRL's fused head: zero (False) where the label is -100
        per_token = {k: v.new_zeros(mask.shape).masked_scatter(mask, v) for k, v in stats.items()}
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-per_token["log_probs"].sum() / count, label_mask=mask, **per_token)

    model.forward = types.MethodType(forward, model)


def disable_attention_dropout(model) -> int:
    """Zero the attention dropout of HF attention modules (a float attribute read in ``forward``,
    which TRL's ``disable_dropout`` misses: it only zeroes ``nn.Dropout`` modules). Otherwise the
    policy's log-probs are noisy against the (eval-mode) reference and the KL is inflated. The
    saved config keeps its value. Returns the number of modules changed."""
    changed = 0
    for module in model.modules():
        if isinstance(getattr(module, "attention_dropout", None), float) and module.attention_dropout > 0:
            module.attention_dropout = 0.0
            changed += 1
    return changed


def lm_to_patch(trainer, model):
    from accelerate.utils import is_peft_model

    model = trainer.accelerator.unwrap_model(model)
    return model.get_base_model() if is_peft_model(model) else model
