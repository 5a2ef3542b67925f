#!/usr/bin/env bash
# One command for a CUDA machine: GPU correctness tests, pooling memory, and the encoder
# comparison (seed loop, sentence-transformers, ours) on the bert-base-shaped model with
# MS MARCO passage lengths, in bf16 (plus our fp32) and fp16. Results land in ${OUT:-out/gpu}.
#   bash benchmarks/gpu_bench.sh [N_PASSAGES]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-out/gpu}; mkdir -p "$out"
n=${1:-20000}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -m pytest -q -s -m gpu -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/gpu_tests.log"
python -m benchmarks.pooling_memory --device cuda --json "$out/pooling.json" 2>&1 | tee "$out/pooling.log"
python -m benchmarks.encoder_bench --model bert-base --n "$n" --device cuda --dtype bfloat16 \
  --ours dtype=float32 --ours dtype=float32,packed=1,screen=1 --ours max_batch_tokens=65536 --ours packed=1 \
  --json "$out/bench_bf16.json" 2>&1 | grep -v -E "Loading weights|deprecated" | tee "$out/bench_bf16.log"
python -m benchmarks.encoder_bench --model bert-base --n "$((n / 2))" --reps 2 --device cuda --dtype float16 --skip seed \
  --json "$out/bench_fp16.json" 2>&1 | grep -v -E "Loading weights|deprecated" | tee "$out/bench_fp16.log"
