"""vLLM SID processor (fast: a synthetic catalogue, no engine) and the offline backend (slow: a real
engine on the tiny SFT checkpoint, compared with the transformers backend)."""

from __future__ import annotations

import json
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")

from vllm import SamplingParams  # noqa: E402
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality  # noqa: E402

from sid_tokenizer.sid import SidIndex, SidVocab  # noqa: E402
from sid_tokenizer.vllm_processor import (  # noqa: E402
    ENV_CHECKPOINT,
    ServingCatalogue,
    SidTrieLogitsProcessor,
    parse_sid_args,
    unknown_sids,
)

LEVELS = (4, 4, 4)
# 12 items, 11 distinct SIDs (items 10 and 11 collide); prefixes shared to exercise the trie
CODES = [
    (0, 0, 0),
    (0, 0, 1),
    (0, 1, 0),
    (0, 1, 3),
    (1, 2, 2),
    (1, 2, 3),
    (1, 3, 0),
    (2, 0, 0),
    (3, 3, 3),
    (3, 3, 1),
    (2, 1, 1),
    (2, 1, 1),
]
CATEGORIES = [["Tools", "Staples"] if i < 4 else ["Tools", "Tape"] if i < 8 else ["Lab"] for i in range(12)]


@pytest.fixture(scope="module")
def mini_ckpt(tmp_path_factory):
    """A checkpoint directory without weights: tokenizer with SID tokens + sidrec/ catalogue."""
    from recipes.model import train_catalogue_tokenizer
    from sid_tokenizer.prompts import REC_TOKEN

    d = tmp_path_factory.mktemp("mini") / "ckpt"
    vocab = SidVocab(LEVELS)
    tok = train_catalogue_tokenizer(
        [f"item number {i} tools tape staples lab" for i in range(50)], vocab_size=300
    )
    tok.add_tokens(vocab.tokens())
    tok.save_pretrained(d)
    raw_ids = [f"P{i:02d}" for i in range(len(CODES))]
    (d / "sidrec").mkdir()
    SidIndex(np.asarray(CODES), vocab, raw_ids).save(d / "sidrec" / "index.json")
    with open(d / "sidrec" / "items.jsonl", "w") as fh:
        for i, r in enumerate(raw_ids):
            fh.write(
                json.dumps({"item_id": i, "raw_id": r, "title": f"Item {i}", "categories": CATEGORIES[i]})
                + "\n"
            )
    (d / "sidrec" / "meta.json").write_text(
        json.dumps(
            {
                "level_sizes": list(LEVELS),
                "num_items": len(CODES),
                "rec_token": REC_TOKEN,
                "format_version": 1,
            }
        )
    )
    return d


def make_processor(ckpt) -> SidTrieLogitsProcessor:
    mc = SimpleNamespace(
        model=str(ckpt), tokenizer=str(ckpt), trust_remote_code=False, get_vocab_size=lambda: 320
    )
    return SidTrieLogitsProcessor(SimpleNamespace(model_config=mc), torch.device("cpu"), False)


def params(**xargs) -> SamplingParams:
    return SamplingParams(extra_args=xargs or None)


def add(index, sp, prompt=None, out=None):
    return (index, sp, prompt or [1, 2, 3], out if out is not None else [])


def update(proc, batch_size, removed=(), added=(), moved=()):
    proc.update_state(
        BatchUpdate(batch_size=batch_size, removed=list(removed), added=list(added), moved=list(moved))
    )


