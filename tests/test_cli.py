"""The ``jaxckpt`` command line: verify (good, damaged, directories of steps,
bounded batches), ls, show, usage errors; in-process through ``main(argv)`` and
once as ``python -m jaxckpt`` in a subprocess."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxckpt
from jaxckpt import arrayinfo
from jaxckpt import cli
from jaxckpt import format as fmt
from jaxckpt import progress
from jaxckpt import posixdirs
from jaxckpt.reader import CheckpointReader

from helpers import FakeClock, flip_bit, read_manifest

DATA = "data-00000.bin"
T0 = 1_700_000_000.0
TREE = {
    "params": {"w": np.arange(64 * 256, dtype=np.float32).reshape(64, 256), "b": np.linspace(0, 1, 7)},
    "step": np.int64(5),
    "note": "hello",
}  # 65536 + 56 + 8 = 65600 bytes = 64.1 KiB in 4 leaves


pytestmark = pytest.mark.usefixtures("no_progress_env")


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def leaf_record(path, key: str) -> fmt.LeafRecord:
    return next(x for x in read_manifest(path).leaves if x.path == key)


@pytest.fixture
def ckpt(ckdir):
    p = ckdir / "c"
    jaxckpt.save(p, TREE, metadata={"run": "demo", "lr": 0.001})
    return p


def state(step: int) -> dict:
    return {"w": np.full((8, 8), step, np.float32), "step": np.int64(step)}  # 264 bytes


@pytest.fixture
def run_dir(ckdir):
    """A manager's directory with steps 1, 2 and 10 (10 forced), fixed timestamps."""
    d = ckdir / "run"
    clock = FakeClock(T0)
    with jaxckpt.CheckpointManager(d, async_save=False, _clock=clock) as mgr:
        for step in (1, 2, 10):
            clock.t = T0 + step
            assert mgr.save(step, state(step), epoch=step // 2, metrics={"loss": 1 / step, "acc": step / 10},
                            force=step == 10)
    return d


def iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts).isoformat(timespec="seconds")


CHECKSUM = r"expected xxh3 0x[0-9a-f]{16}, found 0x[0-9a-f]{16}"


# ----------------------------------------------------------------------------- verify: one checkpoint
def test_verify_good_checkpoint(ckpt, capsys):
    assert run(capsys, "verify", ckpt) == (0, f"OK  {ckpt}  (4 leaves, 64.1 KiB)\n", "")  # no bar: not a TTY


def test_verify_checkpoint_with_only_python_values(ckdir, capsys):
    jaxckpt.save(ckdir / "v", {"a": 1, "b": "x"})
    assert run(capsys, "verify", ckdir / "v") == (0, f"OK  {ckdir / 'v'}  (2 leaves, 0 B)\n", "")


@pytest.mark.parametrize("leaf", ["params/w", "params/b", "step"])
def test_verify_flipped_bit_names_file_and_leaf(ckpt, capsys, leaf):
    s = leaf_record(ckpt, leaf).shards[0]
    flip_bit(ckpt / DATA, s.offset + s.length - 1, bit=5)
    rc, out, err = run(capsys, "verify", ckpt)
    assert (rc, err) == (1, "")
    assert re.fullmatch(re.escape(f"FAILED  {ckpt}: {ckpt / DATA}: checksum mismatch in leaf {leaf!r}, chunk 0 "
                                  f"(bytes at offset {s.offset}): ") + CHECKSUM + "\n", out), out


def test_verify_truncated_data_file(ckpt, capsys):
    size = os.path.getsize(ckpt / DATA)
    os.truncate(ckpt / DATA, size - 1)
    rc, out, _ = run(capsys, "verify", ckpt)
    assert rc == 1
    assert re.fullmatch(re.escape(f"FAILED  {ckpt}: {ckpt / DATA}: truncated: the manifest records {size} bytes, "
                                  f"found {size - 1} (while reading leaf ") + r"'(params/b|params/w|step)'\)\n", out)


