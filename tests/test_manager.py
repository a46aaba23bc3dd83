"""CheckpointManager: save policies, retention, step naming, lock, read-only
followers, resume and restore. Exception and preemption saves are in
test_manager_signals.py."""

import datetime
import gc
import logging
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time

import jax
import jax.numpy as jnp
import msgpack
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jaxckpt
from jaxckpt import lock, posixdirs, posixfs
from jaxckpt.policies import KeepPolicy, RetentionInfo, SavePolicy, StepNaming


class Clock:
    """An injected wall clock the test moves by hand."""

    def __init__(self, t=1_000_000.0):
        self.t = t

    def __call__(self):
        return self.t


def state_at(step):
    return {"w": jnp.full((4,), step, jnp.float32), "b": np.arange(3, dtype=np.int64) * step, "step": step}


def names(d):
    return sorted(e for e in os.listdir(d) if e != lock.LOCK_NAME)


def run_steps(mgr, steps, clock=None, dt=0.0, **kw):
    saved = []
    for s in steps:
        if clock is not None:
            clock.t += dt
        if mgr.save(s, state_at(s), **kw):
            saved.append(s)
    mgr.wait_until_finished()
    return saved


def bits(x):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    a = np.asarray(x)
    return a.dtype.str, a.shape, a.tobytes()


def assert_bit_exact(got, want):
    gl, gt = jax.tree_util.tree_flatten(got)
    wl, wt = jax.tree_util.tree_flatten(want)
    assert gt == wt
    for g, w in zip(gl, wl):
        assert type(g) is type(w) or isinstance(g, jax.Array) == isinstance(w, jax.Array)
        assert bits(g) == bits(w)


# ----------------------------------------------------------------------------- save policies
def test_interval_steps_policy(ckdir):
    with jaxckpt.CheckpointManager(ckdir, save_interval_steps=3) as mgr:
        assert run_steps(mgr, range(1, 11)) == [3, 6, 9]
        assert mgr.all_steps() == [3, 6, 9]
        assert mgr.latest_step() == 9
    assert names(ckdir) == ["3", "6", "9"]


def test_interval_seconds_policy_with_injected_clock(ckdir):
    clock = Clock()
    with jaxckpt.CheckpointManager(ckdir, save_interval_seconds=10, _clock=clock) as mgr:
        # 4 s per step: due at 12 s since creation, then 12 s after that save, ...
        assert run_steps(mgr, range(1, 10), clock, dt=4.0) == [3, 6, 9]
        clock.t += 9.5
        assert not mgr.should_save(10)
        clock.t += 0.5
        assert mgr.should_save(10)
        assert mgr.metadata(9).timestamp == 1_000_000.0 + 36.0


def test_interval_seconds_accepts_timedelta_and_counts_from_any_save(ckdir):
    clock = Clock()
    with jaxckpt.CheckpointManager(ckdir, save_interval_seconds=datetime.timedelta(seconds=5),
                                   save_on_steps=[2], _clock=clock) as mgr:
        assert run_steps(mgr, range(1, 6), clock, dt=2.0) == [2, 5]  # step 2 restarted the 5 s


def test_save_on_steps_unites_with_interval(ckdir):
    with jaxckpt.CheckpointManager(ckdir, save_interval_steps=4, save_on_steps={2, 5, 7}) as mgr:
        assert run_steps(mgr, range(1, 10)) == [2, 4, 5, 7, 8]


def test_no_policy_saves_every_call(ckdir):
    with jaxckpt.CheckpointManager(ckdir) as mgr:
        assert run_steps(mgr, [1, 2, 5]) == [1, 2, 5]
    assert names(ckdir) == ["1", "2", "5"]


def test_policy_never_saves_at_or_below_the_latest_step(ckdir):
    with jaxckpt.CheckpointManager(ckdir, save_interval_steps=3) as mgr:
        assert mgr.save(6, state_at(6))
        assert not mgr.should_save(6)
        assert not mgr.save(6, state_at(6))  # again: at the latest (in flight or committed)
        assert not mgr.save(3, state_at(3))  # below it
        mgr.wait_until_finished()
        assert not mgr.save(3, state_at(3))
        assert mgr.all_steps() == [6]


def test_force_and_overwrite(ckdir):
    with jaxckpt.CheckpointManager(ckdir, save_interval_steps=100) as mgr:
        assert mgr.save(3, state_at(3), force=True)
        assert mgr.save(1, state_at(1), force=True)  # force saves below the latest too
        mgr.wait_until_finished()
        with pytest.raises(jaxckpt.CheckpointExistsError) as e:
            mgr.save(3, state_at(30), force=True)
        assert str(e.value) == f"{ckdir / '3'}: step 3 already exists (pass overwrite=True to replace it)"
        assert mgr.save(3, state_at(30), force=True, overwrite=True)
        mgr.wait_until_finished()
        assert mgr.all_steps() == [1, 3]
        np.testing.assert_array_equal(mgr.restore(3)["w"], np.full(4, 30, np.float32))
        assert mgr.metadata(3).reason == "forced"
    assert names(ckdir) == ["1", "3"]


