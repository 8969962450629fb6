#!/usr/bin/env bash
# labelmill GPU suite: one command on a lent GPU machine, under 8 minutes on one H200.
#
#   bash benchmarks/gpu_suite.sh              # on the GPU machine, from the repo root
#   bash benchmarks/gpu_suite.sh --dry-run    # here, on CPU, small sizes (or LABELMILL_GPU_DRY_RUN=1)
#   bash benchmarks/gpu_suite.sh --prepare    # here, with network: wheels the GPU image lacks
#
# Results: $OUT/gpu_results.md (Markdown table for BENCHMARKS.md), one JSON per part and
# a log per part next to it; $OUT when set, else benchmarks/gpu_results/.
#
# Python: $LABELMILL_PY, else .venv/bin/python if it runs, else python3.  The GPU
# machine has no network: if labelmill's imports are missing there (open_clip,
# pydantic, pycocotools), the wheels that `--prepare` put in benchmarks/.gpu_wheels
# (carry that folder) are installed into benchmarks/.gpu_site and put on PYTHONPATH;
# labelmill itself is imported from this checkout without installing it.
# Each part runs in its own process under its own timeout: a failure or a hang
# costs that part only, and the report says which.
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled TOKENIZERS_PARALLELISM=false
WHEELS=benchmarks/.gpu_wheels
SITE=benchmarks/.gpu_site

if [ "${1:-}" = "--prepare" ]; then
  # Pure-Python and manylinux x86_64 / CPython 3.12 wheels (the GPU image's Python).
  mkdir -p "$WHEELS"
  python3 -m pip download --dest "$WHEELS" --no-deps --only-binary=:all: \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --python-version 3.12 --implementation cp \
    open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth pydantic==2.14.4 pydantic_core==2.50.5 annotated_types \
    typing_inspection pycocotools || exit 1
  du -sh "$WHEELS"
  exit 0
fi

DRY=0
if [ "${1:-}" = "--dry-run" ] || [ "${LABELMILL_GPU_DRY_RUN:-0}" = "1" ]; then DRY=1; fi
RESULTS="${OUT:-benchmarks/gpu_results}"
mkdir -p "$RESULTS"
START=$(date +%s)

PY="${LABELMILL_PY:-.venv/bin/python}"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then PY=python3; fi
if ! "$PY" -c "import open_clip, pydantic, pycocotools" >/dev/null 2>&1 && [ -d "$WHEELS" ]; then
  echo "[gpu_suite] installing carried wheels from $WHEELS into $SITE"
  "$PY" -m pip install --quiet --no-index --no-deps --target "$SITE" "$WHEELS"/*.whl \
    > "$RESULTS/install.log" 2>&1 || echo "[gpu_suite] wheel install failed: see install.log"
  export PYTHONPATH="$PWD/$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
echo "[gpu_suite] python: $PY ($("$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available())' 2>&1))"

ARGS=(--out "$RESULTS")
# time limits are for one H200; a dry run on a small shared CPU box needs more
SCALE="${LABELMILL_GPU_LIMIT_SCALE:-1}"
if [ "$DRY" = "1" ]; then ARGS+=(--dry-run); SCALE="${LABELMILL_GPU_LIMIT_SCALE:-8}"; fi

# part  time limit (s) on one H200: they sum to 7 min 10 s, plus install and report.
PARTS=("env 30" "decode 50" "embed_b16 55" "embed_l14 60" "maskclip 60" "glip 75" "vild_dense 50" "vild_crop 50")
SAMPLER_PID=""
if [ "$DRY" = "0" ] && command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi > "$RESULTS/nvidia-smi.txt" 2>&1
  # a whole-run utilisation trace, in addition to each part's own sampling
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -lms 200 \
    > "$RESULTS/gpu_util_trace.csv" 2>/dev/null &
  SAMPLER_PID=$!
fi
for entry in "${PARTS[@]}"; do
  set -- $entry
  part=$1 limit=$(( $2 * SCALE ))
  echo "[gpu_suite] $(date +%T) part $part (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$PY" benchmarks/gpu_suite.py "$part" "${ARGS[@]}" > "$RESULTS/$part.log" 2>&1
  rc=$?
  if [ $rc -ne 0 ]; then
    echo "[gpu_suite] part $part exited $rc; last lines of its log:"; tail -n 5 "$RESULTS/$part.log"
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
      echo "{\"part\": \"$part\", \"status\": \"timed out after ${limit}s\"}" > "$RESULTS/$part.json"
    fi
  fi
done
if [ -n "$SAMPLER_PID" ]; then kill "$SAMPLER_PID" 2>/dev/null; fi
"$PY" benchmarks/gpu_suite.py report "${ARGS[@]}" > "$RESULTS/report.log" 2>&1 || cat "$RESULTS/report.log"
cat "$RESULTS/gpu_results.md" 2>/dev/null
echo "[gpu_suite] done in $(( $(date +%s) - START )) s; results in $RESULTS"
