"""Pause the cyclic garbage collector around allocation-heavy, acyclic work.

Flattening or decoding a 10^4-leaf tree creates ~10^5 small objects; each
600 allocations trigger a collection, and the older generations are walked
over every live object of the training program (every jax.Array, every
parameter dict). Pausing the collector made ``snapshot.take`` and
``format.decode_manifest`` 2-3x faster on a 10,000-leaf tree. Nothing created
in these sections forms reference cycles, so nothing is leaked.

Pauses nest (an inner one leaves the collector as the outer one found it).
Objects that are still alive when the collector resumes are traversed by its
next collection, so a whole operation is paused at once where its stages hand
many objects to each other: ``restore``, and a background save of a tree of
many leaves (the pause is process-wide: the training thread's cyclic garbage
waits for that save, a fraction of a second; reference counting frees the rest).
"""

from __future__ import annotations

import contextlib
import gc
from typing import Iterator


@contextlib.contextmanager
def paused() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
