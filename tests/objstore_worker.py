"""Child processes that save to an S3 bucket (a moto server the test runs).

Two kinds, both started by the tests as plain ``python`` processes:

* one process of a real multi-process JAX job on localhost (CPU devices,
  gloo), run by tests/test_objstore_multihost.py as::

      python tests/objstore_worker.py SCENARIO PROCESS_ID NUM_PROCESSES PORT DEVICES_PER_PROCESS BUCKET

  with the server's endpoint in ``AWS_ENDPOINT_URL`` (or, with
  ``OBJSTORE_TEST_SCHEME=az``, an Azurite account in ``AZURE_STORAGE_*``;
  ``=gs``, fake-gcs-server in ``STORAGE_EMULATOR_HOST``) and its own, unshared
  working directory. Scenarios: ``save`` (``run/1``, ``run/2``), ``manager``
  (``mgr``), ``late_joiner`` (``run/3``). Prints one line ``RESULT <json>``
  (``"error"`` set where the scenario reports a failure).
* the endless training loop that tests/test_objstore_crash.py kills with
  SIGKILL::

      python tests/objstore_worker.py loop ENDPOINT URL

  Prints one JSON event per line (``start``, ``open``, ``restored``, ``saving``).

Importing this module starts nothing: the tests import the value functions
(``global_values``, ``step_values``, ``loop_values``) to know what every
checkpoint must restore to.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

SCHEME = os.environ.get("OBJSTORE_TEST_SCHEME", "s3")  # "az": the same scenarios on an Azure container

# ----------------------------------------------------------------------------- values (tests import these)
MESH_AXES = ("x", "y")  # the saving job's mesh: (processes, devices per process)


def global_values() -> dict:
    """The deterministic content the multi-process save writes to ``run/1``."""
    return {
        "params": {"w": np.arange(64 * 32, dtype=np.float32).reshape(64, 32) / 7,  # P("x", "y")
                   "v": (np.arange(8 * 12, dtype=np.int16).reshape(8, 12) * 37 - 1000),  # P("y", "x")
                   "b": np.arange(8, dtype=np.int32) - 3},  # P("y"): whole on every process
        "replicated": np.linspace(0, 1, 4096, dtype=np.float32).reshape(64, 64),  # P()
        "host": np.arange(10, dtype=np.int64) * 3,  # a numpy array
        "step": 7,  # a python int
    }


def replicated_values() -> dict:
    """What the save to ``run/2`` writes: nothing that process 1 holds alone."""
    return {"r": np.linspace(-1, 1, 1024, dtype=np.float32).reshape(32, 32), "host": np.arange(5, dtype=np.uint8),
            "n": 3}


def step_values(step: int) -> dict:
    """The manager scenario's state at ``step``."""
    return {"w": np.full((16, 8), step, np.float32) + np.arange(128, dtype=np.float32).reshape(16, 8),
            "step": step}


def loop_values(step: int) -> dict:
    """The crash loop's state at ``step`` (~3 MB, several leaves, a pure function of the step)."""
    rng = np.random.default_rng(step)
    return {
        "params": {"w": rng.standard_normal((512, 512), dtype=np.float32),  # saved as a jax array
                   "m": rng.standard_normal((256, 1024), dtype=np.float32)},
        "opt": {"mu": rng.integers(0, 256, 1 << 20, dtype=np.uint8),
                "count": np.arange(1000, dtype=np.float64) * step},
        "step": step,
    }


# ----------------------------------------------------------------------------- multi-process scenarios
def _mesh(shape, names):
    import jax
    from jax.sharding import Mesh
    return Mesh(np.array(jax.devices()).reshape(shape), names)


def _place(value, mesh, spec):
    import jax
    from jax.sharding import NamedSharding
    return jax.make_array_from_callback(value.shape, NamedSharding(mesh, spec), lambda idx: value[idx])


def _in_step() -> None:
    """A barrier, as the collectives of a training step are: the processes call
    ``save`` nearly together. (A process that comes late is
    ``scenario_late_joiner``'s case.)"""
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("step")


