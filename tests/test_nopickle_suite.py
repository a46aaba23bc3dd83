"""The no-pickle guard of the whole suite (issue 6; see tests/nopickle.py and
tests/conftest.py): every test runs with pickle's loaders patched to raise."""

from __future__ import annotations

import _pickle
import io
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest

import jaxckpt
import nopickle

HERE = os.path.dirname(os.path.abspath(__file__))


def test_the_guard_is_on_in_every_test():
    assert nopickle.installed()
    data = bytes([0x80, 4]) + b"K\x01."  # protocol 4: the int 1
    for loads in (pickle.loads, _pickle.loads):
        with pytest.raises(nopickle.PickleForbidden, match="no code path may unpickle"):
            loads(data)
    with pytest.raises(nopickle.PickleForbidden):
        pickle.load(io.BytesIO(data))
    with pytest.raises(nopickle.PickleForbidden):
        pickle.Unpickler(io.BytesIO(data))
    del nopickle.ATTEMPTS[-4:]  # (these four were on purpose)


def test_third_party_unpickling_is_caught_too(tmp_path):
    # numpy's loader unpickles object arrays when allowed to: through the guard
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(nopickle.PickleForbidden):
        np.load(tmp_path / "o.npy", allow_pickle=True)
    del nopickle.ATTEMPTS[-1:]


def test_the_package_round_trips_under_the_guard(tmp_path):
    tree = {"a": np.arange(5, dtype=np.int16), "b": [1.5, "s", None], "c": (np.float32(2),)}
    with jaxckpt.CheckpointManager(tmp_path / "run", save_on_preemption=False) as mgr:
        mgr.save(1, tree, metrics={"loss": 0.5}, metadata={"note": "x"})
    with jaxckpt.CheckpointManager(tmp_path / "run", read_only=True) as ro:
        got = ro.restore()
        assert ro.metadata().metrics == {"loss": 0.5}
    assert got["a"].tobytes() == tree["a"].tobytes() and got["b"] == tree["b"] and got["c"] == tree["c"]
    assert nopickle.ATTEMPTS == []


_SWALLOWING = '''
import pickle
import pytest

def test_swallows_the_error():
    try:
        pickle.loads(b"\\x80\\x04K\\x01.")
    except Exception:
        pass

@pytest.mark.allow_pickle("a third-party library pickles its cache")
def test_exempt():
    assert pickle.loads(pickle.dumps(1)) == 1
'''


def test_a_swallowed_attempt_still_fails_the_test_and_the_exemptions_work(tmp_path):
    for name in ("conftest.py", "nopickle.py"):
        shutil.copyfile(os.path.join(HERE, name), tmp_path / name)
    (tmp_path / "test_it.py").write_text(_SWALLOWING)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert out.returncode == 1, out.stdout
    assert "1 failed, 1 passed" in out.stdout, out.stdout
    assert "this test unpickled (pickle.loads)" in out.stdout
    out = subprocess.run(cmd + ["--allow-pickle"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert out.returncode == 0 and "2 passed" in out.stdout, out.stdout
