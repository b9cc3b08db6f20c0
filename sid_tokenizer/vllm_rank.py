"""Served top-K ranking: the constrained beam search of evaluation, on the API server's own engine.

``POST /v1/sid/rank`` is answered inside the ``sid_prompt_guard`` middleware (the same
``--middleware`` that validates chat/completion requests), so it runs in the api_server process
next to the OpenAI endpoints and drives the same ``EngineClient`` they use. It returns the
``k`` best distinct catalogue SIDs for one prompt, each with its score (summed
log-probabilities of its tokens), best first: the list ``eval.generate.SidRanker`` ranks
offline for the same prompt.

Why a route and not vLLM's ``use_beam_search``: vLLM's beam search sends one-token requests
without ``extra_args`` and scores them with log-probs taken before logits processors, so no
processor can constrain it (vLLM issue #21546). Here every level ``d = 0..L-1`` sends, for each
live beam, one request ``prompt + beam prefix`` with ``max_tokens=1`` and
``logprob_token_ids`` = the trie children that the request's filter allows
(``SidMasker.allowed``, the code the logits processor masks with). The engine reports the
model's full-vocabulary log-probabilities of exactly those tokens (raw log-probs, the default
``logprobs_mode``, unaffected by other requests in the batch), which is what
``eval.generate.sid_beam_search`` adds up. Children beyond vLLM's 128 ids per request go in
further requests on the same prefix (prefix caching makes them cheap).

Request body (JSON)::

    {"prompt": "<|rec|><a_1><b_2><c_3>..."}      raw completion prompt, as eval builds it, or
    {"messages": [{"role": "user", "content": ...}]}   chat prompt (the model's chat template), or
    {"history": ["raw_id", ...]}                  the seq2seq prompt of these items (last max_history)
    "k": 20                                        items to return (1..MAX_RANK_K)
    "sid_items": [...], "sid_category": "...",     the vllm_xargs filters (allow-list, category),
    "sid_exclude": [...], "sid_exclude_seen": 0|1  blocklist, drop the SIDs the prompt mentions

Answer: ``{"object": "sid.ranking", "k": .., "items": [{"rank", "sid", "score", "item_ids",
"raw_ids", "titles"}, ...]}``; fewer than ``k`` items when the filter leaves fewer.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sid_tokenizer.vllm_processor import (
    RANK_ROUTE,
    ServingCatalogue,
    SidMasker,
    SidRequest,
    frontend_catalogue,
    frontend_masker,
    parse_sid_args,
)

logger = logging.getLogger(__name__)

MAX_RANK_K = 100
DEFAULT_RANK_K = 20
try:  # vLLM's limit on SamplingParams.logprob_token_ids
    from vllm.sampling_params import MAX_LOGPROB_TOKEN_IDS
except ImportError:  # pragma: no cover - older vLLM
    MAX_LOGPROB_TOKEN_IDS = 128
_RANK_KEYS = {"model", "prompt", "messages", "history", "k", "max_history", "user"}


@dataclass
class RankedSid:
    codes: tuple[int, ...]
    score: float


@dataclass
class RankQuery:
    """A parsed ``/v1/sid/rank`` body: prompt token ids, k and the SID filter."""

    prompt_ids: list[int]
    k: int
    req: SidRequest


def parse_rank_body(body: Any, catalogue: ServingCatalogue, tokenizer) -> RankQuery:
    """Validate a ranking request body; ValueError naming the field for anything wrong."""
    from sid_tokenizer.prompts import prompt_text, sid_sequence_prompt

    if not isinstance(body, dict):
        raise ValueError("the request body must be a JSON object")
    sid_keys = {k: v for k, v in body.items() if k.lower().startswith("sid")}
    unknown = sorted(set(body) - _RANK_KEYS - set(sid_keys))
    if unknown:
        raise ValueError(
            f"unknown field(s) {unknown} for {RANK_ROUTE}; expected some of "
            f"{sorted(_RANK_KEYS)} and sid_items / sid_category / sid_exclude / sid_exclude_seen"
        )
    bad = sorted(set(sid_keys) & {"sid_constrained", "sid_count", "sid_prefix_len", "sid_logprobs"})
    if bad:
        raise ValueError(f"{bad} are not ranking options (use k for the number of items)")
    k = body.get("k", DEFAULT_RANK_K)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_RANK_K:
        raise ValueError(f"k must be an integer in [1, {MAX_RANK_K}], got {k!r}")
    req = parse_sid_args({"sid_constrained": 1, **sid_keys})
    given = [f for f in ("prompt", "messages", "history") if body.get(f) is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of prompt, messages, history (got {given or 'none'})")
    if "prompt" in given:
        prompt = body["prompt"]
        if isinstance(prompt, str):
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        elif (
            isinstance(prompt, list)
            and prompt
            and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
        ):
            ids = list(prompt)
        else:
            raise ValueError("prompt must be a string or a non-empty list of token ids")
    elif "messages" in given:
        msgs = body["messages"]
        if (
            not isinstance(msgs, list)
            or not msgs
            or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs
            )
        ):
            raise ValueError(
                "messages must be a non-empty list of {role, content} objects with string content"
            )
        ids = tokenizer(prompt_text(msgs, tokenizer), add_special_tokens=False)["input_ids"]
    else:
        hist = body["history"]
        max_history = body.get("max_history", 20)
        if isinstance(max_history, bool) or not isinstance(max_history, int) or max_history < 1:
            raise ValueError(f"max_history must be a positive integer, got {max_history!r}")
        if not isinstance(hist, list) or not all(
            isinstance(r, str | int) and not isinstance(r, bool) for r in hist
        ):
            raise ValueError("history must be a list of raw item ids")
        missing = [str(r) for r in hist if str(r) not in catalogue.item_of_raw]
        if missing:
            raise ValueError(
                f"history: unknown item id(s) {missing[:5]} (raw_id column of {catalogue.dir / 'items.jsonl'})"
            )
        sids = [catalogue.index.sid(catalogue.item_of_raw[str(r)]) for r in hist[-max_history:]]
        ids = tokenizer(sid_sequence_prompt(sids), add_special_tokens=False)["input_ids"]
    vocab_size = len(tokenizer)
    if any(t < 0 or t >= vocab_size for t in ids):
        raise ValueError(f"prompt token ids must be in [0, {vocab_size})")
    return RankQuery(list(ids), k, req)


async def _logprobs_of(
    engine, prompt_ids: list[int], token_ids: list[int], request_id: str
) -> dict[int, float]:
    """The model's log-probabilities of ``token_ids`` as the next token after ``prompt_ids``."""
    from vllm import SamplingParams
    from vllm.inputs.engine import tokens_input

    params = SamplingParams(
        max_tokens=1,
        temperature=0.0,
        logprob_token_ids=token_ids,
        detokenize=False,
        skip_special_tokens=False,
    )
    final = None
    async for out in engine.generate(tokens_input(prompt_ids), params, request_id):
        final = out
    comp = final.outputs[0] if final is not None and final.outputs else None
    if comp is None or comp.finish_reason == "error" or not comp.logprobs:
        raise RuntimeError(f"the engine returned no log-probabilities for ranking request {request_id}")
    wanted = set(token_ids)
    return {int(t): float(lp.logprob) for t, lp in comp.logprobs[0].items() if int(t) in wanted}