def scenario_save(ctx: dict) -> dict:
    """``run/1``: sharded, replicated, numpy and python leaves, with ``jaxckpt.save``
    configured by the environment alone; ``run/2``: replicated leaves only, with
    an ``AsyncCheckpointer`` given ``storage_options``."""
    import jaxckpt
    from jax.sharding import PartitionSpec as P

    m = _mesh((ctx["nproc"], ctx["ndev"]), MESH_AXES)
    v = global_values()
    tree = {
        "params": {"w": _place(v["params"]["w"], m, P("x", "y")),
                   "v": _place(v["params"]["v"], m, P("y", "x")),
                   "b": _place(v["params"]["b"], m, P("y"))},
        "replicated": _place(v["replicated"], m, P()),
        "host": v["host"],
        "step": v["step"],
    }
    _in_step()
    jaxckpt.save(f"{SCHEME}://{ctx['bucket']}/run/1", tree, metadata={"by": ctx["nproc"]})
    r = replicated_values()
    rtree = {"r": _place(r["r"], m, P()), "host": r["host"], "n": r["n"]}
    _in_step()
    with jaxckpt.AsyncCheckpointer(timeout=60, storage_options=ctx["options"]) as ck:
        ck.save(f"{SCHEME}://{ctx['bucket']}/run/2", rtree).result()
    _in_step()  # the same tree encrypted: each process encrypts its own data, process 0 the manifest
    jaxckpt.save(f"{SCHEME}://{ctx['bucket']}/enc/1", tree, encryption_key=ENCRYPTION_KEY)
    return {"saved": ["run/1", "run/2", "enc/1"]}


ENCRYPTION_KEY = bytes(range(32))


def scenario_split(ctx: dict) -> dict:
    """``split/1`` and (encrypted) ``splitenc/1``: the tree of ``run/1`` with each
    process's data cut into objects of about 64 bytes (as GcsClient cuts it into
    32 MiB ones; set here on the S3 client, which keeps one object by default)."""
    import jaxckpt
    from jax.sharding import PartitionSpec as P
    from jaxckpt import s3client

    s3client.S3Client.file_bytes = 64
    m = _mesh((ctx["nproc"], ctx["ndev"]), MESH_AXES)
    v = global_values()
    tree = {"params": {"w": _place(v["params"]["w"], m, P("x", "y")), "v": _place(v["params"]["v"], m, P("y", "x")),
                       "b": _place(v["params"]["b"], m, P("y"))},
            "replicated": _place(v["replicated"], m, P()), "host": v["host"], "step": v["step"]}
    _in_step()
    jaxckpt.save(f"{SCHEME}://{ctx['bucket']}/split/1", tree)
    _in_step()
    jaxckpt.save(f"{SCHEME}://{ctx['bucket']}/splitenc/1", tree, encryption_key=ENCRYPTION_KEY)
    return {"saved": ["split/1", "splitenc/1"]}


MANAGER_LOSSES = ([3.0, 1.0, 4.0, 2.0], [2.0, 4.0, 1.0, 3.0])  # per process: process 0's are the manifests'


