# Sourced by the bench/device_*.sh scripts: output folder, offline Hugging Face, NVLink multicast off, wheels from
# .whl/ (PyAV, plotly; as .whl files, or as unpacked wheels in .tar.xz files, which travel smaller) where the GPU
# image lacks them, the repository on PYTHONPATH.
OUT=${OUT:-bench/results/latest}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# NVLink multicast stays off on shared hosts (the device notes: it can take the host's GPUs out of service).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if ! python3 -c "import av, plotly" 2>/dev/null; then
  mkdir -p /tmp/site
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  fi
  for packed in .whl/*.tar.xz; do [ -f "$packed" ] && tar -C /tmp/site -xJf "$packed"; done
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}.
