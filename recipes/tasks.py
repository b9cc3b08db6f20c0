"""Instruction tasks: a registry of builders that turn a dataset + SID index into training rows.

Every row is ``{"task", "messages", "prompt", "completion"}``: ``prompt``/``completion`` are
the exact strings that get tokenised (loss on the completion only); ``messages`` keeps the
chat form for reading and for chat-template-based consumers (empty for the raw seq2seq task).

Tasks (LC-Rec / MiniOneRec families):
- ``seq2seq``: raw one-pass format ``<|rec|><sid_1><sid_2>...<sid_n>``, loss on every item
  after the first: one causal pass equals sliding-window augmentation over every prefix
  (GRID) at O(L) instead of O(L * min(L, H)) tokens (H = max_history; benchmarks/training_throughput.py).
- ``seq2seq_chat``: the same prediction in chat form (history SIDs -> next SID), one random
  prefix per sequence; this is what chat users of the served model send.
- ``sid2title`` / ``title2sid``: explicit SID <-> text alignment, one row per catalogue item.
- ``title_history2sid`` / ``sid_history2title``: implicit alignment over histories.
- ``intent2sid``: a need phrased from the target item's own text (category, title keywords).

Weights (``TaskMixture``) are rows per source unit: 1.0 = one pass over the sequences (or
the items), 0.5 = a random half, 2.0 = two passes with fresh random prompts/prefixes.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from data_prep.dataset import Example, RecDataset
from sid_tokenizer.prompts import PROMPTS, seq2seq_prompt
from sid_tokenizer.sid import SidIndex

_STOP = set(
    "a an and the of for with to in on by from at or as is are be this that it its x "
    "inch inches pack count set pcs piece pieces new 1 2 3 4 5 6 8 10 12".split()
)


@dataclass
class TaskContext:
    dataset: RecDataset
    index: SidIndex
    sequences: list[list[int]]  # training sequences (never contain valid/test targets of the split)
    rng: random.Random
    max_history: int = 20
    max_title_chars: int = 80


def _title(ctx: TaskContext, item: int) -> str:
    t = ctx.dataset.items[item].title or f"item {ctx.dataset.items[item].raw_id}"
    return t if len(t) <= ctx.max_title_chars else t[: ctx.max_title_chars].rsplit(" ", 1)[0] + "..."


def _sids(ctx: TaskContext, items: list[int], sep: str = ", ") -> str:
    return sep.join(ctx.index.sid(i) for i in items)


def _chat(task: str, ctx: TaskContext, answer: str, **fields: str) -> dict:
    user = ctx.rng.choice(PROMPTS[task]).format(**fields)
    return {
        "task": task,
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
    }


def _sample(units: list, weight: float, rng: random.Random) -> list:
    """Repeat ``units`` floor(weight) times plus a random fraction (weight % 1)."""
    whole, frac = int(weight), weight - int(weight)
    out = [u for _ in range(whole) for u in units]
    if frac > 0:
        out += rng.sample(units, round(frac * len(units)))
    return out


def _random_prefix(ctx: TaskContext, seq: list[int]) -> tuple[list[int], int]:
    t = ctx.rng.randrange(1, len(seq))
    return seq[max(0, t - ctx.max_history) : t], seq[t]


def build_seq2seq(ctx: TaskContext, weight: float) -> list[dict]:
    """Chunks of at most ``max_history`` targets; each chunk is preceded by up to
    ``max_history`` context items (prompt, no loss), so every target sees a history of at
    least min(position, max_history) items, as with sliding windows."""
    rows = []
    seqs = [s for s in ctx.sequences if len(s) >= 2]
    for seq in _sample(seqs, weight, ctx.rng):
        for start in range(1, len(seq), ctx.max_history):
            context = seq[max(0, start - ctx.max_history) : start]
            targets = seq[start : start + ctx.max_history]
            rows.append(
                {
                    "task": "seq2seq",
                    "messages": [],
                    "prompt": seq2seq_prompt(ctx.index, context, ctx.max_history),
                    "completion": "".join(ctx.index.sid(i) for i in targets),
                }
            )
    return rows


def build_seq2seq_chat(ctx: TaskContext, weight: float) -> list[dict]:
    rows = []
    for seq in _sample([s for s in ctx.sequences if len(s) >= 2], weight, ctx.rng):
        hist, target = _random_prefix(ctx, seq)
        rows.append(_chat("seq2seq_chat", ctx, ctx.index.sid(target), history=_sids(ctx, hist)))
    return rows


def build_sid2title(ctx: TaskContext, weight: float) -> list[dict]:
    items = [it.item_id for it in ctx.dataset.items if it.title]
    return [
        _chat("sid2title", ctx, _title(ctx, i), sid=ctx.index.sid(i)) for i in _sample(items, weight, ctx.rng)
    ]


def build_title2sid(ctx: TaskContext, weight: float) -> list[dict]:
    items = [it.item_id for it in ctx.dataset.items if it.title]
    return [
        _chat("title2sid", ctx, ctx.index.sid(i), title=_title(ctx, i))
        for i in _sample(items, weight, ctx.rng)
    ]


def build_title_history2sid(ctx: TaskContext, weight: float) -> list[dict]:
    rows = []
    for seq in _sample([s for s in ctx.sequences if len(s) >= 2], weight, ctx.rng):
        hist, target = _random_prefix(ctx, seq)
        hist = hist[-5:]  # titles are long: the last few carry the intent
        titles = ", ".join(f'"{_title(ctx, i)}"' for i in hist)
        rows.append(_chat("title_history2sid", ctx, ctx.index.sid(target), titles=titles))
    return rows


def build_sid_history2title(ctx: TaskContext, weight: float) -> list[dict]:
    rows = []
    for seq in _sample([s for s in ctx.sequences if len(s) >= 2], weight, ctx.rng):
        hist, target = _random_prefix(ctx, seq)
        rows.append(_chat("sid_history2title", ctx, _title(ctx, target), history=_sids(ctx, hist)))
    return rows


def item_intent(dataset: RecDataset, item: int, rng: random.Random) -> str:
    """A need derived from the item's own text: its leaf category plus title keywords."""
    it = dataset.items[item]
    cat = it.categories[-1].lower() if it.categories else ""
    words = [w for w in re.findall(r"[A-Za-z][A-Za-z\-]+", it.title.lower()) if w not in _STOP and len(w) > 2]
    keywords = list(dict.fromkeys(words))[:6]
    rng.shuffle(keywords)
    kw = " ".join(keywords[:3])
    if cat and kw:
        return f"{cat}, something like {kw}"
    return cat or kw or "something useful"


