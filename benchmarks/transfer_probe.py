"""Device<->host transfer strategies on the default device: `python -m benchmarks.transfer_probe [OUT.json]`.

Not a comparison with other checkpointers: a probe that tells which JAX
transfer path the snapshot (device -> host) and the restore (host -> device)
should take on this machine. Each strategy runs three times (median, seconds
and GB/s); a strategy that raises is recorded with its error.

  large: 16 arrays of 64 MiB (1 GiB)     small: 10,000 arrays of 4 KiB (40 MiB)

D2H: copy_to_host_async on all then numpy.asarray (what jaxckpt does); one
device_put of the list to "pinned_host" memory, then numpy.asarray; the same
to "unpinned_host"; jax.device_get; for small arrays also one jitted
concatenation on the device, one transfer and a host split.
H2D: one device_put of the list of numpy arrays (what jaxckpt does); numpy ->
pinned_host -> device; for 1,000 of the small arrays one concatenated
transfer and a jitted split on the device (compile time recorded apart).
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

MIB = 1 << 20


def _timing(fn):
    """A run of ``fn`` that returns its duration in seconds."""
    def run():
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return run


def _record(results, name, nbytes, run, reps=3):
    """Median of ``reps`` runs (each returns its seconds), or the error it raised."""
    try:
        times = [run() for _ in range(reps)]
        med = statistics.median(times)
        results[name] = {"s": med, "gbps": nbytes / med / 1e9, "runs": times}
        print(f"{name:45s} {med * 1e3:9.1f} ms {nbytes / med / 1e9:7.2f} GB/s", flush=True)
    except Exception as e:  # noqa: BLE001 - a probe records what fails
        results[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
        print(f"{name:45s} FAILED {type(e).__name__}: {str(e)[:150]}", flush=True)


def _host_sharding(dev, kind):
    return jax.sharding.SingleDeviceSharding(dev, memory_kind=kind)


def d2h(results, label, arrays, dev):
    nbytes = sum(a.nbytes for a in arrays)

    def async_asarray():
        for a in arrays:
            a.copy_to_host_async()
        return [np.asarray(a) for a in arrays]

    # copy_to_host_async caches the host value on the array: use fresh arrays each run
    def fresh(fn):
        def run():
            nonlocal arrays
            arrays = [a + 0 for a in arrays]
            jax.block_until_ready(arrays)
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        return run

    def timed_only(name, fn):
        _record(results, name, nbytes, fresh(fn))

    timed_only(f"d2h {label} copy_to_host_async+asarray", async_asarray)
    timed_only(f"d2h {label} device_get", lambda: jax.device_get(arrays))
    for kind in ("pinned_host", "unpinned_host"):
        def to_host(kind=kind):
            hs = jax.device_put(arrays, _host_sharding(dev, kind))
            jax.block_until_ready(hs)
            return [np.asarray(h) for h in hs]
        timed_only(f"d2h {label} device_put({kind})+asarray", to_host)

        def to_host_only(kind=kind):
            hs = jax.device_put(arrays, _host_sharding(dev, kind))
            return jax.block_until_ready(hs)
        timed_only(f"d2h {label} device_put({kind}) only", to_host_only)


def h2d(results, label, host, dev):
    nbytes = sum(a.nbytes for a in host)
    sh = jax.sharding.SingleDeviceSharding(dev)
    _record(results, f"h2d {label} device_put(list)",
            nbytes, _timing(lambda: jax.block_until_ready(jax.device_put(host, [sh] * len(host)))))

    def via_pinned():
        p = jax.device_put(host, _host_sharding(dev, "pinned_host"))
        return jax.block_until_ready(jax.device_put(p, sh))
    _record(results, f"h2d {label} numpy->pinned_host->device", nbytes, _timing(via_pinned))
    pinned = jax.block_until_ready(jax.device_put(host, _host_sharding(dev, "pinned_host")))
    _record(results, f"h2d {label} pinned_host->device only", nbytes,
            _timing(lambda: jax.block_until_ready(jax.device_put(pinned, sh))))


def small_concat(results, arrays, dev):
    nbytes = sum(a.nbytes for a in arrays)
    sizes = [a.size for a in arrays]
    shapes = [a.shape for a in arrays]
    cat = jax.jit(lambda xs: jnp.concatenate([x.reshape(-1) for x in xs]))
    t0 = time.perf_counter()
    jax.block_until_ready(cat(arrays))
    results["d2h small concat compile+first"] = {"s": time.perf_counter() - t0}
    print(f"d2h small concat compile+first {results['d2h small concat compile+first']['s']:.2f} s")

    def run():
        flat = np.asarray(cat(arrays))
        return [p.reshape(s) for p, s in zip(np.split(flat, np.cumsum(sizes)[:-1]), shapes)]
    _record(results, "d2h small jit concat+one transfer+split", nbytes, _timing(run))
    flat = np.concatenate([np.asarray(a).reshape(-1) for a in arrays])
    offs = np.cumsum([0] + sizes)
    split = jax.jit(lambda f: [f[offs[i]:offs[i + 1]].reshape(shapes[i]) for i in range(len(shapes))])
    t0 = time.perf_counter()
    jax.block_until_ready(split(jax.device_put(flat, dev)))
    results["h2d small split compile+first"] = {"s": time.perf_counter() - t0}
    _record(results, "h2d small one transfer+jit split", nbytes,
            _timing(lambda: jax.block_until_ready(split(jax.device_put(flat, dev)))))


def main(argv):
    out = argv[0] if argv else None
    dev = jax.devices()[0]
    results = {"device": dev.device_kind, "backend": jax.default_backend(), "jax": jax.__version__}
    print(results, flush=True)
    large = [jnp.full((16 * MIB,), i, jnp.float32) for i in range(16)]
    small = [jnp.full((1024,), i, jnp.float32) for i in range(10_000)]
    jax.block_until_ready((large, small))
    d2h(results, "large", large, dev)
    d2h(results, "small", small, dev)
    host_large = [np.full(16 * MIB, i, np.float32) for i in range(16)]
    host_small = [np.full(1024, i, np.float32) for i in range(10_000)]
    h2d(results, "large", host_large, dev)
    h2d(results, "small", host_small, dev)
    if "--no-concat" not in argv:
        # 1,000 arrays only: compiling a 10,000-operand concatenation took 16 s
        # and the 10,000-output split 2m21s on a 2-core CPU host.
        small_concat(results, small[:1000], dev)
    if out:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
