"""A process's data cut into several data files (``Staging.file_bytes``, what
the GCS client asks for), read back from any storage: here on a local
directory, with the cut forced small. The files a split save leaves are
listed with os, not with jaxckpt."""

from __future__ import annotations

import os

import numpy as np
import pytest

import jaxckpt
from jaxckpt import layout, storage
from jaxckpt.reader import CheckpointReader


def _tree():
    rng = np.random.default_rng(7)
    return {"a": [rng.standard_normal(3000, dtype=np.float32) for _ in range(5)],  # 12 KB each
            "big": rng.integers(0, 255, 40_000, dtype=np.uint8),  # above file_bytes: a file of its own
            "small": [np.arange(i, dtype=np.int16) for i in range(30)], "step": 4}


def _same(a, b) -> bool:
    return np.asarray(a).dtype == np.asarray(b).dtype and np.asarray(a).tobytes() == np.asarray(b).tobytes()


@pytest.fixture
def split(monkeypatch):
    monkeypatch.setattr(storage.Staging, "file_bytes", 20_000)


def test_file_groups_cut_between_leaves_once_a_file_holds_file_bytes():
    snap_leaves = [type("L", (), {"shards": [(None, np.zeros(n, np.uint8))]}) for n in (10, 10, 25, 0, 5, 40, 1)]
    snap = type("S", (), {"leaves": snap_leaves})
    assert layout.file_groups(snap, 20) == [range(0, 2), range(2, 3), range(3, 6), range(6, 7)]
    assert layout.file_groups(snap, None) == [range(0, 7)]
    assert layout.file_groups(snap, 1000) == [range(0, 7)]


@pytest.mark.parametrize("key", [None, bytes(range(16))], ids=["plain", "encrypted"])
def test_a_split_save_restores_bit_exactly_whole_and_partially(tmp_path, split, key):
    tree = _tree()
    jaxckpt.save(tmp_path / "ck", tree, encryption_key=key)
    names = sorted(os.listdir(tmp_path / "ck"))
    assert names == ["data-00000-00001.bin", "data-00000-00002.bin", "data-00000-00003.bin",
                     "data-00000.bin", "manifest.msgpack"], names
    with CheckpointReader(tmp_path / "ck", encryption_key=key) as r:
        assert sorted(f.name for f in r.manifest.files) == names[:-1]
        assert [f.size for f in r.manifest.files] == [os.path.getsize(tmp_path / "ck" / f.name)
                                                      for f in r.manifest.files]
    out = jaxckpt.restore(tmp_path / "ck", encryption_key=key)
    assert all(_same(a, b) for a, b in zip(out["a"] + out["small"] + [out["big"]],
                                           tree["a"] + tree["small"] + [tree["big"]])) and out["step"] == 4
    part = jaxckpt.restore(tmp_path / "ck", {"big": np.zeros(40_000, np.uint8)}, partial=True, encryption_key=key)
    assert _same(part["big"], tree["big"])


def test_a_missing_file_of_a_split_checkpoint_names_the_file_and_a_leaf(tmp_path, split):
    jaxckpt.save(tmp_path / "ck", _tree())
    os.remove(tmp_path / "ck" / "data-00000-00002.bin")
    with pytest.raises(jaxckpt.CorruptCheckpointError, match=r"data-00000-00002\.bin.*while reading leaf"):
        jaxckpt.restore(tmp_path / "ck")
