"""No pickle anywhere: every read path works with pickle disabled."""

from __future__ import annotations

import ast
import os
import pickle

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxckpt


class Opt(NamedTuple):
    mu: object
    count: object


def _refuse(*args, **kwargs):
    raise AssertionError("pickle was used")


class _RefusingUnpickler:
    def __init__(self, *args, **kwargs):
        raise AssertionError("pickle.Unpickler was used")


@pytest.fixture
def no_pickle(monkeypatch):
    for name in ("loads", "load", "dumps", "dump"):
        monkeypatch.setattr(pickle, name, _refuse)
    monkeypatch.setattr(pickle, "Unpickler", _RefusingUnpickler)
    monkeypatch.setattr(pickle, "Pickler", _RefusingUnpickler)
    # numpy's own loaders must not be used either (np.load allows pickles when asked)
    monkeypatch.setattr(np, "load", _refuse)
    with pytest.raises(AssertionError, match="pickle was used"):
        pickle.loads(pickle.HIGHEST_PROTOCOL.to_bytes(1, "little"))


TREE = {
    "params": {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": jnp.ones(4, jnp.bfloat16)},
    "opt": Opt(mu=[np.zeros(3), None], count=np.int32(7)),
    "key": jax.random.key(5),
    "meta": ("name", 1.5, 2, True, 1 + 1j),
}


def test_save_and_read_without_pickle(ckdir, no_pickle):
    p = ckdir / "c"
    jaxckpt.save(p, TREE, metadata={"step": 7, "tags": ["a"]})
    got = jaxckpt.restore(p)
    assert got["opt"] == {"mu": [got["opt"]["mu"][0], None], "count": np.int32(7)}
    np.testing.assert_array_equal(got["params"]["w"], TREE["params"]["w"])
    got_t = jaxckpt.restore(p, TREE)
    assert type(got_t["opt"]) is Opt and got_t["meta"] == TREE["meta"]
    assert (jax.random.key_data(got_t["key"]) == jax.random.key_data(TREE["key"])).all()
    part = jaxckpt.restore(p, {"params": {"w": np.zeros((3, 4), np.float32)}}, partial=True)
    np.testing.assert_array_equal(part["params"]["w"], TREE["params"]["w"])
    flat = jaxckpt.load_checkpoint(p)
    assert sorted(flat) == ["key", "meta/0", "meta/1", "meta/2", "meta/3", "meta/4", "opt/count", "opt/mu/0",
                            "params/b", "params/w"]
    tree, report = jaxckpt.load_into(TREE, p)
    assert report == jaxckpt.LoadReport([], [])
    tree, report = jaxckpt.load_into(TREE, flat)
    assert report == jaxckpt.LoadReport([], [])
    info = jaxckpt.inspect(p)
    assert info.metadata == {"step": 7, "tags": ["a"]} and len(info.leaves) == 10


def test_async_save_without_pickle(ckdir, no_pickle):
    with jaxckpt.AsyncCheckpointer() as ck:
        ck.save(ckdir / "c", TREE).result()
    assert len(jaxckpt.load_checkpoint(ckdir / "c")) == 10
    np.testing.assert_array_equal(jaxckpt.restore(ckdir / "c")["params"]["w"], TREE["params"]["w"])


def test_package_sources_do_not_import_pickle():
    pkg = os.path.dirname(jaxckpt.__file__)
    banned = {"pickle", "cPickle", "dill", "cloudpickle", "shelve", "marshal", "joblib"}
    for name in sorted(os.listdir(pkg)):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(pkg, name), encoding="utf-8") as f:
            tree = ast.parse(f.read(), name)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [(node.module or "").split(".")[0]]
            else:
                continue
            assert not banned.intersection(mods), (name, node.lineno, mods)
        src = ast.unparse(tree)
        assert "allow_pickle" not in src, name
        assert "np.load(" not in src and "numpy.load(" not in src, name
