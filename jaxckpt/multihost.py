"""Multi-process coordination through the ``jax.distributed`` coordination service.

The writer and the manager use only this small interface: a key-value store
with blocking gets bounded by a deadline. No XLA collective is involved, so the
coordination runs on background threads and never stalls the training
thread's device work. Every key is scoped by the save that uses it, and every
wait has a deadline; a process that died is noticed through the service's list
of live nodes, so the others fail fast with an error naming it.

Single-process jobs get :data:`LOCAL`, on which nothing waits.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Callable

import jax

from jaxckpt.errors import CheckpointError, SaveTimeoutError

logger = logging.getLogger("jaxckpt")

# Used when the caller configured no timeout: a multi-process wait must end.
DEFAULT_TIMEOUT_S = 300.0


class Coordinator:
    """The single-process coordinator: there is no one to wait for."""

    process_index = 0
    process_count = 1

    @property
    def is_primary(self) -> bool:
        return self.process_index == 0

    def set(self, key: str, value: bytes) -> None:  # pragma: no cover - never called single-process
        raise CheckpointError("no coordination in a single-process job")

    def get(self, key: str, deadline: float | None, what: str, from_process: int | None = None) -> bytes:
        raise CheckpointError("no coordination in a single-process job")

    def try_get(self, key: str) -> bytes | None:
        return None

    def delete(self, key: str) -> None:
        pass

    def tag(self) -> str:
        return f"[process={self.process_index}]"


LOCAL = Coordinator()


class JaxCoordinator(Coordinator):
    """Coordination through ``jax.distributed``'s key-value store."""

    def __init__(self, client, process_index: int, process_count: int):
        self._client = client
        self.process_index = process_index
        self.process_count = process_count

    def set(self, key: str, value: bytes) -> None:
        self._client.key_value_set_bytes(key, value)

    def try_get(self, key: str) -> bytes | None:
        try:
            return self._client.key_value_try_get_bytes(key)
        except Exception:  # NOT_FOUND is reported as a generic runtime error
            return None

    def delete(self, key: str) -> None:
        try:
            self._client.key_value_delete(key)
        except Exception:  # best effort: keys are small
            pass

    def get(self, key: str, deadline: float | None, what: str, from_process: int | None = None) -> bytes:
        """Wait for ``key`` until ``deadline`` (time.monotonic)."""
        if deadline is None:
            deadline = time.monotonic() + DEFAULT_TIMEOUT_S
        left_ms = max(int((deadline - time.monotonic()) * 1000), 1)
        try:
            return self._client.blocking_key_value_get_bytes(key, left_ms)
        except Exception as e:  # the service reports a timeout as a generic error
            if "DEADLINE_EXCEEDED" in str(e) or "timed out" in str(e).lower():
                raise SaveTimeoutError(f"{self.tag()} timed out waiting for {what}" + (
                    "" if from_process is None else f" (process {from_process} did not answer)")) from None
            raise CheckpointError(f"{self.tag()} coordination service error while waiting for {what}: {e}") from None


def coordinator() -> Coordinator:
    """The coordinator for this job (``LOCAL`` unless several JAX processes run)."""
    if jax.process_count() == 1:
        return LOCAL
    from jax._src import distributed  # the documented multi-controller runtime's client

    client = distributed.global_state.client
    if client is None:
        raise CheckpointError("several JAX processes but no jax.distributed client: call jax.distributed.initialize()")
    return JaxCoordinator(client, jax.process_index(), jax.process_count())


def _jax_preemption_service() -> bool:
    from jax._src import distributed

    return distributed.global_state.preemption_sync_manager is not None


class Agreement:
    """Decisions every process of a job must share (the manager's), taken where
    the information lives and published through the key-value store.

    * ``primary_decides(step, decide)``: process 0 evaluates ``decide`` (e.g. a
      wall-clock rule: clocks differ between hosts) and the others wait for its
      answer, so no process saves a step another one skips.
    * ``preempted(step, signalled)``: JAX's preemption sync point where the
      runtime provides one (it picks the first step all processes can reach);
      otherwise the first process signalled publishes ``its step + 2`` and every
      process stops there (processes of a synchronous job are at most a step
      apart).

    Single-process jobs take every decision locally, with no I/O.
    """

    AGREE_TIMEOUT_S = 120.0
    _KEEP_KEYS = 64

    def __init__(self, coord: Coordinator, prefix: str):
        self.coord = coord
        self.prefix = prefix
        self.jax_preemption = coord.process_count > 1 and _jax_preemption_service()
        self._cache: tuple[int, bool] | None = None
        self._published: collections.deque[str] = collections.deque()
        self._signal_published = False

    def primary_decides(self, step: int, decide: Callable[[], bool]) -> bool:
        if self.coord.process_count == 1:
            return decide()
        if self._cache is not None and self._cache[0] == step:
            return self._cache[1]  # should_save(step) then save(step): one decision
        key = f"{self.prefix}/due/{step}"
        if self.coord.is_primary:
            value = bool(decide())
            self.coord.set(key, b"1" if value else b"0")
            self._published.append(key)
            if len(self._published) > self._KEEP_KEYS:
                self.coord.delete(self._published.popleft())
        else:
            value = self.coord.get(key, time.monotonic() + self.AGREE_TIMEOUT_S,
                                   f"process 0's save decision for step {step}", from_process=0) == b"1"
        self._cache = (step, value)
        return value

    def preempted(self, step: int, signalled: bool) -> bool:
        if self.coord.process_count == 1:
            return signalled
        if self.jax_preemption:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        key = f"{self.prefix}/preempt"
        if signalled and not self._signal_published:
            self._signal_published = True
            if self.coord.try_get(key) is None:
                try:
                    self.coord.set(key, str(step + 2).encode())
                except Exception:  # another process published first: its step stands
                    pass
        at = self.coord.try_get(key)
        return at is not None and step >= int(at)
