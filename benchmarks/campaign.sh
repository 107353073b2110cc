#!/usr/bin/env bash
# One GPU call: the whole test suite (GPU-marked tests included), then the benchmarks. Logs and JSON land in
# $OUT when the device tool runs it, else in benchmarks/results/.
#   bash benchmarks/campaign.sh [pytest args...]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
out=${OUT:-benchmarks/results}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
python3 -m pytest -q $workers "$@" 2>&1 | tee "$out/pytest.log" | tail -40
status=${PIPESTATUS[0]}
python3 benchmarks/bench_attention.py 2>&1 | tee "$out/bench_attention.log"
python3 benchmarks/bench_vit.py 2>&1 | tee "$out/bench_vit.log"
exit "$status"
