"""Hostile input (issue 6): fuzzing of the manifest decoder and of full
restores in a memory-limited subprocess, nested msgpack extensions, path
tricks in file names, step directory names and the lock file, symlinks and
FIFOs planted in checkpoint and manager directories.

The fixed manifest cases are in test_hostile.py (issue 2); this file adds
generated ones (``tests/fuzz_worker.py``) and the manager's directory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap

import msgpack
import numpy as np
import pytest

import jaxckpt
from jaxckpt import format as fmt
from jaxckpt import lock, posixdirs, posixfs

import torture_worker as tw
from torture_worker import same, values

LONG = os.environ.get("JAXCKPT_LONG_TESTS") == "1"
HERE = os.path.dirname(os.path.abspath(__file__))


def _fuzz(mode: str, examples: int, seed: int, tmp_path, timeout: float) -> dict:
    work = tmp_path / "work"
    work.mkdir()
    out = subprocess.run([sys.executable, os.path.join(HERE, "fuzz_worker.py"), mode, str(examples), str(seed),
                          str(work)], capture_output=True, text=True, timeout=timeout,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-20000:]
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\nfuzz {mode}: {stats}")
    return stats


def test_fuzz_manifest_decoder(tmp_path):
    """Structured mutations of real manifests, byte mutations, random bytes,
    nested extensions: decode_manifest returns a manifest or raises
    CorruptCheckpointError, within 2 GiB of address space."""
    n = 50_000 if LONG else 1500
    stats = _fuzz("decode", n, 6, tmp_path, timeout=3600 if LONG else 120)
    assert stats["structured"] == round(0.6 * n) and stats["bytes"] == round(0.25 * n)
    assert stats["random"] == round(0.1 * n) and stats["ext"] >= 40  # (45 distinct "ext" inputs in all)
    assert stats["decoded"] > 0 and stats["refused"] > n // 2  # both outcomes were reached
    assert stats["rss_growth_kb"] < 512 * 1024


def test_fuzz_full_restores_stay_in_the_directory(tmp_path):
    """The fuzzed manifests in a checkpoint directory that also holds a
    symlink to a file outside, a FIFO and a directory: inspect, restore and
    load_checkpoint raise only CheckpointError subclasses, never hang, and
    open nothing outside the directory (every open uses O_NOFOLLOW)."""
    n = 5000 if LONG else 300
    stats = _fuzz("restore", n, 7, tmp_path, timeout=3600 if LONG else 120)
    assert stats["structured"] == round(0.6 * n) and stats["bytes"] == round(0.25 * n)
    assert stats["ext"] >= min(40, round(0.05 * n))
    assert stats["restore_ok"] > 0 and stats["restore_refused"] > n // 2
    assert stats["opens_audited"] > n
    assert stats["rss_growth_kb"] < 512 * 1024


_EXT_SCRIPT = textwrap.dedent("""
    import os, sys, msgpack
    import jaxckpt
    from jaxckpt import format as fmt, lock, posixdirs, posixfs

    def nested_ext(depth):
        # outside-in, linear time: the layer k levels above the nil holds 1 + 6 (k - 1) bytes
        return b"".join(b"\\xc9" + (1 + 6 * (k - 1)).to_bytes(4, "big") + b"\\x05"
                        for k in range(depth, 0, -1)) + b"\\xc0"

    def seal(body):
        return msgpack.packb({"format": "jaxckpt", "version": 1, "body": body, "xxh3": fmt.checksum(body)})

    deep = nested_ext(1_000_000)  # 6 MB of ext headers, each the payload of the one before
    for name, data in (("whole", deep), ("body", seal(deep)),
                       ("metadata", seal(msgpack.packb({"metadata": msgpack.ExtType(5, deep)})))):
        try:
            fmt.decode_manifest(data, "m")
            print(name, "DECODED")
        except jaxckpt.CorruptCheckpointError as e:
            print(name, e)
    # the small files read with msgpack's defaults: the lock and the owner marker
    d = sys.argv[1]
    posixfs.write_file(d, lock.LOCK_NAME, nested_ext(600))
    try:
        lock.read_lock(d)
    except jaxckpt.CheckpointLockedError as e:
        print("lock", e)
    os.mkdir(os.path.join(d, ".1.jaxckpt-tmp-00112233aabbccdd"))
    posixfs.write_file(os.path.join(d, ".1.jaxckpt-tmp-00112233aabbccdd"), posixdirs.OWNER_FILE, nested_ext(600))
    print("owner", posixdirs.is_ours(os.path.join(d, ".1.jaxckpt-tmp-00112233aabbccdd")))
