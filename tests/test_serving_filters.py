"""Exclusions, deactivated items and request-option checks of the SID processor and its guard,
on the synthetic catalogue of ``tests/test_vllm.py`` (fast: no engine, real tokenizer and files)."""

from __future__ import annotations

import asyncio
import json
import shutil

import numpy as np
import pytest

pytest.importorskip("vllm")

from sid_tokenizer.vllm_processor import (  # noqa: E402
    ENV_CHECKPOINT,
    ServingCatalogue,
    SidTrieLogitsProcessor,
    parse_sid_args,
)
from tests import test_vllm as tv  # noqa: E402
from tests.test_vllm import CODES, LEVELS, add, decode_sids, make_processor, params, run_greedy, update  # noqa: E402

mini_ckpt = tv.mini_ckpt  # the synthetic checkpoint fixture (weights-free), shared


@pytest.fixture(autouse=True)
def _catalogue_env(mini_ckpt, monkeypatch):
    """The processor and the guard find the catalogue through SIDREC_CHECKPOINT; an earlier test
    (eval.vllm_backend.load_vllm) may have left it pointing at another checkpoint."""
    monkeypatch.setenv(ENV_CHECKPOINT, str(mini_ckpt))


L = len(LEVELS)


def sid_tokens(proc, codes) -> list[int]:
    return [int(proc.masker.level_token_ids[lv][c]) for lv, c in enumerate(codes)]


def test_unknown_case_and_exclusion_arguments():
    with pytest.raises(ValueError, match=r"SID_COUNT.*lower case.*sid_count"):
        parse_sid_args({"sid_constrained": 1, "SID_COUNT": 3})
    with pytest.raises(ValueError, match="Sid_Items"):
        parse_sid_args({"sid_constrained": 1, "Sid_Items": "P01"})
    with pytest.raises(ValueError, match="sidcount"):
        parse_sid_args({"sid_constrained": 1, "sidcount": 2})
    with pytest.raises(ValueError, match="need sid_constrained"):
        parse_sid_args({"sid_exclude": "P01"})
    with pytest.raises(ValueError, match="sid_exclude"):
        parse_sid_args({"sid_constrained": 1, "sid_exclude": [True]})
    r = parse_sid_args({"sid_constrained": 1, "sid_exclude": "P02, P01", "sid_exclude_seen": "true"})
    assert r.exclude == ("P01", "P02") and r.exclude_seen
    assert parse_sid_args({"sid_constrained": 1, "sid_exclude": ""}).exclude is None
    assert parse_sid_args({"sid_constrained": 1, "sid_rank": 1, "sid_count": 5}).rank
    with pytest.raises(ValueError, match="need sid_constrained"):
        parse_sid_args({"sid_rank": 1})
    with pytest.raises(ValueError, match="sid_prefix_len must be 0"):
        parse_sid_args({"sid_constrained": 1, "sid_rank": 1, "sid_prefix_len": 1})


def test_sids_in_tokens_finds_whole_sids_only(mini_ckpt):
    proc = make_processor(mini_ckpt)
    a, b = sid_tokens(proc, CODES[1]), sid_tokens(proc, CODES[4])
    # text, a SID, a broken run (level 1 first), another SID, then a partial SID at the end
    toks = [5, 6] + a + [7] + a[1:] + b + [8] + b[:2]
    found = proc.masker.sids_in_tokens(toks).tolist()
    assert found == [list(CODES[1]), list(CODES[4])]
    assert proc.masker.sids_in_tokens([1, 2]).shape == (0, L)


