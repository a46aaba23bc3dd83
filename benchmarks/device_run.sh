#!/usr/bin/env bash
# The GPU benchmark as one prepared script, for a lent accelerator host that
# has jax, flax, orbax-checkpoint and msgpack but no network:
#   OUT=/some/dir bash benchmarks/device_run.sh [seconds]
# (used through the device tool as: bash benchmarks/device_run.sh 560)
# Installs jaxckpt without dependencies, records the card, then, each step
# under its own time limit so that one failure or overrun leaves the others:
#   1. gpu_probe restore W3 (GPU_PROBE_ROUNDS=1): restores to the device in
#      fresh processes from the page cache, jaxckpt's transfer settings
#      (windows, threads, mappings, staging through pinned host memory: not
#      measured yet, hence first) side by side with orbax, each checked bit for
#      bit, and the limit (page-cache read bandwidth, pinned host -> device
#      bandwidth);
#   2. gpu_probe first W2 / W1: the first and second save of a process, fresh
#      processes, jaxckpt as is, jaxckpt after AsyncCheckpointer.prepare, orbax
#      (W2: 10,000 small leaves, the packed path; every jaxckpt save restored
#      and compared bit for bit);
#   3. the short harness: W1 with jaxckpt async and orbax async, W2 with
#      jaxckpt async (save, restore warm and cold, concurrent loop).
# QUICK=--quick runs it all on tiny workloads (a check of the script).
# Everything lands in $OUT/gpu-results.tgz (the device tool brings back at
# most 8 files) and the log in $OUT/run.log: copy them into
# benchmarks/results/ and commit at once (the tool's copy is scratch space;
# the 2026-12-04 run's files were lost that way).
set -u
OUT=${OUT:-benchmarks/results}
budget=${1:-560}
start=$SECONDS
left() { echo $(( budget - (SECONDS - start) )); }
R=$(mktemp -d /tmp/gpu-results.XXXX)
exec > >(tee "$OUT/run.log") 2>&1
export PYTHONUNBUFFERED=1
python3 -m pip install --no-deps --no-build-isolation -q -e . > "$R/pip.log" 2>&1 \
  || echo "install failed (see pip.log): running from the source tree, which python -m puts on sys.path"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$R/card.txt"
python3 -c "import jax, jaxlib, orbax.checkpoint as o; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'orbax', o.__version__, jax.devices())" 2>&1 | tail -1 | tee -a "$R/card.txt"
lscpu | grep -E "^Model name|^CPU\(s\)" | tee -a "$R/card.txt"
step() {  # step LIMIT NAME COMMAND...
  local limit=$1 name=$2; shift 2
  local l; l=$(left)
  (( limit > l - 15 )) && limit=$(( l - 15 ))
  if (( limit < 20 )); then echo "== $name: skipped, $l s left"; return; fi
  echo "== $name (limit ${limit} s, $(left) s left)"
  timeout "$limit" "$@" > "$R/$name.log" 2>&1
  echo "== $name exit status $? after $(( SECONDS - start )) s"; tail -12 "$R/$name.log"
}
GPU_PROBE_ROUNDS=1 step 180 restore-W3 python3 -m benchmarks.gpu_probe restore W3 ${QUICK:-} "$R/restore-W3.json"
step 150 first-W2 python3 -m benchmarks.gpu_probe first W2 ${QUICK:-} "$R/first-W2.json"
step 90 first-W1 python3 -m benchmarks.gpu_probe first W1 ${QUICK:-} "$R/first-W1.json"
step 150 harness-W1 python3 -m benchmarks.run --short ${QUICK:-} --workloads W1 --methods jaxckpt-async,orbax-async \
  --results "$R" --no-results-md
step 90 harness-W2 python3 -m benchmarks.run --short ${QUICK:-} --workloads W2 --methods jaxckpt-async \
  --results "$R" --no-results-md
tar czf "$OUT/gpu-results.tgz" -C "$R" . && echo "packed $(ls "$R" | wc -l) files after $(( SECONDS - start )) s"
