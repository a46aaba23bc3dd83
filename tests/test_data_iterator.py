"""Data-iterator state saved with each step and restored (issue 19).

Real grain pipelines (a ``DataLoader`` and ``MapDataset(...).to_iter_dataset()``
with ``mp_prefetch``, both shuffling, with worker processes) train in a
subprocess (tests/data_iterator_worker.py) that is interrupted: killed
(SIGKILL) after a save, failing with an exception (the exception save), or
sent SIGTERM (the preemption save). A new process restores with
``data_iterator=`` and must see, bit for bit, the batches an uninterrupted run
sees after that step. Then 2 jax.distributed processes with different
iterators each get their own state back, and a job with another process count
is refused.
"""

import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

import helpers
import jaxckpt
from jaxckpt import dataiter

grain = pytest.importorskip("grain")

WORKER = os.path.join(os.path.dirname(__file__), "data_iterator_worker.py")
WORKERS = max(1, min(2, os.cpu_count() or 1))  # "several" where the machine has the cores
STEPS, SAVE_EVERY = 40, 10


def run_worker(tmp_path, name, *args, timeout=180):
    """Run one training process in its own session; afterwards kill what is left
    of it (a SIGKILLed process leaves its grain workers behind)."""
    log = tmp_path / f"{name}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, WORKER, *map(str, args)], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
        try:
            rc = proc.wait(timeout=timeout)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return rc, log.read_text()


