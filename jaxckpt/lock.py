"""The writer lock of a checkpoint directory on a POSIX file system: one
``CheckpointManager`` writes to a directory at a time.

The lock is a file ``.jaxckpt-lock`` holding a msgpack record ``{"kind":
"jaxckpt-lock", "host", "pid", "start", "token", "time"}``, created with its
content in one atomic step (a hard link of a fully written temporary file).
A lock whose holder is provably gone (same host, process no longer alive:
``procs.process_alive``) is taken over; a live one, or one held from another
host, is refused with ``CheckpointLockedError``.
"""

from __future__ import annotations

import errno
import os
import re
import time
import uuid

import msgpack

from jaxckpt import display
from jaxckpt import posixfs
from jaxckpt import procs
from jaxckpt.errors import CheckpointLockedError, CorruptCheckpointError

LOCK_NAME = ".jaxckpt-lock"
_LOCK_KIND = "jaxckpt-lock"
_LEFTOVER_RE = re.compile(r"^\.jaxckpt-lock\.(?:stale-[0-9a-f]{16}|[0-9a-f]{32})$")


def lock_record(token: str) -> dict:
    return {"kind": _LOCK_KIND, **procs.identity(), "token": token, "time": time.time()}


def read_lock(directory: str) -> dict | None:
    """The lock holder's record, or None when the directory is not locked."""
    path = os.path.join(directory, LOCK_NAME)
    try:
        rec = msgpack.unpackb(posixfs.read_small(directory, LOCK_NAME, posixfs.RECORD_CAP), raw=False)
    except CorruptCheckpointError as e:
        if not os.path.lexists(path):
            return None
        raise CheckpointLockedError(f"{path}: unreadable lock file ({e}); if no writer uses this directory, "
                                    "delete the file") from None
    except (ValueError, msgpack.UnpackException) as e:
        rec = e
    if not isinstance(rec, dict) or rec.get("kind") != _LOCK_KIND:
        raise CheckpointLockedError(f"{path}: not a valid jaxckpt lock file; if no writer uses this directory, "
                                    "delete the file")
    return rec


def _create(directory: str, token: str, mode: int | None) -> bool:
    """Create the lock file with its content in one atomic step (hard link of a
    fully written file); False when it exists already."""
    path = os.path.join(directory, LOCK_NAME)
    data = msgpack.packb(lock_record(token))
    tmp_name = f"{LOCK_NAME}.{token}"
    try:
        posixfs.write_file(directory, tmp_name, data, mode=mode)
        try:
            os.link(os.path.join(directory, tmp_name), path)
        except (FileExistsError, FileNotFoundError):  # ENOENT: the new holder removed our empty temp file
            return False
        except OSError as e:  # a filesystem without hard links: exclusive create in place
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            return _create_exclusive(path, data, mode)
    finally:
        try:
            os.unlink(os.path.join(directory, tmp_name))
        except OSError:
            pass
    posixfs.fsync_dir(directory)
    return True


def _create_exclusive(path: str, data: bytes, mode: int | None) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    except FileExistsError:
        return False
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def _take_over(directory: str, stale: dict) -> None:
    """Remove a stale lock, unless a competitor replaced it meanwhile (then put theirs back)."""
    path = os.path.join(directory, LOCK_NAME)
    aside = os.path.join(directory, f"{LOCK_NAME}.stale-{uuid.uuid4().hex[:16]}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    moved = posixfs.read_record(directory, os.path.basename(aside))
    if not (isinstance(moved, dict) and moved.get("token") == stale.get("token")):
        try:
            os.link(aside, path)
        except OSError:
            pass
    try:
        os.unlink(aside)
    except FileNotFoundError:  # removed by _clean_leftovers of a writer that got the lock meanwhile
        pass


def _clean_leftovers(directory: str) -> None:
    """Remove the lock's temporary files (``_create``, ``_take_over``) that a
    writer killed while taking the lock left behind: only those whose
    recorded process is gone, so a competitor's file in use is never touched."""
    for entry in posixfs.list_entries(directory):
        if not _LEFTOVER_RE.match(entry):
            continue
        try:
            data = posixfs.read_small(directory, entry, posixfs.RECORD_CAP)
            # Empty: its writer was killed between creating and writing it (a
            # competitor's file caught in that instant makes its link fail: it retries).
            rec = msgpack.unpackb(data, raw=False) if data else None
        except (OSError, ValueError, CorruptCheckpointError, msgpack.UnpackException):
            continue
        if rec is None or (isinstance(rec, dict) and rec.get("kind") == _LOCK_KIND and not procs.record_alive(rec)):
            try:
                os.unlink(os.path.join(directory, entry))
            except OSError:
                pass


def _held_message(directory: str, holder: dict) -> str:
    path = os.path.join(directory, LOCK_NAME)
    when = holder.get("time")
    shown = display.local_time(when, invalid="") if isinstance(when, (int, float)) else ""
    since = f" since {shown}" if shown else ""
    who = f"host {holder.get('host')!r}, pid {holder.get('pid')}{since}"
    if procs.is_this_process(holder):
        return (f"{path}: this process already writes to this directory ({who}): close the other "
                "CheckpointManager first, or open this one with read_only=True")
    return (f"{path}: the directory is locked by another writer ({who}); one writer at a time. Open it with "
            "read_only=True to follow that writer; if that process is gone (on another host), delete the lock file")


def acquire(directory: str, mode: int | None = None) -> tuple[str, dict | None]:
    """Take the directory's writer lock. Returns ``(token, stale)``: the token to
    release it with, and the record of a dead holder whose lock was taken over
    (None if there was none). Raises ``CheckpointLockedError`` while a live
    process (or one on another host, whose liveness we cannot check) holds it."""
    token = uuid.uuid4().hex
    stale = None
    for _ in range(5):
        try:
            created = _create(directory, token, mode)
            if created:
                _clean_leftovers(directory)
        except BaseException:  # failed after the lock was made: do not leave it held by nobody's token
            release(directory, token)
            raise
        if created:
            return token, stale
        holder = read_lock(directory)
        if holder is None:
            continue  # released meanwhile
        if procs.record_alive(holder):
            raise CheckpointLockedError(_held_message(directory, holder))
        _take_over(directory, holder)
        stale = holder
    raise CheckpointLockedError(f"{os.path.join(directory, LOCK_NAME)}: could not take the lock: other processes "
                                "keep competing for it")


def release(directory: str, token: str) -> None:
    """Remove the lock if it is still ours."""
    try:
        holder = read_lock(directory)
    except CheckpointLockedError:
        return
    if holder is not None and holder.get("token") == token:
        try:
            os.unlink(os.path.join(directory, LOCK_NAME))
        except FileNotFoundError:
            pass