def test_verify_deleted_data_file(ckpt, capsys):
    os.remove(ckpt / DATA)
    rc, out, _ = run(capsys, "verify", ckpt)
    assert rc == 1
    assert re.fullmatch(re.escape(f"FAILED  {ckpt}: {ckpt / DATA}: file is missing (while reading leaf ")
                        + r"'(params/b|params/w|step)'\)\n", out)


def test_verify_missing_manifest(ckpt, capsys):
    os.remove(ckpt / fmt.MANIFEST_NAME)
    assert run(capsys, "verify", ckpt) == (
        1, f"FAILED  {ckpt}: {ckpt}: not a committed checkpoint (manifest.msgpack is missing)\n", "")


def test_verify_empty_and_damaged_manifest(ckpt, capsys):
    m = ckpt / fmt.MANIFEST_NAME
    good = m.read_bytes()
    m.write_bytes(b"")
    assert run(capsys, "verify", ckpt) == (1, f"FAILED  {ckpt}: {m}: the manifest is empty (0 bytes)\n", "")
    m.write_bytes(good)
    flip_bit(m, len(good) // 2)  # inside the body
    rc, out, _ = run(capsys, "verify", ckpt)
    assert rc == 1
    assert re.fullmatch(re.escape(f"FAILED  {ckpt}: {m}: manifest checksum mismatch: ") + CHECKSUM + "\n", out)


def test_verify_sharded_key_and_bfloat16_leaves(ckdir, capsys):
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("x", "y"))
    arr = jax.device_put(np.arange(8 * 16, dtype=np.int32).reshape(8, 16), NamedSharding(mesh, P("x", "y")))
    tree = {"sharded": arr, "key": jax.random.key(0), "half": np.ones((3, 5), jax.numpy.bfloat16)}
    jaxckpt.save(ckdir / "c", tree)
    assert run(capsys, "verify", ckdir / "c") == (0, f"OK  {ckdir / 'c'}  (3 leaves, 550 B)\n", "")
    s = leaf_record(ckdir / "c", "sharded").shards[7]
    flip_bit(ckdir / "c" / DATA, s.offset)
    rc, out, _ = run(capsys, "verify", ckdir / "c")
    assert rc == 1 and f": checksum mismatch in leaf 'sharded', chunk 0 (bytes at offset {s.offset})" in out


# ----------------------------------------------------------------------------- verify: directories of steps
def test_verify_manager_directory(run_dir, capsys):
    (run_dir / "logs").mkdir()  # not a checkpoint: ignored
    (run_dir / "logs" / "train.txt").write_text("loss 1\n")
    hidden = run_dir / f".10.{posixdirs.TMP_MARK}-0123456789abcdef"  # a save in progress is never a checkpoint
    jaxckpt.save(hidden, state(11))
    os.symlink(run_dir / "1", run_dir / "99")  # a symbolic link is never a step (docs/FORMAT.md section 2)
    expected = "".join(f"OK  {run_dir / s}  (2 leaves, 264 B)\n" for s in ("1", "2", "10"))
    assert run(capsys, "verify", run_dir) == (0, expected + "3 of 3 checkpoints OK\n", "")
    assert run(capsys, "verify", "--quiet", run_dir) == (0, "", "")
    # ... but a link named on the command line is followed
    assert run(capsys, "verify", run_dir / "99") == (0, f"OK  {run_dir / '99'}  (2 leaves, 264 B)\n", "")


def test_verify_manager_directory_with_one_corrupt_step(run_dir, capsys):
    s = leaf_record(run_dir / "2", "w").shards[0]
    flip_bit(run_dir / "2" / DATA, s.offset + 100, bit=1)
    rc, out, err = run(capsys, "verify", run_dir)
    assert (rc, err) == (1, "")
    lines = out.splitlines()
    assert lines[0] == f"OK  {run_dir / '1'}  (2 leaves, 264 B)"
    assert re.fullmatch(re.escape(f"FAILED  {run_dir / '2'}: {run_dir / '2' / DATA}: checksum mismatch in leaf 'w', "
                                  f"chunk 0 (bytes at offset {s.offset}): ") + CHECKSUM, lines[1])
    assert lines[2:] == [f"OK  {run_dir / '10'}  (2 leaves, 264 B)", "2 of 3 checkpoints OK, 1 FAILED"]
    rc, out, _ = run(capsys, "verify", "-q", run_dir)
    assert rc == 1 and out == lines[1] + "\n"  # quiet: the failures only


