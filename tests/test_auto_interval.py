"""save_interval_steps="auto" (issue 19): the interval chosen from a budget
(max_overhead) and the expected time between failures (mtbf), measured with an
injected clock and synthetic costs. The expected intervals are computed here
from the figures the test injects, independently of jaxckpt/interval.py."""

import logging
import math
import statistics
import threading
import time

import jax.numpy as jnp
import numpy as np
import pytest

import jaxckpt
from jaxckpt import interval, posixdirs
from jaxckpt.interval import FIRST_SAVE_AFTER, IntervalTuner


def expected_interval(step_time, blocking, write_steps, slowdown_per_step, max_overhead, mtbf=None):
    """The interval for these costs, from the definitions: a save costs its
    blocking time plus the extra time of the steps that ran while it wrote;
    the interval is the smallest N with cost / (N x step time) <= max_overhead, at
    least one step more than a write lasts, and with an MTBF at least
    Young-Daly's sqrt(2 x cost x MTBF)."""
    cost = blocking + write_steps * slowdown_per_step
    n = max(math.ceil(cost / (max_overhead * step_time)), write_steps + 1)
    if mtbf:
        n = max(n, math.ceil(math.sqrt(2 * cost * mtbf) / step_time))
    return n


class Loop:
    """A synthetic training loop driving an IntervalTuner the way the manager does:
    each step takes ``step_time`` (plus ``slowdown`` while a save writes), a save
    blocks for ``blocking`` and writes for ``write_steps`` steps."""

    def __init__(self, tuner, step_time, blocking, write_steps, slowdown, t0=1_000_000.0):
        self.tuner, self.t = tuner, t0
        self.step_time, self.blocking, self.write_steps, self.slowdown = step_time, blocking, write_steps, slowdown
        self.saves: list[int] = []
        self.saved_while_writing: list[int] = []
        self.choices: list[int | None] = []

    def writing(self, step):
        return bool(self.saves) and step < self.saves[-1] + self.write_steps

    def run(self, steps):
        for step in steps:
            slowed = bool(self.saves) and self.saves[-1] < step <= self.saves[-1] + self.write_steps
            self.t += self.step_time + (self.slowdown if slowed else 0.0)
            writing = self.writing(step)
            if self.tuner.needs_timing(step, writing):
                self.tuner.timing_point(step, self.t)
            if self.tuner.due(step):
                if writing:
                    self.saved_while_writing.append(step)
                ready = self.t
                self.t += self.blocking
                self.tuner.saved(step, ready, self.t, writing=self.write_steps > 0)
                self.saves.append(step)
            self.choices.append(self.tuner.choice.steps)
        return self


CASES = [
    # step time, blocking, write steps, slowdown per step while writing, max_overhead, mtbf
    (0.13, 0.05, 3, 0.01, 0.02, None),       # the budget: 0.08 s / (0.02 x 0.13 s) = 30.8 -> 31
    (0.021, 0.004, 1, 0.0003, 0.02, None),    # a fast step: 0.0043 / 0.00042 = 10.2 -> 11
    (1.7, 0.9, 5, 0.11, 0.01, None),          # a slow step and a tight budget: 1.45 / 0.017 = 85.3 -> 86
    (0.05, 0.001, 40, 0.0, 0.02, None),       # the write is the bound: 41 steps
    (0.13, 0.05, 3, 0.01, 0.02, 3600.0),      # Young-Daly: sqrt(2 x 0.08 x 3600) = 24 s = 184.6 -> 185 steps
    (0.13, 0.05, 3, 0.01, 0.02, 1.5),         # a short MTBF: Young-Daly 3.8 steps, the budget (31) wins
    (0.4, 2.3, 0, 0.0, 0.05, 86400.0),        # a synchronous save (it writes while training waits): C = B
]