def test_save_with_no_policy_due_touches_nothing(ckdir):
    flattened = []

    class Probe:
        """A pytree node that records every flatten."""

    jax.tree_util.register_pytree_node(Probe, lambda p: (flattened.append(1) or ((), None)), lambda _, c: Probe())
    with jaxckpt.CheckpointManager(ckdir, save_interval_steps=1000, save_on_exception=True) as mgr:
        for s in range(1, 200):
            assert mgr.save(s, Probe(), metrics={"loss": object()}) is False
        assert flattened == []
        assert names(ckdir) == []
        assert mgr.all_steps() == []


def test_sync_mode_commits_before_returning(ckdir):
    with jaxckpt.CheckpointManager(ckdir, async_save=False, max_to_keep=1) as mgr:
        assert mgr.save(1, state_at(1))
        assert mgr.latest_step() == 1 and names(ckdir) == ["1"]
        assert mgr.save(2, state_at(2))
        assert names(ckdir) == ["2"]
        assert mgr.last_save_stats.step == 2


@pytest.mark.parametrize("kwargs, error, message", [
    ({"max_to_keep": 0}, ValueError, "max_to_keep must be >= 1, got 0"),
    ({"save_interval_steps": 1.5}, TypeError, "save_interval_steps must be an int, got float"),
    ({"save_interval_seconds": -1}, ValueError, "save_interval_seconds must be a positive, finite duration, got -1"),
    ({"keep_time_interval": "1h"}, TypeError,
     "keep_time_interval must be a number of seconds or a datetime.timedelta, got str"),
    ({"best_metric": "loss"}, ValueError, "best_metric needs max_to_keep: it keeps the best max_to_keep checkpoints"),
    ({"max_to_keep": 2, "best_metric": "loss", "best_mode": "lowest"}, ValueError,
     "best_mode must be 'min' or 'max', got 'lowest'"),
    ({"save_on_steps": [3, -1]}, ValueError, "save_on_steps entry must be in [0, 2**63), got -1"),
    ({"step_format": "{step}_{step}"}, ValueError,
     "step_format '{step}_{step}': it must contain {step} once, and {epoch} and {prefix} at most once"),
    ({"step_format": "../{step}"}, ValueError,
     "step_format '../{step}': outside the fields only letters, digits, '_', '.' and '-' are allowed"),
    ({"step_format": "{epoch}{step}"}, ValueError,
     "step_format '{epoch}{step}': two fields must be separated by some text"),
    ({"step_format": ".{step}"}, ValueError, "step_format '.{step}': a name must not start with '.' or '-'"),
    ({"step_format": "{prefix}_{step}"}, ValueError,
     "step_format '{prefix}_{step}': {prefix} in the format and step_prefix= go together"),
    ({"step_prefix": "a/b"}, ValueError, "step_prefix must be 1-128 characters of letters, digits, '_', '.', '-' "
     "and not start with '.' or '-', got 'a/b'"),
])
def test_invalid_options_are_refused(ckdir, kwargs, error, message):
    with pytest.raises(error) as e:
        jaxckpt.CheckpointManager(ckdir, **kwargs)
    assert str(e.value) == message
    assert not os.path.exists(ckdir / lock.LOCK_NAME)


def test_policy_objects_stand_for_the_keywords(ckdir):
    with jaxckpt.CheckpointManager(ckdir, save_policy=SavePolicy(interval_steps=3),
                                   keep_policy=KeepPolicy(max_to_keep=2)) as mgr:
        assert run_steps(mgr, range(1, 11)) == [3, 6, 9]
        assert mgr.all_steps() == [6, 9]
    for kwargs, error, message in [
        ({"save_policy": SavePolicy(interval_steps=3), "save_interval_steps": 3}, ValueError,
         "pass save_policy= or save_interval_steps/save_interval_seconds/save_on_steps, not both"),
        ({"keep_policy": KeepPolicy(max_to_keep=2), "best_mode": "max"}, ValueError,
         "pass keep_policy= or max_to_keep/keep_time_interval/keep_period/best_metric/best_mode, not both"),
        ({"save_policy": SavePolicy(interval_steps=0)}, ValueError, "save_interval_steps must be >= 1, got 0"),
        ({"keep_policy": {"max_to_keep": 2}}, TypeError, "keep_policy must be a KeepPolicy, got dict"),
    ]:
        with pytest.raises(error) as e:
            jaxckpt.CheckpointManager(ckdir, **kwargs)
        assert str(e.value) == message


