#!/usr/bin/env bash
# Create .venv and install labelmill with its test extras.
# torch 2.14.1 + torchvision 0.29.1 are PyPI's CUDA builds: they import and run
# on CPU-only machines too, so one environment serves laptops, CI and GPU nodes.
# uv does the install (about 30 s here, against about 10 min for pip); if uv
# cannot be had or fails, pip does it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${LABELMILL_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PACKAGES=("torch==2.14.1" "torchvision==0.29.1" -e ".[test]")
if "$VENV/bin/python" -m pip install -q uv 2>/dev/null \
   && "$VENV/bin/python" -m uv pip install -q --python "$VENV/bin/python" "${PACKAGES[@]}"; then
  echo "installed with uv"
else
  echo "uv unavailable or failed; installing with pip" >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "${PACKAGES[@]}"
fi
"$VENV/bin/python" -c "import torch, torchvision, open_clip, ray, labelmill; print('labelmill', labelmill.__version__, '| torch', torch.__version__, '| torchvision', torchvision.__version__, '| ray', ray.__version__)"