@pytest.mark.parametrize("step_time, blocking, write_steps, slowdown, max_overhead, mtbf", CASES)
def test_the_tuner_converges_to_the_expected_interval(step_time, blocking, write_steps, slowdown, max_overhead,
                                                      mtbf):
    want = expected_interval(step_time, blocking, write_steps, slowdown, max_overhead, mtbf)
    steps = range(1, max(3000, 4 * want))
    loop = Loop(IntervalTuner(max_overhead, mtbf), step_time, blocking, write_steps, slowdown).run(steps)
    assert loop.tuner.choice.steps == want
    # The first call starts the first measured window; a background write is
    # measured against the window after it: the second save ends that window.
    assert loop.saves[0] == 1 + FIRST_SAVE_AFTER
    assert loop.saves[1] - loop.saves[0] == (want if write_steps == 0 else write_steps + FIRST_SAVE_AFTER)
    gaps = {b - a for a, b in zip(loop.saves[1:], loop.saves[2:])}
    assert gaps == {want}, (loop.saves[:10], want)
    assert loop.saved_while_writing == []
    choice = loop.tuner.choice
    assert choice.step_time_s == pytest.approx(step_time) and choice.save_cost_s == pytest.approx(
        blocking + write_steps * slowdown)
    bound = "mtbf" if mtbf and math.ceil(math.sqrt(2 * choice.save_cost_s * mtbf) / step_time) == want else (
        "budget" if want > write_steps + 1 else "finish")
    assert choice.bound == bound, choice


def test_never_a_save_while_one_is_writing():
    # The budget alone would save every 11 steps; each write lasts 25 (then 60) steps.
    loop = Loop(IntervalTuner(0.02, None), 0.1, 0.02, 25, 0.0)
    loop.run(range(1, 400))
    assert loop.saved_while_writing == []
    assert loop.tuner.choice.steps == 26 and loop.tuner.choice.bound == "finish"
    loop.write_steps = 60  # the storage got slower
    loop.run(range(400, 1200))
    assert loop.saved_while_writing == []
    assert loop.tuner.choice.steps == 61
    assert all(b - a >= 26 for a, b in zip(loop.saves, loop.saves[1:]))


SETTLE = 4  # saves after a change of the step time until the medians of three have moved


def test_it_adapts_when_the_step_time_changes():
    tuner = IntervalTuner(0.02, None)
    loop = Loop(tuner, 0.2, 0.1, 2, 0.0123).run(range(1, 2000))
    first = expected_interval(0.2, 0.1, 2, 0.0123, 0.02)
    assert tuner.choice.steps == first == 32  # 0.1246 s / (0.02 x 0.2 s) = 31.15
    loop.step_time = 0.05  # a smaller model, or more devices: saves become relatively dearer
    loop.run(range(2000, 6000))
    second = expected_interval(0.05, 0.1, 2, 0.0123, 0.02)
    assert tuner.choice.steps == second == 125  # 124.6
    after = [s for s in loop.saves if s > 2000]
    assert {b - a for a, b in zip(after[SETTLE:], after[SETTLE + 1:])} == {second}  # settled within a few saves
    loop.step_time = 0.9
    loop.run(range(6000, 8000))
    assert tuner.choice.steps == expected_interval(0.9, 0.1, 2, 0.0123, 0.02) == 7  # 6.92


def test_one_slow_save_does_not_move_the_interval():
    tuner = IntervalTuner(0.02, None)
    loop = Loop(tuner, 0.13, 0.05, 3, 0.01).run(range(1, 1000))
    loop.blocking = 5.0  # one save stalls (a busy disk)
    loop.run(range(1000, 1000 + 31))
    loop.blocking = 0.05
    choices = loop.run(range(1031, 3000)).choices
    assert set(choices[-1500:]) == {31}  # the median of three ignores it


def test_choose_explains_its_figures():
    got = interval.choose(0.13, 0.08, 3, 0.02, None)
    assert (got.steps, got.bound) == (31, "budget")
    assert got.reason == ("a step takes 0.13 s, a save costs 0.08 s of training and writes for 3 step(s); 0.02 of "
                          "training time allows a save every 31 steps")
    got = interval.choose(0.13, 0.08, 3, 0.02, 3600.0)
    assert (got.steps, got.bound) == (185, "mtbf")
    assert got.reason.endswith("; Young-Daly with MTBF 3600 s: sqrt(2 x 0.08 x 3600) s = 185 steps")
    assert interval.choose(0.05, 0.001, 40, 0.02, None).bound == "finish"


