"""The save interval from a budget: ``save_interval_steps="auto"``.

``IntervalTuner`` is pure (times in, decisions out), so tests drive it with
synthetic costs; ``AutoInterval`` wires it into a ``CheckpointManager``: the
manager's clock, the two waits for the state, the log lines, and sharing the
choice with the other processes of a job.

What is measured (training thread, the manager's clock; process 0 only):

- the step time ``T``, over a *clean window*: from a timing point (the state
  of step ``s0`` computed, at ``t0``) to the next save's ready point (the state
  of step ``s1`` computed, just before its snapshot, at ``r1``), with no save
  writing in between: ``T = (r1 - t0) / (s1 - s0)``. The state is waited for
  (``jax.block_until_ready``) at these two points only: with asynchronous
  dispatch the time between two ``save()`` calls says how fast Python
  dispatched a step, not how long the step ran (a donated Flax step on the
  CPU returns in 0.2 ms and runs for 130 ms; Python runs ~16 steps ahead).
- each save's cost to training ``C = B + S``: ``B``, the blocking time (the
  ready point until ``save()`` returns at ``e1``), plus ``S``, the slowdown of
  the steps that ran while the save was writing: at the first ``save()`` call
  that finds the write finished (step ``s2``) the state is waited for (``t2``,
  a timing point: the next clean window starts there), and at the next save
  ``S = max(0, (t2 - e1) - (s2 - s1) * T')``, with ``T'`` the mean step time
  of the clean windows right before and right after the write (a drifting
  step time cancels; a sudden change distorts at most one save's cost). A
  save that does not write in the background (``async_save=False``) costs
  ``C = B``, known at once.
- how many steps a write lasts: ``k = s2 - s1``.

The choice, at each save whose costs are known (from the second save on; the
first with ``async_save=False``), from the medians of the last three ``T``
and ``C`` (one slow save, or one evaluation loop in a window, is ignored; a
change of the step time is followed within two saves) and the largest of
the last three ``k``::

    N_budget = ceil(C / (max_overhead * T))   # saves every N steps cost C / (N T) of training time
    N_finish = k + 1                         # never more often than a save finishes (+1 clean step)
    N_daly   = ceil(sqrt(2 C MTBF) / T)       # with mtbf=: Young (1974) / Daly (2006) optimum
    N        = max(N_budget, N_finish, N_daly)

A save is due when ``step - (last save) >= N`` and no save is writing. Until
``N`` is chosen, a save comes ``FIRST_SAVE_AFTER`` steps after the start of
a clean window (the first ``save()`` call; the end of the first write).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import statistics
from typing import Any, Callable

import jax

from jaxckpt import multihost

logger = logging.getLogger("jaxckpt")

FIRST_SAVE_AFTER = 10  # steps of the first clean window, before any save cost is known
SAMPLES = 3  # the medians over the last SAMPLES step times and save costs


@dataclasses.dataclass(frozen=True)
class SaveInterval:
    """The step interval a ``CheckpointManager`` saves at (``mgr.save_interval()``).

    ``steps``: save every that many steps (None: no step interval, or not
    chosen yet). ``bound``: what set it: "fixed" (``save_interval_steps=N``),
    "budget" (``max_overhead``), "finish" (a save must finish first), "mtbf"
    (the Young-Daly optimum), "measuring" (auto, before the first save's cost
    is known) or "none". ``reason``: the same in words, with the figures.
    ``step_time_s`` / ``save_cost_s``: the measured medians behind an "auto"
    choice (a save's cost to training: blocking plus the slowdown of the steps
    that ran while it wrote)."""
    steps: int | None
    bound: str
    reason: str
    step_time_s: float | None = None
    save_cost_s: float | None = None


def _ceil(x: float) -> int:
    """ceil, forgiving the rounding error of a quotient that is a whole number (50.000000001 -> 50)."""
    return math.ceil(x - 1e-9 * max(1.0, x))


def choose(step_time: float, save_cost: float, finish_steps: int, max_overhead: float,
           mtbf: float | None) -> SaveInterval:
    """The interval for these figures (the formulas of the module docstring)."""
    n_budget = max(1, _ceil(save_cost / (max_overhead * step_time)))
    n_finish = finish_steps + 1
    n_daly = _ceil(math.sqrt(2 * save_cost * mtbf) / step_time) if mtbf else 0
    steps = max(n_budget, n_finish, n_daly)
    bound = "mtbf" if steps == n_daly else ("budget" if steps == n_budget else "finish")
    figures = (f"a step takes {step_time:.4g} s, a save costs {save_cost:.4g} s of training and writes for "
               f"{finish_steps} step(s); {max_overhead:.3g} of training time allows a save every {n_budget} steps")
    if mtbf:
        figures += f"; Young-Daly with MTBF {mtbf:.4g} s: sqrt(2 x {save_cost:.4g} x {mtbf:.4g}) s = {n_daly} steps"
    if bound == "finish":
        figures += f"; a save must finish first: {n_finish} steps"
    return SaveInterval(steps, bound, figures, step_time, save_cost)


class IntervalTuner:
    """The measurements and the choice of the module docstring; pure (times in,
    decisions out). Call order, per ``save()`` call of the manager:

    1. ``needs_timing(step, writing)``: True at the first call and at the first
       call that finds the save in flight finished; then wait for the state
       and call ``timing_point(step, now)``.
    2. ``due(step)``: whether the interval says save now.
    3. around a save of ``step``: the state waited for at ``ready``, ``save()``
       returned at ``returned``: ``saved(step, ready, returned, writing)``
       (``writing``: its write goes on in the background).
    """

    def __init__(self, max_overhead: float, mtbf: float | None):
        self.max_overhead = max_overhead
        self.mtbf = mtbf
        self.choice = SaveInterval(None, "measuring", f"measuring: a save {FIRST_SAVE_AFTER} steps after the first "
                                   "save() call, and one after its write, give the figures")
        self._times: collections.deque[float] = collections.deque(maxlen=SAMPLES)
        self._costs: collections.deque[float] = collections.deque(maxlen=SAMPLES)
        self._finish: collections.deque[int] = collections.deque(maxlen=SAMPLES)
        self._phase = "start"  # then "clean" (a window open since _mark) or "writing" (since _mark)
        self._mark: tuple[int, float] = (0, 0.0)  # (step, time) the current window or write started
        self._blocking = 0.0  # B of the save writing
        self._before: float | None = None  # the step time of the window before the save writing
        self._write: tuple[float, float, int, float | None] | None = None  # the write before this window:
        # (B, seconds, steps, the step time of the window before it)
        self._last_save: int | None = None

    @property
    def step_time(self) -> float | None:
        return statistics.median(self._times) if self._times else None

    def needs_timing(self, step: int, writing: bool) -> bool:
        return self._phase == "start" or (self._phase == "writing" and not writing)

    def timing_point(self, step: int, now: float) -> None:
        """The state of ``step`` is computed at ``now`` (a clean window starts)."""
        if self._phase == "writing":
            s1, e1 = self._mark
            self._write = (self._blocking, now - e1, step - s1, self._before) if step >= s1 else None
        self._phase, self._mark = "clean", (step, now)

    def due(self, step: int) -> bool:
        if self._phase != "clean" or step <= self._mark[0]:
            return False  # a save is writing, or its window has no step yet (it would time nothing)
        if self.choice.steps is None or self._last_save is None:
            return step - self._mark[0] >= FIRST_SAVE_AFTER
        return step - self._last_save >= self.choice.steps

    def saved(self, step: int, ready: float, returned: float, writing: bool) -> SaveInterval | None:
        """A save of ``step`` started; returns the new choice if it changed."""
        s0, t0 = self._mark
        changed, window = None, None
        if self._phase == "clean" and step > s0:
            window = (ready - t0) / (step - s0)
            self._times.append(window)
            if self._write is not None:  # the write before this window, against the windows around it
                b, seconds, steps, before = self._write
                t = window if before is None else (before + window) / 2
                changed = self._measured(b + max(0.0, seconds - steps * t), steps)
        self._write, self._last_save, self._before = None, step, window
        blocking = max(0.0, returned - ready)
        if writing:
            self._phase, self._mark, self._blocking = "writing", (step, returned), blocking
            return changed
        self._phase, self._mark = "clean", (step, returned)
        return self._measured(blocking, 0) or changed

    def _measured(self, cost: float, finish_steps: int) -> SaveInterval | None:
        self._costs.append(cost)
        self._finish.append(finish_steps)
        t = self.step_time
        if t is None or t <= 0:
            return None
        new = choose(t, statistics.median(self._costs), max(self._finish), self.max_overhead, self.mtbf)
        changed = new.steps != self.choice.steps
        self.choice = new
        return new if changed else None


def wait_for(state: Any) -> bool:
    """Wait until ``state``'s arrays are computed; False if they cannot be waited for (deleted)."""
    try:
        jax.block_until_ready(state)
    except Exception:  # a donated or deleted array: this timing point is skipped
        return False
    return True