def test_verify_step_that_lost_its_manifest(run_dir, capsys):
    os.remove(run_dir / "10" / fmt.MANIFEST_NAME)
    rc, out, _ = run(capsys, "verify", run_dir)
    assert rc == 1
    assert out.splitlines()[2:] == [
        f"FAILED  {run_dir / '10'}: {run_dir / '10'}: not a committed checkpoint (manifest.msgpack is missing)",
        "2 of 3 checkpoints OK, 1 FAILED"]


def test_verify_step_rotated_away_while_verifying(run_dir, capsys, monkeypatch):
    real = CheckpointReader.read

    def read(self, *args, **kwargs):
        if self.path == str(run_dir / "2"):
            posixdirs.remove_checkpoint(self.path)  # what a running manager's rotation does
        return real(self, *args, **kwargs)

    monkeypatch.setattr(CheckpointReader, "read", read)
    assert run(capsys, "verify", run_dir) == (0, f"OK  {run_dir / '1'}  (2 leaves, 264 B)\n"
                                              f"GONE  {run_dir / '2'}: deleted while being verified (rotated away "
                                              "by a running manager?)\n"
                                              f"OK  {run_dir / '10'}  (2 leaves, 264 B)\n"
                                              "2 of 2 checkpoints OK\n", "")


# ----------------------------------------------------------------------------- verify: bounded memory, progress
@pytest.fixture
def big(ckdir):
    mesh = Mesh(np.array(jax.devices()), ("x",))
    cols = jax.device_put(np.arange(64 * 512, dtype=np.int32).reshape(64, 512), NamedSharding(mesh, P(None, "x")))
    tree = {"cols": cols,  # 8 shards of 64 x 64 int32 (16 KiB each)
            "rows": np.arange(3 * 10000, dtype=np.uint8).reshape(3, 10000),  # one row is above the budget
            "w": np.arange(64 * 256, dtype=np.float32).reshape(64, 256),
            "small": np.ones(5)}
    jaxckpt.save(ckdir / "big", tree)
    return ckdir / "big"


def box_bytes(manifest: fmt.Manifest, i: int, box) -> int:
    leaf = manifest.leaves[i]
    shape = leaf.shape if box is None else tuple(b - a for a, b in box)
    return int(np.prod(shape, dtype=np.int64)) * arrayinfo.DTYPES[leaf.dtype].itemsize


def test_verify_reads_in_bounded_batches_covering_every_byte(big, monkeypatch):
    calls = []
    real = CheckpointReader.read

    def read(self, requests, *args, **kwargs):
        requests = list(requests)
        calls.append([(i, box, box_bytes(self.manifest, i, box)) for i, box in requests])
        return real(self, requests, *args, **kwargs)

    counted = []
    real_close = progress.ProgressBar.close

    def close(self, ok=True):
        counted.append((self.bytes_done, self.leaves_done, self.total_bytes, self.total_leaves))
        real_close(self, ok)

    monkeypatch.setattr(CheckpointReader, "read", read)
    monkeypatch.setattr(progress.ProgressBar, "close", close)
    res = cli.verify_checkpoint(str(big), batch_bytes=8192)
    assert res == cli.VerifyResult(str(big), True, 4, 131072 + 30000 + 65536 + 40)
    assert all(sum(n for *_, n in batch) <= 10000 for batch in calls)  # the budget, or one row when larger
    assert max(sum(n for *_, n in batch) for batch in calls) == 10000
    assert sum(n for batch in calls for *_, n in batch) == res.nbytes  # every byte requested exactly once
    with CheckpointReader(big) as r:
        by_leaf: dict = {}
        for batch in calls:
            for i, box, n in batch:
                by_leaf.setdefault(r.manifest.leaves[i].path, []).append(box)
        cols = r.manifest.leaves[r.by_path["cols"]]
        # the sharded leaf is read shard by shard, each in two slabs of 32 rows
        assert sorted(by_leaf["cols"]) == sorted(((lo, lo + 32),) + s.box[1:] for s in cols.shards for lo in (0, 32))
        assert by_leaf["rows"] == [((r0, r0 + 1), (0, 10000)) for r0 in range(3)]
        assert by_leaf["small"] == [None]
    assert counted == [(res.nbytes, 4, res.nbytes, 4)]  # the bar counted each byte and leaf once

    cols_last = cols.shards[-1]
    flip_bit(big / DATA, cols_last.offset + cols_last.length - 1)  # in the last slab of the last shard
    monkeypatch.setattr(CheckpointReader, "read", real)
    res = cli.verify_checkpoint(str(big), batch_bytes=8192)
    assert not res.ok and re.fullmatch(re.escape(f"{big / DATA}: checksum mismatch in leaf 'cols', chunk 0 (bytes at "
                                                 f"offset {cols_last.offset}): ") + CHECKSUM, res.error)


