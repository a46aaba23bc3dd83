"""CheckpointManager: exception saves (``with`` blocks, KeyboardInterrupt,
donated state) and preemption (SIGTERM), in-process and in real subprocess
training loops."""

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxckpt


def state_at(step):
    return {"w": jnp.full((64,), step, jnp.float32), "n": np.arange(4, dtype=np.int32) + step}


def assert_state(got, step):
    want = state_at(step)
    assert np.asarray(got["w"]).tobytes() == np.asarray(want["w"]).tobytes()
    assert got["n"].tobytes() == want["n"].tobytes()


# ----------------------------------------------------------------------------- exception saves
@pytest.mark.parametrize("error", [RuntimeError("loss is nan"), KeyboardInterrupt()])
def test_exception_in_with_block_saves_the_last_state(ckdir, caplog, error):
    caplog.set_level(logging.INFO, logger="jaxckpt")
    with pytest.raises(type(error)) as raised:
        with jaxckpt.CheckpointManager(ckdir, save_interval_steps=5, save_on_exception=True) as mgr:
            for step in range(1, 100):
                if step == 8:
                    raise error
                mgr.save(step, state_at(step), epoch=1, metrics={"loss": 1.0 / step}, metadata={"run": "a"})
    assert raised.value is error  # the original exception, re-raised
    with jaxckpt.CheckpointManager(ckdir, read_only=True) as ro:
        assert ro.all_steps() == [5, 7]
        assert_state(ro.restore(), 7)
        meta = ro.metadata(7)
        assert (meta.reason, meta.epoch, meta.metrics) == ("exception", 1, {"loss": 1.0 / 7})
        assert meta.metadata == {"run": "a"}
    assert f"save_on_exception: saved step 7 after {type(error).__name__}" in caplog.text
    assert sorted(os.listdir(ckdir)) == ["5", "7"]  # committed, lock released, nothing temporary


def test_exception_save_waits_for_the_save_in_flight(ckdir):
    with pytest.raises(ValueError):
        with jaxckpt.CheckpointManager(ckdir, save_interval_steps=3, save_on_exception=True) as mgr:
            mgr.save(3, state_at(3))
            mgr.save(4, state_at(4))
            raise ValueError("boom")
    with jaxckpt.CheckpointManager(ckdir, read_only=True) as ro:
        assert ro.all_steps() == [3, 4]
        assert ro.metadata(3).reason == "interval" and ro.metadata(4).reason == "exception"


def test_donated_state_is_not_saved_and_the_last_checkpoint_stays(ckdir, caplog):
    step_fn = jax.jit(lambda s: {"w": s["w"] + 1, "n": s["n"]}, donate_argnums=0)
    caplog.set_level(logging.WARNING, logger="jaxckpt")
    with pytest.raises(FloatingPointError):
        with jaxckpt.CheckpointManager(ckdir, save_interval_steps=5, save_on_exception=True) as mgr:
            state = {"w": jnp.zeros(64, jnp.float32), "n": jnp.arange(4)}
            for step in range(1, 100):
                mgr.save(step, state)
                out = step_fn(state)  # donates the state just given to save()
                if step == 7:
                    raise FloatingPointError("the step failed after its inputs were donated")
                state = out
    assert state["w"].is_deleted()
    with jaxckpt.CheckpointManager(ckdir, read_only=True) as ro:
        assert ro.all_steps() == [5]
        np.testing.assert_array_equal(ro.restore()["w"], np.full(64, 4, np.float32))
    assert ("save_on_exception: the state given for step 7 has deleted arrays (2 of 2; donated to the step that "
            "failed?), so it cannot be saved; the last committed checkpoint (step 5) stays the latest") in caplog.text


def test_deleted_buffers_are_detected_too(ckdir, caplog):
    caplog.set_level(logging.WARNING, logger="jaxckpt")
    with pytest.raises(KeyboardInterrupt):
        with jaxckpt.CheckpointManager(ckdir, save_interval_steps=5, save_on_exception=True) as mgr:
            state = state_at(3)
            mgr.save(3, state)
            state["w"].delete()
            raise KeyboardInterrupt
    assert os.listdir(ckdir) == []
    assert "the state given for step 3 has deleted arrays (1 of 1; donated to the step that failed?)" in caplog.text


