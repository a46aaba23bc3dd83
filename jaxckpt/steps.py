"""The steps of a manager's directory: what is committed, what is being saved,
what the manifests say, and what the retention rules delete.

Three pieces, wired by ``CheckpointManager``:

- ``StepTable``: the bookkeeping, in memory, under one lock. A save goes
  ``claim`` (training thread: refuse an existing step, reserve it) ->
  ``attach`` (training thread: the background save's handle) -> ``commit``
  (the save's background thread, right after the commit; the training thread
  for a synchronous save) or ``fail`` (training thread: the save never
  started) or, for a background failure, ``prune`` (training thread, the next
  ``save()``: finished handles are dropped before their error is raised).
  ``forget`` drops a deleted step. The high-water mark (latest committed or
  in-flight step, which no policy saves at or below) is computed in one
  place, after every change.
- ``StepDirectory``: what storage says. ``reload`` lists the committed steps
  (any thread; a read-only follower calls it to see new commits), ``lookup``
  reads a step's record from its manifest (cached in the table), ``restore``
  reads a step, falling back to older ones on request.
- ``Retention``: after each commit (the thread that committed), decide with
  ``KeepPolicy`` which steps go and delete them crash-safely through
  ``storage.Backend.remove`` (un-commit first, then delete). Only a newer
  commit ever deletes anything. In a multi-process job the primary deletes;
  the others, which take the same decision from the same records (process
  0's, as the manifests hold them), only forget the steps.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Mapping

from jaxckpt import api
from jaxckpt import checkpointer as ckpt_mod
from jaxckpt import reader as reader_mod
from jaxckpt import storage
from jaxckpt.errors import CheckpointError, CheckpointExistsError, CheckpointNotFoundError, CorruptCheckpointError
from jaxckpt.policies import KeepPolicy, RetentionInfo, StepMetadata, StepNaming, as_step, metadata_from

logger = logging.getLogger("jaxckpt")

MANIFEST_READERS = 16  # StepDirectory.lookup_all: manifests read at once
MAX_RELISTS = 100  # StepDirectory.restore: re-listings after the latest step was deleted under a follower


class StepTable:
    """A manager's steps in memory, under one lock: committed (step -> directory
    name), in flight (step -> ``SaveHandle``; None from ``claim`` until
    ``attach``, and throughout a synchronous save) and the step records read so
    far (name -> (StepMetadata, written by a manager)). See the module
    docstring for who calls what, from which thread."""

    def __init__(self, root: storage.Location):
        self._root = root
        self._lock = threading.Lock()
        self._committed: dict[int, str] = {}
        self._pending: dict[int, ckpt_mod.SaveHandle | None] = {}
        self._meta: dict[str, tuple[StepMetadata, bool]] = {}
        self._high = -1

    def path(self, name: str) -> str:
        """The path of a step directory, as messages show it."""
        return str(self._root.join(name))

    def location(self, name: str) -> storage.Location:
        """Where a step directory is (with the root's storage options)."""
        return self._root.join(name)

    # ------------------------------------------------------------------ lookups
    def steps(self) -> list[int]:
        """The committed steps, ascending."""
        with self._lock:
            return sorted(self._committed)

    def latest(self) -> int | None:
        """The newest committed step, or None."""
        with self._lock:
            return max(self._committed) if self._committed else None

    def name(self, step: int) -> str | None:
        """The directory name of a committed step; None if it is not committed."""
        with self._lock:
            return self._committed.get(step)

    def is_committed(self, step: int) -> bool:
        with self._lock:
            return step in self._committed

    def is_known(self, step: int) -> bool:
        """Committed, or being saved."""
        with self._lock:
            return step in self._committed or step in self._pending

    @property
    def high(self) -> int:
        """The latest committed or in-flight step; -1 when there is none."""
        return self._high

    @property
    def in_flight(self) -> bool:
        """Whether any save is claimed and not yet committed or pruned (a cheap check)."""
        return bool(self._pending)

    def handles(self) -> list[ckpt_mod.SaveHandle]:
        """The handles of the background saves not yet committed or pruned."""
        with self._lock:
            return [h for h in self._pending.values() if h is not None]

    def snapshot(self) -> tuple[dict[int, str], set[int]]:
        """(committed step -> name, steps being saved), copied at one moment."""
        with self._lock:
            return dict(self._committed), set(self._pending)

    def cached(self, name: str) -> tuple[StepMetadata, bool] | None:
        with self._lock:
            return self._meta.get(name)

    def cache(self, name: str, hit: tuple[StepMetadata, bool]) -> None:
        with self._lock:
            self._meta[name] = hit

    # ------------------------------------------------------------------ changes
    def replace(self, committed: Mapping[int, str]) -> None:
        """The committed steps as just listed from storage; forgets every cached record."""
        with self._lock:
            self._committed = dict(committed)
            self._meta.clear()
            self._refresh()

    def claim(self, step: int, name: str, overwrite: bool) -> str | None:
        """Reserve ``step`` for a save named ``name``. Refuses a step being saved
        or committed, unless ``overwrite`` (then waits for a save of it in flight).
        Returns the existing directory name of the step when it is being replaced."""
        with self._lock:
            handle = self._pending.get(step)
        if handle is not None and not handle.done():
            if not overwrite:
                raise CheckpointExistsError(f"{self.path(name)}: step {step} is being saved already "
                                            "(pass overwrite=True to replace it)")
            handle.wait()
        with self._lock:
            existing = self._committed.get(step)
            if existing is not None and not overwrite:
                raise CheckpointExistsError(f"{self.path(existing)}: step {step} already exists "
                                            "(pass overwrite=True to replace it)")
            self._pending[step] = None
            self._refresh()
        return existing

    def attach(self, step: int, handle: ckpt_mod.SaveHandle) -> None:
        """The background save of a claimed step started (unless it committed already)."""
        with self._lock:
            if step in self._pending:
                self._pending[step] = handle

    def commit(self, step: int, name: str) -> None:
        """``step`` is committed as ``name`` (its record is read back from the manifest when needed)."""
        with self._lock:
            self._committed[step] = name
            self._meta.pop(name, None)
            self._pending.pop(step, None)
            self._refresh()

    def fail(self, step: int) -> None:
        """The save of a claimed step failed before it started in the background."""
        with self._lock:
            self._pending.pop(step, None)
            self._refresh()

    def prune(self) -> bool:
        """Drop the background saves that ended (failed ones: their error is raised
        next, by the checkpointer); True if there were any."""
        with self._lock:
            done = [s for s, h in self._pending.items() if h is not None and h.done()]
            for s in done:
                del self._pending[s]
            if done:
                self._refresh()
        return bool(done)

    def clear_in_flight(self) -> None:
        """Forget every save in flight (the manager closes)."""
        with self._lock:
            self._pending.clear()
            self._refresh()

    def forget(self, step: int, name: str) -> None:
        """``name`` is being deleted: no longer listed as ``step`` (if it still is)."""
        with self._lock:
            if self._committed.get(step) == name:
                del self._committed[step]
            self._meta.pop(name, None)
            self._refresh()

    def reinstate(self, step: int, name: str) -> None:
        """A deletion failed and ``name`` is still committed: list it again as ``step``."""
        with self._lock:
            self._committed.setdefault(step, name)
            self._refresh()

    def _refresh(self) -> None:
        """The one place the high-water mark is computed (the lock is held)."""
        self._high = max([*self._committed, *self._pending, -1])


class StepDirectory:
    """A manager's directory as storage shows it, read into a ``StepTable``."""

    def __init__(self, backend: storage.Backend, root: storage.Location, naming: StepNaming, table: StepTable,
                 read_only: bool, encryption_key: Any = None):
        self._backend = backend
        self._key = encryption_key  # of encrypted steps (jaxckpt/crypto.py)
        self._root = root
        self._naming = naming
        self._table = table
        self._read_only = read_only
        self.directory = str(root)

    def reload(self, listed: list[str] | None = None) -> None:
        """Re-list the committed steps (and forget the cached records); ``listed``:
        what ``list_committed`` just returned, where the caller has it."""
        found: dict[int, tuple[int, str]] = {}
        for entry in self._backend.list_committed(self._root, self._naming.parse) if listed is None else listed:
            step, epoch = self._naming.parse(entry)
            rank = (epoch if epoch is not None else -1, entry)  # two names for one step: the larger epoch wins
            if step not in found or rank > found[step]:
                found[step] = rank
        self._table.replace({s: name for s, (_, name) in found.items()})

    def step_path(self, step: int) -> str:
        """The path of a committed step, as messages show it; ``CheckpointNotFoundError`` for any other."""
        return str(self.step_location(step))

    def step_location(self, step: int) -> storage.Location:
        """Where a committed step is; ``CheckpointNotFoundError`` for any other."""
        name = self._table.name(step)
        if name is None:
            shown = ", ".join(map(str, self._table.steps()[-10:])) or "none"
            hint = "; call reload() to see steps committed since" if self._read_only else ""
            raise CheckpointNotFoundError(f"{self.directory}: step {step} is not a committed checkpoint here "
                                          f"(latest committed steps: {shown}){hint}")
        return self._table.location(name)

    def lookup(self, step: int) -> tuple[StepMetadata, bool]:
        """(the record of a committed step, written by a manager); reads only its manifest, once."""
        loc = self.step_location(step)
        path, name = str(loc), loc.name
        hit = self._table.cached(name)
        if hit is None:
            try:
                with reader_mod.CheckpointReader(loc, encryption_key=self._key) as r:
                    m = r.manifest
                    hit = metadata_from(m.metadata, step, path, m.created, m.total_bytes)
            except (CorruptCheckpointError, CheckpointNotFoundError):
                gone = self.gone(step)
                if gone is not None:
                    raise gone from None
                raise
            self._table.cache(name, hit)
        return hit

    def lookup_all(self, steps: list[int]) -> dict[int, tuple[StepMetadata, bool] | Exception]:
        """``lookup`` of each step, or the error it raised (``CheckpointError``,
        ``OSError``); the manifests not read yet are read ``MANIFEST_READERS`` at
        a time: in a bucket each is a round trip, and a resumed run may hold
        hundreds of steps."""
        def one(step: int) -> tuple[StepMetadata, bool] | Exception:
            try:
                return self.lookup(step)
            except (CheckpointError, OSError) as e:
                return e
        unread = [s for s in steps if (n := self._table.name(s)) is None or self._table.cached(n) is None]
        if len(unread) < 2:
            return {s: one(s) for s in steps}
        with ThreadPoolExecutor(min(MANIFEST_READERS, len(unread)), thread_name_prefix="jaxckpt-lookup") as pool:
            found = dict(zip(unread, pool.map(one, unread)))
        return {s: found[s] if s in found else one(s) for s in steps}

    def gone(self, step: int) -> CheckpointNotFoundError | None:
        """If the directory of ``step`` no longer exists (a writer's retention
        deleted it while we read it), re-list the directory and return the
        error saying so; None if it is still there (a read error is damage)."""
        name = self._table.name(step)
        if name is None or self._backend.exists(self._root.join(name)):
            return None
        self.reload()  # the directory changed under us: see what is there now
        return CheckpointNotFoundError(f"{self.directory}: step {step} was deleted (by the writer's retention rules) "
                                       "while being read")

    def restore(self, asked: int | None, target: Any, partial: bool, fallback: bool, mmap: bool) -> tuple[Any, int]:
        """(tree, step) of ``asked`` (None: the latest committed); with ``fallback``
        the first older committed step that restores, if that one does not."""
        # A read-only follower may see steps deleted under it by the writer's
        # retention (only ever after a newer commit): it then re-lists and,
        # for the latest, moves on to the newer one. Bounded: the writer
        # would have to commit and rotate within each short open-and-read.
        for _ in range(MAX_RELISTS):
            steps = self._table.steps()[::-1]
            if asked is None and not steps:
                raise CheckpointNotFoundError(f"{self.directory}: no committed checkpoint")
            step = as_step(steps[0] if asked is None else asked)
            self.step_path(step)  # raises for an unknown step
            candidates = [s for s in steps if s <= step] if fallback else [step]
            out = self._first_restorable(candidates, step, asked is None, target, partial, fallback, mmap)
            if out is not None:
                return out
        raise CheckpointNotFoundError(f"{self.directory}: the latest step was deleted while being read "
                                      f"{MAX_RELISTS} times in a row")

    def _first_restorable(self, candidates: list[int], step: int, latest: bool, target: Any, partial: bool,
                          fallback: bool, mmap: bool) -> tuple[Any, int] | None:
        """(tree, step) of the first candidate that restores; None when ``step``,
        the latest, was deleted while being read (the caller re-lists)."""
        failures = []
        deleted = False
        for s in candidates:
            try:
                out = api.restore(self.step_location(s), target, partial=partial, mmap=mmap, encryption_key=self._key)
            except (CorruptCheckpointError, CheckpointNotFoundError) as e:
                gone = self.gone(s)
                if gone is not None:  # deleted, not damaged
                    deleted = True
                    if latest and s == step:
                        return None  # a newer step is the latest now
                    if not fallback:
                        raise gone from None
                    continue
                if not fallback:
                    raise
                logger.warning("restore: step %d is unusable (%s); trying an older step", s, e)
                failures.append(f"step {s}: {e}")
                continue
            if s != step:
                logger.warning("restore(fallback=True): restored step %d; step %d could not be restored", s, step)
            return out, s
        if not deleted:
            raise CorruptCheckpointError(f"{self.directory}: no committed step could be restored: "
                                         + "; ".join(failures))
        return None


class Retention:
    """Applies a ``KeepPolicy`` to the committed steps after each commit (see
    the module docstring); one rotation at a time."""

    def __init__(self, policy: KeepPolicy, table: StepTable, directory: StepDirectory, backend: storage.Backend,
                 root: storage.Location, is_primary: bool):
        self.policy = policy
        self._table = table
        self._directory = directory
        self._backend = backend
        self._root = root
        self._is_primary = is_primary
        self._lock = threading.Lock()
        self._written: dict[str, RetentionInfo] = {}  # name -> what this manager committed there

    def remember(self, step: int, name: str, committed: Any) -> None:
        """The metadata the manifest of ``step``, just committed as ``name``,
        holds (in a multi-process job process 0's, whose record every process
        ranks by: their own metrics and clocks may differ): the rotations read
        no manifest of it, which was a round trip per save and process."""
        if self.policy.max_to_keep is None or not isinstance(committed, Mapping):
            return
        stamp, metrics = committed.get("timestamp"), committed.get("metrics")
        if isinstance(stamp, (int, float)) and (metrics is None or isinstance(metrics, Mapping)):
            with self._lock:
                self._written[name] = RetentionInfo(step, float(stamp), self.policy.metric(metrics))

    def _read_infos(self, committed: Mapping[int, str]) -> list[RetentionInfo]:
        """What the rules look at for each committed step written by a manager:
        its remembered record, else its manifest's (steps whose manifest cannot
        be read are left out: never ours to delete)."""
        self._written = {n: i for n, i in self._written.items() if i.step in committed and committed[i.step] == n}
        known = {i.step: i for i in self._written.values()}
        infos = list(known.values())
        for step, hit in self._directory.lookup_all(sorted(set(committed) - set(known))).items():
            if not isinstance(hit, Exception) and hit[1]:
                infos.append(RetentionInfo(step, hit[0].timestamp, self.policy.metric(hit[0].metrics)))
        return infos

    def apply(self) -> None:
        """Delete the manager's steps that no rule keeps. Never deleted: the
        newest committed step, steps being saved, checkpoints no manager wrote
        and steps whose manifest cannot be read."""
        if self.policy.max_to_keep is None:
            return
        with self._lock:
            committed, busy = self._table.snapshot()
            if not committed:
                return
            infos = self._read_infos(committed)
            keep = self.policy.keep(infos) | busy | {max(committed)}
            for step in sorted(i.step for i in infos if i.step not in keep):
                self.delete(step, committed[step])

    def delete(self, step: int, name: str) -> None:
        """Crash-safe deletion of one step directory (un-committed first). In a
        multi-process job the primary deletes; the others only forget the step."""
        path = self._table.path(name)
        self._table.forget(step, name)
        if not self._is_primary:
            return
        loc = self._root.join(name)
        try:
            self._backend.remove(loc)
        except FileNotFoundError:
            return
        except OSError as e:
            logger.error("could not delete %s (step %d): %s", path, step, e)
            if self._backend.is_committed(loc):  # still there (else renamed away, left for the next start to clean)
                self._table.reinstate(step, name)
            return
        logger.info("deleted step %d (%s) by the retention rules", step, path)
