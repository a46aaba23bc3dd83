"""Crash consistency (issue 6): kill -9 torture, deterministic crash points,
simulated power loss.

The saved values are a pure function of the step (``torture_worker.values``),
so after any crash the test knows what every listed step must restore to,
bit for bit. The long variants run with ``JAXCKPT_LONG_TESTS=1``; their
results are recorded in ``docs/RELIABILITY.md``.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import stat
import threading
import time

import msgpack
import pytest

import jaxckpt
from jaxckpt import libc, lock, posixdirs, posixfs, procs

import torture_worker as tw
from torture_worker import LONG, aux_entries, same, values


def check_listed(directory, expect=lambda step: [values(step)]) -> list[int]:
    """Every listed step restores bit-exactly to one of ``expect(step)``; no
    directory named like a step is anything but a committed checkpoint.
    Returns the listed steps."""
    with jaxckpt.CheckpointManager(directory, read_only=True, encryption_key=tw.KEY) as ro:
        steps = ro.all_steps()
        for s in steps:
            got = ro.restore(s)
            assert any(same(got, want) for want in expect(s)), f"step {s} restores to other values"
    for e in os.listdir(directory):
        if e.isdigit():
            assert posixdirs.is_committed(os.path.join(directory, e)), f"{e} is named like a step but not committed"
            assert int(e) in steps
    return steps


# =========================================================================== kill -9 torture
def _delays(rng: random.Random):
    """Mostly somewhere in a run of saves; one in five early (opening, cleaning, restoring)."""
    while True:
        yield rng.uniform(0.0, 0.04) if rng.random() < 0.2 else rng.uniform(0.04, 0.6)


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_kill_9_torture(server, tmp_path, monkeypatch, encrypted):
    if encrypted:  # the same torture once with encryption on (issue 18)
        monkeypatch.setattr(tw, "KEY", tw.TEST_KEY)
    kills = (300 if LONG else 30) if not encrypted else (100 if LONG else 12)
    rng = random.Random(20240906)
    d = str(tmp_path / "run")
    os.mkdir(d)
    stats = {"stale_before_restart": 0, "cycles_with_stale": 0, "restored": 0, "max_listed": 0,
             "lock_leftovers": 0}
    progress = []
    delays = _delays(rng)
    for cycle in range(kills):
        listed = check_listed(d)
        latest = max(listed) if listed else None
        stale = aux_entries(d)
        stats["stale_before_restart"] += len(stale)
        stats["cycles_with_stale"] += bool(stale)
        stats["max_listed"] = max(stats["max_listed"], len(listed))
        log = str(tmp_path / f"cycle-{cycle}.log")
        pid = server.fork("torture", dir=d, log=log, max_step=10**9, key=tw.KEY.hex() if tw.KEY else None)
        time.sleep(next(delays))
        os.kill(pid, signal.SIGKILL)
        status = server.reap(pid)
        events = {e["event"]: e for e in tw.read_log(log)}
        assert "error" not in events, events["error"]["traceback"]
        assert status == {"code": None, "signal": signal.SIGKILL}, (status, events)
        if "open" in events:
            # the restarted writer saw exactly what the test saw, and cleaned every leftover on open
            assert events["open"]["latest"] == latest
            assert [e for e in events["open"]["entries"] if posixdirs.parse_aux(e)] == []
            lock_files = [e for e in events["open"]["entries"] if e.startswith(lock.LOCK_NAME + ".")]
            stats["lock_leftovers"] += len(lock_files)
        if "restored" in events:
            assert events["restored"] == {"event": "restored", "step": latest, "ok": True}
            stats["restored"] += 1
        if "resume" in events:
            assert events["resume"]["step"] == (latest or 0) + 1  # training resumes after the latest step
        progress.append(latest or 0)
    final = check_listed(d)
    # a clean writer start after the last kill: nothing left over, the run goes on
    with tw.open_manager(d) as mgr:
        assert aux_entries(d) == []
        assert mgr.all_steps() == final
        nxt = (mgr.latest_step() or 0) + 1
        mgr.save(nxt, values(nxt))
    assert check_listed(d) == final[-1:] + [nxt]
    print(f"\nkill -9 torture: {kills} kills, final step {nxt - 1}, stats {stats}")
    # the test exercised what it claims to: progress across kills, resumes, leftovers to clean
    assert progress[-1] > kills // 3
    assert stats["restored"] > kills // 3
    assert stats["cycles_with_stale"] > 0
    assert stats["lock_leftovers"] == 0


# =========================================================================== deterministic crash points
SCENARIOS = ("save", "overwrite", "open")


def prepared(tmp_path) -> str:
    """A directory with steps 1 and 2, made once per test and copied per case."""
    base = str(tmp_path / "base")
    tw.prepare(base)
    return base


def plant_leftovers(d: str) -> None:
    """What killed writers leave: a half-written temporary directory, a
    half-deleted step, and the lock temp file of a writer killed while taking
    the lock (the scenario "open" cleans them under injected crashes)."""
    tmp = posixdirs.make_temp_dir(os.path.join(d, "3"))
    posixfs.write_file(tmp, "data-00000.bin", b"x" * 100)
    rec = posixdirs.owner_record()
    rec["pid"], rec["start"] = 2**22 + 7, None  # a pid above pid_max: gone
    posixfs.write_file(tmp, posixdirs.OWNER_FILE, msgpack.packb(rec))
    gone = os.path.join(d, ".9.jaxckpt-del-00112233aabbccdd")
    os.mkdir(gone)
    posixfs.write_file(gone, "data-00000.bin", b"y" * 10)
    posixfs.write_file(gone, "manifest.msgpack", b"jaxckpt manifest stub")
    rec = lock.lock_record("0" * 32)
    rec["pid"], rec["start"] = 2**22 + 7, None
    posixfs.write_file(d, f"{lock.LOCK_NAME}.{'0' * 32}", msgpack.packb(rec))


def dead_lock_leftovers(d: str) -> list[str]:
    """Temporary files of the lock not written by this (live) process: a failed
    unlink of our own is left, and cleaned by the next writer once we are gone."""
    out = []
    for e in os.listdir(d):
        if e.startswith(lock.LOCK_NAME + "."):
            with open(os.path.join(d, e), "rb") as f:
                data = f.read()
            if not data or msgpack.unpackb(data).get("pid") != os.getpid():
                out.append(e)
    return out


def case_dir(tmp_path, base: str, scenario: str, name: str) -> str:
    d = str(tmp_path / name)
    shutil.copytree(base, d)
    if scenario == "open":
        plant_leftovers(d)
    return d


def count_calls(tmp_path, base: str, scenario: str) -> dict[str, int]:
    d = case_dir(tmp_path, base, scenario, f"count-{scenario}")
    mgr = d if scenario == "open" else tw.open_manager(d)
    injs = [tw.Injector(t).install() for t in tw.targets()]
    try:
        opened = tw.run_scenario(mgr, scenario)
        (opened or mgr).close()
    finally:
        for i in injs:
            i.uninstall()
    return {i.target: i.calls for i in injs}


def verify_after_crash(d: str, scenario: str) -> None:
    """The previous checkpoint survives, is listed and restores bit-exactly;
    a new writer cleans every leftover and the run goes on."""
    expect = lambda s: tw.expected(scenario, s)  # noqa: E731
    steps = check_listed(d, expect)
    assert 2 in steps and set(steps) <= {1, 2, 3}, steps
    with tw.open_manager(d) as mgr:
        assert aux_entries(d) == []
        assert dead_lock_leftovers(d) == []
        steps = mgr.all_steps()
        assert 2 in steps and set(steps) <= {1, 2, 3}, steps
        for s in steps:
            assert any(same(mgr.restore(s), w) for w in expect(s)), s
        mgr.save(4, values(4))
    assert check_listed(d, expect) == sorted(steps)[-1:] + [4]


def _crash_cases(counts: dict[str, int], target: str, whens: tuple[str, ...]):
    for i in range(counts[target]):
        for when in whens:
            yield i, when


@pytest.mark.parametrize("target", sorted(tw.targets()))
def test_crash_point_os_exit(server, tmp_path, target):
    """os._exit at every call of ``target`` (before and after it) during a save
    with rotation, an overwrite, and a writer's start over leftovers."""
    base = prepared(tmp_path)
    tried = 0
    for scenario in SCENARIOS:
        counts = count_calls(tmp_path, base, scenario)
        for i, when in _crash_cases(counts, target, ("before", "after")):
            name = f"{scenario}-{i}-{when}"
            d = case_dir(tmp_path, base, scenario, name)
            log = str(tmp_path / f"{name}.log")
            status = server.run("crash", dir=d, log=log, scenario=scenario, target=target, index=i, when=when)
            assert status == {"code": 77, "signal": None}, (name, status, tw.read_log(log))
            verify_after_crash(d, scenario)
            tried += 1
            shutil.rmtree(d)
    assert tried > 0


