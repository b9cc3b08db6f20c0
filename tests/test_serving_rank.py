"""The served ranking on a real server: ``recipes/serve.py`` on 127.0.0.1 with the tiny SFT checkpoint.

One server for the whole module (a vLLM start costs minutes on 2 cores): parity of ``/v1/sid/rank``
with the offline ranking of ``eval.generate.SidRanker``, exclusions and deactivated items on the
ranking route and on chat/completions, request options the guard refuses, the client's last good
catalogue, and at the end ``kill -9`` of the API server (``serve.py`` must exit 1 and leave no
process of the server's group behind)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tests.conftest import ROOT

pytest.importorskip("vllm")

K = 10


def children_of(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                continue
    return out


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_ready(proc: subprocess.Popen, port: int, log: Path, timeout: float = 900) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve.py exited {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/sid/info", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise AssertionError(f"server not ready after {timeout} s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def served(tiny_sft, tmp_path_factory):
    """``recipes/serve.py`` on a copy of the tiny checkpoint (items are deactivated in it)."""
    from recipes.client import SidRecClient
    from recipes.server import free_port

    ckpt = tmp_path_factory.mktemp("ranked") / "final"
    shutil.copytree(tiny_sft / "final", ckpt)
    port = free_port()
    log = ckpt.parent / "serve.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "recipes/serve.py", "--config", "recipes/configs/serve_demo.yaml",
           "--checkpoint", str(ckpt), "--port", str(port), "--reload_seconds", "0",
           "--max_num_seqs", "128", "--log_file", str(ckpt.parent / "vllm.log")]  # fmt: skip
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env)
    try:
        wait_ready(proc, port, log)
        client = SidRecClient(f"http://127.0.0.1:{port}/v1", ckpt)
        yield SimpleNamespace(proc=proc, port=port, ckpt=ckpt, client=client, log=log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)


@pytest.fixture(scope="module")
def offline(tiny_sft, scientific_dirs):
    from data_prep.dataset import RecDataset
    from eval.generate import SidRanker
    from sid_tokenizer.catalog import load_checkpoint

    model, tok, cat = load_checkpoint(tiny_sft / "final")
    ds = RecDataset.load(scientific_dirs["dataset"])
    return SimpleNamespace(ranker=SidRanker(model, tok, cat.index), tok=tok, cat=cat, ds=ds)


def assert_same_up_to_ties(served_items, sids, scores, tol: float = 2e-3) -> None:
    """Same ranked SIDs up to ties: scores agree position by position, and where the SIDs
    differ the expected SID is tied (within ``tol``) with another candidate, so either engine
    may keep either one (untrained SID rows can have exactly equal logits)."""
    got = [it.sid for it in served_items]
    want_scores = np.asarray(scores, dtype=float)
    got_scores = np.asarray([it.score for it in served_items], dtype=float)
    assert len(got) == len(sids)
    np.testing.assert_allclose(got_scores, want_scores, atol=tol)
    untied = []
    for i, (g, w) in enumerate(zip(got, sids, strict=True)):
        if g != w:
            tied = np.abs(want_scores - want_scores[i]) < tol
            tied[i] = False
            if not tied.any():  # only a tie with the first candidate left out (the cut-off) remains
                untied.append(i)
    assert untied in ([], [len(sids) - 1]), (untied, got, sids, want_scores)


@pytest.mark.slow
def test_served_topk_equals_offline_ranking_for_completion_and_chat_prompts(served, offline):
    from sid_tokenizer.prompts import chat_history_prompt, prompt_text, seq2seq_prompt

    vocab = offline.cat.index.vocab
    examples = offline.ds.test[:12]
    prompts = [seq2seq_prompt(offline.cat.index, e.history) for e in examples]
    ranking = offline.ranker.rank(prompts, num_beams=K, progress=False)
    raw = offline.cat.raw_ids
    same = 0
    for e, prompt, sids, scores in zip(examples, prompts, ranking.sids, ranking.scores, strict=True):
        want = [vocab.format(s) for s in sids]
        by_history = served.client.rank(history=[raw[i] for i in e.history], k=K)
        by_prompt = served.client.rank(prompt=prompt, k=K)
        assert [it.sid for it in by_history] == [it.sid for it in by_prompt]
        assert_same_up_to_ties(by_history, want, scores)
        same += [it.sid for it in by_history] == want
        assert len({it.sid for it in by_history}) == K and all(it.raw_ids for it in by_history)
        assert all(a.score >= b.score for a, b in zip(by_history, by_history[1:], strict=False))
    assert same >= len(examples) - 2, same  # identical lists, bar a rare float tie
    # chat prompts: the model's chat template, same ranking as offline on the rendered text
    messages = chat_history_prompt(offline.cat.index, examples[0].history)
    chat_rank = offline.ranker.rank([prompt_text(messages, offline.tok)], num_beams=K, progress=False)
    served_chat = served.client.rank(prompt=messages, k=K)
    assert_same_up_to_ties(served_chat, [vocab.format(s) for s in chat_rank.sids[0]], chat_rank.scores[0])
    # the same rankings from the OpenAI endpoints (vllm_xargs.sid_rank): one choice, best first
    (recs,) = served.client.chat(messages, count=K, ranked=True)
    assert [r.sid for r in recs] == [it.sid for it in served_chat]
    hist = [raw[i] for i in examples[0].history]
    (recs,) = served.client.complete(hist, count=K, ranked=True)
    assert [r.sid for r in recs] == [it.sid for it in served.client.rank(history=hist, k=K)]
    import httpx

    url = f"http://127.0.0.1:{served.port}/v1/chat/completions"
    body = {"model": served.client.model, "messages": messages, "max_tokens": 3 * K + 1,
            "vllm_xargs": {"sid_constrained": 1, "sid_rank": 1, "sid_count": 3}}  # fmt: skip
    r = httpx.post(url, json=body, timeout=120).json()
    assert r["object"] == "chat.completion" and r["choices"][0]["finish_reason"] == "stop"
    assert [it["sid"] for it in r["sid_ranking"]] == [
        it.sid for it in served.client.rank(prompt=messages, k=3)
    ]
    assert r["usage"]["completion_tokens"] == 9 and all("score" in it for it in r["sid_ranking"])
    for bad in ({"stream": True}, {"n": 2, "temperature": 1.0}):
        assert httpx.post(url, json={**body, **bad}, timeout=60).status_code == 400


def offline_without(offline, history: list[int], k: int, dropped: set[str]):
    """The offline ranking over a trie without the ``dropped`` raw ids: what a beam search that
    never produces them must return (banned leaves cut, subtrees left empty cut with them)."""
    from eval.generate import SidRanker
    from sid_tokenizer.prompts import seq2seq_prompt
    from sid_tokenizer.trie import SidTrie

    cat = offline.cat
    keep = [i for i, r in enumerate(cat.raw_ids) if r not in dropped]
    trie = SidTrie(cat.index.codes[keep], cat.index.vocab.level_sizes)
    ranker = SidRanker(offline.ranker.model, offline.tok, cat.index, trie=trie)
    ranking = ranker.rank([seq2seq_prompt(cat.index, history)], num_beams=k, progress=False)
    return [cat.index.vocab.format(s) for s in ranking.sids[0]], ranking.scores[0]


@pytest.mark.slow
def test_exclusions_and_filters_hold_on_ranking_and_generation(served, offline):
    client = served.client
    raw = offline.cat.raw_ids
    hist = [raw[i] for i in offline.ds.test[0].history]
    base = client.rank(history=hist, k=K)
    top3 = [r for it in base[:3] for r in it.raw_ids]
    blocked = client.rank(history=hist, k=K, exclude=top3)
    assert not set(top3) & {r for it in blocked for r in it.raw_ids}
    # exactly the beam search over a catalogue without them (the beams below can change: a prefix
    # left without items frees a beam slot for another one)
    assert_same_up_to_ties(blocked, *offline_without(offline, offline.ds.test[0].history, K, set(top3)))
    # seen items: from the prompt's SIDs (only the last max_history are in the prompt)
    seen = client.rank(history=hist, k=K, exclude_seen=True, max_history=20)
    assert not set(hist[-20:]) & {r for it in seen for r in it.raw_ids}
    # allow-list + category + blocklist together: every answer inside the filter
    allowed = raw[100:130]
    filt = client.rank(history=hist, k=K, items=allowed, exclude=allowed[:5])
    got = {r for it in filt for r in it.raw_ids}
    assert got and got <= set(allowed) - set(allowed[:5])
    few = client.rank(history=hist, k=K, items=allowed[:3])
    assert len(few) == 3  # fewer items than k when the filter leaves fewer
    # generation (sid_count distinct SIDs) with the same filters
    (recs,) = client.complete(hist, count=4, exclude=top3)
    assert len(recs) == 4 and not set(top3) & {r for x in recs for r in x.raw_ids}
    (recs,) = client.chat("Recommend something.", count=3, items=allowed, exclude=allowed[:5])
    assert all(set(x.raw_ids) <= set(allowed) - set(allowed[:5]) for x in recs) and len(recs) == 3
    sids = ", ".join(offline.cat.index.sid(i) for i in offline.ds.test[1].history[-5:])
    (recs,) = client.chat(f"I bought {sids}. What next?", count=5, exclude_seen=True)
    shown = {offline.cat.index.sid(i) for i in offline.ds.test[1].history[-5:]}
    assert len(recs) == 5 and not shown & {x.sid for x in recs}


@pytest.mark.slow
def test_deactivated_items_leave_a_running_server_and_the_client_keeps_its_last_good_view(served, offline):
    from sid_tokenizer.new_items import remove_items, set_items_active

    client, ckpt = served.client, served.ckpt
    hist = client.view.catalogue.raw_ids[:6]  # item ids 0..5
    base = client.rank(history=hist, k=K)
    gone = [r for it in base[:2] for r in it.raw_ids]
    remove_items(ckpt, gone)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the server checks the files on the next request
        now = client.rank(history=hist, k=K)
        if not set(gone) & {r for it in now for r in it.raw_ids}:
            break
        time.sleep(1)
    assert not set(gone) & {r for it in now for r in it.raw_ids}
    assert_same_up_to_ties(now, *offline_without(offline, list(range(6)), K, set(gone)))
    (recs,) = client.complete(hist, count=K)
    assert not set(gone) & {r for x in recs for r in x.raw_ids}
    import openai

    with pytest.raises(openai.BadRequestError, match="no active catalogue item"):
        client.rank(history=hist, k=3, items=gone)
    # an unreadable index.json: server and client keep the last good catalogue
    index = ckpt / "sidrec" / "index.json"
    good = index.read_bytes()
    index.write_text("{ truncated")
    try:
        recs = client.rank(history=hist, k=K)
        assert [it.sid for it in recs] == [it.sid for it in now]
        (parsed,) = client.complete(hist, count=2)
        assert all(p.valid for p in parsed) and client.view.reload_error is not None
    finally:
        index.write_bytes(good)
    set_items_active(ckpt, gone, active=True)
    back = client.rank(history=hist, k=K)
    client.view.refresh()
    assert [it.sid for it in back] == [it.sid for it in base] and client.view.reload_error is None


@pytest.mark.slow
def test_bad_requests_get_400_from_the_real_server(served, offline):
    import httpx
    import openai

    client = served.client
    url = f"http://127.0.0.1:{served.port}/v1"
    msgs = [{"role": "user", "content": "Recommend an item."}]
    on = {"sid_constrained": 1}
    bad = [
        (
            "/chat/completions",
            {"messages": msgs, "response_format": {"type": "json_object"}},
            "response_format",
        ),
        ("/chat/completions", {"messages": msgs, "allowed_token_ids": [1, 2]}, "allowed_token_ids"),
        ("/chat/completions", {"messages": msgs, "stop": ["<b_"]}, "stop"),
        ("/chat/completions", {"messages": msgs, "logprobs": True, "top_logprobs": 5}, "top_logprobs"),
        ("/chat/completions", {"messages": msgs, "max_tokens": 2}, "max_tokens"),
        ("/completions", {"prompt": [1, 2, 3], "vllm_xargs": {**on, "SID_COUNT": 3}}, "vllm_xargs"),
        ("/completions", {"prompt": "hi", "echo": True}, "echo"),
    ]
    for path, body, param in bad:
        xargs = body.pop("vllm_xargs", on)
        r = httpx.post(url + path, json={"model": client.model, **body, "vllm_xargs": xargs}, timeout=60)
        assert r.status_code == 400, (path, body, r.text)
        assert r.json()["error"]["param"] == param, r.text
    # a token-id prompt with a SID that is not an item: rejected like the same text
    from sid_tokenizer.vocab import sid_token_ids

    level_ids = sid_token_ids(offline.tok, offline.cat.index.vocab)
    codes = set(map(tuple, offline.cat.index.codes.tolist()))
    missing = next(
        (a, b, c) for a in range(4) for b in range(256) for c in range(256) if (a, b, c) not in codes
    )
    ids = [int(level_ids[lv][c]) for lv, c in enumerate(missing)]
    r = httpx.post(url + "/completions", json={"model": client.model, "prompt": ids, "max_tokens": 4,
                                               "vllm_xargs": on}, timeout=60)  # fmt: skip
    assert r.status_code == 400 and offline.cat.index.vocab.format(missing) in r.text
    for body in ({"k": 0, "prompt": "x"}, {"k": 5}, {"k": 5, "prompt": "x", "history": []},
                 {"k": 5, "history": ["no-such-item"]}, {"k": 5, "prompt": "x", "sid_count": 2},
                 {"k": 5, "prompt": "x", "beams": 3}):  # fmt: skip
        with pytest.raises(openai.BadRequestError):
            client.rank_raw(body)
    r = httpx.post(url + "/sid/rank", json={"model": "no-such-model", "prompt": "x"}, timeout=60)
    assert r.status_code == 404, r.text
    word = offline.tok("tools", add_special_tokens=False)["input_ids"][0]
    long = {"prompt": [word] * 1023, "k": 3}  # room for less than one SID
    r = httpx.post(url + "/sid/rank", json=long, timeout=60)
    assert r.status_code == 400 and "maximum context length" in r.text, r.text
    # the server still answers afterwards, with valid constrained output
    (recs,) = client.chat("Recommend something.", count=2)
    assert len(recs) == 2 and all(r.valid for r in recs)


@pytest.mark.slow
def test_zz_kill9_of_the_api_server_ends_serve_py_and_its_engine(served):
    """Last in the module: it takes the shared server down."""
    kids = children_of(served.proc.pid)
    assert len(kids) == 1, kids  # the API server, leader of its own process group
    api = kids[0]
    engine = children_of(api)
    assert engine, "vLLM's engine process should be a child of the API server"
    assert os.getpgid(api) == api and all(os.getpgid(p) == api for p in engine)
    os.kill(api, signal.SIGKILL)
    code = served.proc.wait(120)
    assert code == 1, served.log.read_text()[-3000:]
    deadline = time.monotonic() + 30
    while group_alive(api) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not group_alive(api), "EngineCore/worker processes outlived the killed API server"
    assert "exited by itself" in served.log.read_text()
