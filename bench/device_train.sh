#!/usr/bin/env bash
# Train the embedded model on a GPU machine (repo root; PyAV wheel in .whl/ when the image lacks it).
# Usage: OUT=dir TIME_LIMIT=seconds STEPS=n bash bench/device_train.sh
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
python3 -m apbv.train --out "$OUT/model" --device cuda --workers "$(($(nproc) - 2))" --threads 2 \
  --steps "${STEPS:-2300}" --batch 32 --lr 5e-4 --warmup 100 --frames 8-128 --time-limit "${TIME_LIMIT:-430}" \
  --log-every 50 --eval-n 0 2>&1 | grep -v "Loading weights\|Writing model" | tee "$OUT/train.log"
