"""Concurrency (issue 6): two writers on one directory, read-only followers
polling while a writer saves and rotates, restores while a save is in flight.

A follower must never see a partial step, and must never fail because the
writer's retention deleted a step under it: ``restore()`` of the latest then
moves on to the newer latest, and asking for a step that is gone raises
``CheckpointNotFoundError`` saying so, never ``CorruptCheckpointError``.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time

import pytest

import jaxckpt
from jaxckpt import reader as reader_mod
from jaxckpt import lock, posixdirs

import torture_worker as tw
from torture_worker import LONG, aux_entries, big_values, same, values


# =========================================================================== two writers
def test_racing_writers_exactly_one_wins(server, tmp_path):
    """Four processes open a writer on the same directory at the same instant,
    five rounds: each round exactly one wins, the others are refused with
    CheckpointLockedError naming the winner; the next round starts after the
    winner closed."""
    d = str(tmp_path / "run")
    os.mkdir(d)
    contenders = 4
    for rnd in range(1, 6):
        start, release = str(tmp_path / f"start-{rnd}"), str(tmp_path / f"release-{rnd}")
        logs = [str(tmp_path / f"r{rnd}-{i}.log") for i in range(contenders)]
        pids = [server.fork("lock_race", dir=d, log=log, start=start, release=release, step=rnd) for log in logs]
        while not all(tw.read_log(log) for log in logs):  # every contender is waiting
            time.sleep(0.001)
        open(start, "w").close()
        events = []
        while True:
            events = [tw.read_log(log) for log in logs]
            assert not [e for ev in events for e in ev if e["event"] == "error"], events
            if all(len(e) >= 2 for e in events):
                break
            time.sleep(0.001)
        winners = [e[1]["pid"] for e in events if e[1]["event"] == "writer"]
        refused = [e[1]["error"] for e in events if e[1]["event"] == "refused"]
        assert len(winners) == 1 and len(refused) == contenders - 1, events
        for msg in refused:
            assert msg.startswith(f"{d}/{lock.LOCK_NAME}: the directory is locked by another writer "
                                  f"(host {socket.gethostname()!r}, pid {winners[0]} since "), msg
        with pytest.raises(jaxckpt.CheckpointLockedError):  # this process is refused too
            jaxckpt.CheckpointManager(d)
        open(release, "w").close()
        for pid in pids:
            assert server.reap(pid) == {"code": 0, "signal": None}
        assert not os.path.exists(os.path.join(d, lock.LOCK_NAME))
        with jaxckpt.CheckpointManager(d, read_only=True) as ro:
            assert ro.all_steps() == list(range(1, rnd + 1))


def test_second_manager_in_one_process_is_refused_until_the_first_closes(tmp_path):
    d = str(tmp_path / "run")
    first = jaxckpt.CheckpointManager(d, save_on_preemption=False)
    with pytest.raises(jaxckpt.CheckpointLockedError, match="this process already writes to this directory"):
        jaxckpt.CheckpointManager(d, save_on_preemption=False)
    first.save(1, values(1))
    first.close()
    with jaxckpt.CheckpointManager(d, save_on_preemption=False) as second:
        assert second.all_steps() == [1]


# =========================================================================== followers
def test_follower_polls_while_a_writer_saves_and_rotates(server, tmp_path):
    """A writer process saves steps 1..N (every step, async, max_to_keep=1,
    ~1 MiB each); this process follows it read-only: reload, restore the
    latest, restore every listed step, read their metadata. Every restore is
    bit-exact; a step deleted under the follower is reported as gone."""
    d = str(tmp_path / "run")
    steps = 400 if LONG else 60
    size = 1 << 20
    log = str(tmp_path / "writer.log")
    pid = server.fork("writer", dir=d, log=log, steps=steps, keep=1, size=size)
    stats = {"polls": 0, "restores": 0, "gone": 0, "latest_moved": 0}
    try:
        while not os.path.isdir(d):
            time.sleep(0.001)
        with jaxckpt.CheckpointManager(d, read_only=True) as ro:
            done = False
            while not done:
                done = any(e["event"] in ("done", "error") for e in tw.read_log(log))
                ro.reload()
                stats["polls"] += 1
                listed = ro.all_steps()
                if not listed:
                    time.sleep(0.005)
                    continue
                assert len(listed) <= 2  # max_to_keep=1, plus one committed before its rotation
                got = ro.restore()
                s = ro.restored_step
                assert s >= listed[-1]
                stats["latest_moved"] += s > listed[-1]
                assert same(got, big_values(s, size)), s
                stats["restores"] += 1
                for s in listed:
                    try:
                        assert same(ro.restore(s), big_values(s, size)), s
                        assert ro.metadata(s).step == s
                    except jaxckpt.CheckpointNotFoundError as e:
                        # deleted while being read, or noticed gone by an earlier call since ``listed``
                        assert re.fullmatch(rf"{re.escape(d)}: step {s} (was deleted \(by the writer's retention "
                                            r"rules\) while being read|is not a committed checkpoint here .*)",
                                            str(e)), str(e)
                        stats["gone"] += 1
                        assert s not in ro.all_steps()
    finally:
        status = server.reap(pid)
    events = tw.read_log(log)
    assert status == {"code": 0, "signal": None}, events[-1]
    assert events[-1]["event"] == "done"
    print(f"\nfollower: {stats}")
    assert stats["restores"] >= 10


# --------------------------------------------------------------------------- deterministic deletions under a reader
@pytest.fixture
def writer_and_follower(tmp_path):
    d = str(tmp_path / "run")
    w = jaxckpt.CheckpointManager(d, max_to_keep=1, save_on_preemption=False)
    w.save(1, values(1))
    w.wait_until_finished()
    r = jaxckpt.CheckpointManager(d, read_only=True)
    yield d, w, r
    r.close()
    w.close()


def _rotate_when_reading_data(monkeypatch, writer, steps):
    """When the follower first opens a data file, the writer saves ``steps``
    (each rotation deleting the previous): the manifest was read, the data
    is gone."""
    real = reader_mod.CheckpointReader._file
    state = {"armed": True}

    def opened(self, file):
        if state["armed"]:
            state["armed"] = False
            for s in steps:
                writer.save(s, values(s))
                writer.wait_until_finished()
        return real(self, file)

    monkeypatch.setattr(reader_mod.CheckpointReader, "_file", opened)
    return state


def test_latest_deleted_while_being_restored(writer_and_follower, monkeypatch):
    d, w, r = writer_and_follower
    assert r.all_steps() == [1]
    _rotate_when_reading_data(monkeypatch, w, [2, 3])
    got = r.restore()  # step 1 vanishes mid-read: the follower moves on to the newest
    assert r.restored_step == 3 and same(got, values(3))
    assert r.all_steps() == [3]


def test_explicit_step_deleted_while_being_restored(writer_and_follower, monkeypatch):
    d, w, r = writer_and_follower
    _rotate_when_reading_data(monkeypatch, w, [2])
    with pytest.raises(jaxckpt.CheckpointNotFoundError) as e:
        r.restore(1)
    assert str(e.value) == f"{d}: step 1 was deleted (by the writer's retention rules) while being read"
    assert r.all_steps() == [2]
    with pytest.raises(jaxckpt.CheckpointNotFoundError, match="step 1 is not a committed checkpoint here"):
        r.restore(1)


def test_fallback_restore_skips_steps_deleted_under_it(writer_and_follower, monkeypatch):
    d, w, r = writer_and_follower
    _rotate_when_reading_data(monkeypatch, w, [2])
    assert same(r.restore(fallback=True), values(2)) and r.restored_step == 2


def test_metadata_of_a_step_deleted_meanwhile(writer_and_follower):
    d, w, r = writer_and_follower
    w.save(2, values(2))
    w.wait_until_finished()
    assert r.all_steps() == [1]  # not reloaded: step 1 is gone from disk
    with pytest.raises(jaxckpt.CheckpointNotFoundError) as e:
        r.metadata(1)
    assert str(e.value) == f"{d}: step 1 was deleted (by the writer's retention rules) while being read"
    assert same(r.restore(), values(2)) and r.restored_step == 2


def test_damaged_step_is_not_mistaken_for_a_deleted_one(writer_and_follower):
    """Only a step whose directory is gone counts as deleted: a step directory
    that lost its data file is damage, reported as such."""
    d, w, r = writer_and_follower
    data = os.path.join(d, "1", "data-00000.bin")
    os.rename(data, data + ".moved")
    with pytest.raises(jaxckpt.CorruptCheckpointError, match=r"data-00000.bin: file is missing"):
        r.restore()
    os.unlink(os.path.join(d, "1", "manifest.msgpack"))
    with pytest.raises(jaxckpt.CheckpointNotFoundError,
                       match=r"not a committed checkpoint \(manifest.msgpack is missing\)"):
        r.restore()
    os.unlink(data + ".moved")  # an empty directory is nothing, as a save that may take it sees it
    with pytest.raises(jaxckpt.CheckpointNotFoundError, match=r"run: no committed checkpoint$"):
        r.restore()


# =========================================================================== restore while a save is in flight
@pytest.fixture
def held_commit(monkeypatch):
    """Hold the next commit (data and manifest written) until released."""
    gate, reached = threading.Event(), threading.Event()
    real = posixdirs.commit

    def commit(tmp, final, overwrite):
        reached.set()
        assert gate.wait(60)
        return real(tmp, final, overwrite)

    monkeypatch.setattr(posixdirs, "commit", commit)
    yield gate, reached
    gate.set()


def test_follower_restores_the_previous_step_while_a_save_is_in_flight(tmp_path, held_commit):
    gate, reached = held_commit
    d = str(tmp_path / "run")
    gate.set()
    with tw.open_manager(d) as w, jaxckpt.CheckpointManager(d, read_only=True) as r:
        w.save(1, values(1))
        w.wait_until_finished()
        gate.clear()
        reached.clear()
        w.save(2, values(2))
        assert reached.wait(60)  # step 2 is fully written, not committed
        assert [e for e in aux_entries(d) if ".2.jaxckpt-tmp-" in e]
        r.reload()
        assert r.all_steps() == [1] and same(r.restore(), values(1)) and r.restored_step == 1
        assert w.latest_step() == 1
        gate.set()
        w.wait_until_finished()
        r.reload()
        assert same(r.restore(), values(2)) and r.restored_step == 2


def test_writer_restore_of_an_older_step_while_a_save_is_in_flight(tmp_path, held_commit):
    gate, reached = held_commit
    d = str(tmp_path / "run")
    gate.set()
    with tw.open_manager(d) as w:
        w.save(1, values(1))
        w.save(2, values(2))
        w.wait_until_finished()
        gate.clear()
        w.save(3, values(3))
        assert reached.wait(60)
        result = {}
        t = threading.Thread(target=lambda: result.update(got=w.restore(2)))
        t.start()
        t.join(0.3)
        assert t.is_alive()  # the restore waits for the save in flight
        gate.set()
        t.join(60)
        assert same(result["got"], values(2)) and w.all_steps() == [2, 3]


def test_restore_while_the_save_in_flight_fails(tmp_path, monkeypatch):
    """The save in flight fails: restore() returns the previous latest, and
    the save's error is still raised, once, by the next wait."""
    d = str(tmp_path / "run")
    with tw.open_manager(d) as w:
        w.save(1, values(1))
        w.wait_until_finished()

        def failing(tmp, final, overwrite):
            time.sleep(0.2)
            raise OSError(5, "Input/output error", final)

        monkeypatch.setattr(posixdirs, "commit", failing)
        w.save(2, values(2))
        assert same(w.restore(), values(1)) and w.restored_step == 1
        with pytest.raises(OSError, match=r"Input/output error"):
            w.wait_until_finished()
        w.wait_until_finished()
        monkeypatch.undo()
        assert w.save(2, values(2))
    assert sorted(os.listdir(d)) == ["1", "2"]
