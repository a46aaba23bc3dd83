"""Donation vs the CPU snapshot: `python -m benchmarks.donation view|copy|auto`.

A jitted step that donates a 360 MiB state runs at full speed, then with an
AsyncCheckpointer save every 10 steps, with the default zero-copy CPU
snapshot (``copy_cpu_arrays=False``, "view"), with ``copy_cpu_arrays=True``
("copy") or with the default ``None`` ("auto": views until a save sees the
loop donate, then copies). Prints the step
time and the slowdown. See benchmarks/RESULTS.md for what it showed.
"""
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxckpt

mode = sys.argv[1] if len(sys.argv) > 1 else "view"
SCRATCH = "benchmarks/.scratch/donation"
state = {f"w{i}": jnp.ones((2048, 2048), jnp.float32) * i for i in range(22)}  # 360 MiB
step = jax.jit(lambda s: jax.tree.map(lambda x: x * 1.0001 + 1e-6, s), donate_argnums=0)
state = step(state); jax.block_until_ready(state)
def run(n):
    global state
    t0 = time.perf_counter()
    for _ in range(n):
        state = step(state)
    jax.block_until_ready(state); return time.perf_counter() - t0
run(5); base = run(20) / 20
shutil.rmtree(SCRATCH, ignore_errors=True)
ck = jaxckpt.AsyncCheckpointer(copy_cpu_arrays={"view": False, "copy": True, "auto": None}[mode])
times = []
for k in range(5):
    t0 = time.perf_counter()
    h = ck.save(f"{SCRATCH}/{k}", state)
    t = run(10)
    h.result()
    times.append(t / 10)
ck.close()
print(mode, f"base {base*1e3:.1f} ms/step, with a save every 10 steps {np.median(times)*1e3:.1f} ms/step ({(np.median(times)/base-1)*100:+.0f}%)")
shutil.rmtree(SCRATCH, ignore_errors=True)
