#!/usr/bin/env bash
# Create .venv and install labelmill with its test extras.
# torch 2.14.1 + torchvision 0.29.1 are PyPI's CUDA builds: they import and run
# on CPU-only machines too, so one environment serves laptops, CI and GPU nodes.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${LABELMILL_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
"$VENV/bin/python" -m pip install -q -e ".[test]"
"$VENV/bin/python" -c "import torch, torchvision, open_clip, ray, labelmill; print('labelmill', labelmill.__version__, '| torch', torch.__version__, '| torchvision', torchvision.__version__, '| ray', ray.__version__)"