# ----------------------------------------------------------------------------- through the manager
class Clock:
    def __init__(self, t=1_000_000.0):
        self.t = t

    def __call__(self):
        return self.t


@pytest.fixture
def blocking_saves(monkeypatch):
    """Every snapshot 'takes' ``s`` seconds of the injected clock ``clock``."""
    real = jaxckpt.AsyncCheckpointer.save
    advance = {"clock": None, "s": 0.0}

    def save(self, *args, **kwargs):
        advance["clock"].t += advance["s"]
        return real(self, *args, **kwargs)

    monkeypatch.setattr(jaxckpt.AsyncCheckpointer, "save", save)
    return advance


def state_at(step):
    return {"w": jnp.full((8,), step, jnp.float32), "n": np.arange(3) + step}


@pytest.mark.parametrize("step_time, blocking, max_overhead, mtbf", [
    (0.13, 0.047, 0.02, None),   # 0.047 / 0.0026 = 18.1 -> 19
    (0.6, 0.35, 0.01, None),     # 0.35 / 0.006 = 58.3 -> 59
    (0.13, 0.047, 0.02, 600.0),  # sqrt(2 x 0.047 x 600) = 7.51 s = 57.8 -> 58
])
def test_the_manager_measures_with_its_clock_and_converges(ckdir, blocking_saves, caplog, step_time, blocking,
                                                           max_overhead, mtbf):
    caplog.set_level(logging.INFO, logger="jaxckpt")
    clock = Clock()
    blocking_saves.update(clock=clock, s=blocking)
    want = expected_interval(step_time, blocking, 1, 0.0, max_overhead, mtbf)
    saved = []
    with jaxckpt.CheckpointManager(ckdir, save_interval_steps="auto", max_overhead=max_overhead, mtbf=mtbf,
                                   _clock=clock) as mgr:
        assert mgr.save_interval().bound == "measuring" and mgr.save_interval().steps is None
        for step in range(1, 6 * want):
            clock.t += step_time
            if mgr.save(step, state_at(step)):
                saved.append(step)
                mgr.wait_until_finished()  # the write ends within the step: the next call finds it done
        choice = mgr.save_interval()
    assert choice.steps == want and choice.bound == ("mtbf" if mtbf else "budget")
    assert choice.step_time_s == pytest.approx(step_time) and choice.save_cost_s == pytest.approx(blocking)
    assert saved[:2] == [1 + FIRST_SAVE_AFTER, 2 + 2 * FIRST_SAVE_AFTER]  # each write ends by the next call
    assert {b - a for a, b in zip(saved[1:], saved[2:])} == {want}
    logged = [r.getMessage() for r in caplog.records if "save_interval_steps='auto'" in r.getMessage()]
    assert len(logged) == 1 and logged[0].startswith(f"save_interval_steps='auto': a save every {want} steps (")
    assert f"a step takes {step_time:.4g} s, a save costs {blocking:.4g} s of training" in logged[0]


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


def test_the_manager_never_saves_while_a_save_is_writing(ckdir, held_commits, blocking_saves):
    clock = Clock()
    blocking_saves.update(clock=clock, s=0.001)  # the budget alone: a save every 4 steps
    saved = []
    with jaxckpt.CheckpointManager(ckdir, save_interval_steps="auto", _clock=clock) as mgr:
        for step in range(1, 80):
            clock.t += 0.013
            saved += [step] if mgr.save(step, state_at(step)) else []
        assert saved == [1 + FIRST_SAVE_AFTER] and mgr.all_steps() == []  # still writing
        held_commits.set()
        mgr.wait_until_finished()
        for step in range(80, 200):
            clock.t += 0.013
            saved += [step] if mgr.save(step, state_at(step)) else []
            mgr.wait_until_finished()
        choice = mgr.save_interval()
    write_steps = 80 - saved[0]  # the first call after the write ended was step 80
    assert choice.steps == write_steps + 1 and choice.bound == "finish", choice
    assert saved == [saved[0], 80 + FIRST_SAVE_AFTER, 80 + FIRST_SAVE_AFTER + write_steps + 1]


