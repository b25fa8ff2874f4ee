#!/usr/bin/env bash
# Train the embedded model on a GPU machine (repo root; PyAV wheel in .whl/ when the image lacks it).
# Usage: OUT=dir [WORKERS=n] bash bench/device_train.sh ARGS...   (ARGS: apbv.train's, less --out/--device/--workers)
# The checkpoint goes to $OUT/model, the log to $OUT/train.log; evaluate it with --evaluate-only (CPU is fine).
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
python3 -m apbv.train --out "$OUT/model" --device cuda --workers "${WORKERS:-$(($(nproc) - 2))}" "$@" 2>&1 \
  | grep -v "Loading weights\|Writing model" | tee "$OUT/train.log"