@pytest.mark.parametrize("step, error, message", [
    (-1, ValueError, "step must be in [0, 2**63), got -1"),
    (True, TypeError, "step must be an int, got bool"),
    (2.0, TypeError, "step must be an int, got float"),
])
def test_invalid_steps_are_refused(ckdir, step, error, message):
    with jaxckpt.CheckpointManager(ckdir) as mgr:
        with pytest.raises(error) as e:
            mgr.save(step, state_at(1))
        assert str(e.value) == message


def test_numpy_and_device_integer_steps_are_accepted(ckdir):
    with jaxckpt.CheckpointManager(ckdir) as mgr:
        assert mgr.save(np.int64(4), state_at(4))
        assert mgr.save(jnp.int32(5), state_at(5))
        mgr.wait_until_finished()
        assert mgr.all_steps() == [4, 5]


def test_unstorable_metadata_and_metrics_raise_on_the_calling_thread(ckdir):
    with jaxckpt.CheckpointManager(ckdir) as mgr:
        with pytest.raises(jaxckpt.UnsupportedValueError) as e:
            mgr.save(1, state_at(1), metadata={"fn": print})
        assert str(e.value) == (f"{ckdir}: step 1: metadata['fn']: builtin_function_or_method is not storable; "
                                "use str/int/float/bool/None/bytes and lists/dicts of them")
        with pytest.raises(jaxckpt.UnsupportedValueError) as e:
            mgr.save(1, state_at(1), metrics={"acc": {1, 2}})
        assert str(e.value) == (f"{ckdir}: step 1: metrics['acc']: set is not storable; "
                                "use str/int/float/bool/None/bytes and lists/dicts of them")
        assert mgr.all_steps() == [] and names(ckdir) == []


def test_each_value_is_checked_once_per_save(ckdir, monkeypatch):
    real = jaxckpt.format.check_metadata
    checked = []
    monkeypatch.setattr(jaxckpt.format, "check_metadata", lambda v: checked.append(v) or real(v))
    for async_save in (True, False):
        with jaxckpt.CheckpointManager(ckdir / str(async_save), async_save=async_save) as mgr:
            checked.clear()
            mgr.save(1, state_at(1), metrics={"loss": np.float32(0.5)}, metadata={"lr": 0.1})
            # The user's metadata and the metrics, once each; never the step record around them.
            assert checked == [{"lr": 0.1}, {"loss": 0.5}]


@pytest.mark.parametrize("async_save", [True, False])
def test_a_save_that_cannot_start_gives_its_step_back(ckdir, async_save):
    with jaxckpt.CheckpointManager(ckdir, save_interval_steps=2, async_save=async_save) as mgr:
        with pytest.raises(jaxckpt.UnsupportedValueError):
            mgr.save(2, {"bad": object()})
        assert mgr.should_save(2)  # not claimed any more: the policy may save it again
        assert mgr.save(2, state_at(2))
        mgr.wait_until_finished()
        assert mgr.all_steps() == [2]


# ----------------------------------------------------------------------------- retention rules (pure)
def infos(steps, dt=1.0, metrics=None):
    return [RetentionInfo(s, 100.0 + dt * i, None if metrics is None else metrics.get(s))
            for i, s in enumerate(steps)]


def test_keep_policy_rules():
    steps = list(range(1, 11))
    assert KeepPolicy().keep(infos(steps)) == set(steps)
    assert KeepPolicy(max_to_keep=3).keep(infos(steps)) == {8, 9, 10}
    assert KeepPolicy(max_to_keep=2, period=4).keep(infos(steps)) == {4, 8, 9, 10}
    # Windows of 3.5 s over checkpoints 1 s apart: walk forward from the oldest.
    assert KeepPolicy(max_to_keep=1, time_interval=3.5).keep(infos(steps)) == {1, 5, 9, 10}
    # The union of all rules.
    assert KeepPolicy(max_to_keep=1, period=3, time_interval=3.5).keep(infos(steps)) == {1, 3, 5, 6, 9, 10}


def test_keep_policy_best_n_keeps_the_newest_too():
    loss = {1: 0.5, 2: 0.1, 3: 0.3, 4: 0.2, 5: 0.9}
    assert KeepPolicy(max_to_keep=2, best_metric="loss").keep(infos(range(1, 6), metrics=loss)) == {2, 4, 5}
    assert KeepPolicy(max_to_keep=2, best_metric="loss", best_mode="max").keep(
        infos(range(1, 6), metrics=loss)) == {5, 1}
    # Steps without the metric rank last; ties go to the newer step.
    tied = {1: 0.1, 2: 0.1, 3: None, 4: 0.3}
    assert KeepPolicy(max_to_keep=1, best_metric="loss").keep(infos(range(1, 5), metrics=tied)) == {2, 4}
    # Ranking last, they fill the slots the ranked ones leave, the newer first (they were all deleted but the
    # newest, however much room there was: a final save without metrics took the others with it).
    sparse = {1: None, 2: 0.4, 3: None, 4: None}
    assert KeepPolicy(max_to_keep=3, best_metric="loss").keep(infos(range(1, 5), metrics=sparse)) == {2, 3, 4}
    assert KeepPolicy(max_to_keep=5, best_metric="loss").keep(infos(range(1, 4), metrics={})) == {1, 2, 3}


