"""jaxckpt: fast, crash-consistent, asynchronous checkpoints for JAX and Flax.

The public face. Everything not listed in ``__all__`` is internal and may change.
"""

from jaxckpt.api import CheckpointInfo, LeafInfo, LoadReport, save
from jaxckpt.checkpointer import AsyncCheckpointer, SaveHandle, SaveStats
from jaxckpt.errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointLockedError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    DecryptionError,
    SaveTimeoutError,
    StorageAccessError,
    StorageError,
    BucketNotFoundError,
    StructureMismatchError,
    UnsupportedLocationError,
    UnsupportedValueError,
)
from jaxckpt.interop import UnknownFormatError, convert, inspect, load_checkpoint, load_into, restore
from jaxckpt.interval import SaveInterval
from jaxckpt.manager import CheckpointManager
from jaxckpt.policies import KeepPolicy, SavePolicy, StepMetadata
from jaxckpt.version import VERSION as __version__

__all__ = [
    "AsyncCheckpointer",
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointInfo",
    "CheckpointLockedError",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "DecryptionError",
    "KeepPolicy",
    "LeafInfo",
    "LoadReport",
    "SaveHandle",
    "SaveInterval",
    "SavePolicy",
    "SaveStats",
    "SaveTimeoutError",
    "StorageAccessError",
    "StorageError",
    "BucketNotFoundError",
    "StepMetadata",
    "StructureMismatchError",
    "UnknownFormatError",
    "UnsupportedLocationError",
    "UnsupportedValueError",
    "__version__",
    "convert",
    "inspect",
    "load_checkpoint",
    "load_into",
    "restore",
    "save",
]