# Calls that can take effect and still report an error (a short write, an fsync
# that fails after the data reached the page cache): for the others an
# exception "after" the call is what the os._exit test covers.
_FAILS_AFTER_EFFECT = {"os.write", "os.pwrite", "os.ftruncate", "os.fsync"}


@pytest.mark.parametrize("target", sorted(tw.targets()))
def test_crash_point_exception(tmp_path, target, caplog):
    """An exception at every call of ``target`` (before it; and after it where
    a call can take effect and fail): the previous checkpoint
    is still listed and restores without a reload, the failed save left no
    temporary directory, and a new writer starts clean."""
    caplog.set_level(logging.CRITICAL, logger="jaxckpt")
    base = prepared(tmp_path)
    whens = ("before", "after") if target in _FAILS_AFTER_EFFECT else ("before",)
    tried = 0
    for scenario in SCENARIOS:
        counts = count_calls(tmp_path, base, scenario)
        for i, when in _crash_cases(counts, target, whens):
            d = case_dir(tmp_path, base, scenario, f"{scenario}-{i}-{when}")
            expect = lambda s: tw.expected(scenario, s)  # noqa: E731
            if scenario == "open":
                inj = tw.Injector(target, i, when, tw.raise_crash).install()
                try:
                    opened = tw.run_scenario(d, scenario)
                except tw.InjectedCrash:
                    opened = None
                finally:
                    inj.uninstall()
                if opened is not None:
                    opened.close()
            else:
                mgr = tw.open_manager(d)
                inj = tw.Injector(target, i, when, tw.raise_crash).install()
                try:
                    tw.run_scenario(mgr, scenario)
                except tw.InjectedCrash:
                    pass
                finally:
                    inj.uninstall()
                if not inj.fired:  # the crash point is in close(): see the os._exit test
                    mgr.close()
                    shutil.rmtree(d)
                    continue
                # no reload: the manager's own view
                steps = mgr.all_steps()
                assert 2 in steps and set(steps) <= {1, 2, 3}, steps
                for s in steps:
                    assert any(same(mgr.restore(s), w) for w in expect(s)), s
                assert [e for e in aux_entries(d) if posixdirs.TMP_MARK in e] == []
                mgr.close()
            if not inj.fired:  # the crash point is in close(), releasing the lock: see the os._exit test
                shutil.rmtree(d)
                continue
            verify_after_crash(d, scenario)
            tried += 1
            shutil.rmtree(d)
    assert tried > 0