def test_time_window_choice_is_stable_as_checkpoints_arrive():
    policy = KeepPolicy(max_to_keep=1, time_interval=10)
    alive = []
    window_kept = set()
    for i in range(40):  # a checkpoint every 3 s, rotating after each one
        alive.append(RetentionInfo(i, 3.0 * i))
        keep = policy.keep(alive)
        alive = [x for x in alive if x.step in keep]
        window_kept |= keep - {i}
    # Once kept by its window, a checkpoint stays forever.
    assert window_kept == {0, 4, 8, 12, 16, 20, 24, 28, 32, 36}
    assert {x.step for x in alive} == window_kept | {39}


# ----------------------------------------------------------------------------- retention on disk
def test_max_to_keep_rotates_after_each_commit(ckdir):
    with jaxckpt.CheckpointManager(ckdir, max_to_keep=2) as mgr:
        mgr.save(1, state_at(1))
        mgr.save(2, state_at(2))
        mgr.wait_until_finished()
        assert names(ckdir) == ["1", "2"]
        mgr.save(3, state_at(3))
        mgr.wait_until_finished()
        assert names(ckdir) == ["2", "3"] and mgr.all_steps() == [2, 3]


def test_time_windows_on_disk(ckdir):
    clock = Clock()
    with jaxckpt.CheckpointManager(ckdir, max_to_keep=1, keep_time_interval=datetime.timedelta(seconds=10),
                                   _clock=clock) as mgr:
        run_steps(mgr, range(0, 12), clock, dt=3.0)  # timestamps 3 s apart
    # Checkpoints 3 s apart, one kept per 10 s walking from the oldest (0 at 3 s, 4 at 15 s, 8 at 27 s),
    # plus the newest.
    assert sorted(map(int, names(ckdir))) == [0, 4, 8, 11]


def test_keep_period_and_union_on_disk(ckdir):
    with jaxckpt.CheckpointManager(ckdir, max_to_keep=2, keep_period=5, save_interval_steps=2) as mgr:
        run_steps(mgr, range(1, 17))
        assert mgr.all_steps() == [10, 14, 16]  # 10: keep_period (an even multiple of 5); 14, 16: newest two


def test_best_n_keeps_the_newest_even_when_it_is_worse(ckdir):
    losses = {1: 0.9, 2: 0.2, 3: 0.5, 4: 0.1, 5: 0.8, 6: 0.95}
    with jaxckpt.CheckpointManager(ckdir, max_to_keep=2, best_metric="loss") as mgr:
        for s, loss in losses.items():
            mgr.save(s, state_at(s), metrics={"loss": jnp.float32(loss)})
            mgr.wait_until_finished()
            assert mgr.latest_step() == s  # never rotated away right after its commit
        assert mgr.all_steps() == [2, 4, 6]
        assert mgr.metadata(4).metrics == {"loss": float(np.float32(0.1))}


def test_newest_is_kept_by_best_n_with_max_mode(ckdir):
    with jaxckpt.CheckpointManager(ckdir, max_to_keep=1, best_metric="acc", best_mode="max",
                                   async_save=False) as mgr:
        for s, acc in [(1, 0.5), (2, 0.9), (3, 0.4), (4, 0.3)]:
            mgr.save(s, state_at(s), metrics={"acc": acc})
        assert mgr.all_steps() == [2, 4]


def test_rotation_spares_what_no_manager_wrote(ckdir):
    jaxckpt.save(ckdir / "1", {"x": np.ones(2)})  # a plain checkpoint under a step name
    os.mkdir(ckdir / "notes")
    (ckdir / "3.txt").write_text("x")
    os.mkdir(ckdir / "007")  # not a canonical step name
    jaxckpt.save(ckdir / "007" / "inner", {"x": np.ones(2)})
    with jaxckpt.CheckpointManager(ckdir, max_to_keep=1) as mgr:
        assert mgr.all_steps() == [1]
        run_steps(mgr, [2, 3, 4])
        assert mgr.all_steps() == [1, 4]
        meta = mgr.metadata(1)
        assert meta.reason is None and meta.metadata is None and meta.step == 1
    assert names(ckdir) == ["007", "1", "3.txt", "4", "notes"]


