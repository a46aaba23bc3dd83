"""Format v1 compatibility across code changes (issue 15, "Done means").

``tests/data/format_v1/`` holds checkpoints written by the code before the
code-health refactoring (``make.py`` there says how). The current code must
restore them bit for bit, and must write the very same bytes for the same
tree, so that files written before and after restore with either code.
"""

from __future__ import annotations

import os
import sys

import jax
import msgpack
import numpy as np
import pytest

import jaxckpt
from jaxckpt import format as fmt

DATA = os.path.join(os.path.dirname(__file__), "data", "format_v1")
sys.path.insert(0, DATA)
import compat_tree  # noqa: E402

from test_roundtrip import assert_leaf_same, plain  # noqa: E402


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flat(v, f"{prefix}/{k}" if prefix else str(k))
    elif isinstance(tree, (list, tuple)) and not hasattr(tree, "_fields"):
        for i, v in enumerate(tree):
            yield from _flat(v, f"{prefix}/{i}" if prefix else str(i))
    elif isinstance(tree, tuple):
        for f in tree._fields:
            yield from _flat(getattr(tree, f), f"{prefix}/{f}")
    else:
        yield prefix, tree


def _host(x):
    """What a restore with no target gives for a saved leaf."""
    if isinstance(x, jax.Array) and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return np.asarray(x)
    return x


def test_restores_a_v1_checkpoint_written_before_the_refactoring_bit_exactly():
    want = compat_tree.build()
    got = jaxckpt.restore(os.path.join(DATA, "ckpt"))
    got_flat, want_flat = dict(_flat(got)), {p: _host(v) for p, v in _flat(plain(want))}
    assert sorted(got_flat) == sorted(want_flat)
    for path, v in want_flat.items():
        assert_leaf_same(got_flat[path], v, path)
    assert jaxckpt.inspect(os.path.join(DATA, "ckpt")).metadata == compat_tree.METADATA


def test_restores_a_v1_checkpoint_into_a_sharded_target_bit_exactly():
    want = compat_tree.build()
    got = jaxckpt.restore(os.path.join(DATA, "ckpt"), target=want)
    got_flat, want_flat = dict(_flat(got)), dict(_flat(want))
    assert sorted(got_flat) == sorted(want_flat)
    for path, w in want_flat.items():
        assert_leaf_same(got_flat[path], w, path)


def _body(path: str) -> dict:
    with open(os.path.join(path, fmt.MANIFEST_NAME), "rb") as f:
        outer = msgpack.unpackb(f.read(), raw=False, strict_map_key=False)
    assert outer["format"] == "jaxckpt" and outer["version"] == 1
    body = msgpack.unpackb(outer["body"], raw=False, strict_map_key=False)
    del body["created"], body["library"]  # the only fields that differ from one save to the next
    return body


@pytest.mark.parametrize("how", ["save", "async"])
def test_the_current_code_writes_the_same_bytes_for_the_same_tree(tmp_path, how):
    out = str(tmp_path / "again")
    if how == "save":
        jaxckpt.save(out, compat_tree.build(), metadata=compat_tree.METADATA)
    else:
        with jaxckpt.AsyncCheckpointer() as ck:
            ck.save(out, compat_tree.build(), metadata=compat_tree.METADATA).result()
    old = os.path.join(DATA, "ckpt")
    assert sorted(os.listdir(out)) == sorted(os.listdir(old))
    with open(os.path.join(out, "data-00000.bin"), "rb") as a, open(os.path.join(old, "data-00000.bin"), "rb") as b:
        assert a.read() == b.read()
    assert _body(out) == _body(old)


def test_a_v1_manager_directory_lists_and_restores():
    with jaxckpt.CheckpointManager(os.path.join(DATA, "manager"), read_only=True) as mgr:
        assert mgr.all_steps() == [2, 3]
        meta = mgr.metadata(3)
        assert (meta.step, meta.epoch, meta.reason, meta.metrics, meta.metadata) == (
            3, 1, "interval", {"loss": 1.0 / 3}, {"run": "compat"})
        got = mgr.restore()
    assert got["step"] == 3
    assert_leaf_same(got["w"], np.asarray(compat_tree.build()["jax"]["rows"]), "w")
