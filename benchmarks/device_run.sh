#!/usr/bin/env bash
# The GPU benchmark as one prepared script, for a lent accelerator host that
# has jax, flax, orbax-checkpoint and msgpack but no network:
#   OUT=/some/dir bash benchmarks/device_run.sh [seconds]
# (used through the device tool as: bash benchmarks/device_run.sh 480)
# Installs jaxckpt without dependencies, records the card, checks bit-exact
# round trips after donation (gpu_smoke), asks where the time goes
# (gpu_probe snapshot on W1 and W2: pinned-host vs copy_to_host_async snapshots
# over three saves of fresh device arrays in one process),
# then runs the short harness: W1 and W3 with jaxckpt async and orbax async,
# W2 with jaxckpt async only (orbax takes ~25 s per W2 save or restore there).
# The harness gets what is left of the budget (default 480 s); a run cut
# short keeps every measurement made so far in its JSON. Results go to $OUT.
set -u
OUT=${OUT:-benchmarks/results}
budget=${1:-480}
start=$SECONDS
left() { echo $(( budget - (SECONDS - start) )); }
python3 -m pip install --no-deps --no-build-isolation -q -e . > "$OUT/pip.log" 2>&1 \
  || echo "install failed (see pip.log): running from the source tree, which python -m puts on sys.path"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/card.txt"
python3 -c "import jax, orbax.checkpoint as o; print('jax', jax.__version__, 'orbax', o.__version__, jax.devices())" 2>&1 | tail -1 | tee -a "$OUT/card.txt"
timeout 60 python3 -m benchmarks.gpu_smoke 2>&1 | tee "$OUT/gpu-smoke.txt"
for w in W1 W2; do
  timeout 90 python3 -m benchmarks.gpu_probe snapshot "$w" "$OUT/gpu-probe-snapshot-$w.json" > "$OUT/gpu-probe-snapshot-$w.log" 2>&1
  echo "gpu_probe snapshot $w exit status: $?"; head -8 "$OUT/gpu-probe-snapshot-$w.log"
done
t=$(( $(left) - 75 ))
echo "harness W1,W3 with ${t} s"
timeout "$t" python3 -m benchmarks.run --short --workloads W1,W3 --methods jaxckpt-async,orbax-async \
  --results "$OUT" --no-results-md 2>&1 | tail -5
echo "benchmark exit status: ${PIPESTATUS[0]}"
t=$(( $(left) - 10 ))
echo "harness W2 with ${t} s"
timeout "$t" python3 -m benchmarks.run --short --workloads W2 --methods jaxckpt-async \
  --results "$OUT" --no-results-md 2>&1 | tail -5
echo "benchmark exit status: ${PIPESTATUS[0]}"
