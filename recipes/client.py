"""Ask a running sidrec server for recommendations and render SIDs as item titles.

``SidRecClient``: chat / completion requests through the ``openai`` client with the constraint
switched on (``vllm_xargs``), answers parsed into ``Recommendation``s, and ``rank`` (the served
constrained top-K with scores, ``POST /v1/sid/rank``); ``CatalogueView`` maps SIDs to items and
reloads the checkpoint's catalogue when its files change (new items added with
``sid_tokenizer.new_items.add_items``, items deactivated with ``remove_items``). A reload that
fails keeps the last good catalogue (as the server does), so the client keeps answering while a
file is being fixed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sid_tokenizer.catalog import LiveCatalogue
from sid_tokenizer.prompts import sid_sequence_prompt

logger = logging.getLogger(__name__)


@dataclass
class Recommendation:
    """One recommended SID and the catalogue items behind it (several if SIDs collide)."""

    sid: str
    item_ids: list[int]
    raw_ids: list[str]
    titles: list[str]

    @property
    def valid(self) -> bool:
        return bool(self.item_ids)

    def render(self) -> str:
        if not self.valid:
            return f"{self.sid}  (not a catalogue item)"
        return f"{self.sid}  " + " | ".join(
            f"{t} [{r}]" for t, r in zip(self.titles, self.raw_ids, strict=True)
        )


class CatalogueView:
    """SID -> items lookup on a checkpoint's catalogue, reloaded when its files change; a broken
    reload keeps the last good catalogue (``reload_error`` says why)."""

    def __init__(self, checkpoint: str | Path) -> None:
        self.checkpoint = Path(checkpoint)
        self.live = LiveCatalogue(checkpoint)

    @property
    def catalogue(self):
        return self.live.value

    @property
    def reload_error(self) -> str | None:
        return self.live.error

    def refresh(self) -> None:
        self.live.refresh()

    @property
    def vocab(self):
        return self.catalogue.index.vocab

    def parse(self, text: str) -> list[Recommendation]:
        """Every SID in a completion, in order, with its items."""
        self.refresh()
        cat = self.catalogue
        out = []
        for codes in self.vocab.find_all(text):
            items = cat.index.sid_to_items.get(codes, [])
            out.append(
                Recommendation(
                    self.vocab.format(codes),
                    list(items),
                    [cat.raw_ids[i] for i in items],
                    [cat.titles[i] for i in items],
                )
            )
        return out

    def sid_of(self, raw_id: str) -> str:
        self.refresh()
        try:
            return self.catalogue.index.sid(self.catalogue.raw_ids.index(raw_id))
        except ValueError:
            raise KeyError(
                f"item {raw_id!r} is not in {self.checkpoint / 'sidrec' / 'items.jsonl'}"
            ) from None


def sid_xargs(
    count: int = 1,
    items: Sequence[str] | str | None = None,
    category: str | None = None,
    exclude: Sequence[str] | str | None = None,
    exclude_seen: bool = False,
    ranked: bool = False,
) -> dict[str, Any]:
    """The ``vllm_xargs`` that switch the SID constraint on (with the request's filter);
    ``ranked``: the answer is the constrained beam-search top-``count`` (``sid_rank``)."""
    xargs: dict[str, Any] = {"sid_constrained": 1, "sid_count": count}
    xargs.update(sid_filter(items, category, exclude, exclude_seen))
    if ranked:
        xargs["sid_rank"] = 1
    return xargs


def sid_filter(
    items: Sequence[str] | str | None = None,
    category: str | None = None,
    exclude: Sequence[str] | str | None = None,
    exclude_seen: bool = False,
) -> dict[str, Any]:
    """Filter keys shared by ``vllm_xargs`` and the ``/v1/sid/rank`` body."""
    out: dict[str, Any] = {}
    if items is not None:
        out["sid_items"] = items if isinstance(items, str) else [str(i) for i in items]
    if category is not None:
        out["sid_category"] = category
    if exclude is not None:
        out["sid_exclude"] = exclude if isinstance(exclude, str) else [str(i) for i in exclude]
    if exclude_seen:
        out["sid_exclude_seen"] = 1
    return out


@dataclass
class RankedItem:
    """One entry of a served ranking: a SID, its score (summed log-probabilities) and its items."""

    rank: int
    sid: str
    score: float
    item_ids: list[int]
    raw_ids: list[str]
    titles: list[str]


class SidRecClient:
    """Recommendations from a running server: chat or raw-completion prompts, constraint on."""

    def __init__(
        self,
        base_url: str,
        checkpoint: str | Path,
        model: str | None = None,
        api_key: str = "EMPTY",
        timeout: float = 120,
    ) -> None:
        from openai import OpenAI

        self.openai = OpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=0)
        self.view = CatalogueView(checkpoint)
        self.model = model or self.openai.models.list().data[0].id

    def rank_raw(self, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /v1/sid/rank`` with this body; the JSON answer (``openai.APIStatusError`` on 4xx/5xx)."""
        import httpx

        return self.openai.post(
            "/sid/rank", body={"model": self.model, **body}, cast_to=httpx.Response
        ).json()

    def rank(
        self,
        history: Sequence[str] | None = None,
        prompt: str | list[dict] | None = None,
        k: int = 20,
        items: Sequence[str] | str | None = None,
        category: str | None = None,
        exclude: Sequence[str] | str | None = None,
        exclude_seen: bool = False,
        max_history: int = 20,
    ) -> list[RankedItem]:
        """The served constrained top-``k`` (best first, with scores): for a history of raw item ids
        (the seq2seq prompt evaluation ranks), a raw prompt string, or chat messages."""
        if (history is None) == (prompt is None):
            raise ValueError("give history or prompt")
        body: dict[str, Any] = {"k": k, **sid_filter(items, category, exclude, exclude_seen)}
        if history is not None:
            body.update(history=[str(r) for r in history], max_history=max_history)
        elif isinstance(prompt, str):
            body["prompt"] = prompt
        else:
            body["messages"] = prompt
        return [RankedItem(**it) for it in self.rank_raw(body)["items"]]

    def _max_tokens(self, count: int) -> int:
        return count * self.view.vocab.num_levels + 1

    def chat(
        self,
        prompt: str | list[dict],
        count: int = 1,
        n: int = 1,
        items: Sequence[str] | str | None = None,
        category: str | None = None,
        temperature: float = 0.0,
        seed: int | None = None,
        exclude: Sequence[str] | str | None = None,
        exclude_seen: bool = False,
        ranked: bool = False,
    ) -> list[list[Recommendation]]:
        """One list of ``count`` distinct recommendations per returned choice (``n`` choices).

        ``prompt``: the user's message or a full message list. HTTP errors surface as
        ``openai.BadRequestError`` (400: bad arguments, SIDs in the prompt that are not items).
        """
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        resp = self.openai.chat.completions.create(
            model=self.model,
            messages=messages,
            n=n,
            temperature=temperature,
            seed=seed,
            max_tokens=self._max_tokens(count),
            extra_body={"vllm_xargs": sid_xargs(count, items, category, exclude, exclude_seen, ranked)},
        )
        return [self.view.parse(c.message.content or "") for c in resp.choices]

    def complete(
        self,
        history: Sequence[str],
        count: int = 1,
        n: int = 1,
        items: Sequence[str] | str | None = None,
        category: str | None = None,
        temperature: float = 0.0,
        max_history: int = 20,
        seed: int | None = None,
        exclude: Sequence[str] | str | None = None,
        exclude_seen: bool = False,
        ranked: bool = False,
    ) -> list[list[Recommendation]]:
        """Next items after a history of raw item ids, with the raw seq2seq prompt (``<|rec|>`` + SIDs)."""
        prompt = sid_sequence_prompt([self.view.sid_of(str(r)) for r in list(history)[-max_history:]])
        resp = self.openai.completions.create(
            model=self.model,
            prompt=prompt,
            n=n,
            temperature=temperature,
            seed=seed,
            max_tokens=self._max_tokens(count),
            extra_body={"vllm_xargs": sid_xargs(count, items, category, exclude, exclude_seen, ranked)},
        )
        return [self.view.parse(c.text or "") for c in resp.choices]


def render(recs: Sequence[Recommendation]) -> str:
    return "\n".join(f"{i + 1}. {r.render()}" for i, r in enumerate(recs))
