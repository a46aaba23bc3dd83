"""Checkpoint directories on a POSIX file system: the commit protocol.

1. ``make_temp_dir(final)``: a hidden sibling ``.<name>.jaxckpt-tmp-<id>``
   holding an owner marker (``.jaxckpt-owner``: who writes it, so that a
   later cleaner can tell a live writer from a dead one).
2. The writer fills it: data files, then the manifest (fsynced); the owner
   marker is removed right after the manifest is written (from then on the
   manifest marks the directory as ours).
3. ``commit(tmp, final, overwrite)``: fsync the directory, rename it to its
   final name (or exchange it with the checkpoint it replaces), fsync the
   parent. Until the rename nothing is visible at ``final``.

A directory is a checkpoint only once it holds a manifest and carries its
final name. Deletion (``remove_checkpoint``) first renames the directory
away (one atomic step, after which it is no longer a checkpoint), then
deletes it. ``clean_stale`` removes what interrupted saves, overwrites and
deletions left behind, and only that (docs/FORMAT.md, "Commit protocol").
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import uuid
from typing import Callable

import msgpack

from jaxckpt import libc
from jaxckpt import posixfs
from jaxckpt import procs
from jaxckpt.errors import CheckpointExistsError, CorruptCheckpointError
from jaxckpt.format import MANIFEST_NAME

TMP_MARK = "jaxckpt-tmp"
DEL_MARK = "jaxckpt-del"
OLD_MARK = "jaxckpt-old"
OWNER_FILE = ".jaxckpt-owner"
_AUX_RE = re.compile(r"^\.(?P<name>.+)\.(?P<mark>jaxckpt-tmp|jaxckpt-del|jaxckpt-old)-(?P<id>[0-9a-f]{8,32})$")


def aux_name(final: str, mark: str, ident: str | None = None) -> str:
    parent, name = os.path.split(os.path.abspath(final))
    return os.path.join(parent, f".{name}.{mark}-{ident or uuid.uuid4().hex[:16]}")


def parse_aux(entry: str) -> tuple[str, str] | None:
    """``(final name, mark)`` for one of our temporary/deleting/old directory names."""
    m = _AUX_RE.match(entry)
    return (m.group("name"), m.group("mark")) if m else None


def owner_record() -> dict:
    # The start time tells a live writer from a later process that got the same pid.
    return {"kind": TMP_MARK, **procs.identity()}


def make_temp_dir(final: str, ident: str | None = None, file_mode: int | None = None,
                  dir_mode: int | None = None) -> str:
    """Create the temporary sibling of ``final`` and mark it as ours (modes: see ``storage.Modes``)."""
    tmp = aux_name(final, TMP_MARK, ident)
    posixfs.ensure_dir(os.path.dirname(tmp), dir_mode)
    try:
        os.mkdir(tmp)
    except FileExistsError:
        if ident is None:
            raise
    try:
        if dir_mode is not None:
            os.chmod(tmp, dir_mode)  # the checkpoint directory, once renamed
        posixfs.write_file(tmp, OWNER_FILE, msgpack.packb(owner_record()), sync=False, mode=file_mode)
    except BaseException:  # e.g. ENOSPC: a live owner's unmarked directory would never be cleaned
        remove_tree(tmp)
        raise
    return tmp


def is_empty_dir(path: str) -> bool:
    """Whether ``path`` is a directory (not a link to one) with nothing in it: a
    directory made ahead of the save (``mkdir -p``), which a save may take."""
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            return False
        with os.scandir(path) as it:
            return next(it, None) is None
    except OSError:
        return False


def is_ours(path: str) -> bool:
    """True when ``path`` is a directory that jaxckpt created (owner marker or manifest)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISDIR(st.st_mode):
        return False
    rec = posixfs.read_record(path, OWNER_FILE)
    if isinstance(rec, dict) and rec.get("kind") == TMP_MARK:
        return True
    try:
        fd = posixfs.open_regular(os.path.join(path, MANIFEST_NAME))
        try:  # the envelope's first field is format: "jaxckpt"; any manifest size is fine
            return b"jaxckpt" in os.pread(fd, 64, 0)
        finally:
            os.close(fd)
    except (OSError, CorruptCheckpointError):
        return False


def is_committed(path: str, follow: bool = False) -> bool:
    """A real directory (not a symlink, unless ``follow``: ``path`` itself may be
    one that a user named) holding a regular manifest file."""
    try:
        st = os.stat(path) if follow else os.lstat(path)
        mst = os.lstat(os.path.join(path, MANIFEST_NAME))
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and stat.S_ISREG(mst.st_mode)


def write_manifest(tmp: str, data: bytes, mode: int | None = None) -> None:
    """Write the manifest durably; from then on it, not the owner marker, marks ``tmp`` as ours."""
    posixfs.write_file(tmp, MANIFEST_NAME, data, mode=mode)
    os.unlink(os.path.join(tmp, OWNER_FILE))


