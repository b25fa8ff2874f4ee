#!/usr/bin/env bash
# One GPU session for the request path end to end and the GPU-efficiency work: CUDA tests (kernels, vision attention,
# decode graphs, NVDEC), decode ms/token vs transformers, vision tower TFLOP/s, time to first token from real files
# (dense vs APB-V with the CPU decoder; the same with NVDEC; dense beside the official qwen-vl-utils + transformers
# pipeline), the short-input speed points, and profiles of one APB-V/APB layer. Each step has its own time limit
# and the script goes on when one fails.
# Usage (repo root; in .whl/: PyAV, decord2, qwen-vl-utils and PyNvVideoCodec as wheels or unpacked .tar.xz, where
# the image lacks them):
#   OUT=dir [RANKS=8] [ARCH=qwen2.5-vl-3b] [STEPS="tests decode vision e2e nvdec transformers speed profile"] \
#     bash bench/device_perf.sh
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
RANKS=${RANKS:-8} ARCH=${ARCH:-qwen2.5-vl-3b} STEPS=${STEPS:-tests decode vision e2e nvdec transformers speed profile}
quiet() { grep --line-buffered -v "Loading\|Warn\|OMP_NUM_THREADS\|\*\*\*\*\|it/s\]"; }
step() {  # NAME LIMIT_S COMMAND...: run it, stop it at its limit (killed 5 s later if it does not stop), log it
  local name=$1 limit=$2; shift 2; echo "== $name ($(date +%T))"
  timeout -k 5 "$limit" "$@" 2>&1 | quiet | tee "$OUT/$name.log"
}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
TESTS=${TESTS:-tests/test_kernels_cuda.py tests/test_vision_attention.py tests/test_decode_cuda.py tests/test_nvdec_cuda.py}
[[ $STEPS == *tests* ]] && step kernels_cuda 150 python3 -m pytest -q -s -p no:cacheprovider --noconftest $TESTS
e2e() {  # NAME LIMIT_S DECODER [ARGS...]: time to first token from the 1440p file, default size and full 1440p
  local name=$1 limit=$2 decoder=$3; shift 3
  step "$name-default" "$limit" python3 -m apbv.bench.e2e --arch "$ARCH" --videos 1440p:40:10 --frames 64 \
    --world-size "$RANKS" --strategies dense,apbv --video-decoder "$decoder" --warmup 1 --repeats 1 \
    --out "$OUT/$name-$ARCH-default" "$@"
  step "$name-1440p" "$limit" python3 -m apbv.bench.e2e --arch "$ARCH" --videos ${E2E_VIDEOS:-1440p:40:10} \
    --frames 64 --world-size "$RANKS" --strategies dense,apbv --max-pixels 3686400 --uncapped \
    --video-decoder "$decoder" --warmup 1 --repeats 1 --out "$OUT/$name-$ARCH-1440p" "$@"
}
[[ $STEPS == *nvdec* ]] && e2e e2e-nvdec 110 nvdec
[[ $STEPS == *e2e* ]] && e2e e2e 110 cpu
[[ $STEPS == *transformers* ]] && step e2e-transformers 120 python3 -m apbv.bench.e2e --arch "$ARCH" \
  --videos 1440p:40:10 --frames 64 --world-size 1 --strategies dense --transformers --warmup 1 --repeats 1 \
  --out "$OUT/e2e-transformers-$ARCH-default"
[[ $STEPS == *decode* ]] && step decode 80 python3 -m apbv.bench.decode --arch "$ARCH" --contexts 1024 16384 131072 \
  --repeats 2 --out "$OUT/decode.json"
[[ $STEPS == *vision* ]] && step vision 50 python3 -m apbv.bench.vision --arch "$ARCH" --resolution 1440p --frames 8 \
  --repeats 3 --out "$OUT/vision.json"
[[ $STEPS == *speed* ]] && step speed-short 70 python3 -m apbv.bench.speed --arch "$ARCH" --resolutions 360p \
  --frames 16 64 --world-size "$RANKS" --strategies dense,apb,apbv --warmup 1 --repeats 2 --out "$OUT/speed-$ARCH-short"
if [[ $STEPS == *profile* ]]; then
  for tokens in 9600 148480; do
    step "attention-$tokens" 60 python3 -m apbv.bench.attention --tokens "$tokens" --world-size "$RANKS" --device cuda \
      --dtype bf16 --repeats 5 --strategies dense,apb,apbv --json "$OUT/attention-$tokens-w$RANKS.json" \
      --profile "$OUT/profile-$tokens"
  done
fi
echo "== done ($(date +%T))"