def train(tmp_path, name, pipeline, ckdir, interrupt, at=0):
    report = tmp_path / f"{name}.json"
    rc, log = run_worker(tmp_path, name, "train", pipeline, WORKERS, ckdir, STEPS, SAVE_EVERY, interrupt, at, report)
    assert report.exists(), log[-3000:]
    return rc, json.loads(report.read_text()), log


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run of each pipeline (the same worker counts), computed once."""
    made = {}

    def get(pipeline):
        if pipeline not in made:
            d = tmp_path_factory.mktemp(f"ref-{pipeline}")
            rc, out, log = train(d, "reference", pipeline, d / "unused", "reference")
            assert rc == 0, log[-3000:]
            made[pipeline] = out
        return made[pipeline]

    return get


@pytest.mark.timeout(600)
@pytest.mark.parametrize("pipeline, state_type", [("dataloader", "bytes"), ("dataset", "dict")])
@pytest.mark.parametrize("interrupt, at, saved, reason", [
    ("kill", 20, 20, "interval"),        # step 20 committed, 3 more batches drawn, then SIGKILL
    ("exception", 25, 24, "exception"),  # batch 25 drawn, then the failure: the state of save(24, ...) is saved
    ("sigterm", 26, 26, "preemption"),   # the preemption save at step 26, then a clean exit
])
def test_resumed_batches_equal_the_uninterrupted_runs(tmp_path, reference, pipeline, state_type, interrupt, at,
                                                       saved, reason):
    ckdir = tmp_path / "ckpt"
    rc1, run1, log1 = train(tmp_path, "run1", pipeline, ckdir, interrupt, at)
    assert rc1 == {"kill": -signal.SIGKILL, "exception": 1, "sigterm": 0}[interrupt], log1[-3000:]
    assert run1["state_type"] == state_type
    with jaxckpt.CheckpointManager(ckdir, read_only=True) as ro:
        assert ro.latest_step() == saved and ro.metadata().reason == reason
        assert ro.all_steps() == sorted({10, 20, saved})
        raw = ro.data_iterator_state()
        assert type(raw).__name__ == state_type
        assert ro.metadata().data_iterator_states == (raw,)
    rc2, run2, log2 = train(tmp_path, "run2", pipeline, ckdir, "none")
    assert rc2 == 0, log2[-3000:]
    ref = reference(pipeline)
    assert run2["resumed_from"] == saved
    assert sorted(map(int, run2["batches"])) == list(range(saved + 1, STEPS + 1))
    # bit for bit: every batch after the resume, and the state trained on them
    assert {k: v for k, v in run2["batches"].items()} == {k: ref["batches"][k] for k in run2["batches"]}
    assert run2["final"] == ref["final"]
    assert all(ref["batches"][k] == v for k, v in run1["batches"].items())  # run 1 was the same run


def test_states_are_stored_per_step_and_read_back_raw(ckdir):
    data = np.arange(64 * 3, dtype=np.float32).reshape(64, 3)
    ds = grain.MapDataset.source(data).shuffle(seed=3).repeat().batch(4).to_iter_dataset()
    it = iter(ds)
    with jaxckpt.CheckpointManager(ckdir, save_interval_steps=3) as mgr:
        for step in range(1, 8):
            next(it)
            mgr.save(step, {"x": np.full(2, step)}, data_iterator=it)
        mgr.save(8, {"x": np.zeros(2)}, data_iterator={"epoch": 2, "offsets": (1, 2)}, force=True)
        mgr.save(9, {"x": np.zeros(2)}, data_iterator=b"\x00raw", force=True)
        mgr.save(10, {"x": np.zeros(2)}, force=True)
        mgr.wait_until_finished()
        assert [mgr.data_iterator_state(s) for s in (3, 6)] == [{"next_index": 3}, {"next_index": 6}]
        assert mgr.data_iterator_state(8) == {"epoch": 2, "offsets": [1, 2]}  # tuples read back as lists
        assert mgr.data_iterator_state(9) == b"\x00raw"
        assert mgr.data_iterator_state(10) is None and mgr.metadata(10).data_iterator_states is None
        assert "data-iterator states of 1 process(es)" in repr(mgr.metadata(6))
        # The state is in the step record, committed with the arrays (jaxckpt.inspect shows it).
        assert jaxckpt.inspect(ckdir / "6").metadata[dataiter.KEY] == [{"next_index": 6}]
        fresh = iter(ds)
        got = mgr.restore(6, data_iterator=fresh)
        assert got["x"].tolist() == [6, 6]
        want = iter(ds)
        for _ in range(6):
            next(want)
        assert np.array_equal(next(fresh), next(want))


def test_restore_refuses_a_step_without_a_state_and_a_wrong_iterator(ckdir):
    with jaxckpt.CheckpointManager(ckdir) as mgr:
        mgr.save(1, {"x": np.zeros(2)})
        mgr.wait_until_finished()
        it = iter(grain.MapDataset.range(10).to_iter_dataset())
        with pytest.raises(jaxckpt.CheckpointError) as e:
            mgr.restore(data_iterator=it)
        assert str(e.value) == (f"{ckdir / '1'}: step 1 was saved without a data-iterator state "
                                "(save(..., data_iterator=...)); pass data_iterator=None to restore the arrays only")
        with pytest.raises(TypeError, match="restore\\(data_iterator=...\\) needs an object with set_state"):
            mgr.restore(data_iterator={"next_index": 3})
        with pytest.raises(TypeError, match="data_iterator must have get_state\\(\\) and set_state\\(\\)"):
            mgr.save(2, {"x": np.zeros(2)}, data_iterator=object())
        with pytest.raises(jaxckpt.UnsupportedValueError) as e:
            mgr.save(3, {"x": np.zeros(2)}, data_iterator={"f": print})
        assert str(e.value).startswith(f"{ckdir}: step 3: data_iterator state: ")
        assert mgr.all_steps() == [1]


def test_exception_save_stores_the_state_of_the_last_save_call(ckdir):
    it = iter(grain.MapDataset.range(100).to_iter_dataset())
    with pytest.raises(RuntimeError):
        with jaxckpt.CheckpointManager(ckdir, save_interval_steps=5, save_on_exception=True) as mgr:
            for step in range(1, 100):
                batch = next(it)
                if step == 8:
                    raise RuntimeError("the step failed after its batch was drawn")
                mgr.save(step, {"x": np.full(2, batch)}, data_iterator=it)
    with jaxckpt.CheckpointManager(ckdir, read_only=True) as ro:
        assert ro.all_steps() == [5, 7] and ro.metadata(7).reason == "exception"
        assert ro.data_iterator_state(7) == {"next_index": 7}  # not 8: batch 8 is drawn again on resume
        fresh = iter(grain.MapDataset.range(100).to_iter_dataset())
        ro.restore(data_iterator=fresh)
        assert next(fresh) == 7


def test_a_call_that_saves_nothing_does_not_take_the_state_unless_an_exception_save_needs_it(ckdir):
    class Counting:
        calls = 0

        def get_state(self):
            Counting.calls += 1
            return {"n": Counting.calls}

    it = Counting()
    with jaxckpt.CheckpointManager(ckdir, save_interval_steps=5) as mgr:
        for step in range(1, 11):
            mgr.save(step, {"x": np.zeros(1)}, data_iterator=it)
    assert Counting.calls == 2  # at the saves of steps 5 and 10 only
    with jaxckpt.CheckpointManager(ckdir / "b", save_interval_steps=5, save_on_exception=True) as mgr:
        for step in range(1, 11):
            mgr.save(step, {"x": np.zeros(1)}, data_iterator=it)
        mgr.wait_until_finished()
        assert Counting.calls == 12 and mgr.data_iterator_state(10) == {"n": 12}


# ----------------------------------------------------------------------------- multi-host
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(tmp_path, scenario, nproc=2, timeout=150):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    procs = [subprocess.Popen([sys.executable, WORKER, "mh", scenario, str(i), str(nproc), str(port), str(tmp_path)],
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
    assert all(results), "\n".join(logs)[-4000:]
    return results


@pytest.mark.timeout(400)
def test_two_processes_restore_their_own_iterator_states_and_another_count_is_refused(tmp_path):
    saved = run_job(tmp_path, "save")
    assert saved[0]["steps"] == saved[1]["steps"] == [5, 10]
    assert saved[0]["states"]["10"] == saved[1]["states"]["10"] == {"next_index": 10}  # same position...
    assert saved[0]["batches"]["11"] != saved[1]["batches"]["11"]  # ...of different data
    restored = run_job(tmp_path, "restore")
    for pid in (0, 1):
        assert restored[pid]["restored_step"] == 10
        assert restored[pid]["raw"] == saved[pid]["states"]["10"]
        assert restored[pid]["after"] == {s: saved[pid]["batches"][s] for s in ("11", "12")}
    # The committed record holds one state per process, in process order.
    with jaxckpt.CheckpointManager(tmp_path / "run", read_only=True) as ro:
        assert ro.metadata(10).data_iterator_states == ({"next_index": 10}, {"next_index": 10})
        it = iter(grain.MapDataset.range(10).to_iter_dataset())
        message = (f"{tmp_path / 'run' / '10'}: step 10 was saved by 2 process(es) and this job has 1: each process "
                   "restores the data-iterator state saved by the process with its index, so the states cannot be "
                   "matched to processes; pass data_iterator=None to restore the arrays only")
        with pytest.raises(jaxckpt.CheckpointError) as e:
            ro.restore(data_iterator=it)
        assert str(e.value) == message
        with pytest.raises(jaxckpt.CheckpointError) as e:
            ro.data_iterator_state()
        assert str(e.value) == message
        assert ro.restore()["step"] == 10  # the arrays alone restore with any process count


@pytest.mark.timeout(300)
def test_the_auto_interval_is_decided_by_process_0_and_agreed_on(tmp_path):
    r0, r1 = run_job(tmp_path, "auto")
    # Process 0's figures: 0.047 s / (0.02 x 0.1 s) = 23.5 -> 24 steps (process 1's clock would say 55).
    assert r0["steps"] == 24 and r0["bound"] == "budget"
    assert r0["saved"] == r1["saved"] == [11, 22, 46, 70]
    assert (r1["steps"], r1["bound"], r1["reason"]) == (r0["steps"], r0["bound"], r0["reason"])


def test_a_synchronous_save_stores_the_state_too(ckdir):
    ds = grain.MapDataset.range(50).shuffle(seed=1).to_iter_dataset()
    it = iter(ds)
    with jaxckpt.CheckpointManager(ckdir, async_save=False, save_interval_steps=4) as mgr:
        drawn = [next(it) for _ in range(4)]
        assert mgr.save(4, {"drawn": np.asarray(drawn)}, data_iterator=it)
        assert mgr.data_iterator_state(4) == {"next_index": 4}
    with jaxckpt.CheckpointManager(ckdir, read_only=True) as ro:
        again = iter(ds)
        ro.restore(data_iterator=again)
        assert next(again) == next(it)
