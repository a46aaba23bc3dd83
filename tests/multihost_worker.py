"""One process of a real multi-process JAX job on localhost (CPU devices, gloo).

Run by tests/test_multihost.py as:
    python tests/multihost_worker.py SCENARIO PROCESS_ID NUM_PROCESSES PORT DEVICES_PER_PROCESS WORKDIR
Prints one line ``RESULT <json>`` on success.
"""

import json
import os
import sys

scenario, pid, nproc, port, ndev, workdir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(
    sys.argv[5]), sys.argv[6]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ndev}"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
if os.environ.get("MH_RECOVERABLE") == "1":
    # Without this JAX's runtime terminates every process as soon as one dies.
    jax.config.update("jax_enable_recoverability", True)
jax.distributed.initialize(f"127.0.0.1:{port}", nproc, pid, heartbeat_timeout_seconds=30, initialization_timeout=60)

import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxckpt  # noqa: E402

SHAPE = (16, 8)


def global_values():
    """The deterministic content every scenario saves (the tests know it too)."""
    return {
        "params": {"w": np.arange(128, dtype=np.float32).reshape(SHAPE) / 7,
                   "b": np.arange(8, dtype=np.int32) - 3},
        "replicated": np.linspace(0, 1, 4096, dtype=np.float32).reshape(64, 64),
        "host": np.arange(10, dtype=np.int64) * 3,
        "step": 7,
    }


def mesh(shape, names):
    return Mesh(np.array(jax.devices()).reshape(shape), names)


def place(value, sharding):
    return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])


def state(m, w_spec, b_spec):
    v = global_values()
    return {
        "params": {"w": place(v["params"]["w"], NamedSharding(m, w_spec)),
                   "b": place(v["params"]["b"], NamedSharding(m, b_spec))},
        "replicated": place(v["replicated"], NamedSharding(m, P())),
        "host": v["host"],
        "step": v["step"],
    }


def target(m, w_spec, b_spec):
    v = global_values()
    return {
        "params": {"w": jax.ShapeDtypeStruct(SHAPE, np.float32, sharding=NamedSharding(m, w_spec)),
                   "b": jax.ShapeDtypeStruct((8,), np.int32, sharding=NamedSharding(m, b_spec))},
        "replicated": jax.ShapeDtypeStruct((64, 64), np.float32, sharding=NamedSharding(m, P())),
        "host": np.zeros_like(v["host"]),
        "step": 0,
    }


def check(restored, m_desc):
    """Each process checks its addressable shards against the global values."""
    v = global_values()
    flat_v = {"params/w": v["params"]["w"], "params/b": v["params"]["b"], "replicated": v["replicated"]}
    got = {"params/w": restored["params"]["w"], "params/b": restored["params"]["b"], "replicated": restored["replicated"]}
    checked = 0
    for k, arr in got.items():
        for s in arr.addressable_shards:
            np.testing.assert_array_equal(np.asarray(s.data), flat_v[k][s.index], err_msg=f"{k} on {m_desc}")
            checked += 1
    np.testing.assert_array_equal(restored["host"], v["host"])
    if restored["step"] != 7:
        raise AssertionError(f"step {restored['step']}")
    return checked


def scenario_save(async_):
    m = mesh((nproc, ndev), ("x", "y"))
    tree = state(m, P("x", "y"), P("y"))
    path = os.path.join(workdir, "ckpt")
    if async_:
        with jaxckpt.AsyncCheckpointer(timeout=60) as ck:
            ck.save(path, tree, metadata={"by": nproc}).result()
    else:
        jaxckpt.save(path, tree, metadata={"by": nproc})
    files = sorted(f for f in os.listdir(path))
    return {"files": files, "sizes": {f: os.path.getsize(os.path.join(path, f)) for f in files}}


def scenario_restore():
    # a different layout from the saving job's: transposed specs
    m = mesh((nproc, ndev), ("a", "b"))
    restored = jaxckpt.restore(os.path.join(workdir, "ckpt"), target(m, P("b", "a"), P("a")))
    return {"checked": check(restored, f"{nproc}x{ndev}")}


def scenario_kill():
    """Process 1 dies in the middle of writing its shards; the others must fail
    with an error naming it, within the timeout, and commit nothing."""
    import time

    from jaxckpt import layout

    m = mesh((nproc, ndev), ("x", "y"))
    tree = state(m, P("x", "y"), P("y"))
    path = os.path.join(workdir, "ckpt2")
    if pid == 1:
        layout.write_run = lambda *a, **k: os._exit(17)
    t0 = time.monotonic()
    try:
        with jaxckpt.AsyncCheckpointer(timeout=20) as ck:
            ck.save(path, tree).result()
    except jaxckpt.CheckpointError as e:
        return {"error": type(e).__name__, "message": str(e), "seconds": time.monotonic() - t0,
                "committed": os.path.exists(path), "previous_ok": os.path.exists(os.path.join(workdir, "ckpt"))}
    return {"error": None}


