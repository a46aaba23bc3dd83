#!/usr/bin/env bash
# The GPU benchmark as one prepared script, for a lent accelerator host that
# has jax, flax, orbax-checkpoint and msgpack but no network:
#   OUT=/some/dir bash benchmarks/device_run.sh [seconds]
# (used through the device tool as: bash benchmarks/device_run.sh 540)
# Installs jaxckpt without dependencies, records the card, then runs the
# short harness (full-size W1, W3, W2; jaxckpt async/sync and orbax async)
# within the given time budget (default 420 s). Results go to $OUT; a run cut
# short by the budget keeps every measurement made so far in its JSON.
set -u
OUT=${OUT:-benchmarks/results}
budget=${1:-420}
python3 -m pip install --no-deps --no-build-isolation -q -e . > "$OUT/pip.log" 2>&1 \
  || echo "install failed (see pip.log): running from the source tree, which python -m puts on sys.path"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/card.txt"
python3 -c "import jax, orbax.checkpoint as o; print('jax', jax.__version__, 'orbax', o.__version__, jax.devices())" 2>&1 | tail -1 | tee -a "$OUT/card.txt"
timeout "$budget" python3 -m benchmarks.run --short --workloads W1,W3,W2 --results "$OUT" --no-results-md
echo "benchmark exit status: $?"