def test_no_exception_save_unless_asked_or_possible(ckdir, caplog):
    caplog.set_level(logging.INFO, logger="jaxckpt")
    with pytest.raises(RuntimeError):
        with jaxckpt.CheckpointManager(ckdir, save_interval_steps=5) as mgr:
            for step in range(1, 8):
                mgr.save(step, state_at(step))
            raise RuntimeError
    assert sorted(os.listdir(ckdir)) == ["5"]
    with pytest.raises(RuntimeError):
        with jaxckpt.CheckpointManager(ckdir / "b", save_on_exception=True):
            raise RuntimeError
    assert "save_on_exception: RuntimeError before any save() call; nothing to save" in caplog.text
    with pytest.raises(RuntimeError):
        with jaxckpt.CheckpointManager(ckdir / "c", save_interval_steps=5, save_on_exception=True) as mgr:
            mgr.save(5, state_at(5))
            raise RuntimeError
    assert "save_on_exception: step 5 is already committed" in caplog.text
    assert os.listdir(ckdir / "c") == ["5"]


def test_failed_exception_save_keeps_the_original_exception(ckdir, caplog):
    caplog.set_level(logging.ERROR, logger="jaxckpt")
    with pytest.raises(ZeroDivisionError):
        with jaxckpt.CheckpointManager(ckdir, save_interval_steps=5, save_on_exception=True) as mgr:
            mgr.save(5, state_at(5))
            mgr.save(6, {"bad": object()})  # not due: not looked at until the exception save
            1 / 0
    assert "save_on_exception: saving step 6 failed (UnsupportedValueError: leaf 'bad': object is not storable" \
        in caplog.text
    assert os.listdir(ckdir) == ["5"]


# ----------------------------------------------------------------------------- preemption, in-process
@pytest.fixture
def sigterm_handler():
    """A previous SIGTERM handler that records its calls; restored afterwards."""
    calls = []

    def handler(signum, frame):
        calls.append(signum)

    before = signal.signal(signal.SIGTERM, handler)
    yield handler, calls
    signal.signal(signal.SIGTERM, before)


def _sigterm_self(calls):
    os.kill(os.getpid(), signal.SIGTERM)
    for _ in range(1000):  # Python runs the handler at the next bytecode boundary
        if calls:
            return
        time.sleep(0.001)


def test_sigterm_saves_at_the_next_step_and_chains_the_previous_handler(ckdir, sigterm_handler):
    handler, calls = sigterm_handler
    mgr = jaxckpt.CheckpointManager(ckdir, save_interval_steps=100)
    try:
        assert signal.getsignal(signal.SIGTERM) != handler
        assert not mgr.save(1, state_at(1))
        _sigterm_self(calls)
        assert calls == [signal.SIGTERM]  # chained
        assert not mgr.reached_preemption(1)
        assert mgr.should_save(2)
        assert mgr.save(2, state_at(2))
        assert mgr.latest_step() == 2  # committed before save() returned
        assert mgr.reached_preemption(2) and not mgr.reached_preemption(1)
        assert mgr.metadata(2).reason == "preemption"
        assert not mgr.save(3, state_at(3))  # handled once; the policies rule again
        assert mgr.reached_preemption(3)
    finally:
        mgr.close()
    assert signal.getsignal(signal.SIGTERM) is handler  # restored on close


def test_preemption_at_a_step_already_saved(ckdir, sigterm_handler):
    _, calls = sigterm_handler
    with jaxckpt.CheckpointManager(ckdir, save_interval_steps=5) as mgr:
        assert mgr.save(5, state_at(5))
        _sigterm_self(calls)
        assert not mgr.save(5, state_at(5))  # the loop repeats the step: nothing new to save
        assert mgr.reached_preemption(5) and mgr.all_steps() == [5]


def test_no_handler_off_the_main_thread_or_when_disabled(ckdir, sigterm_handler, caplog):
    handler, _ = sigterm_handler
    caplog.set_level(logging.WARNING, logger="jaxckpt")
    made = []
    t = threading.Thread(target=lambda: made.append(jaxckpt.CheckpointManager(ckdir / "a")))
    t.start()
    t.join()
    assert signal.getsignal(signal.SIGTERM) is handler
    made[0].close()
    assert "created outside the main thread: no SIGTERM handler installed" in caplog.text
    with jaxckpt.CheckpointManager(ckdir / "b", save_on_preemption=False):
        assert signal.getsignal(signal.SIGTERM) is handler
    with jaxckpt.CheckpointManager(ckdir / "c", read_only=True):
        assert signal.getsignal(signal.SIGTERM) is handler


