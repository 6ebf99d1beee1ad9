#!/usr/bin/env bash
# The device check of issue 12, for one GPU, under 8 minutes: the device-capable tests (the one
# driver in memory and under --max-memory on CUDA against the CPU run) and the Llama-2-7B-shaped
# surgeon bench with --device cuda. Output goes to bench/gpu_check/ (commit it). CI never runs it.
#   bash bench/gpu_check.sh [PYTHON]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
OUT=bench/gpu_check
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
} > "$OUT/environment.txt" 2>&1
timeout 180 "$PY" -m pytest -q -rs tests/test_device.py 2>&1 | tail -40 > "$OUT/tests.txt"
echo "tests: exit ${PIPESTATUS[0]}" >> "$OUT/tests.txt"
timeout 270 "$PY" bench/scale7b.py --device cuda --threads 8 --max-memory 60GB \
  > "$OUT/scale7b.txt" 2>&1
echo "scale7b: exit $?" >> "$OUT/scale7b.txt"
cat "$OUT/tests.txt" "$OUT/scale7b.txt" | tail -60
