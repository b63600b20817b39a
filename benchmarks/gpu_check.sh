#!/usr/bin/env bash
# The GPU check in one device call (see benchmarks/gpu_check.py). Prepare first, on this machine:
#   bash ../shared/tools/prepare-device.sh 1000       (the GPU machine has OpenCV, h5py, tqdm, JAX)
# then with the device tool: command "bash benchmarks/gpu_check.sh", carry [".device"], timeout_s 540.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD KERAS_BACKEND=jax PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
out=${OUT:-/tmp}
timeout 470 python3 benchmarks/gpu_check.py --data .device/img --replicate 20 "$@" | tee "$out/gpu_check.json"
