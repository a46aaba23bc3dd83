"""What creating a workload's jax.Arrays costs, before any reading: `python -m benchmarks.placement_floor [W2]`.

A restore to a target must end with one committed ``jax.Array`` per leaf.
This times making them from host numpy arrays that are already in memory,
five times each way, on the default device:

* JAX's internal per-array transfer (``pxla.batched_device_put`` with one
  abstract value per distinct shape and dtype), the path
  ``jaxckpt.placement.put`` takes;
* public ``jax.device_put`` of the whole list.

The faster figure is a floor for any restore of that many leaves: with
10,000 small leaves it is well above the time it takes to read their bytes
cold, which is what `RESULTS.md` cites for the W2 cold-restore target.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import jax

from . import workloads


def main(argv: list[str]) -> int:
    from jax._src import core
    from jax._src.interpreters import pxla

    name = argv[0] if argv else "W2"
    workload = workloads.get(name)
    arrays = [workloads.make_leaf(workload, i) for i in range(len(workload.leaves))]
    device = jax.devices()[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    internal, public = [], []
    for _ in range(5):
        avals: dict = {}
        t0 = time.perf_counter()
        out = []
        for a in arrays:
            aval = avals.get((a.shape, a.dtype))
            if aval is None:
                aval = avals[(a.shape, a.dtype)] = core.ShapedArray(a.shape, a.dtype)
            out.append(pxla.batched_device_put(aval, sharding, [a], [device], True))
        jax.block_until_ready(out)
        internal.append(time.perf_counter() - t0)
        del out
        t0 = time.perf_counter()
        jax.block_until_ready(jax.device_put(arrays, [sharding] * len(arrays)))
        public.append(time.perf_counter() - t0)
    result = {"workload": name, "leaves": len(arrays), "bytes": sum(a.nbytes for a in arrays),
              "device": str(device), "internal_s": internal, "device_put_s": public,
              "internal_median_s": statistics.median(internal), "device_put_median_s": statistics.median(public)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
