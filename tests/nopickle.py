"""The no-pickle guard (issue 6): pickle's loaders patched to raise.

A checkpoint library that unpickles is a code-execution hole (torch DCP's
``.metadata``), so the whole test suite runs with ``pickle.load``,
``pickle.loads`` and ``pickle.Unpickler`` (and their ``_pickle`` originals)
refusing to work. ``tests/conftest.py`` installs the guard for the session
and fails any test during which an unpickling was attempted, even if some
caller swallowed the exception. The suite's own subprocess workers
(``torture_worker.py``, ``fuzz_worker.py``) install it too.
"""

from __future__ import annotations

import _pickle
import pickle

ATTEMPTS: list[str] = []
_NAMES = ("load", "loads", "Unpickler")
_REAL = {(mod, name): getattr(mod, name) for mod in (pickle, _pickle) for name in _NAMES}


class PickleForbidden(AssertionError):
    """Raised by every patched loader."""


def _refuse(name: str):
    def refuse(*args, **kwargs):
        ATTEMPTS.append(name)
        raise PickleForbidden(f"{name} was called: no code path may unpickle (the no-pickle guard of the test suite)")
    return refuse


class _RefusingUnpickler:
    def __init__(self, *args, **kwargs):
        ATTEMPTS.append("pickle.Unpickler")
        raise PickleForbidden("pickle.Unpickler was used: no code path may unpickle "
                              "(the no-pickle guard of the test suite)")


def install() -> None:
    for (mod, name) in _REAL:
        setattr(mod, name, _RefusingUnpickler if name == "Unpickler" else _refuse(f"{mod.__name__}.{name}"))


def uninstall() -> None:
    for (mod, name), real in _REAL.items():
        setattr(mod, name, real)


def installed() -> bool:
    return pickle.loads is not _REAL[(pickle, "loads")]
