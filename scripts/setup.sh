#!/usr/bin/env bash
# Create .venv and install onsft with its test tools, without ever pulling a CUDA build of torch onto a
# CPU machine and without replacing a GPU user's own torch:
#   - a torch that already imports in the chosen Python is kept as it is;
#   - otherwise, on a machine with an NVIDIA GPU, pip's default (CUDA) torch is installed;
#   - otherwise the CPU build torch==2.13.0 is installed first, so the `torch>=2.4` requirement is met.
# PYTHON=/path/to/python picks the interpreter; ONSFT_VENV=path picks the environment folder.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${ONSFT_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$venv"
fi
py="$venv/bin/python"
"$py" -m pip install --quiet --upgrade pip
if ! "$py" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$py" -m pip install --quiet torch
  else
    "$py" -m pip install --quiet "torch==2.13.0"
  fi
fi
"$py" -m pip install --quiet -e ".[dev]"
"$py" -c "import torch, transformers, trl, onsft; print(f'onsft {onsft.__version__} ready: torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}')"