def test_half_deleted_and_stale_temporary_directories(ckdir):
    jaxckpt.save(ckdir / "5", state_at(5))
    jaxckpt.save(ckdir / "9", state_at(9))
    # A deletion interrupted after the rename: not listed, removed on start.
    os.rename(ckdir / "5", ckdir / ".5.jaxckpt-del-0123456789abcdef")
    # A save interrupted mid-write by a dead process (same host): removed.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    tmp = posixdirs.make_temp_dir(str(ckdir / "7"))
    posixfs.write_file(tmp, posixdirs.OWNER_FILE, msgpack.packb(
        {"kind": posixdirs.TMP_MARK, "host": socket.gethostname(), "pid": int(dead.stdout), "start": None}))
    posixfs.write_file(tmp, "data-00000.bin", b"partial")
    # A save still running in this very process: left alone.
    live = posixdirs.make_temp_dir(str(ckdir / "8"))
    # Our name pattern without our marker: not ours, left alone.
    foreign = ckdir / ".6.jaxckpt-tmp-0123456789abcdef"
    os.mkdir(foreign)
    (foreign / "user.txt").write_text("keep me")
    with jaxckpt.CheckpointManager(ckdir) as mgr:
        assert mgr.all_steps() == [9]
    left = sorted(os.listdir(ckdir))
    assert left == sorted(["9", os.path.basename(live), ".6.jaxckpt-tmp-0123456789abcdef"])
    assert (foreign / "user.txt").read_text() == "keep me"


def test_interrupted_overwrite_is_put_back_on_start(ckdir):
    jaxckpt.save(ckdir / "3", state_at(3))
    os.rename(ckdir / "3", ckdir / ".3.jaxckpt-old-0123456789abcdef")  # crash between the two renames
    with jaxckpt.CheckpointManager(ckdir) as mgr:
        assert mgr.all_steps() == [3]
        np.testing.assert_array_equal(mgr.restore()["w"], np.full(4, 3, np.float32))
    assert names(ckdir) == ["3"]


# ----------------------------------------------------------------------------- step naming
def test_mindspore_style_names_with_prefix_and_epoch(ckdir):
    fmt_kw = dict(step_format="{prefix}-{epoch}_{step}", step_prefix="resnet")
    with jaxckpt.CheckpointManager(ckdir, save_interval_steps=50, **fmt_kw) as mgr:
        for step in range(1, 201):
            mgr.save(step, state_at(step), epoch=(step - 1) // 100 + 1)
        mgr.wait_until_finished()
        assert mgr.all_steps() == [50, 100, 150, 200]
        assert mgr.metadata(150).epoch == 2
        with pytest.raises(ValueError) as e:
            mgr.save(250, state_at(250))
        assert str(e.value) == "step_format '{prefix}-{epoch}_{step}' names directories by epoch: pass epoch="
    for other in ["resnet-1_0300", "resnet-x_300", "other-1_300"]:  # committed, but not our names
        jaxckpt.save(ckdir / other, state_at(300))
    assert names(ckdir) == ["other-1_300", "resnet-1_0300", "resnet-1_100", "resnet-1_50", "resnet-2_150",
                            "resnet-2_200", "resnet-x_300"]
    with jaxckpt.CheckpointManager(ckdir, read_only=True, **fmt_kw) as ro:
        assert ro.all_steps() == [50, 100, 150, 200]
    with jaxckpt.CheckpointManager(ckdir, read_only=True) as plain:  # another format sees none of them
        assert plain.all_steps() == []


def test_overwrite_under_another_epoch_replaces_the_old_name(ckdir):
    kw = dict(step_format="{prefix}-{epoch}_{step}", step_prefix="net")
    with jaxckpt.CheckpointManager(ckdir, **kw) as mgr:
        mgr.save(10, state_at(10), epoch=1)
        mgr.wait_until_finished()
        assert mgr.save(10, state_at(11), epoch=2, force=True, overwrite=True)
        mgr.wait_until_finished()
        assert mgr.metadata(10).epoch == 2
    assert names(ckdir) == ["net-2_10"]


def test_step_naming_parse_and_zero_padding():
    n = StepNaming.build("ckpt_{step:08d}", None)
    assert n.name(42, None) == "ckpt_00000042"
    assert n.parse("ckpt_00000042") == (42, None)
    assert n.parse("ckpt_123456789") == (123456789, None)
    for bad in ["ckpt_42", "ckpt_0000042", "ckpt_0000004２", "ckpt_00000042/", "x", ""]:
        assert n.parse(bad) is None
    orbax_like = StepNaming.build(None, "step")
    assert orbax_like.name(7, None) == "step_7" and orbax_like.parse("step_7") == (7, None)
    default = StepNaming.build(None, None)
    assert [default.parse(s) for s in ["0", "7", "07", "+7", " 7", "7 ", "99999999999999999999"]] == [
        (0, None), (7, None), None, None, None, None, None]


# ----------------------------------------------------------------------------- metadata and observability
def test_metadata_record(ckdir):
    clock = Clock(1_700_000_000.0)
    with jaxckpt.CheckpointManager(ckdir, _clock=clock) as mgr:
        mgr.save(12, state_at(12), epoch=3, metrics={"loss": np.float64(0.25), "acc": jnp.int32(7)},
                 metadata={"lr": 0.1, "tags": ["a"]})
        mgr.wait_until_finished()
        with pytest.raises(jaxckpt.CheckpointNotFoundError) as e:
            mgr.metadata(11)
        assert str(e.value) == f"{ckdir}: step 11 is not a committed checkpoint here (latest committed steps: 12)"
    with jaxckpt.CheckpointManager(ckdir, read_only=True) as ro:
        meta = ro.metadata()
    assert meta == jaxckpt.StepMetadata(12, 3, 1_700_000_000.0, "interval", {"loss": 0.25, "acc": 7},
                                        {"lr": 0.1, "tags": ["a"]}, jax.__version__, jaxckpt.__version__,
                                        str(ckdir / "12"), 4 * 4 + 3 * 8)
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(1_700_000_000.0))
    assert repr(meta) == (f"StepMetadata(step=12, epoch=3, reason='interval', saved {when}, 40 B, "
                          f"metrics={{'loss': 0.25, 'acc': 7}}, metadata={{'lr': 0.1, 'tags': ['a']}}, "
                          f"jax {jax.__version__}, jaxckpt {jaxckpt.__version__})")
    # The record is in the manifest itself: jaxckpt.inspect shows it.
    assert jaxckpt.inspect(ckdir / "12").metadata["reason"] == "interval"