def build_intent2sid(ctx: TaskContext, weight: float) -> list[dict]:
    items = [it.item_id for it in ctx.dataset.items if it.title]
    return [
        _chat("intent2sid", ctx, ctx.index.sid(i), intent=item_intent(ctx.dataset, i, ctx.rng))
        for i in _sample(items, weight, ctx.rng)
    ]


TASKS: dict[str, Callable[[TaskContext, float], list[dict]]] = {
    "seq2seq": build_seq2seq,
    "seq2seq_chat": build_seq2seq_chat,
    "sid2title": build_sid2title,
    "title2sid": build_title2sid,
    "title_history2sid": build_title_history2sid,
    "sid_history2title": build_sid_history2title,
    "intent2sid": build_intent2sid,
}
TEXT_TASKS = {"sid2title", "title2sid", "title_history2sid", "sid_history2title", "intent2sid"}


def training_sequences(dataset: RecDataset, include_valid: bool) -> list[list[int]]:
    """Training sequences; with ``include_valid`` each ends with its validation target
    (for the final model evaluated on test, once checkpoint selection is done)."""
    if not include_valid:
        return [list(s) for s in dataset.train]
    valid = {e.user_id: e for e in dataset.valid}
    out = []
    for u, s in enumerate(dataset.train):
        e = valid.get(u)
        out.append(list(s) + [e.target] if e is not None else list(s))
    return out


def build_mixture(
    dataset: RecDataset,
    index: SidIndex,
    weights: dict[str, float],
    tokenizer,
    seed: int = 0,
    max_history: int = 20,
    include_valid: bool = False,
) -> list[dict]:
    """All rows of the weighted task mixture, with ``prompt``/``completion`` rendered for ``tokenizer``."""
    unknown = set(weights) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown task(s) {sorted(unknown)}; registered: {sorted(TASKS)}")
    has_text = any(it.title for it in dataset.items)
    ctx = TaskContext(
        dataset,
        index,
        training_sequences(dataset, include_valid),
        random.Random(seed),
        max_history=max_history,
    )
    rows: list[dict] = []
    for task, w in weights.items():
        if w <= 0 or (task in TEXT_TASKS and not has_text):
            continue
        rows.extend(TASKS[task](ctx, w))
    chat = sorted({r["task"] for r in rows if r["messages"]})
    if chat and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"tokenizer of {getattr(tokenizer, 'name_or_path', None) or 'the model'} has no chat template, "
            f"but tasks {chat} are chat tasks: use a chat model's tokenizer, set chat_template: chatml "
            "(or a .jinja file) in the SFT recipe, or keep to the raw seq2seq task"
        )
    for r in rows:
        if r["messages"]:
            r["prompt"] = tokenizer.apply_chat_template(
                r["messages"][:-1], tokenize=False, add_generation_prompt=True
            )
            r["completion"] = r["messages"][-1]["content"] + tokenizer.eos_token
    ctx.rng.shuffle(rows)
    return rows


def eval_rows(
    dataset: RecDataset, index: SidIndex, examples: list[Example], max_history: int = 20
) -> list[dict]:
    """Raw seq2seq rows for held-out examples (history -> target), for the eval loss."""
    return [
        {
            "task": "seq2seq",
            "messages": [],
            "prompt": seq2seq_prompt(index, e.history, max_history),
            "completion": index.sid(e.target),
        }
        for e in examples
    ]


def tokenize_rows(rows: list[dict], tokenizer, max_length: int = 512) -> dict[str, list]:
    """Rows -> columns ``input_ids`` and ``labels`` (-100 on the prompt), truncated from the left
    of the prompt so the completion is always kept."""
    prompts = tokenizer([r["prompt"] for r in rows], add_special_tokens=False)["input_ids"]
    completions = tokenizer([r["completion"] for r in rows], add_special_tokens=False)["input_ids"]
    input_ids, labels = [], []
    for p, c in zip(prompts, completions, strict=True):
        c = c[:max_length]
        p = p[-(max_length - len(c)) :] if max_length - len(c) > 0 else []
        input_ids.append(p + c)
        labels.append([-100] * len(p) + c)
    return {"task": [r["task"] for r in rows], "input_ids": input_ids, "labels": labels}
