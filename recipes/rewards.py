"""Rule-based rewards for RL on Semantic IDs: plain functions in a registry.

Every reward has TRL's GRPO signature ``f(prompts, completions, completion_ids, **kw) -> list[float]``
(one value per completion) where ``kw`` holds the dataset's extra columns, one value per
completion. The RL prompts (``recipes.rl_data.rl_prompt_rows``) carry ``target_item`` (the true next
item id) and ``history`` (item ids); beam rollouts add ``beam_rank`` (1 = the model's best beam).
The catalogue is bound once per run with ``bind_rewards``; YAML recipes pick and weight them::

    reward_funcs: [exact, rank]      # names in REWARDS
    reward_weights: [1.0, 1.0]       # GRPOConfig field

Completions are parsed from the decoded text: SID tokens are normal added tokens, so they
survive ``skip_special_tokens=True`` (chat completions are message lists; their last
``content`` is parsed). Whitespace between SID tokens is ignored; anything else makes the
completion invalid (it then earns 0 from ``exact``/``prefix``/``validity``).

- ``exact``: item-level hit, the metric's rule: 1/G if the target is among the G items sharing
  the completion's SID, else 0.
- ``prefix``: hierarchical partial credit, the share of SID levels that match the target's
  from the first level on (``<a_1><b_2><c_9>`` vs ``<a_1><b_2><c_3>`` -> 2/3).
- ``rank``: MiniOneRec's rank-aware penalty for beam groups: in a group that contains the
  target, a wrong item at beam rank r gets ``-(1/log2(r+1)) / sum_{j=1..G} 1/log2(j+1)`` and the
  hit gets 0; groups without the target get 0 everywhere. Use it with ``exact``.
- ``validity``: 1 if the completion parses as a catalogue SID, else 0.
- ``collaborative``: the completion item's score percentile under a sequential recommender
  (SASRec, ``RewardContext.item_scorer``) given the history: 1 = its top item, 0 = its last.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from data_prep.dataset import RecDataset
from sid_tokenizer.sid import LEVEL_PREFIXES, SidIndex

_TOKEN = re.compile(r"<([a-z])_(\d+)>")

RewardFunc = Callable[..., list[float | None]]


@dataclass
class RewardContext:
    """What rewards need to know about the catalogue.

    item_scorer: histories (lists of item ids) -> float array (len(histories), num_items) of
    scores (higher = more likely next); only ``collaborative`` uses it.
    """

    index: SidIndex
    item_scorer: Callable[[list[list[int]]], np.ndarray] | None = None


def completion_text(completion: Any) -> str:
    """A plain-text completion, or the content of the last message of a chat completion."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list | tuple) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return str(completion)


def parse_sid(text: str, index: SidIndex) -> tuple[int, ...] | None:
    """SID codes of a completion if it is exactly one well-formed SID (whitespace between tokens
    allowed), else None. Catalogue membership is not checked here (see ``catalogue_items``)."""
    text = text.strip()
    tokens = _TOKEN.findall(text)
    if not tokens or re.sub(r"\s+", "", text) != "".join(f"<{p}_{c}>" for p, c in tokens):
        return None
    vocab = index.vocab
    if len(tokens) != vocab.num_levels:
        return None
    codes = []
    for lv, (prefix, code) in enumerate(tokens):
        if prefix != LEVEL_PREFIXES[lv] or int(code) >= vocab.level_sizes[lv]:
            return None
        codes.append(int(code))
    return tuple(codes)


def catalogue_items(completion: Any, index: SidIndex) -> list[int]:
    """Item ids sharing the completion's SID ([] if it is not a catalogue SID)."""
    codes = parse_sid(completion_text(completion), index)
    return index.sid_to_items.get(codes, []) if codes is not None else []


def _target_codes(index: SidIndex, target_item: int) -> tuple[int, ...]:
    return tuple(int(c) for c in index.codes[int(target_item)])


def exact_reward(
    completions: Sequence[Any], target_item: Sequence[int], ctx: RewardContext, **kwargs: Any
) -> list[float]:
    out = []
    for c, t in zip(completions, target_item, strict=True):
        items = catalogue_items(c, ctx.index)
        out.append(1.0 / len(items) if int(t) in items else 0.0)
    return out