def commit(tmp: str, final: str, overwrite: bool) -> None:
    """Make the fully written ``tmp`` visible at ``final``, durably.

    ``overwrite=True`` replaces an existing checkpoint so that a crash at any
    instant leaves either the old or the new one readable: an atomic exchange
    where the OS offers one; otherwise the old one is renamed aside first and
    :func:`recover` puts it back if we die before the new one is in place.
    """
    posixfs.fsync_dir(tmp)
    parent = os.path.dirname(os.path.abspath(final))
    if os.path.lexists(final) and not is_empty_dir(final):  # an empty directory is replaced by the rename below
        if not overwrite:
            raise CheckpointExistsError.at(final)
        if not is_ours(final):  # overwrite replaces checkpoints, never a user's other files
            raise CheckpointExistsError.foreign(final)
        if libc.renameat2_exchange(tmp, final):
            posixfs.fsync_dir(parent)
            remove_tree(tmp)  # the old checkpoint; identifying files last, so a crash leaves it recognisable
            return
        old = aux_name(final, OLD_MARK)
        os.rename(final, old)
        os.rename(tmp, final)
        posixfs.fsync_dir(parent)
        remove_tree(old)
        return
    try:
        os.rename(tmp, final)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise CheckpointExistsError(f"{final}: a checkpoint appeared there during the save") from None
        raise
    posixfs.fsync_dir(parent)


def recover(final: str) -> None:
    """Finish an interrupted non-atomic overwrite: if ``final`` is missing and an
    old copy was set aside, put it back."""
    if os.path.lexists(final):
        return
    parent, name = os.path.split(os.path.abspath(final))
    try:
        entries = os.listdir(parent)
    except OSError:
        return
    for e in entries:
        parsed = parse_aux(e)
        if parsed == (name, OLD_MARK) and is_ours(os.path.join(parent, e)):
            try:
                os.rename(os.path.join(parent, e), final)
                posixfs.fsync_dir(parent)
            except OSError:
                pass
            return


def remove_checkpoint(path: str) -> None:
    """Delete a committed checkpoint crash-safely: rename it away (atomic: it is
    no longer listed), fsync the parent, then delete the files."""
    gone = aux_name(path, DEL_MARK)
    os.rename(path, gone)
    try:
        posixfs.fsync_dir(os.path.dirname(os.path.abspath(path)))
    except BaseException:
        # Not durably renamed away: deleting the files now could leave a
        # half-deleted checkpoint under its name after a power failure. Put
        # it back (the deletion failed as a whole) rather than leave it aside.
        try:
            os.rename(gone, path)
        except OSError:
            pass
        raise
    remove_tree(gone)


def remove_tree(path: str) -> None:
    """Delete a directory tree, its identifying files (owner marker, manifest)
    last: a crash midway leaves a directory still recognisable as ours by
    :func:`is_ours`, or an empty one, which :func:`clean_stale` can remove."""
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            os.unlink(path)  # a symlink planted in place of a directory: remove it, never what it points to
            return
        entries = os.listdir(path)
    except OSError:
        return
    marks = (OWNER_FILE, MANIFEST_NAME)
    for e in [e for e in entries if e not in marks] + [e for e in marks if e in entries]:
        p = os.path.join(path, e)
        try:
            if stat.S_ISDIR(os.lstat(p).st_mode):
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.unlink(p)
        except OSError:
            pass
    try:
        os.rmdir(path)
    except OSError:  # a worker of an abandoned save created a file meanwhile
        shutil.rmtree(path, ignore_errors=True)


def _owner_alive(path: str) -> bool:
    return procs.record_alive(posixfs.read_record(path, OWNER_FILE))


def clean_stale(directory: str, accept: Callable[[str], bool]) -> list[str]:
    """Remove what interrupted saves, overwrites and deletions left in ``directory``
    for the checkpoint names that ``accept`` recognises: our temporary directories whose writer
    is gone, half-deleted checkpoints, old copies set aside by an overwrite (put
    back first when the checkpoint itself is missing). A directory is removed
    only when its name is one of ours AND it carries our owner marker or
    manifest (or is empty). Call with the directory's lock held. Returns the
    removed paths."""
    removed = []
    for entry in posixfs.list_entries(directory):
        parsed = parse_aux(entry)
        if parsed is None or not accept(parsed[0]):
            continue
        name, mark = parsed
        path = os.path.join(directory, entry)
        try:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                continue
        except OSError:
            continue
        if mark == OLD_MARK:
            recover(os.path.join(directory, name))
            if not os.path.lexists(path):
                continue  # it was put back
        if mark == TMP_MARK and _owner_alive(path):
            continue  # a save still running in another process
        if is_ours(path):
            remove_tree(path)
        elif not _remove_if_empty(path):
            continue
        removed.append(path)
    return removed


def _remove_if_empty(path: str) -> bool:
    """Remove a directory of ours that holds nothing (or only an empty owner
    marker: a writer killed between creating the directory and writing its
    marker, one write, leaves that). False when it holds anything else."""
    try:
        marker = os.path.join(path, OWNER_FILE)
        if os.listdir(path) == [OWNER_FILE]:
            st = os.lstat(marker)
            if stat.S_ISREG(st.st_mode) and st.st_size == 0:
                os.unlink(marker)
        os.rmdir(path)  # only succeeds on an empty directory
    except OSError:
        return False
    return True