def decode_sids(proc, tokens) -> list[tuple[int, ...]]:
    L = len(LEVELS)
    codes = proc.masker.codes_of(np.asarray(tokens[: len(tokens) // L * L]).reshape(-1, L))
    return [tuple(int(c) for c in row) for row in codes]


def run_greedy(proc, outputs: list[list[int]], steps: int, seed: int = 0, vocab: int = 320) -> torch.Tensor:
    """Random logits, argmax under the processor, appended to the live output lists; returns the last logits."""
    g = torch.Generator().manual_seed(seed)
    out = None
    for _ in range(steps):
        out = proc.apply(torch.randn(len(outputs), vocab, generator=g))
        for row, toks in enumerate(outputs):
            toks.append(int(out[row].argmax()))
    return out


# ----------------------------------------------------------------------------- argument parsing
def test_parse_sid_args_accepts_openai_shapes():
    assert parse_sid_args(None) is None
    assert parse_sid_args({"other": 1}) is None
    assert parse_sid_args({"sid_constrained": 0}) is None
    r = parse_sid_args(
        {"sid_constrained": 1, "sid_items": "b, a,a", "sid_category": " Staples ", "sid_count": 3}
    )
    assert r.constrained and r.items == ("a", "b") and r.category == "Staples" and r.count == 3
    assert parse_sid_args({"sid_constrained": "true", "sid_items": ["x", 7]}).items == ("7", "x")
    assert parse_sid_args({"sid_logprobs": 1}).logprobs


@pytest.mark.parametrize(
    "xargs, match",
    [
        ({"sid_constrained": "yes"}, "sid_constrained"),
        ({"sid_constrained": 2}, "sid_constrained"),
        ({"sid_constrained": 1, "sid_count": "abc"}, "sid_count"),
        ({"sid_constrained": 1, "sid_count": 0}, "sid_count"),
        ({"sid_constrained": 1, "sid_count": 1.5}, "sid_count"),
        ({"sid_constrained": 1, "sid_items": 5}, "sid_items"),
        ({"sid_constrained": 1, "sid_items": " , "}, "sid_items"),
        ({"sid_constrained": 1, "sid_category": ""}, "sid_category"),
        ({"sid_constrained": 1, "sid_filter": "x"}, "unknown vllm_xargs"),
        ({"sid_items": "P01"}, "need sid_constrained"),
        # JSON Infinity / NaN (Python's json accepts them): 400, not an OverflowError -> 500
        ({"sid_constrained": 1, "sid_count": float("inf")}, "sid_count"),
        ({"sid_constrained": 1, "sid_count": float("nan")}, "sid_count"),
        ({"sid_constrained": 1, "sid_prefix_len": float("-inf")}, "sid_prefix_len"),
    ],
)
def test_parse_sid_args_rejects_bad_arguments(xargs, match):
    with pytest.raises(ValueError, match=match):
        parse_sid_args(xargs)


def test_validate_params_checks_the_catalogue(mini_ckpt, monkeypatch):
    monkeypatch.setenv(ENV_CHECKPOINT, str(mini_ckpt))
    ok = [
        params(sid_constrained=1),
        params(sid_constrained=1, sid_items="P01,P02", sid_count=2),
        params(sid_constrained=1, sid_category="staples"),
        params(),
        params(temperature_hint=1),
    ]
    for sp in ok:
        SidTrieLogitsProcessor.validate_params(sp)
    bad = [
        (params(sid_constrained=1, sid_items="P01,NOPE"), "unknown item id.*'NOPE'"),
        (params(sid_constrained=1, sid_category="Garden"), "no catalogue item matches"),
        (params(sid_constrained=1, sid_items="P00,P01", sid_category="Lab"), "among sid_items"),
        (params(sid_constrained=1, sid_items="P10,P11", sid_count=2), "only 1 distinct"),
        (params(sid_constrained=1, sid_prefix_len=3), "sid_prefix_len"),
        (params(sid_constrained=1, sid_count="x"), "sid_count"),
    ]
    for sp, match in bad:
        with pytest.raises(ValueError, match=match):
            SidTrieLogitsProcessor.validate_params(sp)


# ----------------------------------------------------------------------------- masking
def test_constrained_rows_produce_one_catalogue_sid_then_eos(mini_ckpt):
    proc = make_processor(mini_ckpt)
    valid = set(CODES)
    for seed in range(20):
        outs = [[], [], []]
        update(
            proc,
            3,
            added=[
                add(0, params(sid_constrained=1), out=outs[0]),
                add(1, params(), out=outs[1]),
                add(2, params(sid_constrained=1, sid_category="Lab"), out=outs[2]),
            ],
        )
        last = run_greedy(proc, outs, 4, seed=seed)
        assert decode_sids(proc, outs[0][:3])[0] in valid
        assert decode_sids(proc, outs[2][:3])[0] in {CODES[i] for i in (8, 9, 10)}
        eos = proc.eos_token_id
        assert outs[0][3] == eos and outs[2][3] == eos
        assert torch.isfinite(last[0]).sum() == 1 and torch.isfinite(last[1]).all()  # row 1 untouched
        update(proc, 0, removed=[0, 1, 2])
    assert proc.rows == {}


def test_sid_count_gives_distinct_sids_even_when_the_filter_is_exhausted(mini_ckpt):
    proc = make_processor(mini_ckpt)
    # items P00..P03 have 4 SIDs under 2 prefixes: all 4 must come out, each once, in any order
    for seed in range(15):
        out: list[int] = []
        update(
            proc,
            1,
            added=[add(0, params(sid_constrained=1, sid_items="P00,P01,P02,P03", sid_count=4), out=out)],
        )
        run_greedy(proc, [out], 13, seed=seed)
        sids = decode_sids(proc, out[:12])
        assert sorted(sids) == sorted(CODES[:4]) and out[12] == proc.eos_token_id
        update(proc, 0, removed=[0])
    out = []
    update(proc, 1, added=[add(0, params(sid_constrained=1, sid_count=11), out=out)])
    run_greedy(proc, [out], 34, seed=3)
    assert len(set(decode_sids(proc, out[:33]))) == 11  # every distinct SID of the catalogue


def test_batch_moves_and_swaps_keep_each_request_on_its_row(mini_ckpt):
    proc = make_processor(mini_ckpt)
    lab, staples = [], []
    update(
        proc,
        3,
        added=[
            add(0, params(sid_constrained=1, sid_category="Lab"), out=lab),
            add(1, params()),
            add(2, params(sid_constrained=1, sid_category="staples"), out=staples),
        ],
    )
    run_greedy(proc, [lab, [], staples], 1)
    # the unconstrained request finishes; the staples request moves into its slot
    update(proc, 2, removed=[1], moved=[(2, 1, MoveDirectionality.UNIDIRECTIONAL)])
    assert set(proc.rows) == {0, 1}
    run_greedy(proc, [lab, staples], 2, seed=1)
    update(proc, 2, moved=[(0, 1, MoveDirectionality.SWAP)])
    last = run_greedy(proc, [staples, lab], 1, seed=2)
    assert decode_sids(proc, lab[:3])[0] in {CODES[i] for i in (8, 9, 10)}
    assert decode_sids(proc, staples[:3])[0] in set(CODES[:4])
    assert torch.isfinite(last).sum(1).tolist() == [1, 1]  # both at EOS now
    # an unconstrained request added into a recycled slot clears the old state
    update(proc, 2, added=[add(1, params())])
    assert set(proc.rows) == {0}


def test_prefix_len_continues_a_sid_started_in_the_prompt(mini_ckpt):
    proc = make_processor(mini_ckpt)
    a1 = proc.masker.level_token_ids[0][1]
    b2 = proc.masker.level_token_ids[1][2]
    update(
        proc, 1, added=[add(0, params(sid_constrained=1, sid_prefix_len=2), prompt=[5, 6, int(a1), int(b2)])]
    )
    out = proc.apply(torch.zeros(1, 320))
    allowed = set(torch.isfinite(out[0]).nonzero().flatten().tolist())
    assert allowed == {int(proc.masker.level_token_ids[2][c]) for c in (2, 3)}  # (1,2,2) and (1,2,3)


def test_logprobs_mode_writes_log_softmax_of_the_unconstrained_model(mini_ckpt):
    proc = make_processor(mini_ckpt)
    update(proc, 2, added=[add(0, params(sid_constrained=1, sid_logprobs=1)), add(1, params(sid_logprobs=1))])
    logits = torch.randn(2, 320, generator=torch.Generator().manual_seed(0))
    ref = torch.log_softmax(logits, -1)
    out = proc.apply(logits.clone())
    torch.testing.assert_close(out[1], ref[1])
    first = [int(proc.masker.level_token_ids[0][c]) for c in (0, 1, 2, 3)]
    torch.testing.assert_close(out[0, first], ref[0, first])
    assert torch.isfinite(out[0]).sum() == 4


def test_catalogue_reload_and_prompt_guard(mini_ckpt, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(mini_ckpt, ckpt)
    cat = ServingCatalogue(ckpt, reload_seconds=0)
    assert unknown_sids("I bought <a_0><b_0><c_1> and <a_1><b_2><c_3>, next?", cat) == []
    assert unknown_sids("<|rec|><a_0><b_0><c_0><a_3><b_3><c_3>", cat) == []
    assert unknown_sids("what about <a_3><b_0><c_0>?", cat) == ["<a_3><b_0><c_0>"]
    assert unknown_sids("half <a_1><b_2> done", cat) == ["<a_1><b_2>"]
    assert unknown_sids("<|rec|><a_0><b_0><c_0><a_1><b_2>", cat, allow_partial_tail=2) == []
    # append an item (as add_items does: index first, then items) -> picked up by refresh
    index = json.loads((ckpt / "sidrec" / "index.json").read_text())
    index["NEW"] = ["<a_3>", "<b_0>", "<c_0>"]
    (ckpt / "sidrec" / "index.json").write_text(json.dumps(index))
    with open(ckpt / "sidrec" / "items.jsonl", "a") as fh:
        fh.write(
            json.dumps({"item_id": 12, "raw_id": "NEW", "title": "New", "categories": ["Garden"]}) + "\n"
        )
    assert cat.refresh()
    assert unknown_sids("what about <a_3><b_0><c_0>?", cat) == []
    cat.check(parse_sid_args({"sid_constrained": 1, "sid_category": "garden"}))
    assert len(cat.trie_for(parse_sid_args({"sid_constrained": 1, "sid_items": "NEW"})).trie) == 1


def test_prompt_guard_rejects_what_would_crash_or_escape_the_constraint(mini_ckpt, monkeypatch):
    """The middleware on its own: 400s it answers itself, and what it hands on to vLLM."""
    import asyncio

    from starlette.requests import Request
    from starlette.responses import Response

    from sid_tokenizer.vllm_processor import sid_prompt_guard

    monkeypatch.setenv(ENV_CHECKPOINT, str(mini_ckpt))

    def call(body: bytes, path: str = "/v1/chat/completions") -> tuple[int, str]:
        async def receive():
            return {"type": "http.request", "body": body, "more_body": False}

        async def call_next(request):
            return Response("passed", status_code=299)

        scope = {"type": "http", "method": "POST", "path": path, "headers": [], "query_string": b""}
        resp = asyncio.run(sid_prompt_guard(Request(scope, receive), call_next))
        return resp.status_code, resp.body.decode()

    chat = {"model": "m", "messages": [{"role": "user", "content": "I bought <a_0><b_0><c_1>"}]}
    assert call(json.dumps(chat).encode())[0] == 299
    assert call(b"{not json")[0] == 299  # vLLM answers malformed JSON with its own 400
    status, text = call(b"[" * 100_000 + b"]" * 100_000)  # RecursionError in json.loads
    assert status == 400 and "nests JSON too deeply" in text
    inf = b'{"prompt": "hi", "vllm_xargs": {"sid_constrained": 1, "sid_prefix_len": Infinity}}'
    status, text = call(inf, "/v1/completions")
    assert status == 400 and "sid_prefix_len" in text
    # bad sid arguments: 400 up front (vLLM would answer a stream with 200 + an error event)
    for xargs in ({"sid_constrained": 1, "sid_items": "nope"}, {"sid_constrained": 1, "sid_count": "x"}):
        status, text = call(json.dumps({**chat, "stream": True, "vllm_xargs": xargs}).encode())
        assert status == 400 and "vllm_xargs.sid_" in text
    ok = {
        **chat,
        "stream": True,
        "vllm_xargs": {"sid_constrained": 1, "sid_items": "P01,P02", "sid_count": 2},
    }
    assert call(json.dumps(ok).encode())[0] == 299
    beam = {**chat, "use_beam_search": True, "n": 2, "vllm_xargs": {"sid_constrained": 1}}
    status, text = call(json.dumps(beam).encode())
    assert status == 400 and "use_beam_search" in text
    beam["vllm_xargs"] = {"sid_constrained": "false"}  # unconstrained beam search is vLLM's business
    assert call(json.dumps(beam).encode())[0] == 299
    unknown = {"prompt": "<|rec|><a_3><b_0><c_0>", "vllm_xargs": {"sid_constrained": 1}}
    status, text = call(json.dumps(unknown).encode(), "/v1/completions")
    assert status == 400 and "<a_3><b_0><c_0>" in text


# ----------------------------------------------------------------------------- the offline backend
@pytest.fixture(scope="module")
def offline(tiny_sft):
    from eval.vllm_backend import VllmSidRanker, load_vllm, shutdown_vllm
    from sid_tokenizer.catalog import load_checkpoint

    ckpt = tiny_sft / "final"
    model, tok, cat = load_checkpoint(ckpt)
    before = os.environ.get("SIDREC_CHECKPOINT")
    llm = load_vllm(ckpt, num_beams=10, max_num_seqs=128)
    # the engine found the catalogue while it started; the process's variable is the caller's again
    assert os.environ.get("SIDREC_CHECKPOINT") == before
    yield SimpleNamespace(llm=llm, model=model, tok=tok, cat=cat, ranker=VllmSidRanker(llm, tok, cat.index))
    shutdown_vllm(llm)


@pytest.mark.slow
def test_offline_backend_matches_hf_metrics_with_valid_distinct_items(offline, scientific_dirs):
    from data_prep.dataset import RecDataset
    from eval.generate import SidRanker, evaluate_examples
    from eval.metrics import metrics_with_ci

    examples = RecDataset.load(scientific_dirs["dataset"]).test[:24]
    hf = evaluate_examples(
        SidRanker(offline.model, offline.tok, offline.cat.index),
        examples,
        num_beams=10,
        batch_size=12,
        progress=False,
    )
    vl = evaluate_examples(offline.ranker, examples, num_beams=10, progress=False)
    valid = set(map(tuple, offline.cat.index.codes.tolist()))
    for row in vl["ranking"].sids:
        assert len(row) == 10 and all(s in valid for s in row) and len(set(row)) == 10
    assert vl["valid_rate"] == 1.0
    same = np.mean([a == b for a, b in zip(hf["ranking"].sids, vl["ranking"].sids, strict=True)])
    assert same >= 0.9, same  # identical beams up to float ties
    np.testing.assert_allclose(np.array(vl["ranking"].scores), np.array(hf["ranking"].scores), atol=1e-3)
    ci = metrics_with_ci(hf, n_boot=200)
    for m in ("HR@10", "NDCG@10"):
        assert ci[m]["ci_low"] - 1e-9 <= vl[m] <= ci[m]["ci_high"] + 1e-9, (m, vl[m], ci[m])


@pytest.mark.slow
def test_offline_sampling_and_unconstrained_contrast(offline, scientific_dirs):
    from data_prep.dataset import RecDataset
    from sid_tokenizer.prompts import seq2seq_prompt

    examples = RecDataset.load(scientific_dirs["dataset"]).test[:6]
    prompts = [seq2seq_prompt(offline.cat.index, e.history) for e in examples]
    sp = SamplingParams(
        n=4, temperature=1.0, max_tokens=8, seed=0, extra_args={"sid_constrained": 1, "sid_count": 2}
    )
    outs = offline.llm.generate(prompts, sp, use_tqdm=False)
    vocab = offline.cat.index.vocab
    known = offline.cat.index.sid_to_items
    for o in outs:
        for c in o.outputs:
            sids = vocab.find_all(c.text)
            assert len(sids) == 2 and len(set(sids)) == 2 and all(s in known for s in sids), c.text
            assert c.finish_reason == "stop"
    free = offline.ranker.rank(prompts, num_beams=5, constrained=False, progress=False)
    assert all(len(row) == 5 for row in free.sids)  # validity measured, not assumed