# ----------------------------------------------------------------------------- preemption, subprocess loops
TRAIN_LOOP = textwrap.dedent("""
    import os, signal, sys, time
    import jax.numpy as jnp
    import jaxckpt

    directory, mode = sys.argv[1], sys.argv[2]
    chained = []
    if mode == "self":
        signal.signal(signal.SIGTERM, lambda s, f: chained.append(s))  # the job's own handler
    with jaxckpt.CheckpointManager(directory, save_interval_steps=10, max_to_keep=2) as mgr:
        state = {"w": jnp.zeros(16, jnp.float32)}
        for step in range(1, 100000):
            state = {"w": state["w"] + 1}
            if mode == "self" and step == 23:
                os.kill(os.getpid(), signal.SIGTERM)
            mgr.save(step, state)
            if mode == "parent" and step == 10:
                mgr.wait_until_finished()
                print("ready", flush=True)
            if mgr.reached_preemption(step):
                print(f"preempted at {step}, latest {mgr.latest_step()}, chained {chained}", flush=True)
                break
            time.sleep(0.002)
    print("handler restored:", signal.getsignal(signal.SIGTERM) is not None, flush=True)
""")


def _start(ckdir, mode):
    return subprocess.Popen([sys.executable, "-c", TRAIN_LOOP, str(ckdir), mode], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _check_preempted(ckdir, step):
    with jaxckpt.CheckpointManager(ckdir, read_only=True) as ro:
        assert ro.latest_step() == step
        assert ro.metadata(step).reason == "preemption"
        np.testing.assert_array_equal(ro.restore()["w"], np.full(16, step, np.float32))
    assert not os.path.exists(ckdir / ".jaxckpt-lock")


def test_sigterm_in_a_training_subprocess_exits_cleanly_with_its_checkpoint(ckdir):
    child = _start(ckdir, "self")
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    assert out.splitlines() == [f"preempted at 23, latest 23, chained [{int(signal.SIGTERM)}]",
                                "handler restored: True"]
    _check_preempted(ckdir, 23)
    assert sorted(os.listdir(ckdir)) == ["20", "23"]


def test_sigterm_sent_by_another_process(ckdir):
    child = _start(ckdir, "parent")
    try:
        assert child.stdout.readline() == "ready\n"
        child.send_signal(signal.SIGTERM)  # the default action would kill it: the manager's handler replaced it
        out, err = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 0, err
    first = out.splitlines()[0]
    assert first.startswith("preempted at ") and first.endswith(", chained []")
    step = int(first.split()[2].rstrip(","))
    assert step > 10 and first == f"preempted at {step}, latest {step}, chained []"
    _check_preempted(ckdir, step)


def test_sigterm_after_close_off_the_main_thread_acts_as_before(ckdir):
    # Closed from another thread, the handler cannot be removed (Python allows that only on the
    # main thread): it must then behave like the previous disposition, here the default (die).
    script = textwrap.dedent("""
        import os, signal, sys, threading, jaxckpt
        mgr = jaxckpt.CheckpointManager(sys.argv[1])
        t = threading.Thread(target=mgr.close)
        t.start(); t.join()
        print("closed", flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        print("still alive", flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", script, str(ckdir)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGTERM, proc.stderr
    assert proc.stdout == "closed\n"


def test_sigterm_commits_its_step_to_a_bucket(tmp_path):
    """The preemption save of a training loop that checkpoints to S3 (a moto
    server; the child has nothing on disk but its working directory) is
    committed to the bucket before the loop stops: the manager's lock is
    released, no marker of a save is left, and the rotation kept 20 and 23."""
    import objservers

    srv = objservers.start_moto()
    try:
        objservers.make_bucket(srv.endpoint, "pre")
        env = dict(os.environ, AWS_ENDPOINT_URL=srv.endpoint, AWS_ALLOW_HTTP="true")
        child = subprocess.Popen([sys.executable, "-c", TRAIN_LOOP, "s3://pre/run", "self"], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
        assert out.splitlines() == [f"preempted at 23, latest 23, chained [{int(signal.SIGTERM)}]",
                                    "handler restored: True"]
        opts = {"endpoint": srv.endpoint}
        with jaxckpt.CheckpointManager("s3://pre/run", read_only=True, storage_options=opts) as ro:
            assert ro.all_steps() == [20, 23] and ro.metadata(23).reason == "preemption"
            np.testing.assert_array_equal(ro.restore()["w"], np.full(16, 23, np.float32))
        keys = [o["Key"] for o in objservers.s3_client(srv.endpoint).list_objects_v2(Bucket="pre").get("Contents", [])]
        assert sorted({k.split("/")[1] for k in keys}) == ["20", "23"], keys  # no .jaxckpt-lock
        assert not [k for k in keys if ".jaxckpt-tmp-" in k], keys
        assert os.listdir(tmp_path) == []
    finally:
        srv.stop()
