#!/usr/bin/env bash
# One batched GPU session for speed: CUDA kernel checks, end-to-end speed per strategy, prefill vs transformers.
# Usage (on a GPU machine, repo root; PyAV wheel in .whl/ when the image lacks it): OUT=dir bash bench/device_speed.sh
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -m pytest -q -p no:cacheprovider --noconftest tests/test_kernels_cuda.py tests/test_vision_attention.py \
  2>&1 | tee "$OUT/kernels_cuda.log" | tail -5
timeout "${SPEED_TIMEOUT:-450}" python3 -m apbv.bench.speed --arch "${ARCH:-qwen2.5-vl-3b}" \
  --resolutions ${RESOLUTIONS:-1440p 720p} --frames ${FRAMES:-64} --world-size "${WORLD_SIZE:-8}" \
  --warmup "${WARMUP:-3}" --repeats "${REPEATS:-5}" --out "$OUT/speed-${ARCH:-qwen2.5-vl-3b}-w${WORLD_SIZE:-8}" 2>&1 \
  | grep -v "Loading\|Warn" | tee "$OUT/speed.log"
timeout "${PREFILL_TIMEOUT:-300}" python3 -m apbv.bench.prefill --arch qwen2.5-vl-3b --resolutions 360p 720p --frames 64 \
  --repeats 5 --json "$OUT/prefill-qwen2.5-vl-3b.json" 2>&1 | grep -v "Loading\|Warn" | tee "$OUT/prefill-qwen2.5-vl-3b.txt"
