"""GRPO that stays inside the catalogue: constrained rollouts (sampled, or beam groups) and log-probs.

``SidGRPOTrainer``: ``GRPOTrainer`` whose transformers rollouts are constrained
(``rollout: sample``) or are the G distinct items of a constrained beam search
(``rollout: beam``, MiniOneRec), with ``beam_rank`` passed to the rewards
(``recipes.rewards``); log-probs under the constraint (``recipes.constrained_logps``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from transformers import LogitsProcessorList
from trl import GRPOTrainer

from recipes.constrained_logps import add_constrained_lm_head, disable_attention_dropout, lm_to_patch
from recipes.training import RankingEvalMixin
from sid_tokenizer.constrained import SidConstraint
from sid_tokenizer.sid import SidIndex

logger = logging.getLogger(__name__)

ROLLOUTS = ("sample", "beam")


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
            add_constrained_lm_head(lm_to_patch(self, self.model), self.constraint, self.temperature)
            if self.ref_model is not None:
                add_constrained_lm_head(lm_to_patch(self, self.ref_model), self.constraint, self.temperature)
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