def test_verify_progress_flags(ckpt, capsys, monkeypatch):
    rc, out, err = run(capsys, "verify", "--progress", ckpt)
    assert (rc, out) == (0, f"OK  {ckpt}  (4 leaves, 64.1 KiB)\n")
    drawn = [f for f in err.split("\r") if f.strip()]
    assert drawn[0].endswith("  [--------------------]   0%  0 B/64.1 KiB  0/4 leaves")
    assert err.endswith("\r" + " " * len(err.split("\r")[-2]) + "\r")  # erased: the OK line is the summary
    monkeypatch.setenv(progress.ENV_VAR, "1")
    rc, out, err = run(capsys, "verify", ckpt)
    assert rc == 0 and "0/4 leaves" in err
    assert run(capsys, "verify", "--no-progress", ckpt) == (0, out, "")


# ----------------------------------------------------------------------------- ls
def test_ls_table(run_dir, capsys):
    rc, out, err = run(capsys, "ls", run_dir)
    assert (rc, err) == (0, "")
    rows = [re.split(r"  +", line) for line in out.splitlines()]
    assert rows == [
        ["STEP", "EPOCH", "TIME", "SIZE", "METRICS", "REASON"],
        ["1", "0", iso(T0 + 1), "264 B", "loss=1 acc=0.1", "interval"],
        ["2", "1", iso(T0 + 2), "264 B", "loss=0.5 acc=0.2", "interval"],
        ["10", "5", iso(T0 + 10), "264 B", "loss=0.1 acc=1", "forced"],
    ]
    assert [line.index("interval") for line in out.splitlines()[1:3]] == [out.splitlines()[0].index("REASON")] * 2


def test_ls_json(run_dir, capsys):
    rc, out, _ = run(capsys, "ls", "--json", run_dir)
    assert rc == 0
    got = json.loads(out)
    assert [r["step"] for r in got] == [1, 2, 10]
    assert got[2] == {"step": 10, "epoch": 5, "timestamp": T0 + 10, "time": iso(T0 + 10), "nbytes": 264,
                      "metrics": {"loss": 0.1, "acc": 1.0}, "reason": "forced", "metadata": None,
                      "path": str(run_dir / "10"), "jax_version": jax.__version__,
                      "jaxckpt_version": jaxckpt.__version__}


def test_ls_checkpoints_no_manager_wrote_and_odd_values(ckdir, capsys):
    jaxckpt.save(ckdir / "7", {"a": np.ones(2)}, metadata={"blob": b"\x00\xff", "nan": float("nan")})
    rc, out, _ = run(capsys, "ls", ckdir)
    assert rc == 0
    assert re.split(r"  +", out.splitlines()[1])[:2] + re.split(r"  +", out.splitlines()[1])[3:] == [
        "7", "-", "16 B", "-", "-"]
    got = json.loads(run(capsys, "ls", "--json", ckdir)[1])  # strict JSON: bytes as hex, NaN as a string
    assert got[0]["reason"] is None and got[0]["metadata"] == {"blob": "00ff", "nan": "NaN"}


