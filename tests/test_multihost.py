"""Multi-process save/restore with real jax.distributed processes on localhost.

Each scenario starts N python processes (tests/multihost_worker.py), each with
its own CPU devices and gloo collectives, and a free port for the coordinator.
Every run is bounded in time so that a hang fails fast.
"""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import helpers
import jaxckpt

WORKER = os.path.join(os.path.dirname(__file__), "multihost_worker.py")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(scenario, nproc, ndev, workdir, timeout=120, **extra_env):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env.update(extra_env)
    procs = [subprocess.Popen([sys.executable, WORKER, scenario, str(i), str(nproc), str(port), str(ndev), str(workdir)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for i in range(nproc)]
    results, logs = [], []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            logs.append(out)
            results.append(helpers.worker_result(out))
    finally:
        for p in procs:
            p.kill()
            p.wait()  # reaped: a failed job leaves no running process for a later test's warnings
    return results, logs


@pytest.fixture(scope="module")
def saved_by_2x4(tmp_path_factory):
    d = tmp_path_factory.mktemp("mh")
    results, logs = run_job("save_async", 2, 4, d)
    assert all(results), "\n".join(logs)[-4000:]
    return d, results


def _values():
    # multihost_worker.global_values() flattened (importing the worker would start jax.distributed)
    return {
        "params/w": np.arange(128, dtype=np.float32).reshape(16, 8) / 7,
        "params/b": np.arange(8, dtype=np.int32) - 3,
        "replicated": np.linspace(0, 1, 4096, dtype=np.float32).reshape(64, 64),
        "host": np.arange(10, dtype=np.int64) * 3,
        "step": 7,
    }


@pytest.mark.timeout(180)
def test_two_processes_write_own_shards_and_replicated_data_once(saved_by_2x4):
    d, results = saved_by_2x4
    files = results[0]["files"]
    assert files == ["data-00000.bin", "data-00001.bin", "manifest.msgpack"]
    assert results[1]["files"] == files  # both see the committed checkpoint
    sizes = results[0]["sizes"]
    v = _values()
    sharded = v["params/w"].nbytes + v["params/b"].nbytes
    replicated = v["replicated"].nbytes + v["host"].nbytes
    # Process 1 wrote exactly its half of the sharded leaves (b is split over y only,
    # so each process holds all of it: replica 0 lives on process 0).
    info = jaxckpt.inspect(d / "ckpt")
    per_file = {0: 0, 1: 0}
    from jaxckpt.reader import CheckpointReader
    with CheckpointReader(d / "ckpt") as r:
        for leaf in r.manifest.leaves:
            for s in leaf.shards:
                per_file[s.file] += s.length
        names = [f.name for f in r.manifest.files]
    by_name = dict(zip(names, (per_file[0], per_file[1])))
    assert by_name["data-00001.bin"] == v["params/w"].nbytes // 2
    assert by_name["data-00000.bin"] == v["params/w"].nbytes // 2 + v["params/b"].nbytes + replicated
    assert sum(per_file.values()) == sharded + replicated  # every byte exactly once
    assert info.metadata == {"by": 2}


@pytest.mark.timeout(180)
def test_restore_in_one_process_with_8_devices_and_other_specs(saved_by_2x4):
    d, _ = saved_by_2x4
    m = Mesh(np.array(jax.devices()).reshape(2, 4), ("a", "b"))
    tgt = {
        "params": {"w": jax.ShapeDtypeStruct((16, 8), np.float32, sharding=NamedSharding(m, P("b", "a"))),
                   "b": jax.ShapeDtypeStruct((8,), np.int32, sharding=NamedSharding(m, P(("a", "b"))))},
        "replicated": jax.ShapeDtypeStruct((64, 64), np.float32, sharding=NamedSharding(m, P(None, "a"))),
        "host": np.zeros(10, np.int64),
        "step": 0,
    }
    got = jaxckpt.restore(d / "ckpt", tgt)
    v = _values()
    np.testing.assert_array_equal(got["params"]["w"], v["params/w"])
    np.testing.assert_array_equal(got["params"]["b"], v["params/b"])
    np.testing.assert_array_equal(got["replicated"], v["replicated"])
    np.testing.assert_array_equal(got["host"], v["host"])
    assert got["step"] == 7
    assert got["params"]["w"].sharding == tgt["params"]["w"].sharding


def test_restore_as_plain_numpy_without_distributed(saved_by_2x4):
    d, _ = saved_by_2x4
    got = jaxckpt.restore(d / "ckpt")
    v = _values()
    np.testing.assert_array_equal(got["params"]["w"], v["params/w"])
    np.testing.assert_array_equal(got["replicated"], v["replicated"])
    flat = jaxckpt.load_checkpoint(d / "ckpt")
    np.testing.assert_array_equal(flat["params/b"], v["params/b"])
    assert flat["step"] == 7


@pytest.mark.timeout(240)
def test_restore_with_4_processes_x_2_devices(saved_by_2x4):
    d, _ = saved_by_2x4
    results, logs = run_job("restore", 4, 2, d)
    assert all(results), "\n".join(logs)[-4000:]
    assert all(r["checked"] > 0 for r in results)


@pytest.mark.timeout(180)
def test_restore_with_2_processes_x_4_devices_resharded(saved_by_2x4):
    d, _ = saved_by_2x4
    results, logs = run_job("restore", 2, 4, d)
    assert all(results), "\n".join(logs)[-4000:]


@pytest.mark.timeout(180)
def test_sync_save_across_processes(tmp_path):
    results, logs = run_job("save_sync", 2, 2, tmp_path)
    assert all(results), "\n".join(logs)[-4000:]
    got = jaxckpt.restore(tmp_path / "ckpt")
    np.testing.assert_array_equal(got["params"]["w"], _values()["params/w"])


@pytest.mark.timeout(180)
def test_a_process_dying_mid_save_fails_the_others_and_commits_nothing(saved_by_2x4, tmp_path):
    # With jax_enable_recoverability the survivors keep running: they must get
    # our error naming the dead process within the timeout.
    import shutil
    shutil.copytree(saved_by_2x4[0] / "ckpt", tmp_path / "ckpt")
    results, logs = run_job("kill", 2, 2, tmp_path, MH_RECOVERABLE="1")
    r0 = results[0]
    assert r0 is not None, "\n".join(logs)[-4000:]
    assert results[1] is None  # it died
    assert r0["error"] in ("CheckpointError", "SaveTimeoutError"), r0
    assert "process 1" in r0["message"], r0
    assert not r0["committed"] and r0["previous_ok"], r0  # (a hang is caught by the timeout mark)
    assert not [e for e in os.listdir(tmp_path) if e.startswith(".")]  # temporary directory removed
    np.testing.assert_array_equal(jaxckpt.restore(tmp_path / "ckpt")["params"]["w"], _values()["params/w"])


@pytest.mark.timeout(180)
def test_a_process_dying_under_default_jax_policy_leaves_previous_checkpoint(saved_by_2x4, tmp_path):
    # By default JAX's runtime terminates the whole job when one process dies;
    # what must hold then is crash consistency: nothing new is listed, the
    # previous checkpoint restores bit-exactly.
    import shutil
    shutil.copytree(saved_by_2x4[0] / "ckpt", tmp_path / "ckpt")
    results, logs = run_job("kill", 2, 2, tmp_path)
    assert results == [None, None] or results[0]["error"], "\n".join(logs)[-4000:]
    assert not (tmp_path / "ckpt2").exists()
    np.testing.assert_array_equal(jaxckpt.restore(tmp_path / "ckpt")["params"]["w"], _values()["params/w"])


@pytest.mark.timeout(180)
def test_manager_rotation_across_two_processes(tmp_path):
    results, logs = run_job("manager_rotation", 2, 2, tmp_path)
    assert all(results), "\n".join(logs)[-4000:]
    for r in results:
        assert r["steps"] == [6, 10, 12]  # newest two, plus keep_period=6
        assert r["restored_ok"] and r["restored_step"] == 12
    # Process 0 deletes, right after it publishes the commit that process 1 waits for: process 1's own
    # listing may still see a step that process 0 is deleting. Once process 0's manager is closed it is gone.
    assert results[0]["on_disk"] == ["6", "10", "12"]
    assert sorted((e for e in os.listdir(tmp_path / "run") if not e.startswith(".")), key=int) == ["6", "10", "12"]
    assert not [e for e in os.listdir(tmp_path / "run") if e.startswith(".jaxckpt-tmp") or "-tmp-" in e]


@pytest.mark.timeout(180)
def test_preemption_signal_to_one_process_saves_the_same_step_everywhere(tmp_path):
    results, logs = run_job("preemption", 2, 2, tmp_path)
    assert all(results), "\n".join(logs)[-4000:]
    assert results[0]["stopped"] is not None and results[0]["stopped"] == results[1]["stopped"]
    assert results[0]["steps"] == results[1]["steps"] == [results[0]["stopped"]]
    assert results[0]["reason"] == "preemption"
    got = jaxckpt.restore(tmp_path / "pre" / str(results[0]["stopped"]))
    assert got["step"] == results[0]["stopped"]


@pytest.mark.timeout(180)
def test_exception_in_one_process_does_not_hang_the_others(tmp_path):
    # Documented behaviour (README, multi-host): the failing process tries its
    # exception save with a bounded wait and re-raises; the others' next save
    # fails at its timeout naming the process that did not answer. (Under JAX's
    # default policy the runtime terminates the whole job instead.)
    results, logs = run_job("exception_one_process", 2, 2, tmp_path, MH_RECOVERABLE="1")
    r0, r1 = results
    assert r1 is not None and r1["error"] == "RuntimeError" and "boom" in r1["message"], "\n".join(logs)[-3000:]
    assert r0 is not None and r0["error"] in ("SaveTimeoutError", "CheckpointError"), "\n".join(logs)[-3000:]
    assert "process 1" in r0["message"]
    assert r0["steps"] == [2, 4]  # what both committed before the failure; nothing partial


@pytest.mark.timeout(180)
def test_a_filesystem_not_shared_by_all_processes_is_detected_and_explained(tmp_path):
    results, logs = run_job("unshared", 2, 2, tmp_path)
    assert all(results), "\n".join(logs)[-4000:]
    for r in results:
        assert r["error"] == "CheckpointError" and not r["committed"], r
        assert "[process=1] cannot see" in r["message"], r
        assert "must be on a filesystem that all processes share" in r["message"], r
    assert "save of" in results[0]["message"] and "failed on process 1" in results[0]["message"]
    assert not os.listdir(tmp_path)  # nothing committed, temporary directory removed
