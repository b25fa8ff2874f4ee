#!/usr/bin/env bash
# Train the embedded model on a GPU machine (repo root; PyAV wheel in .whl/ when the image lacks it): vision
# pre-training on needle clips, then end to end with the vision tower frozen.
# Usage: OUT=dir TIME_LIMIT=seconds STEPS=n bash bench/device_train.sh
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
python3 -m apbv.train --out "$OUT/model" --device cuda --workers "$(($(nproc) - 2))" --threads 2 \
  --vision-steps 3000 --vision-batch 128 --freeze-vision \
  --steps "${STEPS:-4000}" --batch 32 --lr 1e-3 --warmup 50 --frames 2-128 --time-limit "${TIME_LIMIT:-430}" \
  --log-every 50 --eval-n 0 2>&1 | grep -v "Loading weights\|Writing model" | tee "$OUT/train.log"