def test_blocklist_and_seen_items_are_never_produced(mini_ckpt, monkeypatch):
    monkeypatch.setenv(ENV_CHECKPOINT, str(mini_ckpt))
    proc = make_processor(mini_ckpt)
    seen_prompt = [3] + sid_tokens(proc, CODES[0]) + [4] + sid_tokens(proc, CODES[4])
    outs = [[] for _ in range(3)]
    n_distinct = len(set(CODES))
    sps = [
        params(sid_constrained=1, sid_count=n_distinct - 2, sid_exclude="P01,P02"),
        params(sid_constrained=1, sid_count=n_distinct - 2, sid_exclude_seen=1),
        # P10 and P11 share a SID: blocking one of them keeps the SID (it is still P11)
        params(sid_constrained=1, sid_count=n_distinct, sid_exclude="P10"),
    ]
    update(proc, 3, added=[add(i, sp, seen_prompt, outs[i]) for i, sp in enumerate(sps)])
    run_greedy(proc, outs, steps=n_distinct * L + 1, seed=3)
    counts = [parse_sid_args(sp.extra_args).count for sp in sps]
    got = [decode_sids(proc, o[: c * L]) for o, c in zip(outs, counts, strict=True)]
    assert len(got[0]) == n_distinct - 2 and not {CODES[1], CODES[2]} & set(got[0])
    assert len(got[1]) == n_distinct - 2 and not {CODES[0], CODES[4]} & set(got[1])
    assert len(set(got[2])) == n_distinct and CODES[10] in got[2]
    for o, c in zip(outs, counts, strict=True):  # then EOS only
        assert o[c * L] == proc.eos_token_id
    # every item excluded -> the request is refused up front
    with pytest.raises(ValueError, match="exclusions leave only 0"):
        SidTrieLogitsProcessor.validate_params(
            params(sid_constrained=1, sid_items="P10,P11", sid_exclude="P10,P11")
        )
    with pytest.raises(ValueError, match="only 1"):
        SidTrieLogitsProcessor.validate_params(
            params(sid_constrained=1, sid_items="P00,P01", sid_exclude="P00", sid_count=2)
        )
    SidTrieLogitsProcessor.validate_params(params(sid_constrained=1, sid_exclude="NOT-AN-ITEM"))


def test_banned_codes_respect_collisions_and_filters(mini_ckpt):
    cat = ServingCatalogue(mini_ckpt, reload_seconds=0)
    req = parse_sid_args({"sid_constrained": 1, "sid_exclude": "P10"})
    assert cat.banned_codes(req) is None  # P11 still stands behind the shared SID
    req = parse_sid_args({"sid_constrained": 1, "sid_exclude": "P10", "sid_items": "P10,P00"})
    assert cat.banned_codes(req).tolist() == [list(CODES[10])]  # inside this allow-list it is P10's alone
    assert cat.items_of_sid(CODES[10], parse_sid_args({"sid_constrained": 1, "sid_exclude": "P10"})) == [11]


def test_deactivated_items_leave_serving_and_come_back(mini_ckpt, tmp_path, monkeypatch):
    from sid_tokenizer.new_items import remove_items, set_items_active

    ckpt = tmp_path / "ckpt"
    shutil.copytree(mini_ckpt, ckpt)
    monkeypatch.setenv(ENV_CHECKPOINT, str(ckpt))
    cat = ServingCatalogue(ckpt, reload_seconds=0)
    n = len(cat.full.trie)
    assert remove_items(ckpt, ["P03", "P08"]) == ["P03", "P08"]
    assert remove_items(ckpt, ["P03"]) == []  # already inactive: nothing changes
    assert cat.refresh()
    assert len(cat.full.trie) == n - 2 and not cat.full.trie.contains(np.asarray([CODES[3], CODES[8]])).any()
    rows = [json.loads(x) for x in (ckpt / "sidrec" / "items.jsonl").read_text().splitlines()]
    assert [r["raw_id"] for r in rows if r.get("active") is False] == ["P03", "P08"]
    assert json.loads((ckpt / "sidrec" / "meta.json").read_text())["num_active_items"] == len(CODES) - 2
    # an allow-list naming a removed item keeps the others; naming only removed items is a 400
    req = parse_sid_args({"sid_constrained": 1, "sid_items": "P03,P02"})
    assert len(cat.trie_for(req).trie) == 1
    with pytest.raises(ValueError, match="no active catalogue item"):
        cat.check(parse_sid_args({"sid_constrained": 1, "sid_items": "P03"}))
    proc = make_processor(ckpt)
    outs = [[]]
    update(proc, 1, added=[add(0, params(sid_constrained=1, sid_count=n - 2), None, outs[0])])
    run_greedy(proc, outs, steps=(n - 2) * L, seed=1)
    assert not {CODES[3], CODES[8]} & set(decode_sids(proc, outs[0]))
    with pytest.raises(ValueError, match="unknown item id"):
        remove_items(ckpt, ["NOPE"])
    assert set_items_active(ckpt, ["P03", "P08"], active=True) == ["P03", "P08"]
    assert cat.refresh() and len(cat.full.trie) == n


