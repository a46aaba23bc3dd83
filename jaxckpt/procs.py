"""Process liveness: is the writer that left a file behind still running?

A record ``{"host", "pid", "start"}`` (``identity()``) names a process; the
start time (clock ticks since boot, Linux ``/proc``) tells it from a later
process that got the same pid. Used by the owner marker of temporary
checkpoint directories and by the writer lock.
"""

from __future__ import annotations

import os
import socket


def _proc_stat(pid: int) -> tuple[bytes, int] | None:
    """(state, start time in clock ticks since boot) from Linux /proc, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        fields = data[data.rindex(b")") + 2:].split()  # the command name may hold spaces and ')'
        return fields[0], int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def process_start(pid: int) -> int | None:
    st = _proc_stat(pid)
    return st[1] if st else None


def identity() -> dict:
    """This process as a record: host name, pid, start time."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": process_start(pid)}


def is_this_process(rec: dict) -> bool:
    return rec.get("host") == socket.gethostname() and rec.get("pid") == os.getpid()


def process_alive(host: object, pid: object, start: object) -> bool:
    """False only when sure the process is gone: same host, and the pid no longer
    exists, is a zombie, or now belongs to a process started later (pid reuse)."""
    if host != socket.gethostname() or type(pid) is not int or not 0 < pid < 2**31:  # (os.kill: C int)
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except OSError:
        return True
    st = _proc_stat(pid)
    if st is not None and (st[0] == b"Z" or (type(start) is int and st[1] != start)):
        return False
    return True


def record_alive(rec: object) -> bool:
    """``process_alive`` of a record read from disk (anything but a dict: gone)."""
    return isinstance(rec, dict) and process_alive(rec.get("host"), rec.get("pid"), rec.get("start"))
