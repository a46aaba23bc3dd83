"""Preemption: a SIGTERM handler that only raises a flag.

The manager reads ``SigtermWatch.requested`` at its next ``save()`` (training
thread), and in a multi-process job shares it through
``multihost.Agreement.preempted`` so that every process saves the same step.
Jobs that use JAX's own preemption service get no handler here: that service
owns SIGTERM.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

logger = logging.getLogger("jaxckpt")


class SigtermWatch:
    """Marks preemption on SIGTERM. Installed only from the main thread (Python
    allows no other); chains the previous handler; ``uninstall`` restores it."""

    def __init__(self) -> None:
        self.requested = False
        self._prev: Any = None
        self._installed = False
        self._active = True

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            logger.warning("CheckpointManager created outside the main thread: no SIGTERM handler installed, "
                           "preemption is not detected")
            return
        self._prev = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, self._handle)
        self._installed = True

    def deactivate(self) -> None:
        """Stop marking preemption; the handler, if still installed, only forwards
        to the previous one (safe from any thread, and from a finalizer)."""
        self._active = False

    def _handle(self, signum: int, frame: Any) -> None:
        if self._active:
            self.requested = True  # no logging here: a signal handler may run inside logging's own lock
        if callable(self._prev):
            self._prev(signum, frame)
        elif not self._active and self._prev == signal.SIG_DFL:
            # Closed, but still installed (closed off the main thread, or another handler was
            # chained on top of ours): do what the default would have done.
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    def uninstall(self) -> None:
        self.deactivate()
        if not self._installed or threading.current_thread() is not threading.main_thread():
            return  # stays installed but inert: it only forwards to the previous handler
        if signal.getsignal(signal.SIGTERM) == self._handle:
            signal.signal(signal.SIGTERM, self._prev if self._prev is not None else signal.SIG_DFL)
            self._installed = False