def prefix_reward(
    completions: Sequence[Any], target_item: Sequence[int], ctx: RewardContext, **kwargs: Any
) -> list[float]:
    num_levels = ctx.index.vocab.num_levels
    out = []
    for c, t in zip(completions, target_item, strict=True):
        codes = parse_sid(completion_text(c), ctx.index)
        matched = 0
        if codes is not None:
            for a, b in zip(codes, _target_codes(ctx.index, t), strict=True):
                if a != b:
                    break
                matched += 1
        out.append(matched / num_levels)
    return out


def rank_penalties(group_size: int) -> list[float]:
    """Penalty of a wrong item at beam rank 1..G: -(1/log2(r+1)) normalised to sum to -1."""
    w = [1.0 / math.log2(r + 1) for r in range(1, group_size + 1)]
    total = sum(w)
    return [-x / total for x in w]


def beam_groups(beam_rank: Sequence[int]) -> list[range]:
    """Consecutive rows of one beam group: a group starts where ``beam_rank`` is 1."""
    starts = [i for i, r in enumerate(beam_rank) if int(r) == 1]
    if not starts or starts[0] != 0:
        raise ValueError(f"beam_rank must start each group with 1, got {list(beam_rank)[:8]}...")
    ends = starts[1:] + [len(beam_rank)]
    return [range(s, e) for s, e in zip(starts, ends, strict=True)]


def rank_reward(
    completions: Sequence[Any],
    target_item: Sequence[int],
    ctx: RewardContext,
    beam_rank: Sequence[int] | None = None,
    **kwargs: Any,
) -> list[float]:
    if beam_rank is None:
        raise ValueError("the 'rank' reward needs beam rollouts (rollout: beam), which pass beam_rank")
    out = [0.0] * len(completions)
    for group in beam_groups(beam_rank):
        hits = [int(target_item[i]) in catalogue_items(completions[i], ctx.index) for i in group]
        if not any(hits):
            continue  # no target in the group: no ranking signal (MiniOneRec)
        penalties = rank_penalties(len(group))
        for j, i in enumerate(group):
            out[i] = 0.0 if hits[j] else penalties[int(beam_rank[i]) - 1]
    return out


def validity_reward(completions: Sequence[Any], ctx: RewardContext, **kwargs: Any) -> list[float]:
    return [1.0 if catalogue_items(c, ctx.index) else 0.0 for c in completions]


def collaborative_reward(
    completions: Sequence[Any], history: Sequence[Sequence[int]], ctx: RewardContext, **kwargs: Any
) -> list[float | None]:
    if ctx.item_scorer is None:
        raise ValueError(
            "the 'collaborative' reward needs RewardContext.item_scorer (set collaborative_model)"
        )
    # rows of a group share their history: score each distinct history once
    keys = [tuple(int(i) for i in h) for h in history]
    distinct = list(dict.fromkeys(keys))
    scores = np.asarray(ctx.item_scorer([list(k) for k in distinct]), dtype=np.float64)
    row_of = {k: r for r, k in enumerate(distinct)}
    num_items = scores.shape[1]
    out: list[float | None] = []
    for c, k in zip(completions, keys, strict=True):
        items = catalogue_items(c, ctx.index)
        if not items:
            out.append(0.0)
            continue
        s = scores[row_of[k]]
        # percentile of the best item sharing the SID: 1.0 for the scorer's top item
        better = min(int((s > s[i]).sum()) for i in items)
        out.append(1.0 - better / max(num_items - 1, 1))
    return out


REWARDS: dict[str, RewardFunc] = {
    "exact": exact_reward,
    "prefix": prefix_reward,
    "rank": rank_reward,
    "validity": validity_reward,
    "collaborative": collaborative_reward,
}


class BoundReward:
    """A registry reward with the catalogue bound; ``__name__`` is the registry key, so TRL logs
    ``rewards/<key>/mean``. A module-level class, so it pickles (multiprocessing, checkpoints)."""

    def __init__(self, name: str, ctx: RewardContext) -> None:
        if name not in REWARDS:
            raise ValueError(f"unknown reward {name!r} in reward_funcs; choose from {sorted(REWARDS)}")
        self.__name__ = name
        self.ctx = ctx

    def __call__(self, *args: Any, **kwargs: Any) -> list[float | None]:
        return REWARDS[self.__name__](*args, ctx=self.ctx, **kwargs)


def bind_rewards(names: Sequence[str], ctx: RewardContext) -> list[BoundReward]:
    """Registry names (``reward_funcs`` in a recipe) -> reward callables over the catalogue ``ctx``."""
    return [BoundReward(name, ctx) for name in names]


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