def test_ls_unreadable_step(run_dir, capsys):
    (run_dir / "10" / fmt.MANIFEST_NAME).write_bytes(b"")
    rc, out, err = run(capsys, "ls", run_dir)
    assert rc == 1
    assert re.split(r"  +", out.splitlines()[-1]) == ["10", "?", "?", "?", "?", "UNREADABLE"]
    assert err == f"jaxckpt ls: step 10: {run_dir / '10' / fmt.MANIFEST_NAME}: the manifest is empty (0 bytes)\n"


def test_ls_step_naming_options(ckdir, capsys):
    with jaxckpt.CheckpointManager(ckdir, async_save=False, step_prefix="run") as mgr:
        mgr.save(1, state(1))
        mgr.save(20, state(20))
    assert {"run_1", "run_20"} <= set(os.listdir(ckdir)) and not {"1", "20"} & set(os.listdir(ckdir))
    assert run(capsys, "ls", ckdir) == (0, "", f"{ckdir}: no committed checkpoints (2 checkpoint directories are not "
                                                "named by step, e.g. 'run_1': see --step-format)\n")
    rc, out, _ = run(capsys, "ls", "--step-prefix", "run", ckdir)
    assert rc == 0 and [line.split()[0] for line in out.splitlines()] == ["STEP", "1", "20"]
    rc, _, err = run(capsys, "ls", "--step-format", "{epoch}", ckdir)
    assert rc == 2 and err.startswith("jaxckpt ls: step_format '{epoch}': it must contain {step} once")
    assert run(capsys, "ls", ckdir / "empty_not_there")[0] == 2


def test_ls_refuses_a_single_checkpoint(ckpt, capsys):
    assert run(capsys, "ls", ckpt) == (2, "", f"jaxckpt ls: {ckpt} is a checkpoint, not a directory of checkpoints; "
                                              f"try: jaxckpt show {ckpt}\n")


# ----------------------------------------------------------------------------- show
def test_show_text(ckpt, capsys):
    created = jaxckpt.inspect(ckpt).created
    assert run(capsys, "show", ckpt) == (0, "\n".join([
        str(ckpt),
        f"  format v1, written by jaxckpt {jaxckpt.__version__}, created {iso(created)}",
        "  4 leaves, 64.1 KiB",
        "",
        "KEY PATH  SHAPE      DTYPE    SIZE",
        "note      -          str      'hello'",
        "params/b  (7,)       float64  56 B",
        "params/w  (64, 256)  float32  64.0 KiB",
        "step      ()         int64    8 B",
        "",
        "metadata:",
        "  {'run': 'demo', 'lr': 0.001}",
    ]) + "\n", "")


def test_show_keys_bfloat16_and_no_metadata(ckdir, capsys):
    jaxckpt.save(ckdir / "k", {"rng": jax.random.key(1), "h": np.zeros((2, 3), jax.numpy.bfloat16), "z": 1 + 2j})
    rc, out, _ = run(capsys, "show", ckdir / "k")
    assert rc == 0
    assert out.splitlines()[4:] == ["KEY PATH  SHAPE   DTYPE        SIZE",
                                    "h         (2, 3)  bfloat16     12 B",
                                    "rng       (2,)    key<uint32>  8 B",
                                    "z         -       complex      (1+2j)",
                                    "",
                                    "metadata: none"]


def test_show_json(ckdir, capsys):
    jaxckpt.save(ckdir / "c", {"w": np.ones((2, 3), np.float32), "z": 1 + 2j, "s": "x"},
                 metadata={"b": b"\x01", "n": [1, 2]})
    rc, out, _ = run(capsys, "show", "--json", ckdir / "c")
    assert rc == 0
    doc = json.loads(out)
    assert doc["path"] == str(ckdir / "c") and doc["format_version"] == 1 and doc["total_bytes"] == 24
    assert doc["metadata"] == {"b": "01", "n": [1, 2]}
    assert doc["leaves"] == [
        {"path": "s", "kind": "value", "shape": [], "dtype": None, "nbytes": 0, "value": "x"},
        {"path": "w", "kind": "array", "shape": [2, 3], "dtype": "float32", "nbytes": 24},
        {"path": "z", "kind": "value", "shape": [], "dtype": None, "nbytes": 0, "value": [1.0, 2.0]},
    ]


