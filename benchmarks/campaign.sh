#!/usr/bin/env bash
# One GPU call turns into all the evidence: the GPU-marked tests, the end-to-end and per-op benchmarks with
# their torch.compile baselines, JSON + PNG + Markdown tables, and a short summary printed last.
#   bash benchmarks/campaign.sh [OUTDIR]        (default: $OUT when the device tool runs it, else benchmarks/results)
# Planned to fit 9 minutes on an H100 (the compile baselines only at batch 1 and 256; max-autotune only for
# ViT-B/16). Set CAMPAIGN_FULL_TESTS=1 to run the whole test suite instead of the GPU-marked tests.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
out=${1:-${OUT:-benchmarks/results}}
mkdir -p "$out"
start=$(date +%s)
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv | tee "$out/gpu.txt"
workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
marker=$([ "${CAMPAIGN_FULL_TESTS:-0}" = 1 ] && echo "" || echo "-m gpu")
python3 -m pytest -q $workers $marker 2>&1 | tee "$out/pytest.log" | tail -5
tests=${PIPESTATUS[0]}
cli="python3 -m vit_kernels.cli bench --out $out"
$cli --model vit_b_16 --batch 1 8 32 64 128 256 --ops none --compile default max-autotune reduce-overhead --compile-batches 1 256 \
    --train --train-batch 64 128 2>&1 | tee "$out/bench_vit_b16.log" | tail -35
$cli --model vit_s_16 vit_l_16 --batch 1 64 256 --ops none --compile default --compile-batches 256 \
    2>&1 | tee "$out/bench_vit_s_l.log" | tail -15
$cli --model vit_b_16 vit_l_16 --batch 64 256 --no-e2e --compile none 2>&1 | tee "$out/bench_ops.log" | tail -40
$cli --model vit_b_16 --batch 1 64 256 --no-e2e --ops none --breakdown 2>&1 | tee "$out/bench_breakdown.log" | tail -50  # where the time goes: kernel time per category (GEMM, attention, LayerNorm, patch embed, other), rates vs peak and the launch/host gap, ours vs timm eager (~1 min)
echo
echo "== campaign summary ($(( $(date +%s) - start )) s) =="
tail -3 "$out/pytest.log"
grep -h "headline" "$out"/bench_vit_b16.log || echo "no headline (see $out/bench_vit_b16.log)"
ls "$out"
exit "$tests"