def scenario_manager(ctx: dict) -> dict:
    """Steps 0-3 with ``max_to_keep=2, best_metric="loss"`` into
    ``s3://BUCKET/mgr``, each process giving its own losses
    (``MANAGER_LOSSES``). Reports the steps each kept, the manifests each
    read (counted on the client's whole-object GETs) and the data objects each
    looked up one by one (HEADs)."""
    import jaxckpt
    from jax.sharding import PartitionSpec as P
    from jaxckpt import azclient, gcsclient, s3client

    client = {"s3": s3client.S3Client, "az": azclient.AzureClient, "gs": gcsclient.GcsClient}[SCHEME]
    gets: list[str] = []
    heads: list[str] = []
    get, head = client.get, client.head

    def counted(self, key, cap):
        gets.append(key)
        return get(self, key, cap)

    def counted_head(self, key):
        heads.append(key)
        return head(self, key)

    client.get, client.head = counted, counted_head
    m = _mesh((ctx["nproc"], ctx["ndev"]), MESH_AXES)
    url = f"{SCHEME}://{ctx['bucket']}/mgr"
    losses = MANAGER_LOSSES[ctx["pid"] % 2]
    with jaxckpt.CheckpointManager(url, max_to_keep=2, best_metric="loss", save_timeout=60,
                                   storage_options=ctx["options"]) as mgr:
        for step in range(4):
            s = step_values(step)
            _in_step()
            mgr.save(step, {"w": _place(s["w"], m, P("x", "y")), "step": s["step"]}, metrics={"loss": losses[step]})
        mgr.wait_until_finished()
        steps = mgr.all_steps()
    return {"steps": steps, "manifests_read": [k for k in gets if k.endswith("manifest.msgpack")],
            "data_looked_up": [k for k in heads if "/data-" in k]}


def scenario_late_joiner(ctx: dict) -> dict:
    """Process 1 calls ``save`` only once process 0's save is under way (its
    marker is in the bucket): a slower process must join, not refuse."""
    import jaxckpt
    from jax.experimental import multihost_utils
    from jax.sharding import PartitionSpec as P

    import objservers

    m = _mesh((ctx["nproc"], ctx["ndev"]), MESH_AXES)
    v = global_values()
    tree = {"w": _place(v["params"]["w"], m, P("x", "y")), "step": v["step"]}
    url = f"{SCHEME}://{ctx['bucket']}/run/3"
    out: dict = {"error": None}
    try:
        with jaxckpt.AsyncCheckpointer(timeout=10, storage_options=ctx["options"]) as ck:
            if ctx["pid"] == 1:
                client = objservers.s3_client(ctx["options"]["endpoint"])
                deadline = time.monotonic() + 30
                while not client.list_objects_v2(Bucket=ctx["bucket"], Prefix="run/3/.jaxckpt-tmp-").get("KeyCount"):
                    if time.monotonic() > deadline:
                        raise TimeoutError("process 0's save never began")
                    time.sleep(0.01)
            ck.save(url, tree).result()
    except Exception as e:
        out = {"error": type(e).__name__, "message": str(e)[:500]}
    print("RESULT " + json.dumps(out), flush=True)
    multihost_utils.sync_global_devices("late_joiner_done")  # neither exits while the other still waits
    return out


def scenario_restore(ctx: dict) -> dict:
    """``big/1``: a 16 MiB array saved with its rows split by process, then
    restored by the same processes with the halves swapped (the mesh's process
    order reversed), so each needs only the other's data object. Each process
    checks its shards and reports the byte ranges it read (counted on the
    client's ranged GETs, which still go to the server)."""
    import jax
    import jaxckpt
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P
    from jaxckpt import azclient, gcsclient, s3client

    big = np.arange(4096 * 1024, dtype=np.float32).reshape(4096, 1024)
    m = _mesh((ctx["nproc"], ctx["ndev"]), MESH_AXES)
    _in_step()
    jaxckpt.save(f"{SCHEME}://{ctx['bucket']}/big/1", {"w": _place(big, m, P("x", None))})
    reads: list[tuple[str, int, int]] = []
    client = {"s3": s3client.S3Client, "az": azclient.AzureClient, "gs": gcsclient.GcsClient}[SCHEME]
    read_into = client.read_into

    def counted(self, key, buf, offset):
        reads.append((key, offset, len(buf)))
        return read_into(self, key, buf, offset)

    client.read_into = counted
    swapped = NamedSharding(Mesh(np.array(jax.devices()).reshape(ctx["nproc"], ctx["ndev"])[::-1], MESH_AXES),
                            P("x", None))
    _in_step()
    got = jaxckpt.restore(f"{SCHEME}://{ctx['bucket']}/big/1",
                          {"w": jax.ShapeDtypeStruct(big.shape, big.dtype, sharding=swapped)})["w"]
    ok = got.sharding == swapped and all(np.array_equal(np.asarray(s.data), big[s.index])
                                         for s in got.addressable_shards)
    rows = sorted({s.index[0].start for s in got.addressable_shards})
    return {"ok": ok, "first_rows": rows, "read_bytes": sum(n for _, _, n in reads),
            "objects_read": sorted({k.rpartition("/")[2] for k, _, _ in reads})}


