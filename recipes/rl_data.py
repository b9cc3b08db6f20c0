"""RL prompt rows: a user's history -> the next item, as the prompt the evaluation ranks with.

Rows are ``{"prompt", "target_item", "history"}``; ``prompt`` is the raw seq2seq text or a chat
message list (``sid_tokenizer.prompts.history_prompt``).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from data_prep.dataset import Example, RecDataset
from sid_tokenizer.prompts import history_prompt
from sid_tokenizer.sid import SidIndex


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
                "prompt": history_prompt(index, history, max_history, prompt_format),
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
            "prompt": history_prompt(index, e.history, max_history, prompt_format),
            "target_item": e.target,
            "history": list(e.history)[-max_history:],
        }
        for e in examples
    ]


def rl_rows(index: SidIndex, dataset: RecDataset, args) -> tuple[list[dict], list[dict]]:
    """Train rows (prefixes of training sequences) and eval rows (validation users) for an RL run;
    ``args``: ``recipes.args.RLScriptArgs``."""
    train = rl_prompt_rows(
        index,
        dataset.train,
        args.num_train_prompts,
        args.max_history,
        args.prefix_sampling,
        args.prompt_format,
        seed=args.seed_data,
    )
    return train, example_rows(
        index, dataset.valid[: args.eval_prompts], args.max_history, args.prompt_format
    )