def test_each_save_is_logged_and_recorded(ckdir, caplog):
    caplog.set_level(logging.INFO, logger="jaxckpt")
    with jaxckpt.CheckpointManager(ckdir, save_interval_steps=2) as mgr:
        assert mgr.last_save_stats is None
        run_steps(mgr, range(1, 5))
        stats = mgr.last_save_stats
    written = os.path.getsize(ckdir / "4" / "data-00000.bin")  # 40 B of arrays, aligned
    assert (stats.step, stats.reason, stats.path, stats.bytes, stats.files) == (4, "interval", str(ckdir / "4"),
                                                                                written, 2)
    assert 0 <= stats.blocking_s <= stats.total_s and stats.throughput_gbps > 0
    lines = [r.getMessage() for r in caplog.records if r.name == "jaxckpt" and r.getMessage().startswith("saved")]
    assert [line.split(":")[0] for line in lines] == [f"saved step 2 (interval) to {ckdir / '2'}",
                                                     f"saved step 4 (interval) to {ckdir / '4'}"]
    assert f" {written} B, " in lines[-1] and lines[-1].endswith("B/s") and "blocked " in lines[-1]


def test_background_failure_is_raised_once_and_nothing_is_listed(ckdir, monkeypatch):
    real = posixdirs.commit
    calls = []

    def failing_commit(tmp, final, overwrite):
        calls.append(final)
        if len(calls) == 1:
            raise OSError(28, "No space left on device", final)
        return real(tmp, final, overwrite)

    monkeypatch.setattr(posixdirs, "commit", failing_commit)
    with jaxckpt.CheckpointManager(ckdir) as mgr:
        mgr.save(1, state_at(1))
        with pytest.raises(OSError) as e:
            mgr.wait_until_finished()
        assert e.value.errno == 28
        mgr.wait_until_finished()  # raised once only
        assert mgr.all_steps() == [] and mgr.latest_step() is None
        assert mgr.save(2, state_at(2))
        mgr.wait_until_finished()
        assert mgr.all_steps() == [2]
    assert names(ckdir) == ["2"]


def test_background_failure_surfaces_on_a_later_save_call(ckdir, monkeypatch):
    def failing_commit(tmp, final, overwrite):
        raise OSError(5, "Input/output error", final)

    monkeypatch.setattr(posixdirs, "commit", failing_commit)
    mgr = jaxckpt.CheckpointManager(ckdir, save_interval_steps=10)
    try:
        mgr.save(10, state_at(10))
        mgr._wait_all()
        with pytest.raises(OSError) as e:
            mgr.save(11, state_at(11))  # no save due: the earlier failure is reported anyway
        assert e.value.errno == 5
        assert mgr.save(12, state_at(12)) is False
    finally:
        mgr.close()


# ----------------------------------------------------------------------------- lock
def test_second_writer_is_refused(ckdir):
    with jaxckpt.CheckpointManager(ckdir) as mgr:
        with pytest.raises(jaxckpt.CheckpointLockedError) as e:
            jaxckpt.CheckpointManager(ckdir)
        msg = str(e.value)
        assert msg.startswith(f"{ckdir / lock.LOCK_NAME}: this process already writes to this directory "
                              f"(host {socket.gethostname()!r}, pid {os.getpid()} since ")
        assert msg.endswith("close the other CheckpointManager first, or open this one with read_only=True")
        with jaxckpt.CheckpointManager(ckdir, read_only=True) as ro:  # readers need no lock
            assert ro.all_steps() == []
        mgr.save(1, state_at(1))
    assert not os.path.exists(ckdir / lock.LOCK_NAME)
    with jaxckpt.CheckpointManager(ckdir) as again:  # released on close
        assert again.all_steps() == [1]


