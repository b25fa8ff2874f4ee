#!/usr/bin/env bash
# One batched GPU session: CUDA kernel checks, attention micro-benchmarks, model prefill benchmark.
# Usage (on a GPU machine, repo root; PyAV wheel in .whl/ when the image lacks it): OUT=dir bash bench/device_run.sh
set -uo pipefail
OUT=${OUT:-bench/results/latest}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if ! python3 -c "import av" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}.
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
python3 -m pytest -q -s -p no:cacheprovider --noconftest tests/test_kernels_cuda.py 2>&1 | tee "$OUT/kernels_cuda.log" | tail -25
for n in 148480 38272; do
  python3 -m apbv.bench.attention --tokens "$n" --world-size 8 --device cuda --dtype bf16 --repeats 5 \
    --json "$OUT/attention-$n-w8.json" 2>&1 | tee "$OUT/attention-$n-w8.txt"
done
python3 -m apbv.bench.prefill --arch qwen2.5-vl-3b --resolutions 360p 720p --frames 64 --repeats 5 \
  --json "$OUT/prefill-qwen2.5-vl-3b.json" 2>&1 | tee "$OUT/prefill-qwen2.5-vl-3b.txt" | grep -v "Loading\|Warn"
