"""Helpers of the reliability suite (issue 6): deterministic step values, a
fork server for kill -9 tests, and a crash injector.

The fork server (``python tests/torture_worker.py``) imports jaxckpt once and
then forks one child per request, so that a test can kill and restart a
"training process" many times a second instead of paying the jax import on
each restart. It never touches a jax backend itself (jax warns, rightly, about
forking a process whose runtime threads are running); the children may.

Protocol, one JSON object per line on stdin, one answer per line on stdout:
``{"op": "fork", "job": NAME, "args": {...}}`` -> ``{"pid": PID}``;
``{"op": "reap", "pid": PID}`` -> ``{"code": EXIT CODE or null, "signal": SIGNAL or null}``;
``{"op": "quit"}``. A child writes what it did to ``args["log"]`` (JSON lines,
unbuffered ``os.write``: a SIGKILL loses nothing already written) and leaves
with ``os._exit``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from typing import Any, Callable

import numpy as np

import jaxckpt
import nopickle
from jaxckpt import libc, posixdirs, posixfs

LONG = os.environ.get("JAXCKPT_LONG_TESTS") == "1"  # the long variants of the crash and concurrency tests
KEY: bytes | None = None  # set: every manager of these tests encrypts (the suites run once with encryption)
TEST_KEY = bytes(range(100, 132))

# --------------------------------------------------------------------------- step values
def values(step: int, version: int = 0) -> dict:
    """The training state of ``step``: a pure function of (step, version), with
    a data size that varies by step so that a mix of two steps cannot pass."""
    rng = np.random.default_rng([step, version])
    return {
        "params": {"w": rng.standard_normal((32, 64)).astype(np.float32),
                   "b": (np.arange(100 + step % 37, dtype=np.int64) * (step + 1)) ^ version},
        "opt": [rng.integers(0, 255, size=(step % 5 + 1, 7), dtype=np.uint8),
                (np.float64(step) / 7.0, np.int32(step - version))],
        "step": step,
        "tag": f"step-{step}-v{version}",
    }


def _bits(x: Any) -> Any:
    if isinstance(x, (np.ndarray, np.generic)):
        a = np.asarray(x)
        return ("array", a.dtype.str, a.shape, a.tobytes())
    if hasattr(x, "__array__") and hasattr(x, "dtype"):  # a jax.Array
        a = np.asarray(x)
        return ("array", a.dtype.str, a.shape, a.tobytes())
    if isinstance(x, dict):
        return {k: _bits(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_bits(v) for v in x]
    return (type(x).__name__, x)


def same(got: Any, want: Any) -> bool:
    """Bit-exact equality of two restored trees (containers, dtypes, shapes, bytes).

    Containers compare as lists: a restore without target gives plain lists
    and tuples as saved, dicts as dicts."""
    return _bits(got) == _bits(want)


def restores_as(path: str, candidates: list[dict]) -> int | None:
    """Index of the candidate ``path`` restores to bit-exactly, None if none."""
    got = jaxckpt.restore(path)
    for i, c in enumerate(candidates):
        if same(got, c):
            return i
    return None


AUX = (posixdirs.TMP_MARK, posixdirs.DEL_MARK, posixdirs.OLD_MARK)


def aux_entries(directory: str) -> list[str]:
    """Leftovers of interrupted saves, overwrites and deletions."""
    return sorted(e for e in os.listdir(directory) if posixdirs.parse_aux(e) is not None)


# --------------------------------------------------------------------------- crash injector
class InjectedCrash(Exception):
    """Raised by the injector in exception mode."""


def targets() -> dict[str, tuple[Any, str]]:
    """The functions a crash can be injected into: name -> (owner, attribute)."""
    out: dict[str, tuple[Any, str]] = {}
    # (no os.pwritev: data files go through O_DIRECT pwrite where the filesystem
    # allows it, as on the test machine; test_faults covers the buffered path)
    for name in ("open", "write", "pwrite", "ftruncate", "fsync", "rename", "unlink", "rmdir", "mkdir"):
        out[f"os.{name}"] = (os, name)
    for owner, names in ((posixdirs, ("commit", "remove_checkpoint", "remove_tree", "make_temp_dir")),
                         (posixfs, ("fsync_dir", "write_file")), (libc, ("renameat2_exchange",))):
        for name in names:
            out[f"{owner.__name__.rsplit('.', 1)[1]}.{name}"] = (owner, name)
    out["posixfs.DataFile.finish"] = (posixfs.DataFile, "finish")
    return out


class Injector:
    """Counts the calls jaxckpt makes to ``target`` and, at call number
    ``index`` (0-based), runs ``action`` before or after the real call.

    ``os.*`` and ``shutil.*`` calls are counted only when made from a jaxckpt
    module or from ``shutil`` (whose ``rmtree`` jaxckpt calls), so that the
    count does not depend on other code (jax, logging, pytest) running
    meanwhile. ``action=None`` only counts.
    """

    def __init__(self, target: str, index: int = -1, when: str = "before",
                 action: Callable[[], None] | None = None):
        self.target, self.index, self.when, self.action = target, index, when, action
        self.owner, self.attr = targets()[target]
        self.real = getattr(self.owner, self.attr)
        self.calls = 0
        self.fired = False
        self._lock = threading.Lock()
        self._filter = target.split(".")[0] in ("os", "shutil")

    def wrapper(self) -> Callable:
        real = self.real

        def wrapped(*args, **kwargs):
            if self._filter:
                caller = sys._getframe(1).f_globals.get("__name__", "")
                if not caller.startswith(("jaxckpt", "shutil")):
                    return real(*args, **kwargs)
            with self._lock:
                n = self.calls
                self.calls += 1
                fire = self.action is not None and n == self.index and not self.fired
                if fire:
                    self.fired = True
            if fire and self.when == "before":
                self.action()
            try:
                return real(*args, **kwargs)
            finally:  # "after" the call whatever its outcome (probing a missing file raises)
                if fire and self.when == "after":
                    self.action()

        return wrapped

    def install(self, setattr_: Callable[[Any, str, Any], None] = setattr) -> "Injector":
        setattr_(self.owner, self.attr, self.wrapper())
        return self

    def uninstall(self) -> None:
        setattr(self.owner, self.attr, self.real)


def raise_crash() -> None:
    raise InjectedCrash("injected crash")


def hard_exit() -> None:
    os._exit(77)


# --------------------------------------------------------------------------- scenarios
def open_manager(directory: str, **kw) -> jaxckpt.CheckpointManager:
    if KEY is not None:
        kw.setdefault("encryption_key", KEY)
    return jaxckpt.CheckpointManager(directory, max_to_keep=2, save_on_preemption=False, **kw)


def prepare(directory: str) -> None:
    """Steps 1 and 2 committed, the manager closed."""
    with open_manager(directory) as mgr:
        mgr.save(1, values(1))
        mgr.save(2, values(2))


def run_scenario(mgr: "jaxckpt.CheckpointManager | str", scenario: str) -> "jaxckpt.CheckpointManager | None":
    """``save``: step 3 (commit, then rotation deletes step 1).
    ``overwrite``: step 2 replaced by version 1 of its values.
    ``open``: a writer opens the directory ``mgr`` (taking the lock, cleaning
    leftovers); returns that manager, for the caller to close."""
    if scenario == "open":
        return open_manager(mgr)
    if scenario == "save":
        mgr.save(3, values(3))
    elif scenario == "overwrite":
        mgr.save(2, values(2, 1), force=True, overwrite=True)
    else:
        raise ValueError(scenario)
    mgr.wait_until_finished()
    return None


def expected(scenario: str, step: int) -> list[dict]:
    """What a listed step may restore to after a crash in ``scenario``."""
    if scenario == "overwrite" and step == 2:
        return [values(2), values(2, 1)]
    return [values(step)]


# --------------------------------------------------------------------------- fork server jobs
class Log:
    def __init__(self, path: str):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)

    def __call__(self, event: str, **kw) -> None:
        os.write(self.fd, (json.dumps({"event": event, **kw}) + "\n").encode())


def job_torture(args: dict, log: Log) -> None:
    """A training loop: resume from the latest step, save every step (async,
    max_to_keep=2) until ``args['max_step']`` or until killed."""
    global KEY
    d = args["dir"]
    KEY = bytes.fromhex(args["key"]) if args.get("key") else None
    mgr = open_manager(d)
    latest = mgr.latest_step()
    log("open", latest=latest, entries=sorted(os.listdir(d)))
    if latest is not None:
        log("restored", step=latest, ok=same(mgr.restore(), values(latest)))
    step = (latest or 0) + 1
    log("resume", step=step)
    while step <= args["max_step"]:
        mgr.save(step, values(step))
        step += 1
    mgr.close()
    log("done", latest=step - 1)


def job_crash(args: dict, log: Log) -> None:
    """Run a scenario and leave with os._exit(77) at one injected call."""
    mgr = args["dir"] if args["scenario"] == "open" else open_manager(args["dir"])
    inj = Injector(args["target"], args["index"], args["when"], hard_exit).install()
    opened = run_scenario(mgr, args["scenario"])
    (opened or mgr).close()  # (a crash while releasing the lock is a crash point too)
    inj.uninstall()
    log("completed", calls=inj.calls)


def _wait_for(path: str) -> None:
    while not os.path.exists(path):
        time.sleep(0.0002)


def job_lock_race(args: dict, log: Log) -> None:
    """Wait for the file ``args['start']``, then try to become the directory's
    writer; the winner saves a step and holds the lock until ``args['release']``."""
    log("ready")
    _wait_for(args["start"])
    try:
        mgr = jaxckpt.CheckpointManager(args["dir"], save_on_preemption=False)
    except jaxckpt.CheckpointLockedError as e:
        log("refused", error=str(e))
        return
    log("writer", pid=os.getpid())
    mgr.save(args["step"], values(args["step"]))
    mgr.wait_until_finished()
    _wait_for(args["release"])
    mgr.close()
    log("closed")


def job_writer(args: dict, log: Log) -> None:
    """A writer that saves steps 1..n every step with rotation, then exits."""
    with jaxckpt.CheckpointManager(args["dir"], max_to_keep=args["keep"], save_on_preemption=False) as mgr:
        for step in range(1, args["steps"] + 1):
            mgr.save(step, big_values(step, args["size"]))
            log("saved", step=step)
    log("done")


def big_values(step: int, size: int) -> dict:
    """``values(step)`` plus ``size`` bytes of step-dependent data (slower reads)."""
    out = values(step)
    out["big"] = (np.arange(size // 4, dtype=np.uint32) * np.uint32(2654435761) + np.uint32(step))
    return out


JOBS = {"torture": job_torture, "crash": job_crash, "lock_race": job_lock_race, "writer": job_writer}


def _child(job: str, args: dict) -> None:
    code = 0
    try:
        fd = os.open(args["log"] + ".stderr", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        os.close(0)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        log = Log(args["log"])
        JOBS[job](args, log)
    except BaseException:
        try:
            log("error", traceback=traceback.format_exc())
        except BaseException:
            pass
        code = 3
    os._exit(code)


def serve() -> None:
    nopickle.install()  # the children run the package under the suite's no-pickle guard too
    out = sys.stdout
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "fork":
            pid = os.fork()
            if pid == 0:
                _child(req["job"], req["args"])
            answer: dict = {"pid": pid}
        elif req["op"] == "reap":
            _, status = os.waitpid(req["pid"], 0)
            answer = {"code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
                      "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None}
        elif req["op"] == "quit":
            return
        else:
            answer = {"error": f"unknown op {req['op']!r}"}
        out.write(json.dumps(answer) + "\n")
        out.flush()


class ForkServer:
    """The test side of the fork server."""

    def __init__(self) -> None:
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)

    def _ask(self, req: dict) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the fork server died (exit code {self.proc.wait()})")
        return json.loads(line)

    def fork(self, job: str, **args) -> int:
        return self._ask({"op": "fork", "job": job, "args": args})["pid"]

    def reap(self, pid: int) -> dict:
        return self._ask({"op": "reap", "pid": pid})

    def run(self, job: str, **args) -> dict:
        """Fork a child and wait for it."""
        return self.reap(self.fork(job, **args))

    def close(self) -> None:
        try:
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.close()
        except OSError:
            pass
        self.proc.wait(timeout=30)
        self.proc.stdout.close()


def read_log(path: str) -> list[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.endswith("\n")]
    except FileNotFoundError:
        return []


if __name__ == "__main__":
    serve()
