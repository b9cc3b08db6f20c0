#!/usr/bin/env bash
# The end-to-end demo on the embedded default (vendored Amazon Scientific data, offline):
# data -> embeddings -> SIDs -> SFT -> RL -> evaluation -> a served recommendation.
# Every stage writes under outputs/demo/ and is skipped when its artifact is already complete,
# so a rerun after an interruption continues where it stopped (training resumes from checkpoints).
set -euo pipefail
cd "$(dirname "$0")/.."
export TOKENIZERS_PARALLELISM=false
OUT=outputs/demo
mkdir -p "$OUT"
TIMES="$OUT/stage_times.tsv"
: > "$TIMES"

stage() {  # stage NAME DONE_MARKER COMMAND...
  local name=$1 marker=$2; shift 2
  local t0=$SECONDS
  if [[ -n "$marker" && -e "$marker" ]]; then
    echo "== $name: done already ($marker)"
  else
    echo "== $name: $*"
    "$@"
  fi
  printf '%s\t%s\n' "$name" "$((SECONDS - t0))" >> "$TIMES"
}

stage data  "$OUT/dataset/meta.json" \
  python -m data_prep.prepare --config data_prep/configs/scientific.yaml --output_dir "$OUT/dataset"
stage sids  "$OUT/sid_rkmeans/meta.json" \
  python -m sid_tokenizer.build --config sid_tokenizer/configs/scientific_rkmeans.yaml \
    --dataset_dir "$OUT/dataset" --output_dir "$OUT/sid_rkmeans"
stage sft   "$OUT/sft/final/sidrec/meta.json" \
  accelerate launch --config_file accelerate_configs/cpu.yaml recipes/sft.py --config recipes/configs/sft_demo.yaml
if [[ -f recipes/configs/grpo_demo.yaml ]]; then
  stage rl  "$OUT/grpo/final/sidrec/meta.json" \
    python recipes/rl.py --config recipes/configs/grpo_demo.yaml
  CKPT="$OUT/grpo/final"
else
  CKPT="$OUT/sft/final"
fi
stage eval  "" python -m eval.evaluate --config eval/configs/demo.yaml --checkpoint "$CKPT"
if [[ -f recipes/configs/serve_demo.yaml ]]; then
  stage serve "" python recipes/serve.py --config recipes/configs/serve_demo.yaml --checkpoint "$CKPT" \
    --once "I bought a digital caliper and a set of drill bits. What should I buy next?"
fi

echo
echo "================ sidrec demo summary ================"
cat "$OUT/eval/metrics.md"
echo
echo "stage seconds:"; column -t "$TIMES" 2>/dev/null || cat "$TIMES"
echo "artifacts: $OUT/{dataset,sid_rkmeans,sft,eval}; plots: $OUT/sid_rkmeans/report.png," \
     "$OUT/sft/training_curves.png, $OUT/eval/metrics.png"