class AutoInterval:
    """``save_interval_steps="auto"`` for one manager. Process 0 measures and
    decides (its ``due`` runs inside ``multihost.Agreement.primary_decides``)
    and, with each save it decides, publishes its choice under a key of that
    step before the decision; the other processes read it once they see the
    decision (``fetch``), so that ``choice`` agrees everywhere."""

    KEEP_KEYS = 64  # published choices kept in the key-value store

    def __init__(self, max_overhead: float, mtbf: float | None, clock: Callable[[], float],
                 coord: multihost.Coordinator, prefix: str):
        self.tuner = IntervalTuner(max_overhead, mtbf)
        self._clock = clock
        self._coord = coord
        self._prefix = f"{prefix}/interval"
        self._published: collections.deque[str] = collections.deque()
        self._shared = SaveInterval(None, "measuring", "process 0 measures and decides; no save yet")

    @classmethod
    def build(cls, policy: Any, clock: Callable[[], float], coord: multihost.Coordinator,
              prefix: str) -> "AutoInterval | None":
        """For a ``policies.SavePolicy`` with ``interval_steps="auto"``; None for any other."""
        return cls(policy.max_overhead, policy.mtbf, clock, coord, prefix) if policy.auto else None

    @property
    def choice(self) -> SaveInterval:
        return self.tuner.choice if self._coord.is_primary else self._shared

    def before(self, step: int, state: Any, writing: bool) -> None:
        """[T] every ``save()`` call, before the decision: a timing point when one is due."""
        if self._coord.is_primary and self.tuner.needs_timing(step, writing) and wait_for(state):
            self.tuner.timing_point(step, self._clock())

    def due(self, step: int) -> bool:
        """(process 0) Whether the interval says save ``step``. In a multi-process
        job the choice is published first, under a key of that step."""
        due = self.tuner.due(step)
        if due and self._coord.process_count > 1:
            self._publish(step)
        return due

    def _publish(self, step: int) -> None:
        key = f"{self._prefix}/{step}"
        self._coord.set(key, json.dumps(dataclasses.asdict(self.tuner.choice)).encode())
        self._published.append(key)
        if len(self._published) > self.KEEP_KEYS:
            self._coord.delete(self._published.popleft())

    def fetch(self, step: int) -> None:
        """(other processes) Read the choice process 0 published with its decision
        to save ``step`` (none if another rule decided it: the last one stays)."""
        if self._coord.is_primary:
            return
        raw = self._coord.try_get(f"{self._prefix}/{step}")
        if raw is not None:
            self._shared = SaveInterval(**json.loads(raw))

    def ready(self, state: Any) -> float | None:
        """[T] before a save's snapshot: the ready point (None on the other processes)."""
        if not self._coord.is_primary:
            return None
        wait_for(state)
        return self._clock()

    def saved(self, step: int, ready: float | None, writing: bool) -> None:
        """[T] right after ``save()`` started the save of ``step`` (or committed it)."""
        if ready is not None:
            self._log(self.tuner.saved(step, ready, self._clock(), writing))

    @staticmethod
    def _log(changed: SaveInterval | None) -> None:
        if changed is not None:
            logger.info("save_interval_steps='auto': a save every %d steps (%s): %s", changed.steps,
                        changed.bound, changed.reason)


def fixed(interval_steps: int | None) -> SaveInterval:
    """``save_interval()`` of a manager without ``"auto"``."""
    if interval_steps is None:
        return SaveInterval(None, "none", "no step interval (save_interval_steps is not set)")
    return SaveInterval(interval_steps, "fixed", f"save_interval_steps={interval_steps}")
