"""Typed errors. Everything jaxckpt raises about a checkpoint derives from
:class:`CheckpointError`; the subclasses also derive from the standard
exception a caller would naturally catch (``FileNotFoundError`` ...).

Messages name the file and/or the pytree key path, what was expected and what
was found, so that a user can act on them without reading our code.
"""

from __future__ import annotations


class CheckpointError(Exception):
    """Base class of every error jaxckpt raises about a checkpoint."""


class CorruptCheckpointError(CheckpointError, ValueError):
    """A checkpoint on disk is damaged or hostile: checksum mismatch, truncated or
    missing data file, malformed manifest, values outside the format's limits."""


class StructureMismatchError(CheckpointError, ValueError):
    """The checkpoint does not fit the requested target structure (missing or
    unexpected leaves, shape or kind mismatch)."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No committed checkpoint exists at the given path (or step)."""


class CheckpointExistsError(CheckpointError, FileExistsError):
    """A checkpoint already exists where a new one was to be written."""

    @classmethod
    def at(cls, where: object) -> "CheckpointExistsError":
        """The error of a save to ``where`` without ``overwrite``."""
        return cls(f"{where}: a checkpoint already exists (pass overwrite=True to replace it)")

    @classmethod
    def foreign(cls, where: object) -> "CheckpointExistsError":
        """The error of an overwrite of ``where`` that holds something other than a checkpoint."""
        return cls(f"{where}: exists and is not a jaxckpt checkpoint; refusing to replace it")


class CheckpointLockedError(CheckpointError):
    """Another live writer holds the checkpoint directory's lock."""


class SaveTimeoutError(CheckpointError, TimeoutError):
    """A save did not finish within the configured timeout."""


class UnsupportedValueError(CheckpointError, TypeError):
    """A leaf (or metadata value) cannot be stored in the format."""


class UnsupportedLocationError(CheckpointError, ValueError):
    """A checkpoint location this version cannot store to or read from (an
    unknown URL scheme, or object storage where no backend is available). A
    URL is never taken for a local path."""


class StorageError(CheckpointError, OSError):
    """The storage failed a request that retries could not save: an object
    store's server errors, throttling or a connection that kept failing
    within the operation's time. The message names the URL."""


class StorageAccessError(StorageError, PermissionError):
    """The storage refused the credentials (missing, wrong or not allowed).
    The message names the URL and which credential source was used, never a
    secret."""


class BucketNotFoundError(CheckpointNotFoundError):
    """The bucket (Azure: container) of an ``s3://`` / ``gs://`` / ``az://`` location does not exist."""


class DecryptionError(CheckpointError):
    """An encrypted checkpoint was read without a key, with the wrong key, or
    with the wrong cipher mode. The message says which (and, for jaxckpt's own
    format, the fingerprint of the key it expected)."""
