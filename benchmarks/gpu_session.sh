#!/usr/bin/env bash
# The GPU tests and benchmarks in one script, for a CUDA machine (written for torch 2.11, triton
# 3.6, Python 3.12, no network):
#   bash benchmarks/gpu_session.sh
# Results land in $OUT (default benchmarks/results/).
set -uo pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export TAPS_FAST_NO_EXT=${TAPS_FAST_NO_EXT:-0}
# Builds taps_fast._C with its CUDA part (sm_80, sm_90) on the machine's own torch.
pip install -e . --no-deps --no-build-isolation -q > "$OUT/gpu_build.txt" 2>&1
echo "build rc=$?" >> "$OUT/gpu_build.txt"
{
  date -u; nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv
  python -m taps_fast.info
} > "$OUT/gpu_info.txt" 2>&1
# The compiled kernels first: their GPU tests, then the small-batch suite (bf16, CUDA graphs over
# layer stacks larger than 4x L2, against the floor, the Triton path and torch.mm).
python -m pytest tests/ext/test_ext.py tests/ext/test_ext_kernels.py -q -p no:cacheprovider > "$OUT/gpu_ext_tests.txt" 2>&1
echo "ext tests rc=$?" >> "$OUT/gpu_ext_tests.txt"
python -m taps_fast.bench --suite small --quiet --out "$OUT/small_cuda.json" > "$OUT/small_cuda.txt" 2>&1
echo "small rc=$?" >> "$OUT/small_cuda.txt"
# GPU tests: the interpreter-tier tests run on the GPU, plus the large shapes and bf16.
python -m pytest tests/kernels/ tests/ops/test_triton_dispatch.py \
  tests/ops/test_mt_ops.py tests/multitask/test_multitask.py -q -x -p no:cacheprovider > "$OUT/gpu_tests.txt" 2>&1
echo "tests rc=$?" >> "$OUT/gpu_tests.txt"
python -m taps_fast.bench --suite kernels --quiet --out "$OUT/kernels_cuda.json" > "$OUT/kernels_cuda.txt" 2>&1
echo "kernels rc=$?" >> "$OUT/kernels_cuda.txt"
python -m taps_fast.bench --quiet --batch 64 --resolution 224 --out "$OUT/bench_cuda.json" > "$OUT/bench_cuda.txt" 2>&1
echo "models rc=$?" >> "$OUT/bench_cuda.txt"
# Multi-task, the GPU targets: one linear layer M = N = K = 4096, T = 32, a quarter open;
# ViT-B/16 end to end, batch 256, T = 32.
python -m taps_fast.bench --suite multitask --layer 4096,4096,4096,32 --out "$OUT/mt_layer_cuda.json" \
  > "$OUT/mt_layer_cuda.txt" 2>&1
echo "mt layer rc=$?" >> "$OUT/mt_layer_cuda.txt"
python -m taps_fast.bench --suite multitask --models vit_base_patch16_224 --batch 256 --tasks 32 \
  --out "$OUT/mt_vitb_cuda.json" > "$OUT/mt_vitb_cuda.txt" 2>&1
echo "mt vit-b rc=$?" >> "$OUT/mt_vitb_cuda.txt"
tail -n 3 "$OUT"/*.txt
