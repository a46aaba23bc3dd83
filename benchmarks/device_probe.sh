#!/usr/bin/env bash
# The accelerator probes (benchmarks/gpu_probe.py) as one prepared script:
#   OUT=/some/dir bash benchmarks/device_probe.sh
# Snapshot paths on W1 and W2, then fresh-process restores of W3 (jaxckpt
# with three transfer windows, and orbax). About four minutes on an H200 host.
set -u
OUT=${OUT:-benchmarks/results}
python3 -m pip install --no-deps --no-build-isolation -q -e . > "$OUT/pip.log" 2>&1 || echo "install failed"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$OUT/card.txt"
timeout 60 python3 -m benchmarks.gpu_smoke 2>&1 | tail -2
timeout 90 python3 -m benchmarks.gpu_probe snapshot W1 "$OUT/gpu-probe-snapshot-W1.json"
timeout 90 python3 -m benchmarks.gpu_probe snapshot W2 "$OUT/gpu-probe-snapshot-W2.json"
timeout 200 python3 -m benchmarks.gpu_probe restore W3 "$OUT/gpu-probe-restore-W3.json" 2>&1 | cut -c1-400
