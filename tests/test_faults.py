"""Faults (issue 6): ENOSPC and EIO at every write, fsync, rename, delete and
create call of a save with rotation; a real full filesystem; hung storage;
damaged checkpoints seen through the manager (restore of "latest" and
``fallback=True``).

The step values are a pure function of the step (``torture_worker.values``):
"restores" below always means bit-exactly.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest

import jaxckpt
from jaxckpt import format as fmt
from jaxckpt import libc, lock, posixfs

import torture_worker as tw
from torture_worker import aux_entries, same, values

DATA = "data-00000.bin"


# =========================================================================== injected ENOSPC / EIO
# Which os calls make up each kind of operation. os.open counts only when it
# creates (O_CREAT): that is where a full disk or a dead device says no.
KINDS = {
    "write": ("os.write", "os.pwrite", "os.pwritev", "os.ftruncate"),
    "fsync": ("os.fsync",),
    "rename": ("os.rename", "libc.renameat2_exchange"),
    "delete": ("os.unlink", "os.rmdir"),
    "create": ("os.open", "os.mkdir"),
}
_PATH_ARGS = {"os.open": 1, "os.mkdir": 1, "os.unlink": 1, "os.rmdir": 1, "os.rename": 2,
              "libc.renameat2_exchange": 2}


class Fault:
    """Makes call number ``index`` (0-based) of ``target`` by jaxckpt fail with
    ``OSError(code)``, the way the system call would: path calls name their
    path(s) in the error, fd calls do not (the package must add it)."""

    def __init__(self, target: str, index: int, code: int | None):
        owner_name, attr = target.rsplit(".", 1)
        self.owner = {"os": os, "libc": libc}[owner_name]
        self.attr, self.target, self.index, self.code = attr, target, index, code
        self.real = getattr(self.owner, attr)
        self.calls = 0
        self.raised: OSError | None = None
        self._lock = threading.Lock()

    def counts(self, args) -> bool:
        if self.target == "libc.renameat2_exchange":
            return True
        if not sys_caller().startswith(("jaxckpt", "shutil")):
            return False
        return self.target != "os.open" or bool(args[1] & os.O_CREAT)

    def install(self, monkeypatch) -> "Fault":
        def wrapped(*args, **kwargs):
            if self.counts(args):
                with self._lock:
                    n, self.calls = self.calls, self.calls + 1
                if n == self.index and self.code is not None:
                    paths = [os.fsdecode(a) for a in args[:_PATH_ARGS.get(self.target, 0)]]
                    self.raised = OSError(self.code, os.strerror(self.code), *paths[:1], None, *paths[1:2])
                    raise self.raised
            return self.real(*args, **kwargs)

        monkeypatch.setattr(self.owner, self.attr, wrapped)
        return self


def sys_caller() -> str:
    """The module that called the wrapped function (3 frames up: here, counts, wrapped)."""
    return sys._getframe(3).f_globals.get("__name__", "")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("faults") / "base")
    tw.prepare(d)
    return d


def _count(base: str, tmp_path, target: str, monkeypatch, scenario: str) -> int:
    d = str(tmp_path / "count")
    shutil.copytree(base, d)
    mgr = tw.open_manager(d)
    with monkeypatch.context() as m:
        f = Fault(target, -1, None).install(m)
        tw.run_scenario(mgr, scenario)
    mgr.close()
    shutil.rmtree(d)
    return f.calls


def _error_records(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "jaxckpt" and r.levelno >= logging.ERROR]


@pytest.mark.parametrize("direct", [True, False], ids=["o_direct", "buffered"])
@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO], ids=["ENOSPC", "EIO"])
def test_fault_at_every_call(base, tmp_path, monkeypatch, caplog, code, kind, direct):
    """Step 3 saved (async) over steps 1 and 2 with max_to_keep=2, and step 2
    overwritten, one call failing: the error surfaces once, naming the path
    and the errno; the checkpoints listed before stay listed and restorable
    without a reload; nothing is rotated away by a failed save; no temporary
    directory is left."""
    if not direct:
        monkeypatch.setattr(posixfs, "O_DIRECT", 0)
    caplog.set_level(logging.ERROR, logger="jaxckpt")
    outcomes = {"raised": 0, "logged": 0, "absorbed": 0}
    for scenario in ("save", "overwrite"):
        for target in KINDS[kind]:
            for i in range(_count(base, tmp_path, target, monkeypatch, scenario)):
                _one_fault(base, tmp_path, monkeypatch, caplog, code, scenario, target, i, outcomes)
    print(f"\n{kind} {errno.errorcode[code]}: {outcomes}")
    assert outcomes["raised"] > 0
    if kind in ("rename", "fsync"):
        assert outcomes["logged"] > 0  # the rotation's rename-away and its fsync failed too


@pytest.fixture(scope="module")
def base_encrypted(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("faults-enc") / "base")
    tw.KEY = tw.TEST_KEY
    try:
        tw.prepare(d)
    finally:
        tw.KEY = None
    return d


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_fault_at_every_call_encrypted(base_encrypted, tmp_path, monkeypatch, caplog, kind):
    """The same, once with encryption on (issue 18): EIO at every call."""
    monkeypatch.setattr(tw, "KEY", tw.TEST_KEY)
    caplog.set_level(logging.ERROR, logger="jaxckpt")
    outcomes = {"raised": 0, "logged": 0, "absorbed": 0}
    for scenario in ("save", "overwrite"):
        for target in KINDS[kind]:
            for i in range(_count(base_encrypted, tmp_path, target, monkeypatch, scenario)):
                _one_fault(base_encrypted, tmp_path, monkeypatch, caplog, errno.EIO, scenario, target, i, outcomes)
    print(f"\n{kind} EIO, encrypted: {outcomes}")
    assert outcomes["raised"] > 0


def _one_fault(base, tmp_path, monkeypatch, caplog, code, scenario, target, i, outcomes) -> None:
    d = str(tmp_path / f"{scenario}-{target}-{i}")
    shutil.copytree(base, d)
    caplog.clear()
    mgr = tw.open_manager(d)
    with monkeypatch.context() as m:
        fault = Fault(target, i, code).install(m)
        try:
            tw.run_scenario(mgr, scenario)
            err = None
        except OSError as e:
            err = e
        assert fault.raised is not None, (target, i)
    mgr.wait_until_finished()  # raised once only
    where = f"{scenario}: {target} call {i}"
    listed = mgr.all_steps()
    expect = (lambda s: tw.expected(scenario, s)) if err is not None else (
        lambda s: [values(2, 1)] if scenario == "overwrite" and s == 2 else [values(s)])
    if err is not None:  # the save failed
        outcomes["raised"] += 1
        assert err.errno == code, where
        path = os.fsdecode(err.filename or "")
        assert path == d or path.startswith(d + os.sep), (where, err)  # names the file or directory
        assert os.fsdecode(err.filename) in str(err)
        assert listed == [1, 2], where  # nothing rotated away, no reload needed
    elif scenario == "overwrite":
        outcomes["absorbed"] += 1
        assert listed == [1, 2], where
    else:  # the save committed; the rotation's deletion of step 1 failed, or the fault was retried
        messages = [msg for msg in _error_records(caplog) if f"[Errno {code}]" in msg]
        if messages:
            outcomes["logged"] += 1
            assert len(messages) == 1, (where, messages)
            assert re.fullmatch(rf"could not delete {re.escape(d)}/1 \(step 1\): \[Errno {code}\] "
                                rf"{os.strerror(code)}: '{re.escape(d)}(/[^']*)?'.*", messages[0]), messages
            assert listed == [1, 2, 3], where
        else:
            outcomes["absorbed"] += 1
            assert listed == [2, 3], where
    for s in listed:
        got = mgr.restore(s)
        assert any(same(got, w) for w in expect(s)), (where, s)
    assert aux_entries(d) == [], where
    mgr.close()
    # what a fresh writer finds agrees, and the run goes on
    with tw.open_manager(d) as again:
        on_disk = again.all_steps()
        assert set(listed) <= set(on_disk) <= set(listed) | {3}, where
        again.save(4, values(4))
    assert aux_entries(d) == []
    shutil.rmtree(d)


def test_async_error_surfaces_on_the_next_save(base, tmp_path, monkeypatch):
    d = str(tmp_path / "d")
    shutil.copytree(base, d)
    with tw.open_manager(d) as mgr:
        with monkeypatch.context() as m:
            Fault("os.fsync", 0, errno.EIO).install(m)
            mgr.save(3, values(3))
            mgr._wait_all()  # (the save has failed by now)
        with pytest.raises(OSError) as e:
            mgr.save(4, values(4))
        assert e.value.errno == errno.EIO and f"{d}{os.sep}.3.jaxckpt-tmp-" in str(e.value)
        assert mgr.all_steps() == [1, 2]  # step 4 was not saved: the error came first
        assert mgr.save(4, values(4))
        mgr.wait_until_finished()
        assert mgr.all_steps() == [2, 4]
    assert aux_entries(d) == []


# =========================================================================== hung storage
def _from_jaxckpt() -> bool:
    return sys._getframe(2).f_globals.get("__name__", "").startswith("jaxckpt")


@pytest.mark.parametrize("direct", [True, False], ids=["o_direct", "buffered"])
def test_hung_write_times_out_and_never_commits(base, tmp_path, monkeypatch, direct):
    """The first data write of step 3 hangs. The save fails with
    SaveTimeoutError naming the step once the timeout passed, while the write
    is still hung (the training thread is not held by it); nothing is
    committed. When the hung write finally returns, in the middle of the next
    save, it must land in step 3's abandoned file, not in a file that reused
    its descriptor number: step 4 restores bit-exactly."""
    if not direct:
        monkeypatch.setattr(posixfs, "O_DIRECT", 0)
    d = str(tmp_path / "d")
    shutil.copytree(base, d)
    hang = {"armed": True, "release_on_truncate": False}
    gate, stale_done = threading.Event(), threading.Event()
    real = {n: getattr(os, n) for n in ("pwrite", "pwritev", "ftruncate")}

    def hung(name):
        def call(fd, *args):
            if _from_jaxckpt() and hang["armed"]:
                hang["armed"] = False
                assert gate.wait(60)
                try:
                    return real[name](fd, *args)
                finally:
                    stale_done.set()
            return real[name](fd, *args)
        return call

    def ftruncate(fd, size):
        if _from_jaxckpt() and hang["release_on_truncate"]:  # step 4's data file is open and written
            hang["release_on_truncate"] = False
            gate.set()
            assert stale_done.wait(60)
        return real["ftruncate"](fd, size)

    monkeypatch.setattr(os, "pwrite", hung("pwrite"))
    monkeypatch.setattr(os, "pwritev", hung("pwritev"))
    monkeypatch.setattr(os, "ftruncate", ftruncate)
    with tw.open_manager(d, save_timeout=2.0) as mgr:  # (step 4 must fit in it on a busy machine)
        assert mgr.save(3, values(3))
        with pytest.raises(jaxckpt.SaveTimeoutError) as e:
            mgr.wait_until_finished()
        assert not gate.is_set()  # the error came while the write was still hung
        assert str(e.value) == "save of step 3 did not finish within the timeout"
        mgr.wait_until_finished()  # raised once
        assert mgr.all_steps() == [1, 2] and not os.path.exists(os.path.join(d, "3"))
        hang["release_on_truncate"] = True
        assert mgr.save(4, values(4))
        mgr.wait_until_finished()
        assert stale_done.is_set()
        assert mgr.all_steps() == [2, 4]
        assert same(mgr.restore(4), values(4))
        assert same(mgr.restore(2), values(2))
    assert sorted(os.listdir(d)) == ["2", "4"]  # nothing of step 3, no temporary directory


def test_hung_fsync_of_the_commit_times_out(base, tmp_path, monkeypatch):
    """A hung fsync of the data file: the same contract (the fsync is the last
    step a timeout may abandon; the commit itself is never cut in half)."""
    d = str(tmp_path / "d")
    shutil.copytree(base, d)
    gate = threading.Event()
    real_fsync = os.fsync
    state = {"armed": False}

    def fsync(fd):
        if _from_jaxckpt() and state["armed"]:
            state["armed"] = False
            assert gate.wait(60)
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with tw.open_manager(d, save_timeout=1.0) as mgr:
        state["armed"] = True  # the first fsync of the save: the data file's
        mgr.save(3, values(3))
        with pytest.raises(jaxckpt.SaveTimeoutError, match=r"^save of step 3 did not finish within the timeout$"):
            mgr.wait_until_finished()
        assert not gate.is_set()
        gate.set()
        assert mgr.save(4, values(4))
        mgr.wait_until_finished()
        assert mgr.all_steps() == [2, 4]
        assert same(mgr.restore(4), values(4))
    assert sorted(os.listdir(d)) == ["2", "4"]


# =========================================================================== read side, through the manager
def _leaf_offset(path: str, leaf: str) -> int:
    with open(os.path.join(path, fmt.MANIFEST_NAME), "rb") as f:
        m = fmt.decode_manifest(f.read(), "m")
    return next(x for x in m.leaves if x.path == leaf).shards[0].offset


def _flip(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ 0x10]))


def damage(step_dir: str, how: str) -> str:
    """Damage one checkpoint; returns a regex of the error it must raise."""
    data, man = os.path.join(step_dir, DATA), os.path.join(step_dir, fmt.MANIFEST_NAME)
    d, m = re.escape(data), re.escape(man)
    if how == "data_bit":
        _flip(data, _leaf_offset(step_dir, "params/w") + 5)
        return rf"{d}: checksum mismatch in leaf 'params/w', chunk 0 \(bytes at offset \d+\): expected xxh3 0x"
    if how == "data_truncated":
        size = os.path.getsize(data)
        os.truncate(data, size // 2)
        return (rf"{d}: truncated: the manifest records {size} bytes, found {size // 2} "
                r"\(while reading leaf '[a-z/0-9]+'\)")
    if how == "data_deleted":
        os.unlink(data)
        return rf"{d}: file is missing \(while reading leaf '[a-z/0-9]+'\)"
    if how == "manifest_bit":
        with open(man, "rb") as f:
            at = f.read().index(b"params")
        _flip(man, at)
        return rf"{m}: manifest checksum mismatch: expected xxh3 0x[0-9a-f]{{16}}, found 0x[0-9a-f]{{16}}"
    if how == "manifest_truncated":
        os.truncate(man, os.path.getsize(man) // 2)
        return rf"{m}: not a valid msgpack manifest \("
    if how == "manifest_empty":
        os.truncate(man, 0)
        return rf"{m}: the manifest is empty \(0 bytes\)"
    raise ValueError(how)


DAMAGE = ["data_bit", "data_truncated", "data_deleted", "manifest_bit", "manifest_truncated", "manifest_empty"]


@pytest.fixture
def three_steps(tmp_path):
    d = str(tmp_path / "run")
    with jaxckpt.CheckpointManager(d, save_on_preemption=False) as mgr:
        for s in (1, 2, 3):
            mgr.save(s, values(s))
    return d


@pytest.mark.parametrize("read_only", [False, True], ids=["writer", "reader"])
@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_latest_is_reported_not_skipped(three_steps, caplog, how, read_only):
    """restore() of the latest raises CorruptCheckpointError naming the file
    (and the leaf); only fallback=True moves to an older step, and says so."""
    d = three_steps
    caplog.set_level(logging.WARNING, logger="jaxckpt")
    with jaxckpt.CheckpointManager(d, read_only=read_only, save_on_preemption=False) as mgr:
        pattern = damage(os.path.join(d, "3"), how)  # damaged under a running manager: no reload
        for call in (lambda: mgr.restore(), lambda: mgr.restore(3), lambda: mgr.restore(target=values(3))):
            with pytest.raises(jaxckpt.CorruptCheckpointError) as e:
                call()
            assert re.match(pattern, str(e.value)), str(e.value)
        assert mgr.restored_step is None
        assert not [r for r in caplog.records if "restored step" in r.getMessage()]
        got = mgr.restore(fallback=True)
        assert same(got, values(2)) and mgr.restored_step == 2
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any(w.startswith("restore: step 3 is unusable (") and re.search(pattern, w) for w in warnings), warnings
        assert "restore(fallback=True): restored step 2; step 3 could not be restored" in warnings
        w = mgr.restore(target={"params": {"w": np.zeros((32, 64), np.float32)}}, partial=True, fallback=True)
        assert same(w, {"params": {"w": values(2)["params"]["w"]}})
        assert mgr.all_steps() == [1, 2, 3]  # a damaged step is reported, never deleted by a restore
        assert same(mgr.restore(2), values(2))


def test_fallback_skips_every_damaged_step_and_fails_when_none_is_left(three_steps, caplog):
    d = three_steps
    caplog.set_level(logging.WARNING, logger="jaxckpt")
    damage(os.path.join(d, "3"), "data_bit")
    damage(os.path.join(d, "2"), "manifest_empty")
    with jaxckpt.CheckpointManager(d, read_only=True) as mgr:
        assert same(mgr.restore(fallback=True), values(1)) and mgr.restored_step == 1
        assert "restore(fallback=True): restored step 1; step 3 could not be restored" in caplog.text
        assert same(mgr.restore(2, fallback=True), values(1))  # older than the step asked, never newer
        damage(os.path.join(d, "1"), "data_deleted")
        with pytest.raises(jaxckpt.CorruptCheckpointError) as e:
            mgr.restore(fallback=True)
    msg = str(e.value)
    assert msg.startswith(f"{d}: no committed step could be restored: step 3: {d}/3/{DATA}: checksum mismatch")
    assert f"; step 2: {d}/2/{fmt.MANIFEST_NAME}: the manifest is empty (0 bytes); step 1: {d}/1/{DATA}: " \
           "file is missing" in msg


# =========================================================================== a real full filesystem
@pytest.fixture
def small_fs(tmp_path):
    """An 8 MiB tmpfs (root only)."""
    if os.geteuid() != 0:
        pytest.skip("a real full filesystem needs root to mount an 8 MiB tmpfs; not root here, so this was not run")
    d = tmp_path / "small"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(d)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"could not mount an 8 MiB tmpfs at {d} (running as root): {r.stderr.strip() or r.returncode}")
    try:
        yield str(d)
    finally:
        subprocess.run(["umount", "-l", str(d)], check=True)


def _free(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_real_full_filesystem(small_fs):
    """A save bigger than the free space of a real (tmpfs) filesystem fails
    with ENOSPC naming the file; the previous step stays listed and restorable
    without a reload; every byte of the failed save is given back; the run
    goes on."""
    run = os.path.join(small_fs, "run")
    with tw.open_manager(run) as mgr:
        mgr.save(1, values(1))
        mgr.wait_until_finished()
        free = _free(small_fs)
        big = dict(values(2), big=np.ones((12 << 20) // 4, np.float32))  # 12 MiB on an 8 MiB filesystem
        assert mgr.save(2, big)
        with pytest.raises(OSError) as e:
            mgr.wait_until_finished()
        assert e.value.errno == errno.ENOSPC
        assert re.fullmatch(rf"\[Errno 28\] No space left on device: '{re.escape(run)}/\.2\.jaxckpt-tmp-[0-9a-f]+/"
                            rf"data-00000\.bin'", str(e.value)), str(e.value)
        mgr.wait_until_finished()  # once
        assert mgr.all_steps() == [1] and same(mgr.restore(1), values(1))
        assert sorted(os.listdir(run)) == [lock.LOCK_NAME, "1"]
        assert _free(small_fs) == free  # nothing of the failed save is left
        mgr.save(3, values(3))
        mgr.wait_until_finished()
        assert mgr.all_steps() == [1, 3]
    with pytest.raises(OSError) as e:  # the synchronous API: the same, raised at once
        jaxckpt.save(os.path.join(small_fs, "sync"), big)
    assert e.value.errno == errno.ENOSPC and e.value.filename.startswith(os.path.join(small_fs, ".sync.jaxckpt-tmp-"))
    assert sorted(os.listdir(small_fs)) == ["run"]


def test_disk_filling_up_at_every_point_of_a_save(small_fs):
    """The filesystem has k free pages, k = 0, 1, 2, ...: each file of a save
    (owner marker, data, manifest, rotation) meets ENOSPC in turn. Each save
    either commits or fails with ENOSPC; nothing is ever left behind and
    the listed steps always restore."""
    run = os.path.join(small_fs, "run")
    filler = os.path.join(small_fs, "filler")
    page = os.statvfs(small_fs).f_frsize
    with tw.open_manager(run) as mgr:
        mgr.save(1, values(1))
        mgr.wait_until_finished()
        failed, committed, step = 0, 0, 2
        for k in range(0, 16):
            fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            try:
                os.posix_fallocate(fd, 0, _free(small_fs) - k * page)
            finally:
                os.close(fd)
            assert _free(small_fs) == k * page
            before = mgr.all_steps()
            mgr.save(step, values(step))
            try:
                mgr.wait_until_finished()
                committed += 1
                assert mgr.all_steps() == (before + [step])[-2:]
            except OSError as e:  # (raised once: the next wait above would not raise it again)
                failed += 1
                assert e.errno == errno.ENOSPC, e
                assert os.fsdecode(e.filename).startswith(run + os.sep), e
                assert mgr.all_steps() == before
                assert _free(small_fs) == k * page, k  # the failed save gave back every page
            assert aux_entries(run) == []
            for s in mgr.all_steps():
                assert same(mgr.restore(s), values(s))
            os.unlink(filler)
            step += 1
    print(f"\nfilling up: {failed} saves failed with ENOSPC, {committed} committed")
    assert failed >= 3 and committed >= 3, (failed, committed)  # ENOSPC met at several points, then room enough
