"""The writer lock of a directory of checkpoints in a bucket: a lease.

The lock is one object ``<root>/.jaxckpt-lock`` holding a msgpack record
``{"kind": "jaxckpt-lease", "host", "pid", "start", "token", "time",
"expires"}``. It is taken with a conditional create (``If-None-Match: *``, or
``ifGenerationMatch=0`` on GCS), so two writers can never both hold it, and
renewed by its holder every third of the lease with a conditional update
against the version it last wrote. A lease that has expired (by more than a
second lease of grace, for clocks that disagree) or whose holder is provably
gone (same host, process no longer alive) is taken over with a conditional
update of the version that was read, so two takers cannot both win. A holder
that cannot renew in time, or finds the lock taken, marks its lease lost;
the backend then refuses to commit through it.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid

import msgpack

from jaxckpt import display
from jaxckpt import procs
from jaxckpt.errors import CheckpointLockedError
from jaxckpt.objclient import Conflict, NotFound, ObjectClient

LOCK_NAME = ".jaxckpt-lock"
KIND = "jaxckpt-lease"
RECORD_CAP = 64 << 10
logger = logging.getLogger("jaxckpt")


def _record(token: str, seconds: float) -> bytes:
    now = time.time()
    return msgpack.packb({"kind": KIND, **procs.identity(), "token": token, "time": now, "expires": now + seconds})


def read(client: ObjectClient, key: str) -> tuple[dict | None, str | None]:
    """The holder's record and its version, or (None, None) when unlocked."""
    try:
        data, version = client.get(key, RECORD_CAP)
    except NotFound:
        return None, None
    except ValueError:
        data, version = b"", None
    try:
        rec = msgpack.unpackb(data, raw=False)
    except (ValueError, msgpack.UnpackException):
        rec = None
    if not isinstance(rec, dict) or rec.get("kind") != KIND:
        raise CheckpointLockedError(f"{client.describe(key)}: not a valid jaxckpt lock object; if no writer uses "
                                    "this directory, delete the object")
    return rec, version


def is_stale(rec: dict, now: float | None = None) -> bool:
    """Whether the lease ``rec`` may be taken over: expired by more than a lease of grace, or its holder gone."""
    now = time.time() if now is None else now
    expires, started = rec.get("expires"), rec.get("time")
    if isinstance(expires, (int, float)) and isinstance(started, (int, float)):
        if now > expires + (expires - started):
            return True
    return not procs.record_alive(rec)


def _describe_holder(rec: dict) -> str:
    expires = rec.get("expires")
    until = display.local_time(expires) if isinstance(expires, (int, float)) else "?"
    return f"host {rec.get('host')!r}, pid {rec.get('pid')}, lease until {until}"


class Lease:
    """A held lock, renewed on a daemon thread until ``release``."""

    def __init__(self, client: ObjectClient, key: str, token: str, version: str, seconds: float):
        self.client, self.key, self.token, self.seconds = client, key, token, seconds
        self._version = version
        self._renewed = time.monotonic()
        self._stop = threading.Event()
        self.lost: str | None = None  # why the lease was lost, once it is
        self._thread = threading.Thread(target=self._run, name="jaxckpt-lease", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                self._version = self.client.put(self.key, _record(self.token, self.seconds), if_match=self._version)
                self._renewed = time.monotonic()
            except (Conflict, NotFound):
                self._lose("another writer took the lock over")
                return
            except Exception as e:  # a transient failure: try again at the next tick, until the lease runs out
                if time.monotonic() - self._renewed > self.seconds:
                    self._lose(f"could not renew the lease in time ({e})")
                    return

    def _lose(self, why: str) -> None:
        self.lost = why
        logger.error("jaxckpt: lost the writer lock %s: %s; saves through it will not commit",
                     self.client.describe(self.key), why)

    def check(self) -> None:
        """Raise ``CheckpointLockedError`` if the lease is lost (or has run out unrenewed)."""
        if self.lost is None and time.monotonic() - self._renewed > self.seconds:
            self.lost = "the lease ran out before it could be renewed"
        if self.lost is not None:
            raise CheckpointLockedError(f"{self.client.describe(self.key)}: this writer lost the lock "
                                        f"({self.lost}); refusing to commit")

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.seconds)
        if self.lost is not None:
            return
        rec, _ = read(self.client, self.key)
        if rec is not None and rec.get("token") == self.token:
            self.client.delete([self.key])


def acquire(client: ObjectClient, key: str, seconds: float) -> tuple[Lease, dict | None]:
    """Take the lock: ``(lease, the stale holder's record or None)``;
    ``CheckpointLockedError`` while a live holder's lease runs."""
    token = uuid.uuid4().hex
    for _ in range(3):  # the holder may release between our create and our read
        try:
            version = client.put(key, _record(token, seconds), create=True)
            return Lease(client, key, token, version, seconds), None
        except Conflict:
            pass
        rec, version = read(client, key)
        if rec is None:
            continue
        if not is_stale(rec):
            raise CheckpointLockedError(f"{client.describe(key)}: another writer holds this directory "
                                        f"({_describe_holder(rec)})")
        try:
            version = client.put(key, _record(token, seconds), if_match=version)
        except (Conflict, NotFound):
            raise CheckpointLockedError(f"{client.describe(key)}: another writer took the stale lock over "
                                        "at the same time") from None
        return Lease(client, key, token, version, seconds), rec
    raise CheckpointLockedError(f"{client.describe(key)}: the lock kept changing hands; try again")
