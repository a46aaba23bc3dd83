"""Small helpers shared by several test modules."""

from __future__ import annotations

import json
import os

from jaxckpt import format as fmt


class FakeClock:
    """A clock that stands still until a test moves ``t``."""

    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def read_manifest(path) -> fmt.Manifest:
    with open(os.path.join(path, fmt.MANIFEST_NAME), "rb") as f:
        return fmt.decode_manifest(f.read(), "test")


def flip_bit(path, offset: int, bit: int = 0) -> None:
    """Flip one bit of the file at ``path`` in place."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ (1 << bit)]))


def check_conditional_commit(url: str, options: dict) -> None:
    """A second writer's manifest for a step committed meanwhile is refused
    (the commit is a conditional create) and the first one still restores."""
    import numpy as np
    import pytest

    import jaxckpt
    from jaxckpt import storage

    jaxckpt.save(f"{url}/once", {"x": np.arange(3)}, storage_options=options)
    loc = storage.Location.parse(f"{url}/once", options)
    staging = storage.backend(loc).begin_save(loc)
    staging.write_manifest(b"another manifest")
    with pytest.raises(jaxckpt.CheckpointExistsError, match="committed here by another writer meanwhile"):
        staging.commit(overwrite=False)
    staging.abandon()
    assert jaxckpt.restore(f"{url}/once", storage_options=options)["x"].tolist() == [0, 1, 2]


def check_short_and_missing_data(url: str, options: dict, where: str, size: int, cut, delete) -> None:
    """The checkpoint ``url`` (leaves 'a': 256 int64 at byte 0, and 'b' after
    it, in the data object ``where`` of ``size`` bytes) with that object cut
    to 1000 bytes (``cut(1000)``, through the store's own client), then deleted
    (``delete()``): each is named by the read that needs the bytes, with the leaf."""
    import re

    import numpy as np
    import pytest

    import jaxckpt

    cut(1000)  # 'a' (2048 bytes at 0) cut short; 'b' starts past the end (a range there is answered 416)
    with pytest.raises(jaxckpt.CorruptCheckpointError) as e:
        jaxckpt.restore(url, target={"a": np.zeros(256, np.int64)}, partial=True, storage_options=options)
    assert str(e.value) == (f"{where}: truncated: the manifest records {size} bytes, the object ends at byte 1000 "
                            "(leaf 'a')")
    with pytest.raises(jaxckpt.CorruptCheckpointError, match=re.escape(
            f"{where}: truncated: the manifest records {size} bytes, the object ends at or before byte ")):
        jaxckpt.restore(url, target={"b": np.zeros(1000, np.float32)}, partial=True, storage_options=options)
    delete()
    with pytest.raises(jaxckpt.CorruptCheckpointError) as e:
        jaxckpt.restore(url, storage_options=options)
    assert str(e.value) == f"{where}: data object missing (the manifest names it) (leaves 'a' .. 'b')"


def worker_result(out: str):
    """The JSON after the last ``RESULT `` line of a worker's output, or None. A
    native library writing to the same stream (gloo's "[Gloo] Rank 0 is
    connected ...") can land on that line after the JSON: it is ignored."""
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    return json.JSONDecoder().raw_decode(lines[-1][7:])[0] if lines else None
