#!/usr/bin/env bash
# One batched GPU session for speed: CUDA kernel checks, one attention layer and end-to-end prefill + first token
# per strategy, ours vs transformers' prefill. With RANKS GPUs on the machine the ranks are real processes over NCCL
# (torchrun, measured); with fewer, thread-ranks run one after another on one GPU (projected).
# Usage (repo root; wheels the image lacks, e.g. PyAV and plotly, in .whl/):
#   OUT=dir [RANKS=8] [ARCH=qwen2.5-vl-3b] [RESOLUTIONS="1440p 720p"] [FRAMES=64] [TOKENS=148480] \
#   [STEPS="kernels attention speed prefill"] bash bench/device_speed.sh
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
GPUS=$(nvidia-smi -L | wc -l)
RANKS=${RANKS:-$((GPUS > 1 ? GPUS : 8))}
ARCH=${ARCH:-qwen2.5-vl-3b} TOKENS=${TOKENS:-148480} STEPS=${STEPS:-kernels attention speed prefill}
LAUNCH=(python3)
if ((RANKS > 1 && RANKS <= GPUS)); then LAUNCH=(python3 -m torch.distributed.run --standalone --nproc-per-node "$RANKS"); fi
quiet() { grep -v "Loading\|Warn\|OMP_NUM_THREADS\|\*\*\*\*"; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
if [[ $STEPS == *kernels* ]]; then
  python3 -m pytest -q -p no:cacheprovider --noconftest tests/test_kernels_cuda.py tests/test_vision_attention.py \
    2>&1 | tee "$OUT/kernels_cuda.log" | tail -3
fi
if [[ $STEPS == *attention* ]]; then
  timeout 300 "${LAUNCH[@]}" -m apbv.bench.attention --tokens "$TOKENS" --world-size "$RANKS" --device cuda --dtype bf16 \
    --repeats 5 --json "$OUT/attention-$TOKENS-w$RANKS.json" 2>&1 | quiet | tee "$OUT/attention-$TOKENS-w$RANKS.txt"
fi
if [[ $STEPS == *speed* ]]; then
  timeout "${SPEED_TIMEOUT:-450}" "${LAUNCH[@]}" -m apbv.bench.speed --arch "$ARCH" \
    --resolutions ${RESOLUTIONS:-1440p 720p} --frames ${FRAMES:-64} --world-size "$RANKS" --warmup "${WARMUP:-3}" \
    --repeats "${REPEATS:-5}" --out "$OUT/speed-$ARCH-w$RANKS" 2>&1 | quiet | tee "$OUT/speed-$ARCH-w$RANKS.log"
fi
if [[ $STEPS == *prefill* ]]; then
  timeout "${PREFILL_TIMEOUT:-300}" python3 -m apbv.bench.prefill --arch qwen2.5-vl-3b --resolutions 360p 720p \
    --frames 64 --repeats 5 --json "$OUT/prefill-qwen2.5-vl-3b.json" 2>&1 | quiet | tee "$OUT/prefill-qwen2.5-vl-3b.txt"
fi
