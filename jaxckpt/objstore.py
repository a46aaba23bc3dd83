"""The object-store backend: checkpoints as key prefixes in a bucket.

A checkpoint at ``s3://bucket/run/100`` is the objects under ``run/100/``:

* the manifest (``format.MANIFEST_NAME``): the commit. Published last, in one PUT, with a
  conditional create (it exists only if no checkpoint does) or, for an
  overwrite, a conditional update of the version it replaces. A prefix
  without it is not a checkpoint: never listed, read or counted.
* ``data-<process>-<attempt>.bin``: each process's data, one object per
  process, uploaded as a multipart stream straight from the snapshot's host
  buffers; where the client sets ``file_bytes`` (GCS), several objects of
  about that size, ``data-<process>-<part>-<attempt>.bin`` after the first,
  each uploaded in one request. Names are unique to the save attempt (16 hex digits), so an
  overwrite never touches the data the old manifest names; that data is
  deleted after the new manifest is published.
* ``.jaxckpt-tmp-<attempt>``: the marker of a save in flight (who writes it,
  under which lock), put first and deleted after the commit, so that a later
  cleaner can tell a live save from an abandoned one.

A single file (a foreign checkpoint: safetensors, MindSpore, flax msgpack)
is one plain object (``jaxckpt/objfiles.py``, which also holds the ranged
reads of data objects).

Deleting a checkpoint deletes its manifest first (after which it is no
checkpoint), then the rest. The lock of a directory of checkpoints is a
lease object (``jaxckpt/objlock.py``). Implements ``storage.Backend`` over
an ``objclient.ObjectClient`` (``s3client``, ``gcsclient``).
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from typing import Any, BinaryIO, Callable, Iterable

import msgpack

from jaxckpt import config
from jaxckpt import objclient
from jaxckpt import objfiles
from jaxckpt import objlock
from jaxckpt import procs
from jaxckpt import storage
from jaxckpt.errors import (CheckpointError, CheckpointExistsError, CheckpointNotFoundError,
                            CorruptCheckpointError)
from jaxckpt.format import MANIFEST_NAME
from jaxckpt.objclient import Conflict, NotFound, ObjectClient
from jaxckpt.objfiles import key_of
from jaxckpt.storage import Location

MARK = ".jaxckpt-tmp-"
_ATTEMPT = r"[0-9a-f]{16}"
_OURS_RE = re.compile(rf"^(?:data-\d{{5}}(?:-\d{{5}})?-(?P<data>{_ATTEMPT})\.bin(?:\.part-\d{{5}})?|"
                      rf"\.jaxckpt-tmp-(?P<mark>{_ATTEMPT}))$")
_NAMED_RE = re.compile(rb"data-\d{5}(?:-\d{5})?-(" + _ATTEMPT.encode() + rb")\.bin")
MARKER_CAP = 64 << 10
OVERWRITE_TRIES = 5  # an overwrite that loses the race to another writer's commit tries this often in all
UNMANAGED_STALE_SECONDS = 24 * 3600  # a save's marker written outside any lock is abandoned after this long
logger = logging.getLogger("jaxckpt")



def _join(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


def _attempt_of(name: str) -> str | None:
    m = _OURS_RE.match(name)
    return None if m is None else (m.group("data") or m.group("mark"))


# ----------------------------------------------------------------------------- writing
class ObjectSink(storage.DataSink):
    """One data object, uploaded in one streamed (multipart) PUT."""

    direct = False
    sequential = True

    def __init__(self, client: ObjectClient, key: str):
        self.client, self.key = client, key

    def write_stream(self, chunks: Iterable[memoryview], size: int) -> None:
        self.client.put_stream(self.key, chunks, size)

    def pwrite(self, view: memoryview, offset: int, direct: bool = False) -> None:
        raise NotImplementedError("objects are written in order, with write_stream")

    def pwritev(self, views: list, offset: int) -> None:
        raise NotImplementedError("objects are written in order, with write_stream")

    def finish(self, size: int) -> None:
        pass  # the object is durable once its PUT returns

    def close(self) -> None:
        pass


class ObjectStaging(storage.Staging):
    """One save attempt: data objects named with ``attempt``, then the manifest PUT."""

    def __init__(self, backend: "ObjectBackend", loc: Location, attempt: str, bare: bool = False):
        self.backend, self.loc, self.token = backend, loc, attempt
        self._bare = bare  # nothing was under the prefix before this attempt's marker
        self.client = backend.client
        self.file_bytes = self.client.file_bytes
        self.prefix = key_of(loc)
        self._manifest: bytes | None = None
        self._listed: dict[str, objclient.ObjectInfo] | None = None  # check_visible's one listing
        self._listing = threading.Lock()

    def data_name(self, base: str) -> str:
        stem, dot, ext = base.rpartition(".")
        return f"{stem}-{self.token}.{ext}" if dot else f"{base}-{self.token}"

    def create(self, name: str, direct: bool = True) -> ObjectSink:
        return ObjectSink(self.client, _join(self.prefix, name))

    def check_visible(self, name: str, size: int, process: int) -> None:
        """Every process's objects, from one LIST of the prefix (taken once all
        reported their uploads done; a HEAD per object was a request per process
        per save), an object the listing lacks looked up again on its own."""
        key = _join(self.prefix, name)
        with self._listing:
            if self._listed is None:
                self._listed = {o.key: o for o in self.client.list(self.prefix + "/")}
        info = self._listed.get(key) or self.client.head(key)
        if info is None or info.size != size:
            found = "nothing" if info is None else f"{info.size} bytes"
            raise CheckpointError(
                f"process 0 cannot see {self.client.describe(_join(self.prefix, name))} as uploaded by process "
                f"{process} ({size} bytes; found {found}): every process must use the same bucket and endpoint")

    def write_manifest(self, data: bytes) -> None:
        self._manifest = data  # published by commit: the PUT is the commit

    def commit(self, overwrite: bool) -> None:
        self.backend.check_lease(self.loc.parent)
        key = _join(self.prefix, MANIFEST_NAME)
        for tries_left in range(OVERWRITE_TRIES - 1, -1, -1):
            try:
                old = self._replacing(key) if overwrite else None
                if old is None:
                    self.client.put(key, self._manifest, create=True)
                else:
                    self.client.put(key, self._manifest, if_match=old.etag)
                break
            except Conflict:  # another writer committed first: an overwrite replaces it in turn (the last wins)
                if not (overwrite and tries_left):
                    raise CheckpointExistsError(f"{self.loc}: a checkpoint was committed here by another writer "
                                                "meanwhile") from None
        try:
            if self._bare and old is None:  # nothing to replace or left over: no listing
                self.client.delete([_join(self.prefix, MARK + self.token)])
            else:
                self._after_commit(old is not None)
        except Exception as e:  # committed: a leftover is cleaned later, never fatal
            logger.warning("jaxckpt: %s committed, but cleaning up after it failed: %s", self.loc, e)

    def _replacing(self, key: str) -> objclient.ObjectInfo | None:
        """An overwrite's HEAD of the manifest it replaces. Where there is none,
        a prefix holding objects of anything but save attempts is refused, as on
        disk (that LIST also tells whether the commit has anything to clean up)."""
        old = self.client.head(key)
        if old is None:
            objs = self.client.list(self.prefix + "/")
            if _foreign(self.prefix, objs):
                raise CheckpointExistsError.foreign(self.loc)
            self._bare = all(_attempt_of(o.key.rpartition("/")[2]) == self.token or _is_folder(self.prefix, o)
                             for o in objs)
        return old

    def _after_commit(self, replaced: bool) -> None:
        """Delete our marker and the data of attempts the new manifest replaced
        (no live marker); after an overwrite, everything else the prefix held,
        as the replaced directory goes on disk (a checkpoint nested in it
        manifest first). If another save was live meanwhile and its commit
        replaced ours, our data goes too: nothing names it any more."""
        objs = self.client.list(self.prefix + "/")
        names = [o.key[len(self.prefix) + 1:] for o in objs]
        live = {_attempt_of(n) for n in names if n.startswith(MARK)} - {self.token}
        keep = {MANIFEST_NAME} | {n for n in names if _attempt_of(n) in live | {self.token}}
        doomed = [n for n in names if n not in keep and (replaced or _attempt_of(n) is not None)]
        _delete_manifests_first(self.client, [_join(self.prefix, n) for n in doomed + [MARK + self.token]])
        if live and not self._still_ours():
            self.client.delete([_join(self.prefix, n) for n in names
                                if _attempt_of(n) == self.token and not n.startswith(MARK)])

    def _still_ours(self) -> bool:
        """Whether the manifest is still the one this attempt published (its
        bytes: they name this attempt's data); True where it cannot be read."""
        try:
            data, _ = self.client.get(_join(self.prefix, MANIFEST_NAME), len(self._manifest))
        except NotFound:  # deleted meanwhile: whoever deleted it deletes the rest
            return True
        except ValueError:  # larger than ours: another one
            return False
        return data == self._manifest

    def abandon(self) -> None:
        try:
            objs = self.client.list(self.prefix + "/")
            mine = [o.key for o in objs if _attempt_of(o.key.rpartition("/")[2]) == self.token]
            self.client.delete([k for k in mine if not k.endswith(MARK + self.token)])
            self.client.delete([_join(self.prefix, MARK + self.token)])
        except Exception as e:  # the cleaner removes it later
            logger.warning("jaxckpt: could not remove the leftovers of an abandoned save to %s: %s", self.loc, e)


# ----------------------------------------------------------------------------- reading
class ObjectData(objfiles.RangedReads, storage.DataSource):
    """A data object, read with ranged GETs. Opening it sends nothing (a HEAD
    per object was a round trip before the first byte of every restore): a
    missing or short object is found by the GETs that need its bytes, and
    named as the open used to name it."""

    def __init__(self, client: ObjectClient, key: str, size: int, manifest: tuple[str, str | None]):
        self.client, self.key, self.size = client, key, size
        self._manifest = manifest  # (key, version read): whether the checkpoint is still the one being read

    def _get(self, buf: memoryview, offset: int, what: str) -> None:
        where = self.client.describe(self.key)
        detail = what[len(where):].strip() if what.startswith(where) else f"({what})"
        try:
            got = self.client.read_into(self.key, buf, offset)
        except NotFound:
            now = self.client.head(self._manifest[0])
            if now is None or now.etag != self._manifest[1]:  # deleted (a rotation) or overwritten meanwhile
                raise CheckpointNotFoundError(f"{where}: the checkpoint was deleted or replaced while being read "
                                              f"{detail}".rstrip()) from None
            raise CorruptCheckpointError(f"{where}: data object missing (the manifest names it) "
                                         f"{detail}".rstrip()) from None
        if got < len(buf):
            end = f"at byte {offset + got}" if got else f"at or before byte {offset}"
            raise CorruptCheckpointError(f"{where}: truncated: the manifest records {self.size} bytes, the object "
                                         f"ends {end} {detail}".rstrip())

    def readv_into(self, bufs: list[memoryview], offset: int, what: str) -> None:
        total = sum(memoryview(b).nbytes for b in bufs)
        tmp = bytearray(total)
        self.read_into(memoryview(tmp), offset, what)
        pos = 0
        for b in bufs:
            b = memoryview(b).cast("B")
            b[:] = tmp[pos:pos + len(b)]
            pos += len(b)

    def map(self, offset: int, length: int) -> memoryview | None:
        return None

    def close(self) -> None:
        pass


class ObjectSource(storage.Source):
    """A committed checkpoint in a bucket."""

    def __init__(self, client: ObjectClient, loc: Location):
        # Nothing is sent yet: read_manifest's GET says whether a checkpoint is committed here.
        self.client, self.location = client, loc
        self.prefix = key_of(loc)
        self._version: str | None = None  # of the manifest read

    def read_manifest(self, cap: int) -> bytes:
        key = _join(self.prefix, MANIFEST_NAME)
        try:
            data, self._version = self.client.get(key, cap)
            return data
        except NotFound:
            self.client.check_bucket()
            raise CheckpointNotFoundError(f"{self.location}: no committed checkpoint here "
                                          f"({MANIFEST_NAME} is missing)") from None
        except ValueError as e:
            raise CorruptCheckpointError(f"{self.client.describe(key)}: manifest too large: {e}") from None

    def open_data(self, name: str, size: int) -> ObjectData:
        manifest = (_join(self.prefix, MANIFEST_NAME), self._version)
        return ObjectData(self.client, _join(self.prefix, name), size, manifest)

    def describe(self, name: str) -> str:
        return self.client.describe(_join(self.prefix, name))


# ----------------------------------------------------------------------------- the backend
def _marker(lock_token: str | None) -> bytes:
    return msgpack.packb({"kind": "jaxckpt-save", **procs.identity(), "time": time.time(), "lock": lock_token})


def _foreign(prefix: str, objs: list[objclient.ObjectInfo]) -> bool:
    """Whether any of ``objs`` (under ``prefix``) is not an object of a save
    attempt. A zero-byte ``prefix/`` (the folder a console's "Create folder"
    makes) is no more than the empty directory a save may take on disk."""
    return any(_attempt_of(o.key[len(prefix) + 1:]) is None and not _is_folder(prefix, o) for o in objs)


def _delete_manifests_first(client: ObjectClient, keys: list[str]) -> None:
    """Delete ``keys``: the manifests among them first, so that a checkpoint nested in what is deleted
    is un-committed before its data goes (a crash between leaves no listed checkpoint without data)."""
    manifests = [k for k in keys if k.rpartition("/")[2] == MANIFEST_NAME]
    if manifests:
        client.delete(manifests)
    client.delete([k for k in keys if k.rpartition("/")[2] != MANIFEST_NAME])


def _is_folder(prefix: str, o: objclient.ObjectInfo) -> bool:
    return o.size == 0 and o.key in (prefix, prefix + "/")  # obstore lists 'name/' as 'name'


def _committed(prefix: str, children: dict[str, list[objclient.ObjectInfo]], accept: Callable[[str], Any]
               ) -> list[str]:
    """The names among ``children`` (objects by name under ``prefix``) that
    ``accept`` recognises and whose manifest is there."""
    return [name for name, objs in children.items()
            if accept(name) and any(o.key == _join(_join(prefix, name), MANIFEST_NAME) for o in objs)]


class ObjectBackend(storage.Backend):
    """One bucket of one object store, through ``client``; one that replaces
    ``previous`` (the same bucket and options, a changed environment) shares
    the leases this process holds there."""

    def __init__(self, client: ObjectClient, previous: storage.Backend | None = None):
        self.client = client
        # root key -> the lease this process holds on it
        self._leases: dict[str, objlock.Lease] = previous._leases if isinstance(previous, ObjectBackend) else {}

    # ------------------------------------------------------------ saves
    def exists(self, loc: Location) -> bool:
        """A committed checkpoint, or objects not ours (a save in flight, whose
        marker and data are ours, does not count: the other processes of a
        multi-process save check after process 0 began it). One LIST, which
        shows the manifest too: listings are strongly consistent on S3, GCS and
        Azure, and the commit's conditional create refuses a late rival anyway."""
        prefix = key_of(loc)
        if not prefix:
            return self.is_committed(loc)  # the bucket's root, which begin_save refuses
        return _foreign(prefix, self.client.list(prefix + "/"))

    def is_committed(self, loc: Location, follow: bool = False) -> bool:
        return self.client.head(_join(key_of(loc), MANIFEST_NAME)) is not None

    def begin_save(self, loc: Location, attempt: str | None = None,
                   modes: storage.Modes = storage.Modes(), absent: bool = False) -> ObjectStaging:
        if not key_of(loc):
            raise CheckpointError(f"{loc}: a checkpoint needs a path inside the bucket (e.g. {loc}/run/100)")
        bare = False
        if absent:  # the LIST of ``exists``, which also tells whether the commit has anything to clean up
            objs = self.client.list(key_of(loc) + "/")
            if _foreign(key_of(loc), objs):
                manifest = _join(key_of(loc), MANIFEST_NAME)
                raise (CheckpointExistsError.at(loc) if any(o.key == manifest for o in objs)
                       else CheckpointExistsError.foreign(loc))
            bare = all(_is_folder(key_of(loc), o) for o in objs)
        attempt = attempt or uuid.uuid4().hex[:16]
        lease = self._leases.get(key_of(loc.parent))
        self.client.put(_join(key_of(loc), MARK + attempt), _marker(lease.token if lease else None))
        return ObjectStaging(self, loc, attempt, bare)

    def join_save(self, loc: Location, token: str, modes: storage.Modes = storage.Modes()) -> ObjectStaging:
        if not re.fullmatch(_ATTEMPT, token) or self.client.head(_join(key_of(loc), MARK + token)) is None:
            raise CheckpointError(f"cannot see {self.client.describe(_join(key_of(loc), MARK + token))}, put by "
                                  "process 0: every process must use the same bucket and endpoint")
        return ObjectStaging(self, loc, token)

    def check_lease(self, root: Location) -> None:
        lease = self._leases.get(key_of(root))
        if lease is not None:
            lease.check()

    def open(self, loc: Location) -> ObjectSource:
        return ObjectSource(self.client, loc)

    # ------------------------------------------------------------ roots
    def ensure_root(self, root: Location, modes: storage.Modes = storage.Modes()) -> None:
        self.client.check_bucket()  # nothing to create: prefixes exist when objects do

    def _children(self, root: Location) -> dict[str, list[objclient.ObjectInfo]]:
        """Objects under ``root``, by the first path component below it."""
        prefix = key_of(root)
        start = len(prefix) + 1 if prefix else 0
        out: dict[str, list[objclient.ObjectInfo]] = {}
        for o in self.client.list(prefix + "/" if prefix else ""):
            name, slash, _ = o.key[start:].partition("/")
            if slash:
                out.setdefault(name, []).append(o)
        return out

    def list_committed(self, root: Location, accept: Callable[[str], Any]) -> list[str]:
        return _committed(key_of(root), self._children(root), accept)

    def remove(self, loc: Location) -> None:
        """One LIST, then the manifest's DELETE (un-committed from here on), then
        everything else under the prefix, as a directory goes on disk (a
        checkpoint nested in it manifest first). Objects of a save that starts
        at the prefix after the LIST are left to it."""
        prefix = key_of(loc)
        objs = self.client.list(prefix + "/")
        manifest = _join(prefix, MANIFEST_NAME)
        if not any(o.key == manifest for o in objs):
            raise FileNotFoundError(f"{loc}: no committed checkpoint to remove")
        self.client.delete([manifest])
        _delete_manifests_first(self.client, [o.key for o in objs if o.key != manifest])

    def clean_stale(self, root: Location, accept: Callable[[str], Any]) -> tuple[list[str], list[str]]:
        """One listing for both: the cleaning deletes no manifest."""
        lease = self._leases.get(key_of(root))
        removed = []
        children = self._children(root)
        for name, objs in children.items():
            if accept(name):
                removed.extend(self._clean_one(_join(key_of(root), name), objs, lease))
        return removed, _committed(key_of(root), children, accept)

    def _clean_one(self, prefix: str, objs: list[objclient.ObjectInfo], lease: objlock.Lease | None) -> list[str]:
        """Our objects under one checkpoint's prefix that no live save and no manifest needs."""
        names = {o.key[len(prefix) + 1:] for o in objs}
        attempts = {_attempt_of(n) for n in names} - {None}
        live = {a for a in attempts if MARK + a in names and not self._abandoned(_join(prefix, MARK + a), lease)}
        keep = set(live)
        over = attempts - live
        if MANIFEST_NAME in names and len(over) == 1:
            # A committed step as its save left it (one attempt's objects): the manifest names
            # them, so it is not read, which was one GET per step at every start of a manager.
            keep |= over
        elif MANIFEST_NAME in names and over:
            try:
                data, _ = self.client.get(_join(prefix, MANIFEST_NAME), 64 << 20)
            except (NotFound, ValueError):
                return []  # changed under us: leave it to the next cleaning
            keep |= {m.decode() for m in _NAMED_RE.findall(data)}
        doomed = sorted(_join(prefix, n) for n in names if _attempt_of(n) is not None and
                        _attempt_of(n) not in (live if n.startswith(MARK) else keep))
        self.client.delete(doomed)
        return [self.client.describe(k) for k in doomed]

    def _abandoned(self, marker_key: str, lease: objlock.Lease | None) -> bool:
        """Whether the save that put this marker is provably over (see ``clean_stale``)."""
        try:
            rec = msgpack.unpackb(self.client.get(marker_key, MARKER_CAP)[0], raw=False)
        except NotFound:
            return True
        except (ValueError, msgpack.UnpackException):
            return True  # not a marker we could have written
        if not isinstance(rec, dict):
            return True
        if not procs.record_alive(rec):
            return True  # same host, the writer is gone
        holder = rec.get("lock")
        if lease is not None and holder is not None:
            return holder != lease.token  # saved under an earlier holder's lock, which we now hold
        started = rec.get("time")
        return isinstance(started, (int, float)) and time.time() - started > UNMANAGED_STALE_SECONDS

    # ------------------------------------------------------------ the lock
    def acquire_lock(self, root: Location, modes: storage.Modes = storage.Modes()) -> tuple[str, dict | None]:
        key = _join(key_of(root), objlock.LOCK_NAME)
        lease, stale = objlock.acquire(self.client, key, config.current().lease_seconds)
        self._leases[key_of(root)] = lease
        return lease.token, stale

    def release_lock(self, root: Location, token: str) -> None:
        lease = self._leases.get(key_of(root))
        if lease is not None and lease.token == token:
            del self._leases[key_of(root)]
            lease.release()

    # ------------------------------------------------------------ single files (objfiles)
    def open_file(self, loc: Location) -> objfiles.ObjectFile:
        return objfiles.ObjectFile(self.client, loc)

    def write_file(self, loc: Location, fill: Callable[[BinaryIO], None], size: int | None = None) -> None:
        objfiles.write(self.client, loc, fill, size)

    def list_files(self, loc: Location) -> list[tuple[str, int]]:
        return objfiles.list_files(self.client, loc)