async def constrained_beam_search(
    engine,
    masker: SidMasker,
    prompt_ids: list[int],
    k: int,
    req: SidRequest,
    banned: np.ndarray | None = None,
) -> list[RankedSid]:
    """Top ``k`` distinct SIDs for one prompt under ``req``'s filter, best first.

    The search of ``eval.generate.sid_beam_search``: at each level every beam is extended by
    its allowed children, candidates are scored by summed log-probabilities, the ``k`` best
    survive (ties broken by beam, then token id). ``banned``: (n, L) SID codes never returned.
    """
    L = masker.num_levels
    rid = f"sidrank-{uuid.uuid4().hex}"
    beams: list[tuple[tuple[int, ...], float]] = [((), 0.0)]
    for d in range(L):
        gen = [list(prefix) for prefix, _ in beams]
        rows, toks, _ = masker.allowed([req] * len(beams), gen, banned=[banned] * len(beams))
        jobs: list[tuple[int, list[int]]] = []
        for b in range(len(beams)):
            children = toks[rows == b].tolist()
            for s in range(0, len(children), MAX_LOGPROB_TOKEN_IDS):
                jobs.append((b, children[s : s + MAX_LOGPROB_TOKEN_IDS]))
        if not jobs:
            return []
        results = await asyncio.gather(
            *(
                _logprobs_of(engine, prompt_ids + list(beams[b][0]), chunk, f"{rid}-{d}-{j}")
                for j, (b, chunk) in enumerate(jobs)
            )
        )
        cands: list[tuple[float, int, int]] = []
        for (b, chunk), lps in zip(jobs, results, strict=True):
            base = beams[b][1]
            for tok in chunk:
                v = lps.get(tok)
                if v is not None and np.isfinite(v):
                    cands.append((base + v, b, tok))
        cands.sort(key=lambda c: (-c[0], c[1], c[2]))
        beams = [(beams[b][0] + (tok,), s) for s, b, tok in cands[:k]]
    codes = masker.codes_of(np.asarray([b[0] for b in beams], dtype=np.int64).reshape(len(beams), L))
    return [RankedSid(tuple(int(c) for c in row), s) for row, (_, s) in zip(codes, beams, strict=True)]


def ranking_json(catalogue: ServingCatalogue, ranked: Sequence[RankedSid], k: int, req: SidRequest) -> dict:
    """The answer body: each SID with its items (inactive and excluded items left out)."""
    vocab = catalogue.index.vocab
    out = []
    for r, item in enumerate(ranked):
        ids = catalogue.items_of_sid(item.codes, req)
        out.append(
            {
                "rank": r + 1,
                "sid": vocab.format(item.codes),
                "score": item.score,
                "item_ids": ids,
                "raw_ids": [catalogue.raw_ids[i] for i in ids],
                "titles": [catalogue.titles[i] for i in ids],
            }
        )
    return {"object": "sid.ranking", "k": k, "items": out}


