#!/usr/bin/env bash
# The GPU ladder in one device call (see benchmarks/gpu_ladder.py). Prepare first, on this machine:
#   bash ../shared/tools/prepare-device.sh 1000     (keras wheels + 1,000 photos into .device/, ~45 MB)
# then with the device tool: command "bash benchmarks/gpu_ladder.sh keras", carry [".device"], timeout_s 420;
# a second call does the Lite set: "bash benchmarks/gpu_ladder.sh lite". Results: $OUT/ladder_<set>.{log,json}.
set -uo pipefail
name=${1:-keras}; shift || true
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD KERAS_BACKEND=jax PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
out=${OUT:-/tmp}
# 20 links per photo: 20,000 images, enough for every rung at the Lite set's pace
timeout 330 python3 benchmarks/gpu_ladder.py --set "$name" --data .device/img --replicate 20 --rung-seconds 8 \
  --time-cap 180 --json "$out/ladder_$name.json" "$@" 2>&1 | grep -v "oneDNN\|absl::" | tee "$out/ladder_$name.log"
