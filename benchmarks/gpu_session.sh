#!/usr/bin/env bash
# Every GPU figure the issues ask for, in ONE device call (about 9 minutes; the device gives a task ~15).
# Prepare on this machine (keras + nvImageCodec for CUDA 13 + 500 photos, ~53 MB):
#   bash ../shared/tools/prepare-device.sh 500 nvidia-nvimgcodec-cu13 nvidia-nvjpeg
# then with the device tool: command "bash benchmarks/gpu_session.sh", carry [".device"], timeout_s 590.
# Steps (each under its own time limit, results under $OUT as they come):
#   1 nvImageCodec on the GPU?          smoke.log
#   2 GPU ladder, Keras set              ladder_keras.{log,json}   (build, compile cache miss)
#   3 rerun of the whole CLI, Keras set  rerun.log                 (new process: compile cache hit)
#   4 grow that cache by 5% and rerun    rerun.log
#   5 GPU ladder, Lite set, nvImageCodec ladder_lite.{log,json}
#   6 decode benchmark                   decode.log
# Tiny on a CPU (checks the plumbing, not speed):  SESSION_TINY=1 KERAS_BACKEND=jax bash benchmarks/gpu_session.sh
set -uo pipefail
t0=$(date +%s)
out=${OUT:-/tmp/gpu_session}; mkdir -p "$out"
if [ -z "${SESSION_TINY:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD LD_LIBRARY_PATH=/tmp/site/nvidia/cu13/lib:${LD_LIBRARY_PATH:-}
  keras_set=r50,incv3,xcep,irv2; lite_set=lite0,lite1,lite2; rep=40; cap_k=110; cap_l=70; sec=6
  py=python3; img=.device/img
else
  export PYTHONPATH=$PWD
  keras_set=lite0; lite_set=lite0; rep=2; cap_k=4; cap_l=4; sec=0.3
  py=${PYTHON:-python3}; img=${IMG:-.device/img}
fi
export KERAS_BACKEND=jax PYTHONUNBUFFERED=1 CATFEAT_CACHE_DIR=/tmp/catfeat-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$out/smoke.log"
quiet() { grep -v "oneDNN\|absl::\|^WARNING: All log" ; }
left() { echo $(( ${BUDGET:-575} - ($(date +%s) - t0) )); }
lim() { local want=$1 l; l=$(( $(left) - 5 )); [ "$l" -lt "$want" ] && want=$l; [ "$want" -lt 5 ] && want=5; echo "$want"; }
step() { echo "=== $1 at +$(( $(date +%s) - t0 )) s"; }

step "1 nvImageCodec" | tee -a "$out/smoke.log"
timeout 60 $py - <<'EOF' 2>&1 | quiet | tee -a "$out/smoke.log"
import glob, time
from catfeat.images import nvimgcodec_decoder as n
from catfeat.models.forward import device_description
print("device:", device_description(), "| nvimgcodec installed:", n.installed())
if n.installed():
    s = n.session()
    datas = [open(p, "rb").read() for p in sorted(glob.glob(".device/img/*.jpg"))[:64]]
    t = time.perf_counter(); out = s.decoder.decode(datas, params=s.params); dt = time.perf_counter() - t
    print("gpu_ready:", s.on_gpu, "decoded", sum(o is not None for o in out), "of", len(datas), f"in {dt:.3f} s (first call)")
EOF
dec=opencv; grep -q "gpu_ready: True" "$out/smoke.log" && dec=nvimgcodec

step "2 ladder keras"
timeout "$(lim 240)" $py benchmarks/gpu_ladder.py --models "$keras_set" --data "$img" --replicate $rep \
  --rung-seconds $sec --time-cap $cap_k --json "$out/ladder_keras.json" 2>&1 | quiet | tee "$out/ladder_keras.log"

step "3 rerun, whole CLI" | tee "$out/rerun.log"
links=$(mktemp -d); feats=$(mktemp -d)
n=0; for k in $(seq 1 $rep); do for p in "$img"/*.jpg; do b=$(basename "$p"); c=${b%%.*}; i=${b#*.}; i=${i%%.*}
  n=$((n+1)); ln -s "$(realpath "$p")" "$links/$c.$k$(printf %05d "$i").jpg"; done; done
echo "$n photos linked" | tee -a "$out/rerun.log"
grow=$(mktemp -d); m=$((n / 20)); ls "$links" | sort | tail -n $m | while read -r f; do mv "$links/$f" "$grow/"; done
echo "held back $m (5%) for the growth step" | tee -a "$out/rerun.log"
s=$(date +%s%N)
timeout "$(lim 100)" $py -m catfeat.extract "$links" --models "$keras_set" --weights none --precision mixed_bfloat16 \
  --features "$feats" --no-progress 2>&1 | quiet | tee -a "$out/rerun.log"
echo "whole process wall: $(( ($(date +%s%N) - s) / 1000000 )) ms" | tee -a "$out/rerun.log"

step "4 grow by 5%" | tee -a "$out/rerun.log"
mv "$grow"/* "$links/"
s=$(date +%s%N)
timeout "$(lim 60)" $py -m catfeat.extract "$links" --models "$keras_set" --weights none --precision mixed_bfloat16 \
  --features "$feats" --no-progress 2>&1 | quiet | tee -a "$out/rerun.log"
echo "whole process wall (grow): $(( ($(date +%s%N) - s) / 1000000 )) ms" | tee -a "$out/rerun.log"
rm -rf "$links" "$feats" "$grow"

step "5 ladder lite, decoder $dec"
timeout "$(lim 170)" $py benchmarks/gpu_ladder.py --models "$lite_set" --data "$img" --replicate $rep --decoder $dec \
  --rung-seconds $sec --time-cap $cap_l --json "$out/ladder_lite.json" 2>&1 | quiet | tee "$out/ladder_lite.log"

step "6 decode benchmark"
timeout "$(lim 60)" $py benchmarks/bench_gpu_decode.py --data "$img" --limit 500 --sizes 224,240,260,299 \
  --batch-sizes 128 --repeat 2 2>&1 | quiet | tee "$out/decode.log"
step "done"