def test_a_step_time_change_is_followed_through_the_manager(ckdir, blocking_saves):
    clock = Clock()
    blocking_saves.update(clock=clock, s=0.03)
    with jaxckpt.CheckpointManager(ckdir, save_interval_steps="auto", max_to_keep=2, _clock=clock) as mgr:
        for step in range(1, 400):
            clock.t += 0.07 if step < 200 else 0.29
            if mgr.save(step, state_at(step)):
                mgr.wait_until_finished()
            if step == 199:
                assert mgr.save_interval().steps == expected_interval(0.07, 0.03, 1, 0.0, 0.02) == 22
        assert mgr.save_interval().steps == expected_interval(0.29, 0.03, 1, 0.0, 0.02) == 6


def test_the_fixed_and_absent_intervals_say_so(ckdir):
    with jaxckpt.CheckpointManager(ckdir, save_interval_steps=7) as mgr:
        assert mgr.save_interval() == interval.SaveInterval(7, "fixed", "save_interval_steps=7")
    with jaxckpt.CheckpointManager(ckdir) as mgr:
        assert mgr.save_interval().steps is None and mgr.save_interval().bound == "none"


@pytest.mark.parametrize("kwargs, error, message", [
    ({"max_overhead": 0.05}, ValueError, "max_overhead= and mtbf= go with save_interval_steps='auto'"),
    ({"save_interval_steps": 10, "mtbf": 3600}, ValueError,
     "max_overhead= and mtbf= go with save_interval_steps='auto'"),
    ({"save_interval_steps": "often"}, ValueError, "save_interval_steps must be an int or 'auto', got 'often'"),
    ({"save_interval_steps": "auto", "max_overhead": 0}, ValueError,
     "max_overhead must be a fraction of training time in (0, 1), got 0"),
    ({"save_interval_steps": "auto", "max_overhead": "2%"}, TypeError,
     "max_overhead must be a number (a fraction of training time), got str"),
    ({"save_interval_steps": "auto", "mtbf": -1}, ValueError, "mtbf must be a positive, finite duration, got -1"),
])
def test_invalid_auto_options_are_refused(ckdir, kwargs, error, message):
    with pytest.raises(error) as e:
        jaxckpt.CheckpointManager(ckdir, **kwargs)
    assert str(e.value) == message


def test_mtbf_accepts_a_timedelta_and_the_policy_object_stands_for_the_keywords(ckdir):
    import datetime

    policy = jaxckpt.SavePolicy.build("auto", None, None, 0.05, datetime.timedelta(hours=2))
    assert (policy.interval_steps, policy.max_overhead, policy.mtbf) == ("auto", 0.05, 7200.0)
    with jaxckpt.CheckpointManager(ckdir, save_policy=policy) as mgr:
        assert mgr.save_interval().bound == "measuring"
    assert jaxckpt.SavePolicy.build("auto", None, None).max_overhead == 0.02


def test_a_call_that_saves_nothing_stays_cheap(ckdir):
    with jaxckpt.CheckpointManager(ckdir, save_interval_steps="auto") as mgr:
        state = state_at(0)
        for step in range(1, 5):
            mgr.save(step, state)  # the first call waits for the state once (a timing point)
        times = []
        for step in range(5, 5 + FIRST_SAVE_AFTER - 5):
            t0 = time.perf_counter()
            assert not mgr.save(step, state)
            times.append(time.perf_counter() - t0)
    # A few microseconds on an idle machine; the bound leaves room for a loaded 2-core VM.
    assert statistics.median(times) < 200e-6, times