def test_show_errors(run_dir, ckdir, capsys):
    assert run(capsys, "show", run_dir) == (2, "", f"jaxckpt show: {run_dir} is a directory of checkpoints (1, 2, 10); "
                                                   f"show one of them, e.g. jaxckpt show {run_dir / '10'}\n")
    os.remove(run_dir / "2" / fmt.MANIFEST_NAME)
    assert run(capsys, "show", run_dir / "2") == (
        1, "", f"jaxckpt show: {run_dir / '2'}: not a committed checkpoint (manifest.msgpack is missing)\n")
    (run_dir / "1" / fmt.MANIFEST_NAME).write_bytes(b"\x00")
    rc, _, err = run(capsys, "show", run_dir / "1")
    assert rc == 1 and err.startswith(f"jaxckpt show: {run_dir / '1' / fmt.MANIFEST_NAME}: not a jaxckpt manifest")
    assert "Traceback" not in err


# ----------------------------------------------------------------------------- usage
@pytest.mark.parametrize("argv, message", [
    ([], "usage: jaxckpt [-h] [--version] COMMAND ..."),
    (["verify"], "jaxckpt verify: error: the following arguments are required: PATH"),
    (["frobnicate"], "jaxckpt: error: argument COMMAND: invalid choice: 'frobnicate'"),
    (["verify", "--progress", "--no-progress", "x"], "argument --no-progress: not allowed with argument --progress"),
    (["ls"], "jaxckpt ls: error: the following arguments are required: DIR"),
    (["show", "a", "b"], "jaxckpt: error: unrecognized arguments: b"),
])
def test_usage_errors_exit_2(capsys, argv, message):
    rc, out, err = run(capsys, *argv)
    assert (rc, out) == (2, "") and message in err


def test_paths_that_cannot_be_verified_exit_2(ckdir, capsys):
    assert run(capsys, "verify", ckdir / "nope") == (2, "", f"jaxckpt verify: {ckdir / 'nope'}: no such directory\n")
    (ckdir / "f").write_text("x")
    assert run(capsys, "verify", ckdir / "f") == (2, "", f"jaxckpt verify: {ckdir / 'f'}: not a directory\n")
    (ckdir / "empty").mkdir()
    assert run(capsys, "verify", ckdir / "empty") == (
        2, "", f"jaxckpt verify: {ckdir / 'empty'}: nothing to verify (no checkpoint here: no manifest.msgpack in "
               "it or in its subdirectories)\n")


def test_help_and_version(capsys):
    rc, out, _ = run(capsys, "--help")
    assert rc == 0 and all(c in out for c in ("verify", "ls", "show", "Exit status"))
    assert run(capsys, "--version") == (0, f"jaxckpt {jaxckpt.__version__}\n", "")


def test_interrupt_exits_130_without_a_traceback(ckpt, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "verify_checkpoint", interrupted)
    assert run(capsys, "verify", ckpt) == (130, "", "jaxckpt verify: interrupted\n")


def test_console_script_entry_point():
    (ep,) = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "jaxckpt"]
    assert ep.value == "jaxckpt.cli:main" and ep.load() is cli.main


def test_python_dash_m_in_a_subprocess(run_dir):
    s = leaf_record(run_dir / "10", "step").shards[0]
    flip_bit(run_dir / "10" / DATA, s.offset)
    env = {k: v for k, v in os.environ.items() if k != progress.ENV_VAR}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, "-m", "jaxckpt", "verify", str(run_dir)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert (proc.returncode, proc.stderr) == (1, "")
    lines = proc.stdout.splitlines()
    assert lines[:2] == [f"OK  {run_dir / s}  (2 leaves, 264 B)" for s in ("1", "2")]
    assert lines[2].startswith(f"FAILED  {run_dir / '10'}: {run_dir / '10' / DATA}: checksum mismatch in leaf 'step'")
    assert lines[3:] == ["2 of 3 checkpoints OK, 1 FAILED"]