async def handle_rank(request, body: Any):
    """Answer ``POST /v1/sid/rank`` (called by ``sid_prompt_guard``); 400 for bad bodies."""
    from starlette.responses import JSONResponse

    from sid_tokenizer.vllm_processor import _bad_request, prompt_problems

    catalogue = frontend_catalogue()
    masker = frontend_masker()
    if catalogue is None or masker is None:
        return _bad_request("this server has no sidrec catalogue (SIDREC_CHECKPOINT)", None)
    engine = getattr(request.app.state, "engine_client", None)
    if engine is None:
        return _bad_request("this server has no engine to rank with", None)
    model = body.get("model") if isinstance(body, dict) else None
    args = getattr(request.app.state, "args", None)
    names = (getattr(args, "served_model_name", None) or [getattr(args, "model", None)]) if args else []
    if model is not None and names and model not in names:
        return JSONResponse(
            status_code=404,
            content={"error": {"message": f"The model `{model}` does not exist.", "type": "NotFoundError",
                               "param": "model", "code": 404}},
        )  # fmt: skip
    try:
        query = parse_rank_body(body, catalogue, masker.tokenizer)
        problem = prompt_problems(query.prompt_ids, catalogue, masker)
        if problem:
            return _bad_request(problem, "prompt")
        banned = catalogue.banned_codes(query.req, masker.sids_in_tokens(query.prompt_ids))
        catalogue.check(query.req, banned)
        config = getattr(request.app.state, "vllm_config", None)
        max_len = getattr(getattr(config, "model_config", None), "max_model_len", None)
        if max_len is not None and len(query.prompt_ids) + masker.num_levels > max_len:
            raise ValueError(
                f"the prompt has {len(query.prompt_ids)} tokens; with a SID of {masker.num_levels} tokens "
                f"that exceeds the model's maximum context length {max_len}"
            )
        ranked = await constrained_beam_search(engine, masker, query.prompt_ids, query.k, query.req, banned)
    except ValueError as e:  # our checks, and the engine's own input validation
        return _bad_request(str(e), None)
    return JSONResponse(
        {**ranking_json(catalogue, ranked, query.k, query.req), "prompt_tokens": len(query.prompt_ids)}
    )


async def handle_openai_rank(request, body: dict, req: SidRequest, chat: bool):
    """``vllm_xargs: {sid_constrained: 1, sid_rank: 1, sid_count: K}`` on ``/v1/chat/completions``
    or ``/v1/completions`` (called by ``sid_prompt_guard`` after its checks): the answer of an
    OpenAI request whose one choice is the constrained beam-search top-K, best first (the list
    ``/v1/sid/rank`` returns), plus ``sid_ranking`` with each SID's score and items. Sampling
    options do not apply (the ranking is deterministic); ``n`` > 1 and ``stream`` are refused."""
    import time as _time

    from starlette.responses import JSONResponse

    from sid_tokenizer.vllm_processor import _bad_request, _truthy

    if _truthy(body.get("stream")):
        return _bad_request("vllm_xargs.sid_rank answers in one piece: stream must be false", "stream")
    if body.get("n") not in (None, 1):
        return _bad_request("vllm_xargs.sid_rank returns one ranked list: n must be 1", "n")
    rank_body: dict[str, Any] = {"k": req.count, "model": body.get("model")}
    for key, value in (
        ("sid_items", req.items),
        ("sid_category", req.category),
        ("sid_exclude", req.exclude),
    ):
        if value is not None:
            rank_body[key] = list(value) if isinstance(value, tuple) else value
    if req.exclude_seen:
        rank_body["sid_exclude_seen"] = 1
    if chat:
        rank_body["messages"] = body.get("messages")
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and not isinstance(prompt[0], int):
            prompt = prompt[0]  # one prompt in a list
        rank_body["prompt"] = prompt
    resp = await handle_rank(request, rank_body)
    if resp.status_code != 200:
        return resp
    import json as _json

    ranking = _json.loads(resp.body)
    text = "".join(it["sid"] for it in ranking["items"])
    catalogue = frontend_catalogue()
    L = catalogue.num_levels if catalogue is not None else 0
    choice: dict[str, Any] = {"index": 0, "finish_reason": "stop", "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return JSONResponse(
        {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-sidrank-{uuid.uuid4().hex}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(_time.time()),
            "model": body.get("model"),
            "choices": [choice],
            "usage": {"prompt_tokens": ranking["prompt_tokens"], "completion_tokens": len(ranking["items"]) * L,
                      "total_tokens": ranking["prompt_tokens"] + len(ranking["items"]) * L},
            "sid_ranking": ranking["items"],
        }
    )  # fmt: skip