""")


def test_nested_msgpack_extensions_do_not_overflow_the_stack(tmp_path):
    out = subprocess.run([sys.executable, "-c", _EXT_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr[-5000:]
    lines = out.stdout.splitlines()
    ext = r" \(ValueError: \d+ exceeds max_ext_len\(0\)\)"  # refused at the first extension header
    assert re.fullmatch(r"whole m: not a valid msgpack manifest" + ext, lines[0]), lines
    assert re.fullmatch(r"body m: manifest body is not valid msgpack" + ext, lines[1]), lines
    assert re.fullmatch(r"metadata m: manifest body is not valid msgpack" + ext, lines[2]), lines
    assert lines[3] == (f"lock {tmp_path / lock.LOCK_NAME}: not a valid jaxckpt lock file; if no writer uses "
                        "this directory, delete the file")
    assert lines[4] == "owner False"


# =========================================================================== path tricks: step directories
def _outside_checkpoint(tmp_path, step: int) -> str:
    """A manager checkpoint of ``step`` outside the manager directory."""
    d = str(tmp_path / f"elsewhere-{step}")
    with tw.open_manager(d) as mgr:
        mgr.save(step, values(step))
    return os.path.join(d, str(step))


def _tree_listing(path: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(r, f), path) for r, ds, fs in os.walk(path) for f in fs + ds)


def test_step_names_that_are_not_steps(tmp_path):
    """Entries named almost like steps, symlinks and files named like steps,
    and step directories whose manifest is a symlink: never listed, never
    restored from, never deleted or followed by the rotation or the cleanup."""
    d = str(tmp_path / "run")
    with tw.open_manager(d) as mgr:
        mgr.save(1, values(1))
    outside = _outside_checkpoint(tmp_path, 7)
    before = _tree_listing(os.path.dirname(outside))
    for name in ("0005", "5 ", " 5", "+5", "-5", "5.0", "5e0", "\u0665", "\uff15", "5\n", "0x5", "99999999999999999999",
                 "1_000"):
        shutil.copytree(os.path.join(d, "1"), os.path.join(d, name))
    os.symlink(outside, os.path.join(d, "7"))  # a symlinked step directory
    os.mkdir(os.path.join(d, "8"))  # a step directory whose manifest is a symlink out
    os.symlink(os.path.join(outside, fmt.MANIFEST_NAME), os.path.join(d, "8", fmt.MANIFEST_NAME))
    shutil.copyfile(os.path.join(outside, "data-00000.bin"), os.path.join(d, "9"))  # a file named like a step
    os.mkfifo(os.path.join(d, "10"))
    # leftovers' names pointing out: a "temporary" and a "deleting" directory that are symlinks
    os.symlink(os.path.dirname(outside), os.path.join(d, ".11.jaxckpt-tmp-00112233aabbccdd"))
    os.symlink(outside, os.path.join(d, ".12.jaxckpt-del-00112233aabbccdd"))
    os.symlink(outside, os.path.join(d, ".13.jaxckpt-old-00112233aabbccdd"))
    with tw.open_manager(d) as mgr:  # max_to_keep=2: a rotation after each save
        assert mgr.all_steps() == [1]
        for s in (7, 8, 9, 10):
            with pytest.raises(jaxckpt.CheckpointNotFoundError, match=f"step {s} is not a committed checkpoint here"):
                mgr.restore(s)
        for s in (20, 21, 22):
            mgr.save(s, values(s))
        mgr.wait_until_finished()
        assert mgr.all_steps() == [21, 22]
        assert same(mgr.restore(), values(22))
    with jaxckpt.CheckpointManager(d, read_only=True) as ro:
        assert ro.all_steps() == [21, 22]
    assert _tree_listing(os.path.dirname(outside)) == before  # nothing outside was touched
    assert jaxckpt.restore(outside)["step"] == 7
    assert os.path.islink(os.path.join(d, "7")) and stat_fifo(os.path.join(d, "10"))


def stat_fifo(path: str) -> bool:
    import stat
    return stat.S_ISFIFO(os.lstat(path).st_mode)


def test_rotation_does_not_follow_a_step_replaced_by_a_symlink(tmp_path):
    """A step directory listed by the writer is replaced by a symlink to a
    directory outside before the rotation deletes it: the rotation removes
    the link, never the files it points to."""
    d = str(tmp_path / "run")
    outside = _outside_checkpoint(tmp_path, 1)
    before = _tree_listing(outside)
    with jaxckpt.CheckpointManager(d, max_to_keep=1, save_on_preemption=False) as mgr:
        mgr.save(1, values(1))
        mgr.wait_until_finished()
        shutil.rmtree(os.path.join(d, "1"))
        os.symlink(outside, os.path.join(d, "1"))  # swapped under the writer
        mgr.save(2, values(2))
        mgr.wait_until_finished()
        assert mgr.all_steps() == [2]
    assert sorted(os.listdir(d)) == ["2"]
    assert _tree_listing(outside) == before and same(jaxckpt.restore(outside), values(1))


def test_clean_stale_never_follows_a_planted_owner_marker(tmp_path):
    """A temporary directory whose owner marker is a symlink to a file outside
    or a FIFO is not ours to judge: left alone, the outside untouched."""
    d = str(tmp_path / "run")
    os.mkdir(d)
    target = tmp_path / "precious"
    target.write_bytes(b"")
    a = os.path.join(d, ".3.jaxckpt-tmp-00112233aabbccdd")
    b = os.path.join(d, ".4.jaxckpt-tmp-00112233aabbccdd")
    os.mkdir(a)
    os.symlink(target, os.path.join(a, posixdirs.OWNER_FILE))
    os.mkdir(b)
    os.mkfifo(os.path.join(b, posixdirs.OWNER_FILE))
    with tw.open_manager(d):
        pass
    assert os.path.islink(os.path.join(a, posixdirs.OWNER_FILE)) and stat_fifo(os.path.join(b, posixdirs.OWNER_FILE))
    assert target.read_bytes() == b""


@pytest.mark.parametrize("kwargs", [
    {"step_format": "../{step}"}, {"step_format": "/abs/{step}"}, {"step_format": "a/{step}"},
    {"step_format": ".{step}"}, {"step_format": "{step}\x00"}, {"step_format": "-{step}"},
    {"step_prefix": ".."}, {"step_prefix": "a/b"}, {"step_prefix": "/abs"}, {"step_prefix": "x\x00"},
    {"step_prefix": ""},
], ids=lambda kw: repr(kw))
def test_step_naming_with_path_tricks_is_refused(tmp_path, kwargs):
    with pytest.raises(ValueError, match=r"^step_(format|prefix) "):
        jaxckpt.CheckpointManager(tmp_path / "run", **kwargs)
    assert not os.path.exists(tmp_path / "run")


def test_nul_bytes_in_paths_are_refused(tmp_path):
    tree = {"a": np.arange(3)}
    with jaxckpt.AsyncCheckpointer() as ck:
        for call in (lambda: jaxckpt.save(f"{tmp_path}/x\x00y", tree),
                     lambda: jaxckpt.CheckpointManager(f"{tmp_path}/x\x00y"),
                     lambda: ck.save(f"{tmp_path}/x\x00y", tree)):  # on the calling thread
            with pytest.raises(jaxckpt.UnsupportedLocationError, match="a path cannot hold a NUL character"):
                call()
    with pytest.raises(jaxckpt.UnsupportedLocationError, match="a path cannot hold a NUL character"):
        jaxckpt.restore(f"{tmp_path}/x\x00y")  # the same error as the save's (it was CheckpointNotFoundError)
    assert os.listdir(tmp_path) == []


# =========================================================================== path tricks: the lock file
def _lock_cases(tmp_path) -> dict:
    me = socket.gethostname()
    rec = {"kind": "jaxckpt-lock", "host": me, "pid": 1, "start": None, "token": "t", "time": 0.0}
    return {
        "time_nan": msgpack.packb(dict(rec, time=float("nan"))),
        "time_huge": msgpack.packb(dict(rec, time=1e300)),
        "pid_huge": msgpack.packb(dict(rec, pid=2**62)),
        "pid_negative": msgpack.packb(dict(rec, pid=-5)),
        "pid_str": msgpack.packb(dict(rec, pid="../1")),
        "host_nul": msgpack.packb(dict(rec, host="a\x00b")),
        "not_a_map": msgpack.packb([1, 2]),
        "wrong_kind": msgpack.packb(dict(rec, kind="pickle")),
        "garbage": b"\x80\x04\x95 not msgpack",
        "empty": b"",
        "deep": b"\x91" * 4000 + b"\xc0",
        "too_big": msgpack.packb(dict(rec, pad="x" * 5000)),
    }


LOCK_CASES = ["time_nan", "time_huge", "pid_huge", "pid_negative", "pid_str", "host_nul", "not_a_map", "wrong_kind",
              "garbage", "empty", "deep", "too_big", "symlink_out", "symlink_dangling", "fifo", "directory"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", LOCK_CASES)
def test_hostile_lock_file(tmp_path, case):
    """A lock file that is hostile or damaged refuses the writer with
    CheckpointLockedError (never another error, never a hang), and is never
    followed, rewritten or removed; a read-only follower is unaffected."""
    d = str(tmp_path / "run")
    with tw.open_manager(d) as mgr:
        mgr.save(1, values(1))
    lock_path = os.path.join(d, lock.LOCK_NAME)
    outside = tmp_path / "outside"
    outside.write_bytes(b"precious")
    if case == "symlink_out":
        os.symlink(outside, lock_path)
    elif case == "symlink_dangling":
        os.symlink(tmp_path / "nowhere", lock_path)
    elif case == "fifo":
        os.mkfifo(lock_path)
    elif case == "directory":
        os.mkdir(lock_path)
    else:
        with open(lock_path, "wb") as f:
            f.write(_lock_cases(tmp_path)[case])
    before = os.lstat(lock_path)
    with pytest.raises(jaxckpt.CheckpointLockedError) as e:
        jaxckpt.CheckpointManager(d, save_on_preemption=False)
    assert str(e.value).startswith(f"{lock_path}: ")
    after = os.lstat(lock_path)
    assert (after.st_ino, after.st_mode, after.st_size, after.st_mtime_ns) == \
           (before.st_ino, before.st_mode, before.st_size, before.st_mtime_ns)
    assert outside.read_bytes() == b"precious" and sorted(os.listdir(d)) == [lock.LOCK_NAME, "1"]
    with jaxckpt.CheckpointManager(d, read_only=True) as ro:
        assert same(ro.restore(), values(1))


def test_lock_leftovers_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    """The lock's temporary files: a dead writer's (or an empty one: killed
    between creating and writing it) are removed when the lock is taken; a
    live process's is kept; a look-alike that is a symlink is not followed."""
    d = str(tmp_path / "run")
    os.mkdir(d)
    dead = lock.lock_record("d" * 32)
    dead["pid"], dead["start"] = 2**22 + 7, None
    live = lock.lock_record("a" * 32)  # this process
    posixfs.write_file(d, f"{lock.LOCK_NAME}.{'d' * 32}", msgpack.packb(dead))
    posixfs.write_file(d, f"{lock.LOCK_NAME}.stale-{'e' * 16}", msgpack.packb(dead))
    posixfs.write_file(d, f"{lock.LOCK_NAME}.{'0' * 32}", b"")
    posixfs.write_file(d, f"{lock.LOCK_NAME}.{'a' * 32}", msgpack.packb(live))
    (tmp_path / "precious").write_bytes(msgpack.packb(dead))
    os.symlink(tmp_path / "precious", os.path.join(d, f"{lock.LOCK_NAME}.{'b' * 32}"))
    with tw.open_manager(d):
        pass
    assert sorted(os.listdir(d)) == [f"{lock.LOCK_NAME}.{'a' * 32}", f"{lock.LOCK_NAME}.{'b' * 32}"]
    assert (tmp_path / "precious").read_bytes() == msgpack.packb(dead)


def test_fuzz_foreign_files(tmp_path):
    """Mutated MindSpore (plain, crc, encrypted), safetensors and flax files
    (issue 17): every read returns or raises a CheckpointError, within 2 GiB
    of address space (tests/fuzz_foreign_worker.py)."""
    n = 50_000 if LONG else 3000
    work = tmp_path / "work"
    work.mkdir()
    out = subprocess.run([sys.executable, os.path.join(HERE, "fuzz_foreign_worker.py"), str(n), "17", str(work)],
                         capture_output=True, text=True, timeout=3600 if LONG else 180,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-20000:]
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\nfuzz foreign: {stats}")
    assert stats["examples"] >= n and min(stats[f] for f in ("mindspore", "safetensors", "flax")) > n // 10
    assert stats["load_refused"] > n // 4 and stats["load_ok"] > 0  # both outcomes were reached
