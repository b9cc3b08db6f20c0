"""RL after SFT that stays inside the catalogue: prompts, constrained GRPO/DPO trainers, pair mining, curves.

- ``rl_prompt_rows``: RL prompts from the training sequences (a sampled prefix of a user's
  training sequence -> its next item), in the format the evaluation uses (raw seq2seq
  ``<|rec|>`` + SIDs) or in chat form.
- ``SidConstraint``: the SID trie as "allowed next tokens of a completion"; used for rollouts
  (``SidLogitsProcessor`` in ``generate`` / ``sid_beam_search``) and for the log-probs.
- ``add_constrained_lm_head``: TRL computes the policy's (and the reference's) per-token
  log-probs with ``model(..., labels=..., fused_lm_head=True)``; this replaces that head so the
  log-probs are taken under the *constrained* next-token distribution (logits outside the
  allowed set masked, then renormalised), the distribution the rollouts were drawn from and
  the one served. Without it the importance ratios, KL and DPO margins would be measured on a
  full-vocabulary distribution that also counts mass on tokens that can never be emitted.
- ``SidGRPOTrainer``: ``GRPOTrainer`` whose transformers rollouts are constrained
  (``rollout: sample``) or are the G distinct items of a constrained beam search
  (``rollout: beam``, MiniOneRec), with ``beam_rank`` passed to the rewards.
- ``SidDPOTrainer``: ``DPOTrainer`` with the constrained log-probs; pairs from
  ``mine_preference_pairs`` (chosen = true next item, rejected = the SFT model's top-ranked
  wrong items).
- ``plot_rl_curves``: rewards by component, KL, validity, DPO margins and validation ranking.
"""

from __future__ import annotations

import io
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import LogitsProcessorList
from trl import DPOTrainer, GRPOTrainer

from data_prep.dataset import Example, RecDataset
from data_prep.io import atomic_write_bytes
from data_prep.tasks import PROMPTS, seq2seq_prompt
from eval.training import RankingEvalMixin
from sid_tokenizer.constrained import SidLogitsProcessor
from sid_tokenizer.llm import sid_token_ids
from sid_tokenizer.sid import SidIndex
from sid_tokenizer.trie import SidTrie

logger = logging.getLogger(__name__)

PROMPT_FORMATS = ("seq2seq", "chat")
ROLLOUTS = ("sample", "beam")


# ------------------------------------------------------------------------------------------ prompts


def rl_prompt(index: SidIndex, history: Sequence[int], max_history: int, prompt_format: str) -> Any:
    """The prompt for a history: raw seq2seq text (what ``eval.evaluate`` ranks with), or a chat
    message list (the SFT ``seq2seq_chat`` task's first template)."""
    if prompt_format == "seq2seq":
        return seq2seq_prompt(index, list(history), max_history)
    if prompt_format == "chat":
        sids = ", ".join(index.sid(i) for i in list(history)[-max_history:])
        return [{"role": "user", "content": PROMPTS["seq2seq_chat"][0].format(history=sids)}]
    raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")


def rl_prompt_rows(
    index: SidIndex,
    sequences: Sequence[Sequence[int]],
    num_prompts: int,
    max_history: int = 20,
    prefix: str = "uniform",
    prompt_format: str = "seq2seq",
    seed: int = 0,
) -> list[dict]:
    """RL rows ``{"prompt", "target_item", "history"}`` from training sequences.

    Each row is one user's sequence cut at a position t (target = item t, history = the items
    before it): ``prefix="last"`` cuts before the last training item (the most recent, closest to
    the validation target), ``"uniform"`` at a uniformly drawn t >= 1. Users are drawn without
    replacement (then again, if ``num_prompts`` exceeds the users with >= 2 items).
    """
    if prefix not in ("uniform", "last"):
        raise ValueError(f"prefix must be 'uniform' or 'last', got {prefix!r}")
    rng = random.Random(seed)
    seqs = [list(s) for s in sequences if len(s) >= 2]
    if not seqs:
        raise ValueError("no training sequence has two items: nothing to build RL prompts from")
    order: list[list[int]] = []
    while len(order) < num_prompts:
        order += rng.sample(seqs, len(seqs))
    rows = []
    for seq in order[:num_prompts]:
        t = len(seq) - 1 if prefix == "last" else rng.randrange(1, len(seq))
        history = seq[max(0, t - max_history) : t]
        rows.append(
            {
                "prompt": rl_prompt(index, history, max_history, prompt_format),
                "target_item": seq[t],
                "history": history,
            }
        )
    return rows