# ----------------------------------------------------------------------------- the guard
def guard_call(
    body: dict | bytes, path: str = "/v1/chat/completions", method: str = "POST"
) -> tuple[int, str]:
    from starlette.requests import Request
    from starlette.responses import Response

    from sid_tokenizer.vllm_processor import sid_prompt_guard

    raw = body if isinstance(body, bytes) else json.dumps(body).encode()

    async def receive():
        return {"type": "http.request", "body": raw, "more_body": False}

    async def call_next(request):
        return Response("passed", status_code=299)

    scope = {"type": "http", "method": method, "path": path, "headers": [], "query_string": b""}
    resp = asyncio.run(sid_prompt_guard(Request(scope, receive), call_next))
    return resp.status_code, resp.body.decode()


CHAT = {"model": "m", "messages": [{"role": "user", "content": "I bought <a_0><b_0><c_1>"}]}
ON = {"sid_constrained": 1}


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"response_format": {"type": "json_object"}}, "response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}},
            "response_format",
        ),
        ({"structured_outputs": {"choice": ["a", "b"]}}, "structured_outputs"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"}, "tools"),
        ({"allowed_token_ids": [1, 2, 3]}, "allowed_token_ids"),
        ({"bad_words": ["<a_0>"]}, "bad_words"),
        ({"stop": ["<b_"]}, "stop"),
        ({"stop": "_1"}, "stop"),
        ({"stop": ["ok", ">"]}, "stop"),
        ({"ignore_eos": True}, "ignore_eos"),
        ({"max_tokens": 2}, "max_tokens"),
        ({"max_completion_tokens": 5, "vllm_xargs": {**ON, "sid_count": 2}}, "max_completion_tokens"),
        ({"min_tokens": 4}, "min_tokens"),
        ({"logprobs": True, "top_logprobs": 3}, "top_logprobs"),
        ({"continue_final_message": True}, "continue_final_message"),
    ],
)
def test_guard_rejects_options_that_break_a_constrained_chat(mini_ckpt, monkeypatch, extra, param):
    monkeypatch.setenv(ENV_CHECKPOINT, str(mini_ckpt))
    body = {**CHAT, "vllm_xargs": ON, **extra}
    status, text = guard_call(body)
    assert status == 400, text
    err = json.loads(text)["error"]
    assert err["param"] == param and ("SID" in err["message"] or "sid_" in err["message"]), err
    # without the constraint the same options are vLLM's business
    assert guard_call({**CHAT, **{k: v for k, v in extra.items() if k != "vllm_xargs"}})[0] == 299