def scenario_refused(ctx: dict) -> dict:
    """``run/4`` saved, then saved again by an ``AsyncCheckpointer``: process 0's
    save thread finds the checkpoint there and refuses; process 1 hears so from
    process 0 (not from its own timeout)."""
    import jaxckpt
    from jax.sharding import PartitionSpec as P

    m = _mesh((ctx["nproc"], ctx["ndev"]), MESH_AXES)
    v = global_values()
    tree = {"w": _place(v["params"]["w"], m, P("x", "y")), "step": v["step"]}
    url = f"{SCHEME}://{ctx['bucket']}/run/4"
    _in_step()
    jaxckpt.save(url, tree)
    _in_step()
    out: dict = {"refused": None}
    with jaxckpt.AsyncCheckpointer(timeout=60, storage_options=ctx["options"]) as ck:
        handle = ck.save(url, tree)
        try:
            handle.result()
        except Exception as e:
            out = {"refused": {"type": type(e).__name__, "message": str(e)[:500]}}
    return out


SCENARIOS = {"save": scenario_save, "manager": scenario_manager, "late_joiner": scenario_late_joiner,
             "split": scenario_split, "restore": scenario_restore, "refused": scenario_refused}


def multi_main(argv: list[str]) -> None:
    scenario, pid, nproc, port, ndev, bucket = argv[0], int(argv[1]), int(argv[2]), argv[3], int(argv[4]), argv[5]
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ndev}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", nproc, pid, heartbeat_timeout_seconds=30,
                               initialization_timeout=60)
    ctx = {"pid": pid, "nproc": nproc, "ndev": ndev, "bucket": bucket,
           "options": {"endpoint": os.environ[{"az": "AZURE_STORAGE_ENDPOINT", "gs": "STORAGE_EMULATOR_HOST"}
                                              .get(SCHEME, "AWS_ENDPOINT_URL")]}}
    out = SCENARIOS[scenario](ctx)
    # Process 0 hosts the coordination service: leaving before the others
    # have read the outcome of its last commit would fail them.
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("scenario done")
    print("RESULT " + json.dumps(out), flush=True)
    os._exit(0)  # skip jax.distributed shutdown barriers


# ----------------------------------------------------------------------------- the crash loop
def _event(**kw) -> None:
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()


def same(a, b) -> bool:
    """Bit-exact equality of two pytrees of arrays and python scalars (dtype and shape included)."""
    if isinstance(a, dict) or isinstance(b, dict):
        return isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys() and \
            all(same(a[k], b[k]) for k in a)
    if isinstance(b, np.ndarray):
        a = np.asarray(a)
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    return type(a) is type(b) and a == b


def loop_main(endpoint: str, url: str) -> None:
    """Resume from the latest step and save every step, forever (until SIGKILL)."""
    import jax

    import jaxckpt

    _event(event="start", pid=os.getpid())
    with jaxckpt.CheckpointManager(url, max_to_keep=3, save_interval_steps=1,
                                   storage_options={"endpoint": endpoint}) as mgr:
        latest = mgr.latest_step()
        _event(event="open", latest=latest, pid=os.getpid())
        if latest is not None:
            got = mgr.restore(latest)
            _event(event="restored", step=latest, ok=same(got, loop_values(latest)))
        step = (latest or 0) + 1
        while True:
            state = loop_values(step)
            state["params"]["w"] = jax.device_put(state["params"]["w"])
            _event(event="saving", step=step)
            mgr.save(step, state)
            step += 1


if __name__ == "__main__":
    if sys.argv[1] == "loop":
        loop_main(sys.argv[2], sys.argv[3])
    else:
        multi_main(sys.argv[1:])