def example_rows(
    index: SidIndex, examples: Sequence[Example], max_history: int = 20, prompt_format: str = "seq2seq"
) -> list[dict]:
    """RL rows for held-out examples (validation users): same columns as ``rl_prompt_rows``."""
    return [
        {
            "prompt": rl_prompt(index, e.history, max_history, prompt_format),
            "target_item": e.target,
            "history": list(e.history)[-max_history:],
        }
        for e in examples
    ]


def prompt_text(prompt: Any, tokenizer) -> str:
    """Text fed to the model: the raw prompt, or a chat prompt rendered with the generation prompt."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


# ------------------------------------------------------------------------------------------ constraint


class SidConstraint:
    """Which tokens a completion may contain: L SID tokens along the trie, then EOS.

    Tokens after the (L+1)-th are not constrained (chat templates may add text after EOS).
    """

    def __init__(self, index: SidIndex, tokenizer, vocab_size: int | None = None) -> None:
        self.index = index
        self.trie = SidTrie(index.codes, index.vocab.level_sizes)
        self.level_token_ids = sid_token_ids(tokenizer, index.vocab)
        self.num_levels = index.vocab.num_levels
        self.eos_token_id = tokenizer.eos_token_id
        self.vocab_size = max(
            vocab_size or 0, len(tokenizer), int(max(t.max() for t in self.level_token_ids)) + 1
        )

    def processor(self, prompt_length: int) -> SidLogitsProcessor:
        """A logits processor for a left-padded prompt batch of width ``prompt_length``."""
        return SidLogitsProcessor(
            self.trie, self.level_token_ids, prompt_length, self.eos_token_id, vocab_size=self.vocab_size
        )

    def allowed(self, completions: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """completions (N, C) token ids (anything after a row's end is ignored) -> bool (N, C, V):
        may token v stand at position t of the completion, given the tokens before it."""
        n, c = completions.shape
        out = torch.ones(n, c, vocab_size, dtype=torch.bool, device=completions.device)
        proc = self.processor(prompt_length=0)
        for t in range(min(c, self.num_levels + 1)):
            out[:, t] = proc.allowed_mask(completions[:, :t], vocab_size)
        return out

    def is_catalogue_sid(self, completions: Sequence[Sequence[int]]) -> np.ndarray:
        """Bool (N,): do the completion's first L tokens form a catalogue SID?"""
        out = np.zeros(len(completions), dtype=bool)
        proc = self.processor(prompt_length=0)
        rows = [i for i, ids in enumerate(completions) if len(ids) >= self.num_levels]
        if rows:
            gen = np.asarray([list(completions[i])[: self.num_levels] for i in rows], dtype=np.int64)
            out[rows] = proc.nodes_for(gen) >= 0
        return out


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

    import types

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


def _lm_to_patch(trainer, model):
    from accelerate.utils import is_peft_model

    model = trainer.accelerator.unwrap_model(model)
    return model.get_base_model() if is_peft_model(model) else model


# ------------------------------------------------------------------------------------------ GRPO


class SidGRPOTrainer(RankingEvalMixin, GRPOTrainer):
    """GRPOTrainer with catalogue-constrained rollouts and log-probs.

    rollout ``sample``: ``generate`` with the trainer's sampling config plus ``SidLogitsProcessor``
    (TRL has no hook for a logits processor: ``_generate_single_turn`` is overridden).
    rollout ``beam``: the group of a prompt is the ``num_generations`` distinct SIDs of a
    constrained beam search, best first; rewards receive ``beam_rank`` (1..G). Beam groups are
    not samples from the policy, so the policy-gradient estimate is biased toward the head of
    the distribution (MiniOneRec's choice: every group has G distinct items and a ranking).
    Generation runs in eval mode (no dropout). Only transformers generation is supported.
    """

    def __init__(
        self,
        *args,
        catalogue_index: SidIndex,
        rollout: str = "sample",
        constrain_logprobs: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        if rollout not in ROLLOUTS:
            raise ValueError(f"rollout must be one of {ROLLOUTS}, got {rollout!r}")
        if self.use_vllm or self.use_transformers_continuous_batching:
            raise ValueError(
                "SidGRPOTrainer constrains transformers generation only: set use_vllm=false and "
                "use_transformers_continuous_batching=false"
            )
        if rollout == "beam":
            per_gen = self.args.per_device_train_batch_size * self.args.steps_per_generation
            if per_gen % self.num_generations:
                raise ValueError(
                    f"rollout beam needs whole groups on each process: per_device_train_batch_size x "
                    f"steps_per_generation = {per_gen} is not a multiple of num_generations {self.num_generations}"
                )
        self.rollout = rollout
        if self.args.disable_dropout:
            disable_attention_dropout(self.model)
        self.constraint = SidConstraint(
            catalogue_index, self._tokenizer, self.accelerator.unwrap_model(self.model).config.vocab_size
        )
        if constrain_logprobs:
            add_constrained_lm_head(_lm_to_patch(self, self.model), self.constraint, self.temperature)
            if self.ref_model is not None:
                add_constrained_lm_head(_lm_to_patch(self, self.ref_model), self.constraint, self.temperature)
        self._rollout_extra: dict[str, list] = {}

    def _generate(self, prompts: list):
        out = list(super()._generate(prompts))
        out[5] = {**out[5], **self._rollout_extra}  # extra_fields -> reward kwargs (one value per completion)
        self._rollout_extra = {}
        return tuple(out)

    def _generate_single_turn(
        self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False
    ):
        from trl.models.utils import unwrap_model_for_generation
        from trl.trainer.utils import pad

        if images is not None or multimodal_fields:
            raise ValueError("SidGRPOTrainer supports text prompts only")
        device = self.accelerator.device
        mode = "train" if self.model.training else "eval"
        if self.rollout == "beam":
            groups = [prompt_ids[i : i + num_generations] for i in range(0, len(prompt_ids), num_generations)]
            if len(prompt_ids) % num_generations or any(any(p != g[0] for p in g) for g in groups):
                raise RuntimeError(
                    "beam rollouts expect each prompt repeated num_generations times consecutively"
                )
            gen_prompts = [g[0] for g in groups]
        else:
            gen_prompts = prompt_ids
        tensors = [torch.tensor(ids) for ids in gen_prompts]
        input_ids = pad(tensors, padding_value=self._tokenizer.pad_token_id, padding_side="left").to(device)
        attention_mask = pad([torch.ones_like(t) for t in tensors], padding_value=0, padding_side="left").to(
            device
        )
        proc = self.constraint.processor(input_ids.shape[1])
        with (
            unwrap_model_for_generation(
                self.model_wrapped,
                self.accelerator,
                gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                generation_kwargs=self.generation_kwargs,
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
            ) as model,
            torch.no_grad(),
            self._dist.summon_full_params(self.model_wrapped, recurse=False),
        ):
            was_training = model.training
            model.eval()
            try:
                if self.rollout == "beam":
                    completion_ids = self._beam_rollout(
                        model, input_ids, attention_mask, proc, num_generations
                    )
                else:
                    out = model.generate(
                        input_ids=input_ids,
                        attention_mask=attention_mask,
                        generation_config=self.generation_config,
                        logits_processor=LogitsProcessorList([proc]),
                    )
                    completion_ids = _cut_after_eos(out[:, input_ids.shape[1] :].cpu(), self.eos_token_ids)
            finally:
                model.train(was_training)
        valid = self.constraint.is_catalogue_sid(completion_ids)
        self._metrics[mode]["completions/valid_sid"].append(float(valid.mean()))
        groups_distinct = [
            len({tuple(c) for c in completion_ids[i : i + num_generations]})
            for i in range(0, len(completion_ids), num_generations)
        ]
        self._metrics[mode]["completions/distinct_per_group"].append(float(np.mean(groups_distinct)))
        return completion_ids, None

    def _beam_rollout(self, model, input_ids, attention_mask, proc, num_generations) -> list[list[int]]:
        from eval.generate import sid_beam_search

        num_levels = self.constraint.num_levels
        gen, scores = sid_beam_search(model, input_ids, attention_mask, num_generations, num_levels, proc)
        gen, scores = gen.cpu(), scores.cpu()
        # fewer valid SIDs than beams (tiny catalogues only): repeat the best beam
        unfilled = ~torch.isfinite(scores)
        if unfilled.any():
            logger.warning(
                "%d beams had no distinct catalogue SID left; repeating the best beam", int(unfilled.sum())
            )
            gen[unfilled] = gen[:, :1].expand_as(gen)[unfilled]
        eos = self.constraint.eos_token_id
        completion_ids = [row.tolist() + [eos] for row in gen.reshape(-1, num_levels)]
        self._rollout_extra = {"beam_rank": list(range(1, num_generations + 1)) * len(input_ids)}
        return completion_ids


def _cut_after_eos(completions: torch.Tensor, eos_token_ids: Sequence[int]) -> list[list[int]]:
    """(N, C) generated ids -> per row, the ids up to and including the first EOS."""
    out = []
    eos = set(int(e) for e in eos_token_ids)
    for row in completions.tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        out.append(row[:end])
    return out


# ------------------------------------------------------------------------------------------ DPO


class SidDPOTrainer(RankingEvalMixin, DPOTrainer):
    """DPOTrainer whose policy and reference log-probs are taken under the SID constraint."""

    def __init__(self, *args, catalogue_index: SidIndex, constrain_logprobs: bool = True, **kwargs) -> None:
        args_ = kwargs.get("args")
        if constrain_logprobs and args_ is not None and args_.precompute_ref_log_probs:
            raise ValueError(
                "precompute_ref_log_probs runs before the constrained head is installed; set it false"
            )
        super().__init__(*args, **kwargs)
        if self.args.disable_dropout:
            disable_attention_dropout(self.model)
        self.constraint = SidConstraint(
            catalogue_index,
            self.processing_class,
            self.accelerator.unwrap_model(self.model).config.vocab_size,
        )
        if constrain_logprobs:
            add_constrained_lm_head(_lm_to_patch(self, self.model), self.constraint)
            if self.ref_model is not None:
                add_constrained_lm_head(_lm_to_patch(self, self.ref_model), self.constraint)


def mine_preference_pairs(
    model,
    tokenizer,
    index: SidIndex,
    rows: Sequence[dict],
    num_negatives: int,
    num_beams: int,
    batch_size: int = 32,
    progress: bool = True,
) -> list[dict]:
    """DPO rows from the model's own mistakes (S-DPO style, several negatives per prompt).

    For each RL row (``prompt``, ``target_item``), a constrained beam search ranks
    ``num_beams`` distinct items; the ``num_negatives`` highest-ranked items that are not the
    target (nor share its SID) become rejected completions, each paired with the target's SID
    as chosen: ``num_negatives`` rows per prompt, so the pairwise DPO loss sums over the hard
    negatives (S-DPO's softmax over negatives is approximated by independent pairs). Rows:
    ``prompt``, ``chosen``, ``rejected`` (text, or assistant messages for chat prompts) plus
    ``target_item`` and ``rejected_rank`` (1-based beam rank of the negative).
    """
    from eval.generate import SidRanker

    if num_beams <= num_negatives:
        raise ValueError(f"mining_beams ({num_beams}) must exceed num_negatives ({num_negatives})")
    ranker = SidRanker(model, tokenizer, index)
    texts = [prompt_text(r["prompt"], tokenizer) for r in rows]
    ranking = ranker.rank(texts, num_beams=num_beams, batch_size=batch_size, progress=progress)
    out = []
    for row, sids in zip(rows, ranking.sids, strict=True):
        target = int(row["target_item"])
        chosen = index.sid(target)
        negatives = [
            (r, s)
            for r, s in enumerate(sids, start=1)
            if s is not None and target not in index.sid_to_items.get(s, [])
        ][:num_negatives]
        for rank, s in negatives:
            rejected = index.vocab.format(s)
            if isinstance(row["prompt"], str):
                pair = {"chosen": chosen, "rejected": rejected}
            else:
                pair = {
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                }
            out.append({"prompt": row["prompt"], **pair, "target_item": target, "rejected_rank": rank})
    return out


# ------------------------------------------------------------------------------------------ collaborative


def sasrec_item_scorer(
    dataset: RecDataset, seed: int = 0, **config: Any
) -> Callable[[list[list[int]]], np.ndarray]:
    """Fit SASRec on the training sequences (``eval.baselines``, early-stopped on validation) and
    return histories -> (B, num_items) scores, for the ``collaborative`` reward."""
    from eval.baselines import SASRec, SASRecConfig

    sasrec = SASRec(SASRecConfig(**config), seed=seed)
    sasrec.fit(dataset, "valid")
    net, max_len = sasrec.model, sasrec.cfg.max_len
    net.eval()

    @torch.no_grad()
    def score(histories: list[list[int]]) -> np.ndarray:
        lens = [max(min(len(h), max_len), 1) for h in histories]
        seq = torch.zeros(len(histories), max(lens), dtype=torch.long)
        for r, h in enumerate(histories):
            tail = [i + 1 for i in h[-max_len:]]  # SASRec shifts ids by one (0 = padding)
            seq[r, : len(tail)] = torch.tensor(tail, dtype=torch.long)
        hidden = net(seq)[torch.arange(len(histories)), torch.tensor(lens) - 1]
        return net.scores(hidden)[:, 1:].float().numpy()

    return score


# ------------------------------------------------------------------------------------------ curves


RL_PANELS: list[tuple[str, Callable[[str], bool]]] = [
    # GRPO
    (
        "reward by component (train)",
        lambda k: k == "reward" or k.startswith("rewards/") and k.endswith("/mean"),
    ),
    ("KL to the SFT model (train)", lambda k: k == "kl"),
    ("rollouts that are catalogue SIDs", lambda k: k == "completions/valid_sid"),
    ("loss (train / eval)", lambda k: k in ("loss", "eval_loss")),
    # DPO
    (
        "DPO implicit rewards",
        lambda k: k.removeprefix("eval_") in ("rewards/chosen", "rewards/rejected", "rewards/margins"),
    ),
    ("DPO pair accuracy", lambda k: k.removeprefix("eval_") == "rewards/accuracies"),
    # both
    ("validation ranking (constrained beams)", lambda k: k in ("eval_NDCG@10", "eval_HR@10")),
]


def plot_rl_curves(log_history: list[dict], path: str | Path, title: str = "") -> None:
    """Training curves of an RL run -> PNG, one panel per group of logged series that is present
    (``RL_PANELS``): GRPO reward by component, KL, rollout validity; DPO loss, implicit rewards,
    pair accuracy; validation NDCG@10 / HR@10 for both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, tuple[list, list]] = {}
    for rec in log_history:
        for k, v in rec.items():
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool):
                series.setdefault(k, ([], []))
                series[k][0].append(rec.get("step"))
                series[k][1].append(v)
    panels = [(name, {k: v for k, v in series.items() if pred(k)}) for name, pred in RL_PANELS]
    panels = [(name, curves) for name, curves in panels if curves]
    cols = min(max(len(panels), 1), 3)
    rows = -(-max(len(panels), 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, (name, curves) in zip(axes.flat, panels, strict=False):
        for k, (x, y) in sorted(curves.items()):
            ax.plot(x, y, label=k, marker="o" if len(x) < 30 else None, markersize=3)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())  # a kill while saving never leaves a truncated PNG


# ------------------------------------------------------------------------------------------ report


@dataclass
class RLReportArgs:
    inputs: list[str] = field(
        metadata={"help": "metrics.json files written by eval.evaluate (one per model)"}
    )
    output: str = field(
        default="docs/results/rl_scientific", metadata={"help": "report prefix (.json/.md/.png)"}
    )
    metrics: list[str] = field(default_factory=lambda: ["HR@5", "NDCG@5", "HR@10", "NDCG@10", "HR@20"])
    title: str = "SFT vs SFT+GRPO vs SFT+DPO"
    notes: list[str] = field(default_factory=list, metadata={"help": "markdown lines above the tables"})
    paired: list[str] = field(
        default_factory=list,
        metadata={"help": "NAME=CHECKPOINT ...: paired per-user differences to the first one (same users)"},
    )
    paired_splits: list[str] = field(default_factory=lambda: ["valid", "test"])
    paired_metrics: list[str] = field(default_factory=lambda: ["NDCG@10", "HR@10", "HR@5", "HR@20"])
    paired_max_users: int | None = field(default=None, metadata={"help": "seeded subset (as eval.evaluate)"})
    num_beams: int = 20
    max_history: int = 20
    seed: int = 0
    n_boot: int = 1000


def paired_differences(args: RLReportArgs) -> list[dict]:
    """Per-user metric differences of each ``paired`` checkpoint to the first, on the same users
    (``eval.generate.evaluate_examples``, the code ``eval.evaluate`` runs), with percentile
    bootstrap 95% CIs of the mean difference: far tighter than comparing two unpaired CIs."""
    from data_prep.io import read_json
    from eval.generate import SidRanker, evaluate_examples
    from eval.metrics import paired_difference
    from sid_tokenizer.llm import load_checkpoint

    named = [p.split("=", 1) for p in args.paired]
    if len(named) < 2 or any(len(p) != 2 for p in named):
        raise ValueError(f"paired must be two or more NAME=CHECKPOINT entries, got {args.paired}")
    dataset = RecDataset.load(read_json(Path(named[0][1]) / "sidrec" / "meta.json")["dataset_dir"])
    per_user: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for name, ckpt in named:
        model, tokenizer, catalogue = load_checkpoint(ckpt)
        ranker = SidRanker(model, tokenizer, catalogue.index)
        for split in args.paired_splits:
            examples = list(getattr(dataset, split))
            if args.paired_max_users and args.paired_max_users < len(examples):
                examples = random.Random(args.seed).sample(examples, args.paired_max_users)
            res = evaluate_examples(ranker, examples, args.max_history, args.num_beams, batch_size=32)
            per_user[name, split] = res["per_example"]
            logger.info("%s %s: NDCG@10 %.4f (%d users)", name, split, res["NDCG@10"], len(examples))
    base = named[0][0]
    rows = []
    for name, _ in named[1:]:
        for split in args.paired_splits:
            for metric in args.paired_metrics:
                diff = np.asarray(per_user[name, split][metric]) - np.asarray(per_user[base, split][metric])
                rows.append(paired_difference(diff, n_boot=args.n_boot, seed=args.seed, model=name,
                                              baseline=base, split=split, metric=metric))
    return rows


def paired_markdown(rows: list[dict]) -> list[str]:
    lines = [
        "| model - baseline | split | metric | users | mean difference [95% CI] | users better / worse |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} - {r['baseline']} | {r['split']} | {r['metric']} | {r['users']} | "
            f"{r['difference']:+.4f} [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}] | "
            f"{r['better_users']} / {r['worse_users']} |"
        )
    return lines


def write_rl_report(args: RLReportArgs) -> list[Path]:
    """Merge per-model ``eval.evaluate`` results into one report (``eval.report.write_metrics_report``),
    with paired differences when ``args.paired`` names the checkpoints."""
    from data_prep.io import read_json
    from eval.report import write_metrics_report

    results: dict[str, dict] = {}
    for path in args.inputs:
        for key, row in read_json(path)["results"].items():
            if key in results:
                raise ValueError(
                    f"{path}: row {key!r} already read from an earlier input; give each model a name"
                )
            results[key] = row
    meta: dict[str, Any] = {"inputs": list(args.inputs)}
    notes = list(args.notes)
    if args.paired:
        meta["paired_differences"] = rows = paired_differences(args)
        # one note block: the report separates notes, which would split the table
        notes.append("\n".join(["## paired differences (same users)", "", *paired_markdown(rows)]))
    return write_metrics_report(
        results, args.output, meta=meta, metrics=args.metrics, title=args.title, notes=notes
    )


if __name__ == "__main__":
    from trl import TrlParser

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    (report_args,) = TrlParser((RLReportArgs,)).parse_args_and_config()
    for written in write_rl_report(report_args):
        print(written)
