"""The checkpointing methods under test, behind one small interface.

Call order, in one process: `Method(root)` -> `start_save(tree, slot)` ->
the returned `wait()` -> (`save_stats()`) -> `close()`; or, in a later
process, `Method(root)` -> `restore(abstract, slot)` -> `close()`.

`start_save` returns when the caller may mutate or free `tree` again (the
"blocking" time); `wait()` returns once the checkpoint is committed and
durable.  Synchronous methods do all their work in `start_save`.  `restore`
returns jax.Arrays placed as the ShapeDtypeStructs in `abstract` say.

Every method writes only under its own fresh `root` directory, so counting
what is there afterwards counts what the method created.  Libraries are
imported lazily: a process pays only for the method it runs.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

Wait = Callable[[], None]


def _committed() -> None:
    """`wait()` of a synchronous method: nothing left to do."""


def _shardings(abstract):
    import jax

    return jax.tree.map(lambda s: s.sharding, abstract)


class Method(abc.ABC):
    name: ClassVar[str]
    label: ClassVar[str]
    asynchronous: ClassVar[bool]
    module: ClassVar[str]  # what must import for the method to be available

    def __init__(self, root: Path):
        self.root = root

    @abc.abstractmethod
    def start_save(self, tree: Any, slot: int) -> Wait:
        """Begin saving `tree` as checkpoint `slot`; return its wait()."""

    @abc.abstractmethod
    def restore(self, abstract: Any, slot: int = 0) -> Any:
        """Read checkpoint `slot` back as jax.Arrays shaped like `abstract`."""

    def save_stats(self) -> dict:
        """The library's own account of the last save, if it keeps one."""
        return {}

    def close(self) -> None:
        pass

    @classmethod
    def check_available(cls) -> None:
        """Raise (ImportError, AttributeError) if the method cannot run."""
        __import__(cls.module)


# --------------------------------------------------------------------------
# jaxckpt


class _Jaxckpt(Method):
    module = "jaxckpt"

    def _path(self, slot: int) -> Path:
        return self.root / f"ckpt_{slot}"

    def restore(self, abstract, slot=0):
        import jaxckpt

        return jaxckpt.restore(self._path(slot), target=abstract)


class JaxckptAsync(_Jaxckpt):
    name = "jaxckpt-async"
    label = "jaxckpt AsyncCheckpointer"
    asynchronous = True

    def __init__(self, root):
        super().__init__(root)
        self._ck = None
        self._handle = None

    def start_save(self, tree, slot):
        import jaxckpt

        if self._ck is None:
            self._ck = jaxckpt.AsyncCheckpointer()
        self._handle = self._ck.save(self._path(slot), tree)
        return self._handle.result

    def save_stats(self):
        import dataclasses

        stats = getattr(self._handle, "stats", None)
        return dataclasses.asdict(stats) if dataclasses.is_dataclass(stats) else {}

    def close(self):
        if self._ck is not None:
            self._ck.close()

    @classmethod
    def check_available(cls):
        import jaxckpt

        jaxckpt.AsyncCheckpointer, jaxckpt.restore  # noqa: B018


class JaxckptSync(_Jaxckpt):
    name = "jaxckpt-sync"
    label = "jaxckpt save (sync)"
    asynchronous = False

    def start_save(self, tree, slot):
        import jaxckpt

        jaxckpt.save(self._path(slot), tree)
        return _committed

    @classmethod
    def check_available(cls):
        import jaxckpt

        jaxckpt.save, jaxckpt.restore  # noqa: B018


# --------------------------------------------------------------------------
# orbax-checkpoint


class OrbaxManagerAsync(Method):
    name = "orbax-async"
    label = "orbax CheckpointManager async"
    asynchronous = True
    module = "orbax.checkpoint"

    def __init__(self, root):
        super().__init__(root)
        import orbax.checkpoint as ocp

        self._ocp = ocp
        options = ocp.CheckpointManagerOptions(enable_async_checkpointing=True,
                                               max_to_keep=None, create=True)
        self._mgr = ocp.CheckpointManager(root, options=options)

    def start_save(self, tree, slot):
        self._mgr.save(slot, args=self._ocp.args.StandardSave(tree))
        return self._mgr.wait_until_finished

    def restore(self, abstract, slot=0):
        return self._mgr.restore(slot, args=self._ocp.args.StandardRestore(abstract))

    def close(self):
        self._mgr.close()


class OrbaxStandardSync(Method):
    name = "orbax-sync"
    label = "orbax StandardCheckpointer (sync)"
    asynchronous = False
    module = "orbax.checkpoint"

    def __init__(self, root):
        super().__init__(root)
        import orbax.checkpoint as ocp

        self._ckptr = ocp.StandardCheckpointer()

    def _path(self, slot: int) -> Path:
        return self.root / f"ckpt_{slot}"

    def start_save(self, tree, slot):
        self._ckptr.save(self._path(slot), tree)
        self._ckptr.wait_until_finished()
        return _committed

    def restore(self, abstract, slot=0):
        return self._ckptr.restore(self._path(slot), abstract)

    def close(self):
        self._ckptr.close()


# --------------------------------------------------------------------------
# flax msgpack


class FlaxMsgpack(Method):
    name = "flax-msgpack"
    label = "flax msgpack + write + fsync"
    asynchronous = False
    module = "flax.serialization"

    def _path(self, slot: int) -> Path:
        return self.root / f"state_{slot}.msgpack"

    def start_save(self, tree, slot):
        from flax import serialization

        _write_durably(self._path(slot), serialization.msgpack_serialize(tree))
        return _committed

    def restore(self, abstract, slot=0):
        import jax
        from flax import serialization

        host = serialization.msgpack_restore(self._path(slot).read_bytes())
        return jax.device_put(host, _shardings(abstract))


def _write_durably(path: Path, data: bytes) -> None:
    """Write, fsync the file, then its directory (so the name is durable)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# --------------------------------------------------------------------------

ALL: dict[str, type[Method]] = {
    m.name: m for m in (JaxckptAsync, JaxckptSync, OrbaxManagerAsync, OrbaxStandardSync,
                        FlaxMsgpack)
}
REFERENCE = OrbaxManagerAsync.name  # what "x orbax" ratios divide by


def get(name: str) -> type[Method]:
    if name not in ALL:
        raise ValueError(f"unknown method {name!r}; expected one of {', '.join(ALL)}")
    return ALL[name]