# =========================================================================== simulated power loss
class PowerLossDisk:
    """Records, at the ``os`` level, what jaxckpt does to the files under
    ``root``, and rebuilds what a power loss after any recorded operation
    would leave on a strict POSIX disk:

    * file data (writes, truncations) survives only once the file is fsynced;
    * a directory entry change (create, rename, exchange, unlink, link) survives
      only once that directory is fsynced; otherwise it is rolled back.

    Files are identified by their real inode (with a generation, as inodes are
    reused). Everything under ``root`` when recording starts is durable.
    """

    def __init__(self, root: str):
        self.root = os.path.realpath(root)
        self.ops: list[tuple] = []
        self.ids: dict[int, int] = {}  # inode -> current id
        self.kinds: dict[int, str] = {}
        self.fds: dict[int, list] = {}  # fd -> [id, offset]
        self.lock = threading.RLock()
        self.init_entries: dict[int, dict[str, int]] = {}
        self.init_data: dict[int, bytes] = {}
        self.root_id = self._scan(self.root)
        self.real = {n: getattr(os, n) for n in ("open", "close", "write", "pwrite", "pwritev", "ftruncate", "fsync",
                                                 "fdatasync", "mkdir", "rename", "replace", "unlink", "remove",
                                                 "rmdir", "link")}
        self.real_exchange = libc.renameat2_exchange

    # ----------------------------------------------------------------- identity
    def _new_id(self, ino: int, kind: str) -> int:
        i = len(self.kinds)
        self.ids[ino] = i
        self.kinds[i] = kind
        return i

    def _scan(self, path: str) -> int:
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            i = self._new_id(st.st_ino, "dir")
            self.init_entries[i] = {e: self._scan(os.path.join(path, e)) for e in os.listdir(path)}
        else:
            assert stat.S_ISREG(st.st_mode), path
            i = self._new_id(st.st_ino, "file")
            with open(path, "rb") as f:
                self.init_data[i] = f.read()
        return i

    def _dir_of(self, path, dir_fd=None) -> tuple[int | None, str]:
        """(id of the directory holding ``path``, entry name); id None if not tracked."""
        path = os.fsdecode(path)
        if dir_fd is not None and not os.path.isabs(path):
            parent_ino = os.fstat(dir_fd).st_ino
            name = path
            if "/" in path:
                return None, path
        else:
            full = os.path.abspath(path)
            parent, name = os.path.split(full)
            try:
                parent_ino = os.stat(parent).st_ino
            except OSError:
                return None, name
        return self.ids.get(parent_ino), name

    # ----------------------------------------------------------------- wrappers
    def install(self, monkeypatch) -> None:
        for name in self.real:
            monkeypatch.setattr(os, name, getattr(self, "_" + name))
        monkeypatch.setattr(libc, "renameat2_exchange", self._exchange)

    def _open(self, path, flags, mode=0o777, *, dir_fd=None):
        with self.lock:
            parent, name = self._dir_of(path, dir_fd)
            try:
                os.lstat(path, dir_fd=dir_fd)
                existed = True
            except OSError:
                existed = False
            fd = self.real["open"](path, flags, mode, dir_fd=dir_fd)
            st = os.fstat(fd)
            if parent is not None:
                if not existed:
                    i = self._new_id(st.st_ino, "dir" if stat.S_ISDIR(st.st_mode) else "file")
                    self.ops.append(("create", parent, name, i))
                elif flags & os.O_TRUNC and st.st_ino in self.ids:
                    self.ops.append(("trunc", self.ids[st.st_ino], 0))
            if st.st_ino in self.ids:
                self.fds[fd] = [self.ids[st.st_ino], 0]
            return fd

    def _close(self, fd):
        with self.lock:
            self.fds.pop(fd, None)
            return self.real["close"](fd)

    def _write(self, fd, data):
        with self.lock:
            n = self.real["write"](fd, data)
            if fd in self.fds:
                i, off = self.fds[fd]
                self.ops.append(("write", i, off, bytes(memoryview(data)[:n])))
                self.fds[fd][1] = off + n
            return n

    def _pwrite(self, fd, data, offset):
        with self.lock:
            n = self.real["pwrite"](fd, data, offset)
            if fd in self.fds:
                self.ops.append(("write", self.fds[fd][0], offset, bytes(memoryview(data)[:n])))
            return n

    def _pwritev(self, fd, buffers, offset, *flags):
        with self.lock:
            n = self.real["pwritev"](fd, buffers, offset, *flags)
            if fd in self.fds:
                data = b"".join(bytes(memoryview(b).cast("B")) for b in buffers)[:n]
                self.ops.append(("write", self.fds[fd][0], offset, data))
            return n

    def _ftruncate(self, fd, length):
        with self.lock:
            self.real["ftruncate"](fd, length)
            if fd in self.fds:
                self.ops.append(("trunc", self.fds[fd][0], length))

    def _fsync(self, fd):
        with self.lock:
            self.real["fsync"](fd)
            if fd in self.fds:
                self.ops.append(("fsync", self.fds[fd][0]))

    def _fdatasync(self, fd):
        with self.lock:
            self.real["fdatasync"](fd)
            if fd in self.fds:
                self.ops.append(("fsync", self.fds[fd][0]))

    def _mkdir(self, path, mode=0o777, *, dir_fd=None):
        with self.lock:
            parent, name = self._dir_of(path, dir_fd)
            self.real["mkdir"](path, mode, dir_fd=dir_fd)
            if parent is not None:
                i = self._new_id(os.lstat(path, dir_fd=dir_fd).st_ino, "dir")
                self.ops.append(("create", parent, name, i))

    def _rename(self, src, dst, *, src_dir_fd=None, dst_dir_fd=None, _real="rename"):
        with self.lock:
            a = self._dir_of(src, src_dir_fd)
            b = self._dir_of(dst, dst_dir_fd)
            self.real[_real](src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
            if a[0] is not None or b[0] is not None:
                assert a[0] is not None and b[0] is not None, (src, dst)
                self.ops.append(("rename", a[0], a[1], b[0], b[1]))

    def _replace(self, src, dst, *, src_dir_fd=None, dst_dir_fd=None):
        self._rename(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd, _real="replace")

    def _unlink(self, path, *, dir_fd=None, _real="unlink"):
        with self.lock:
            parent, name = self._dir_of(path, dir_fd)
            self.real[_real](path, dir_fd=dir_fd)
            if parent is not None:
                self.ops.append(("unlink", parent, name))

    def _remove(self, path, *, dir_fd=None):
        self._unlink(path, dir_fd=dir_fd, _real="remove")

    def _rmdir(self, path, *, dir_fd=None):
        self._unlink(path, dir_fd=dir_fd, _real="rmdir")

    def _link(self, src, dst, *, src_dir_fd=None, dst_dir_fd=None, follow_symlinks=True):
        with self.lock:
            a = self._dir_of(src, src_dir_fd)
            b = self._dir_of(dst, dst_dir_fd)
            self.real["link"](src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd, follow_symlinks=follow_symlinks)
            if b[0] is not None:
                self.ops.append(("link", a[0], a[1], b[0], b[1]))

    def _exchange(self, a, b):
        with self.lock:
            da, db = self._dir_of(a), self._dir_of(b)
            done = self.real_exchange(a, b)
            if done and da[0] is not None:
                self.ops.append(("exchange", da[0], da[1], db[0], db[1]))
            return done

    def mark(self, what) -> None:
        """A point in the program (e.g. "save of step 3 returned")."""
        with self.lock:
            self.ops.append(("mark", what))

    # ----------------------------------------------------------------- replay
    def durable_state(self, cut: int):
        """(entries, data) that survive a power loss after the first ``cut`` ops."""
        vol_e = {d: dict(e) for d, e in self.init_entries.items()}
        dur_e = {d: dict(e) for d, e in self.init_entries.items()}
        vol_d = {f: bytearray(b) for f, b in self.init_data.items()}
        dur_d = dict(self.init_data)
        for op in self.ops[:cut]:
            kind = op[0]
            if kind == "create":
                _, parent, name, i = op
                vol_e[parent][name] = i
                if self.kinds[i] == "dir":
                    vol_e[i], dur_e[i] = {}, {}
                else:
                    vol_d[i], dur_d[i] = bytearray(), b""
            elif kind == "write":
                _, i, off, data = op
                buf = vol_d[i]
                if len(buf) < off + len(data):
                    buf.extend(bytes(off + len(data) - len(buf)))
                buf[off:off + len(data)] = data
            elif kind == "trunc":
                _, i, size = op
                buf = vol_d[i]
                del buf[size:]
                buf.extend(bytes(size - len(buf)))
            elif kind == "fsync":
                i = op[1]
                if self.kinds[i] == "dir":
                    dur_e[i] = dict(vol_e[i])
                else:
                    dur_d[i] = bytes(vol_d[i])
            elif kind == "rename":
                _, da, na, db, nb = op
                vol_e[db][nb] = vol_e[da].pop(na)
            elif kind == "exchange":
                _, da, na, db, nb = op
                vol_e[da][na], vol_e[db][nb] = vol_e[db][nb], vol_e[da][na]
            elif kind == "unlink":
                _, parent, name = op
                del vol_e[parent][name]
            elif kind == "link":
                _, da, na, db, nb = op
                vol_e[db][nb] = vol_e[da][na]
        return dur_e, dur_d

    def materialize(self, cut: int, dest: str) -> None:
        entries, data = self.durable_state(cut)

        def build(i: int, path: str) -> None:
            if self.kinds[i] == "dir":
                os.mkdir(path)
                for name, child in entries[i].items():
                    build(child, os.path.join(path, name))
            else:
                with open(path, "wb") as f:
                    f.write(data[i])

        build(self.root_id, dest)

    def marks(self) -> list[tuple[int, object]]:
        return [(k, op[1]) for k, op in enumerate(self.ops) if op[0] == "mark"]


def _after_reboot(monkeypatch):
    """Every process of before the power loss is gone."""
    monkeypatch.setattr(procs, "process_alive", lambda host, pid, start: False)


def _check_manager_disk(d: str, newest: int | None, candidates: set[int]) -> list[int]:
    """What a power loss left in a manager directory: each listed step complete
    and bit-exact, the newest step whose save had returned still there (the
    rotation deleted nothing before a newer step was durable), and a new writer
    cleans the rest."""
    steps = check_listed(d) if os.path.isdir(d) else []
    assert set(steps) <= candidates, steps
    assert newest is None or newest in steps, (steps, newest)
    if os.path.isdir(d):
        with tw.open_manager(d) as mgr:
            assert aux_entries(d) == []
            assert dead_lock_leftovers(d) == []
            assert set(mgr.all_steps()) == set(steps)
    return steps


@pytest.mark.parametrize("fresh", [False, True], ids=["existing_dir", "fresh_dir"])
def test_power_loss_at_every_point_of_saves_and_rotations(tmp_path, monkeypatch, fresh):
    """Steps 3 and 4 saved (each rotation deletes the oldest) into a directory
    holding steps 1 and 2, or into a directory the manager creates: after a
    power loss at any point, what is listed is complete, and every step whose
    save had returned is still there."""
    root = tmp_path / "disk"
    root.mkdir()
    run = str(root / "run")
    if not fresh:
        tw.prepare(run)
    disk = PowerLossDisk(str(root))
    disk.install(monkeypatch)
    with tw.open_manager(run) as mgr:
        disk.mark("opened")
        for step in ((1, 2, 3) if fresh else (3, 4)):
            mgr.save(step, values(step))
            mgr.wait_until_finished()
            disk.mark(step)
    disk.mark("closed")
    monkeypatch.undo()
    _after_reboot(monkeypatch)
    candidates = {1, 2, 3, 4}
    cuts = range(len(disk.ops) + 1)
    seen = set()
    for cut in cuts:
        returned = [m for k, m in disk.marks() if isinstance(m, int) and k < cut] or ([] if fresh else [2])
        dest = str(tmp_path / f"cut-{cut}")
        disk.materialize(cut, dest)
        steps = _check_manager_disk(os.path.join(dest, "run"), max(returned, default=None), candidates)
        seen.add(tuple(steps))
        shutil.rmtree(dest)
    ops = [op[0] for op in disk.ops]
    print(f"\npower loss ({'fresh' if fresh else 'existing'} dir): {len(cuts)} cut points, "
          f"{ops.count('fsync')} fsyncs, listings seen: {sorted(seen)}")
    assert len(seen) >= 3  # the cuts did land before, between and after the commits


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename_aside"])
def test_power_loss_during_an_overwrite_leaves_old_or_new(tmp_path, monkeypatch, exchange):
    """``save(overwrite=True)``: at every cut point the path restores to the old
    checkpoint or the new one, never a mix, never nothing."""
    root = tmp_path / "disk"
    root.mkdir()
    path = str(root / "ckpt")
    jaxckpt.save(path, values(7))
    if not exchange:
        monkeypatch.setattr(libc, "renameat2_exchange", lambda a, b: False)
    disk = PowerLossDisk(str(root))
    disk.install(monkeypatch)
    jaxckpt.save(path, values(7, 1), overwrite=True)
    disk.mark("returned")
    monkeypatch.undo()
    _after_reboot(monkeypatch)
    outcomes = []
    for cut in range(len(disk.ops) + 1):
        dest = str(tmp_path / f"cut-{cut}")
        disk.materialize(cut, dest)
        which = tw.restores_as(os.path.join(dest, "ckpt"), [values(7), values(7, 1)])
        assert which is not None, f"cut {cut}: neither the old nor the new checkpoint"
        if cut == len(disk.ops):
            assert which == 1  # the save returned: the new one is durable
        outcomes.append(which)
        shutil.rmtree(dest)
    assert outcomes[0] == 0 and outcomes[-1] == 1
    assert outcomes == sorted(outcomes)  # old, then new, never back


def test_power_loss_in_a_nested_new_directory(tmp_path, monkeypatch):
    """``jaxckpt.save`` into directories that do not exist yet: once it returns,
    the checkpoint survives a power loss (the new directories are durable too)."""
    root = tmp_path / "disk"
    root.mkdir()
    disk = PowerLossDisk(str(root))
    disk.install(monkeypatch)
    path = str(root / "a" / "b" / "ckpt")
    jaxckpt.save(path, values(5))
    monkeypatch.undo()
    for cut in range(len(disk.ops) + 1):
        dest = str(tmp_path / f"cut-{cut}")
        disk.materialize(cut, dest)
        p = os.path.join(dest, "a", "b", "ckpt")
        if cut == len(disk.ops):
            assert os.path.isdir(p), "the save returned but the checkpoint is not durable"
        if os.path.isdir(p):
            assert tw.restores_as(p, [values(5)]) == 0
        shutil.rmtree(dest)