def _small_state(m, step):
    w = np.full(SHAPE, step, np.float32) + np.arange(128, dtype=np.float32).reshape(SHAPE)
    return {"w": place(w, NamedSharding(m, P("x"))), "step": step}


def scenario_manager_rotation():
    """Both processes run the same loop; the primary deletes, the others agree."""
    m = mesh((nproc, ndev), ("x", "y"))
    d = os.path.join(workdir, "run")
    with jaxckpt.CheckpointManager(d, save_interval_steps=2, max_to_keep=2, keep_period=6,
                                   save_timeout=60) as mgr:
        for step in range(1, 13):
            mgr.save(step, _small_state(m, step), metrics={"loss": 1.0 / step})
        mgr.wait_until_finished()
        steps = mgr.all_steps()
    latest = jaxckpt.CheckpointManager(d, read_only=True)
    got = latest.restore(target={"w": jax.ShapeDtypeStruct(SHAPE, np.float32, sharding=NamedSharding(m, P("y"))),
                                 "step": 0})
    ok = all(np.array_equal(np.asarray(s.data), (np.full(SHAPE, 12, np.float32)
                                                 + np.arange(128, dtype=np.float32).reshape(SHAPE))[s.index])
             for s in got["w"].addressable_shards)
    return {"steps": steps, "on_disk": sorted((e for e in os.listdir(d) if not e.startswith(".")), key=int),
            "restored_ok": ok, "restored_step": got["step"]}


def scenario_preemption():
    """SIGTERM reaches process 1 only; both must save the same step and stop."""
    import signal
    import time

    m = mesh((nproc, ndev), ("x", "y"))
    d = os.path.join(workdir, "pre")
    stopped = None
    with jaxckpt.CheckpointManager(d, save_interval_steps=1000, save_timeout=60) as mgr:
        for step in range(1, 2000):
            if pid == 1 and step == 10:
                os.kill(os.getpid(), signal.SIGTERM)
            mgr.save(step, _small_state(m, step))
            if mgr.reached_preemption(step):
                stopped = step
                break
            time.sleep(0.01)
        steps = mgr.all_steps()
        meta = mgr.metadata(steps[-1]) if steps else None
    return {"stopped": stopped, "steps": steps, "reason": meta.reason if meta else None}


def scenario_exception_one_process():
    """Process 1 fails inside the managed loop; process 0 goes on. Nobody may hang."""
    import time

    m = mesh((nproc, ndev), ("x", "y"))
    d = os.path.join(workdir, "exc")
    t0 = time.monotonic()
    try:
        with jaxckpt.CheckpointManager(d, save_interval_steps=2, save_on_exception=True, save_timeout=15) as mgr:
            for step in range(1, 12):
                if pid == 1 and step == 5:
                    raise RuntimeError("boom on process 1")
                mgr.save(step, _small_state(m, step))
                time.sleep(0.05)
    except Exception as e:
        return {"error": type(e).__name__, "message": str(e)[:300], "seconds": time.monotonic() - t0,
                "steps": jaxckpt.CheckpointManager(d, read_only=True).all_steps()}
    return {"error": None, "seconds": time.monotonic() - t0}


def scenario_unshared():
    """Process 1 does not see the directory process 0 created (as with a
    node-local path on a cluster): the save must fail everywhere, saying so."""
    m = mesh((nproc, ndev), ("x", "y"))
    tree = state(m, P("x", "y"), P("y"))
    path = os.path.join(workdir, "ckpt3")
    if pid == 1:
        real_isdir = os.path.isdir
        os.path.isdir = lambda p: False if ".jaxckpt-tmp-" in str(p) else real_isdir(p)
    try:
        with jaxckpt.AsyncCheckpointer(timeout=30) as ck:
            ck.save(path, tree).result()
    except jaxckpt.CheckpointError as e:
        return {"error": type(e).__name__, "message": str(e), "committed": os.path.exists(path)}
    return {"error": None}


SCENARIOS = {
    "unshared": scenario_unshared,
    "manager_rotation": scenario_manager_rotation,
    "preemption": scenario_preemption,
    "exception_one_process": scenario_exception_one_process,
    "save_sync": lambda: scenario_save(False),
    "save_async": lambda: scenario_save(True),
    "restore": scenario_restore,
    "kill": scenario_kill,
}

if __name__ == "__main__":
    out = SCENARIOS[scenario]()
    if scenario not in ("kill", "exception_one_process"):  # where every process gets here
        # Process 0 hosts the coordination service: leaving before the others
        # have read the outcome of its last commit would fail them.
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("scenario done")
    print("RESULT " + json.dumps(out), flush=True)
    sys.stdout.flush()
    os._exit(0)  # skip jax.distributed shutdown barriers: a killed peer would stall them