def test_writer_in_another_process_is_refused_then_stale_lock_taken_over(ckdir, caplog):
    script = textwrap.dedent(f"""
        import os, sys, numpy as np, jaxckpt
        mgr = jaxckpt.CheckpointManager({str(ckdir)!r})
        mgr.save(1, {{"x": np.arange(3)}})
        mgr.wait_until_finished()
        print("ready", flush=True)
        sys.stdin.readline()
        os._exit(0)  # dies holding the lock
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "ready\n"
        with pytest.raises(jaxckpt.CheckpointLockedError) as e:
            jaxckpt.CheckpointManager(ckdir)
        assert str(e.value).startswith(f"{ckdir / lock.LOCK_NAME}: the directory is locked by another writer "
                                       f"(host {socket.gethostname()!r}, pid {child.pid} since ")
    finally:
        child.communicate("go\n", timeout=60)
    assert child.returncode == 0
    assert lock.read_lock(str(ckdir))["pid"] == child.pid  # the dead writer's lock is still there
    caplog.set_level(logging.WARNING, logger="jaxckpt")
    with jaxckpt.CheckpointManager(ckdir) as mgr:
        assert lock.read_lock(str(ckdir))["pid"] == os.getpid()
        assert mgr.all_steps() == [1]
    gone = f"took over the lock of a writer that is gone (host {socket.gethostname()!r}, pid {child.pid})"
    assert gone in caplog.text


def test_lock_of_another_host_or_unreadable_lock_is_refused(ckdir):
    posixfs.write_file(str(ckdir), lock.LOCK_NAME, msgpack.packb(
        {"kind": "jaxckpt-lock", "host": "elsewhere", "pid": 1, "start": None, "token": "t", "time": 0.0}))
    with pytest.raises(jaxckpt.CheckpointLockedError) as e:
        jaxckpt.CheckpointManager(ckdir)
    assert "locked by another writer (host 'elsewhere', pid 1 since " in str(e.value)
    os.unlink(ckdir / lock.LOCK_NAME)
    os.symlink("/etc/passwd", ckdir / lock.LOCK_NAME)
    with pytest.raises(jaxckpt.CheckpointLockedError) as e:
        jaxckpt.CheckpointManager(ckdir)
    assert str(e.value).startswith(f"{ckdir / lock.LOCK_NAME}: unreadable lock file (")
    assert os.path.islink(ckdir / lock.LOCK_NAME)


def test_lock_is_released_when_an_unclosed_manager_is_collected(ckdir):
    mgr = jaxckpt.CheckpointManager(ckdir)
    mgr.save(1, state_at(1))
    mgr.wait_until_finished()
    del mgr
    gc.collect()
    assert not os.path.exists(ckdir / lock.LOCK_NAME)
    with jaxckpt.CheckpointManager(ckdir) as again:
        assert again.all_steps() == [1]


def test_pid_reuse_is_detected_by_start_time(ckdir):
    me = lock.lock_record("old")
    me["start"] = me["start"] - 1  # same pid, an earlier process: the holder is gone
    posixfs.write_file(str(ckdir), lock.LOCK_NAME, msgpack.packb(me))
    with jaxckpt.CheckpointManager(ckdir):
        assert lock.read_lock(str(ckdir))["token"] != "old"


# ----------------------------------------------------------------------------- read-only followers
@pytest.fixture
def held_commits(monkeypatch):
    """Hold every commit until the test releases it."""
    gate = threading.Event()
    real = posixdirs.commit

    def commit(tmp, final, overwrite):
        assert gate.wait(30)
        return real(tmp, final, overwrite)

    monkeypatch.setattr(posixdirs, "commit", commit)
    yield gate
    gate.set()


def test_read_only_follower_sees_committed_steps_only(ckdir, held_commits):
    with jaxckpt.CheckpointManager(ckdir, max_to_keep=2) as writer, \
            jaxckpt.CheckpointManager(ckdir, read_only=True) as reader:
        held_commits.set()
        run_steps(writer, [1, 2])
        assert reader.all_steps() == []
        reader.reload()
        assert reader.all_steps() == [1, 2]
        held_commits.clear()
        writer.save(3, state_at(3))
        reader.reload()
        assert reader.all_steps() == [1, 2] and writer.latest_step() == 2  # step 3 is not committed yet
        held_commits.set()
        writer.wait_until_finished()
        reader.reload()
        assert reader.all_steps() == [2, 3] and reader.latest_step() == 3
        assert_bit_exact(reader.restore(), {"b": np.arange(3) * 3, "step": 3, "w": np.full(4, 3, np.float32)})
        with pytest.raises(jaxckpt.CheckpointError) as e:
            reader.save(4, state_at(4), force=True)
        assert str(e.value) == f"{ckdir}: this CheckpointManager is read-only; it cannot save"
    with jaxckpt.CheckpointManager(ckdir / "missing", read_only=True) as empty:
        assert empty.all_steps() == [] and empty.latest_step() is None
        with pytest.raises(jaxckpt.CheckpointNotFoundError):
            empty.restore()
    assert not os.path.exists(ckdir / "missing")


def test_restore_waits_for_the_save_in_flight(ckdir, held_commits):
    with jaxckpt.CheckpointManager(ckdir) as mgr:
        held_commits.set()
        run_steps(mgr, [1])
        held_commits.clear()
        mgr.save(2, state_at(2))
        assert mgr.latest_step() == 1
        threading.Timer(0.2, held_commits.set).start()
        got = mgr.restore()
        assert mgr.restored_step == 2
        np.testing.assert_array_equal(got["w"], np.full(4, 2, np.float32))


def test_closed_manager_refuses_saves(ckdir):
    mgr = jaxckpt.CheckpointManager(ckdir)
    assert mgr.should_save(1)
    mgr.close()
    mgr.close()
    with pytest.raises(jaxckpt.CheckpointError) as e:
        mgr.save(1, state_at(1))
    assert str(e.value) == f"{ckdir}: this CheckpointManager is closed; it cannot save"
    assert not mgr.should_save(1)  # "would save(step) save now": it would raise
    reader = jaxckpt.CheckpointManager(ckdir, read_only=True)
    assert not reader.should_save(1)
    reader.close()


# ----------------------------------------------------------------------------- resume
def rich_state(seed):
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
    k = jax.random.key(seed)
    sharded = jax.device_put(jax.random.normal(k, (16, 8), jnp.float32), NamedSharding(mesh, P("data", "model")))
    return {
        "params": {"dense": {"kernel": sharded, "bias": jnp.arange(8, dtype=jnp.bfloat16) * seed}},
        "opt": (jnp.zeros((3,), jnp.float16) + seed, np.arange(5, dtype=np.uint8)),
        "rng": jax.random.fold_in(k, 1),
        "step": seed,
        "lr": np.float32(0.5),
    }


def test_resume_restores_bit_exactly(ckdir):
    with jaxckpt.CheckpointManager(ckdir, save_interval_steps=5, max_to_keep=2) as mgr:
        for s in range(1, 13):
            if mgr.save(s, rich_state(s), metrics={"loss": 1.0 / s}):
                want = (s, rich_state(s))
    # A new process would do exactly this:
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) if isinstance(x, jax.Array) else x,
        rich_state(0))
    with jaxckpt.CheckpointManager(ckdir, save_interval_steps=5, max_to_keep=2) as mgr:
        assert mgr.all_steps() == [5, 10] and mgr.latest_step() == want[0]
        got = mgr.restore(target=abstract)
        assert got["params"]["dense"]["kernel"].sharding == want[1]["params"]["dense"]["kernel"].sharding
        assert_bit_exact(got, want[1])
        assert mgr.restore(5, target=abstract)["step"] == 5
        partial = mgr.restore(target={"params": abstract["params"]}, partial=True)
        assert_bit_exact(partial, {"params": want[1]["params"]})
        # The run goes on from there; policies skip the steps already saved.
        assert not mgr.save(10, got)
        assert mgr.save(15, got)


def test_restore_fallback_to_an_older_step(ckdir, caplog):
    with jaxckpt.CheckpointManager(ckdir) as mgr:
        run_steps(mgr, [1, 2, 3])
    data = ckdir / "3" / "data-00000.bin"
    raw = bytearray(data.read_bytes())
    raw[0] ^= 0x01
    data.write_bytes(bytes(raw))
    caplog.set_level(logging.WARNING, logger="jaxckpt")
    with jaxckpt.CheckpointManager(ckdir, read_only=True) as mgr:
        with pytest.raises(jaxckpt.CorruptCheckpointError) as e:
            mgr.restore()
        assert str(e.value).startswith(f"{data}: checksum mismatch in leaf 'b', chunk 0")
        got = mgr.restore(fallback=True)
        assert mgr.restored_step == 2
        np.testing.assert_array_equal(got["w"], np.full(4, 2, np.float32))
        assert "restore(fallback=True): restored step 2; step 3 could not be restored" in caplog.text
        with pytest.raises(jaxckpt.CheckpointNotFoundError) as e:
            mgr.restore(7)
        assert str(e.value) == f"{ckdir}: step 7 is not a committed checkpoint here (latest committed steps: 1, 2, 3)" \
                               "; call reload() to see steps committed since"