def test_guard_accepts_harmless_options_and_checks_token_prompts(mini_ckpt, monkeypatch):
    monkeypatch.setenv(ENV_CHECKPOINT, str(mini_ckpt))
    ok = [
        {
            **CHAT,
            "vllm_xargs": ON,
            "stop": ["\nUser:", "\n"],
            "logprobs": True,
            "top_logprobs": 0,
            "max_tokens": 4,
        },
        {
            **CHAT,
            "vllm_xargs": ON,
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": "none",
        },
        {**CHAT, "vllm_xargs": ON, "response_format": {"type": "text"}, "min_tokens": 3},
    ]
    for body in ok:
        assert guard_call(body)[0] == 299, body
    comp = "/v1/completions"
    assert guard_call({"prompt": "hi", "vllm_xargs": ON, "logprobs": 2}, comp)[0] == 400
    assert guard_call({"prompt": "hi", "vllm_xargs": ON, "logprobs": 0}, comp)[0] == 299
    assert guard_call({"prompt": "hi", "vllm_xargs": ON, "echo": True}, comp)[0] == 400
    # token-id prompts get the same check as text: a SID that is not an item is a 400
    proc = make_processor(mini_ckpt)
    good = [1] + sid_tokens(proc, CODES[0])
    bad = [1] + sid_tokens(proc, (3, 0, 0))
    assert guard_call({"prompt": good, "vllm_xargs": ON}, comp)[0] == 299
    status, text = guard_call({"prompt": [good, bad], "vllm_xargs": ON}, comp)
    assert status == 400 and "<a_3><b_0><c_0>" in text
    assert guard_call({"prompt": "<|rec|><a_3><b_0><c_0>", "vllm_xargs": ON}, comp)[0] == 400
    # stop token ids: SID tokens would cut a SID, EOS is fine
    assert guard_call({**CHAT, "vllm_xargs": ON, "stop_token_ids": [good[2]]})[0] == 400
    assert guard_call({**CHAT, "vllm_xargs": ON, "stop_token_ids": [proc.eos_token_id]})[0] == 299
    # exclude_seen counts the prompt's SIDs: 2 allowed items, one of them in the prompt
    xargs = {**ON, "sid_items": "P00,P01", "sid_count": 2, "sid_exclude_seen": 1}
    status, text = guard_call({**CHAT, "vllm_xargs": xargs})
    assert status == 400 and "only 1" in text
    status, text = guard_call(b"", "/v1/sid/info", method="GET")
    info = json.loads(text)
    assert status == 200 and info["items"] == len(CODES) and info["active_items"] == len(CODES)


def test_load_checker_flags_bad_rankings(mini_ckpt):
    """benchmarks/server_load.py's check of /v1/sid/rank answers is not vacuous."""
    from recipes.client import CatalogueView
    from tests.test_server import _load_module

    load = _load_module()
    view = CatalogueView(mini_ckpt)
    sid = view.catalogue.index.sid

    def ans(*pairs):
        return {"items": [{"sid": sid(i), "score": s, "raw_ids": [f"P{i:02d}"]} for i, s in pairs]}

    spec = {"kind": "rank", "k": 2, "items": None, "category": None, "exclude": ["P05"]}
    assert load.check_answer(view, spec, ans((0, -1.0), (1, -2.0))) == []
    assert load.check_answer(view, spec, ans((0, -2.0), (1, -1.0)))  # not best first
    assert load.check_answer(view, spec, ans((0, -1.0), (0, -2.0)))  # repeated SID
    assert load.check_answer(view, spec, ans((0, -1.0)))  # fewer than k without a filter
    assert load.check_answer(view, spec, ans((0, -1.0), (5, -2.0)))  # a blocklisted item
    assert load.check_answer(view, {**spec, "items": ["P00", "P02"]}, ans((0, -1.0), (1, -2.0)))  # outside


def test_guard_refuses_the_constraint_on_unguarded_generation_routes(mini_ckpt, monkeypatch):
    """/v1/responses, /v1/messages, /invocations, ... pass vllm_xargs to the engine too."""
    monkeypatch.setenv(ENV_CHECKPOINT, str(mini_ckpt))
    for path in ("/v1/responses", "/v1/messages", "/invocations", "/v1/chat/completions/batch"):
        status, text = guard_call({"input": "hi", "vllm_xargs": {"sid_constrained": 1}}, path)
        assert status == 400 and "served on /v1/chat/completions" in text, (path, text)
        assert guard_call({"input": "hi"}, path)[0] == 299  # no SID arguments: vLLM's business
    body = {"prompt": "x", "sampling_params": {"extra_args": {"SID_constrained": 1}}}
    assert guard_call(body, "/inference/v1/generate")[0] == 400
    assert guard_call(b"not json", "/v1/responses")[0] == 299
