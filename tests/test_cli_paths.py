"""The command line on every kind of path: file:// URLs, a missing place, an
object where a prefix is expected, a scheme no store takes, on disk and on
moto's S3 (on 127.0.0.1); and what `convert` does with what is already at its
destination, its keys and its metadata."""

from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors.numpy

import jaxckpt
import objservers
from jaxckpt import cli

pytestmark = [pytest.mark.usefixtures("no_progress_env"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]
KEY, OTHER_KEY = bytes(range(32)), bytes(range(1, 33))


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def moto():
    srv = objservers.start_moto()
    objservers.make_bucket(srv.endpoint, "cli-paths")
    yield srv
    srv.stop()


@pytest.fixture
def s3(moto, monkeypatch) -> str:
    """The bucket's URL, with the environment a user sets for it (the conftest set the credentials)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto.endpoint)
    monkeypatch.setenv("AWS_ALLOW_HTTP", "true")
    return "s3://cli-paths"


def test_file_urls_are_local_paths_to_every_command(tmp_path, capsys):
    with jaxckpt.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, {"w": np.arange(4.0)}, force=True)
    url = f"file://{tmp_path}/run"
    assert run(capsys, "ls", url)[1].splitlines()[1].split()[0] == "1"
    rc, out, _ = run(capsys, "verify", url)
    assert rc == 0 and out.splitlines()[-1] == "1 of 1 checkpoints OK"
    rc, out, _ = run(capsys, "show", url + "/1")
    assert rc == 0 and out.startswith(f"{tmp_path}/run/1\n")
    safetensors.numpy.save_file({"t": np.ones(2, np.float32)}, str(tmp_path / "m.safetensors"))
    assert run(capsys, "show", f"file://{tmp_path}/m.safetensors")[0] == 0


def test_a_missing_place_and_a_bad_url_are_usage_errors_on_disk_and_in_a_bucket(tmp_path, s3, capsys):
    safetensors.numpy.save_file({"t": np.ones(2, np.float32)}, str(tmp_path / "m.safetensors"))
    assert run(capsys, "convert", tmp_path / "m.safetensors", f"{s3}/m.safetensors", "--to", "safetensors")[0] == 0
    for cmd in ("ls", "show", "verify"):
        assert run(capsys, cmd, tmp_path / "nope") == (2, "", f"jaxckpt {cmd}: {tmp_path / 'nope'}: no such directory\n")
        assert run(capsys, cmd, f"{s3}/nope") == (
            2, "", f"jaxckpt {cmd}: {s3}/nope: nothing there (no object under this prefix)\n")
        assert run(capsys, cmd, "hdfs://host/x")[0] == 2
        assert run(capsys, cmd, "s3://BAD/x")[0] == 2
    for cmd in ("ls", "verify"):
        assert run(capsys, cmd, f"{s3}/m.safetensors") == (
            2, "", f"jaxckpt {cmd}: {s3}/m.safetensors: not a directory (an object, not a prefix)\n")
    rc, out, _ = run(capsys, "show", f"{s3}/m.safetensors")
    assert rc == 0 and out.startswith(f"{s3}/m.safetensors\n")
    assert run(capsys, "ls", s3)[0] == 0  # the bucket's root: nothing to check


def test_ls_with_a_key_that_opens_nothing_fails(tmp_path, capsys):
    with jaxckpt.CheckpointManager(tmp_path / "run", encryption_key=KEY) as mgr:
        mgr.save(1, {"w": np.arange(4.0)}, force=True)
    (tmp_path / "other.key").write_bytes(OTHER_KEY)
    rc, out, _ = run(capsys, "ls", tmp_path / "run")
    assert rc == 0 and out.splitlines()[1].endswith("encrypted (--key-file to show)")
    rc, out, _ = run(capsys, "ls", tmp_path / "run", "--key-file", tmp_path / "other.key")
    assert rc == 1 and out.splitlines()[1].endswith("WRONG KEY")


def test_convert_refuses_what_is_at_its_destination_unless_told_to_overwrite(tmp_path, s3, capsys):
    jaxckpt.save(tmp_path / "ck", {"w": np.arange(3, dtype=np.float32)})
    jaxckpt.save(tmp_path / "ck2", {"w": np.ones(3, np.float32)})
    for dst in (tmp_path / "new" / "dir" / "m.safetensors", f"{s3}/conv/m.safetensors"):  # parents are made
        assert run(capsys, "convert", tmp_path / "ck", dst, "--to", "safetensors")[0] == 0
        rc, _, err = run(capsys, "convert", tmp_path / "ck2", dst, "--to", "safetensors")
        assert (rc, err) == (1, f"jaxckpt convert: {dst}: exists (pass --overwrite to replace it)\n")
        assert jaxckpt.load_checkpoint(str(dst))["w"].tolist() == [0, 1, 2]
        assert run(capsys, "convert", tmp_path / "ck2", dst, "--to", "safetensors", "--overwrite")[0] == 0
        assert jaxckpt.load_checkpoint(str(dst))["w"].tolist() == [1, 1, 1]
    rc, _, err = run(capsys, "convert", tmp_path / "ck", tmp_path / "ck2")
    assert (rc, err) == (1, f"jaxckpt convert: {tmp_path / 'ck2'}: a checkpoint already exists (pass --overwrite "
                            "to replace it)\n")
    assert run(capsys, "convert", tmp_path / "ck", tmp_path / "ck2", "--overwrite")[0] == 0
    assert jaxckpt.restore(tmp_path / "ck2")["w"].tolist() == [0, 1, 2]
    jaxckpt.save(f"{s3}/conv/ck", {"w": np.ones(3, np.float32)})  # a checkpoint's prefix: never taken for a file
    for dst in (f"{s3}/conv/ck", tmp_path / "ck"):
        rc, _, err = run(capsys, "convert", tmp_path / "ck2", dst, "--to", "safetensors", "--overwrite")
        assert (rc, err) == (1, f"jaxckpt convert: {dst}: a directory is there; refusing to replace it with a file\n")
    assert jaxckpt.restore(f"{s3}/conv/ck")["w"].tolist() == [1, 1, 1]
    with pytest.raises(jaxckpt.UnsupportedValueError, match="an orbax destination is never replaced"):
        jaxckpt.convert(tmp_path / "ck", tmp_path / "orbax", to="orbax", overwrite=True)


def test_convert_carries_a_step_record_and_exports_an_encrypted_checkpoint(tmp_path, capsys):
    with jaxckpt.CheckpointManager(tmp_path / "run", encryption_key=KEY) as mgr:
        mgr.save(2, {"w": np.arange(4.0)}, metrics={"loss": 0.5}, force=True)
    before = jaxckpt.CheckpointManager(tmp_path / "run", read_only=True, encryption_key=KEY).metadata(2)
    (tmp_path / "k").write_bytes(KEY)
    (tmp_path / "new").write_bytes(OTHER_KEY)
    assert run(capsys, "convert", tmp_path / "run" / "2", tmp_path / "rot" / "2", "--key-file", tmp_path / "k",
               "--new-key-file", tmp_path / "new")[0] == 0
    after = jaxckpt.CheckpointManager(tmp_path / "rot", read_only=True, encryption_key=OTHER_KEY).metadata(2)
    assert (after.metrics, after.timestamp, after.reason) == (before.metrics, before.timestamp, before.reason)
    assert run(capsys, "convert", tmp_path / "run" / "2", tmp_path / "w.safetensors", "--to", "safetensors",
               "--key-file", tmp_path / "k")[0] == 0
    assert safetensors.numpy.load_file(str(tmp_path / "w.safetensors"))["w"].tolist() == [0, 1, 2, 3]
    with pytest.raises(jaxckpt.UnsupportedValueError, match="new_encryption_key encrypts jaxckpt destinations"):
        jaxckpt.convert(tmp_path / "run" / "2", tmp_path / "x.safetensors", to="safetensors", encryption_key=KEY,
                        new_encryption_key=OTHER_KEY)


def test_a_public_bucket_is_read_without_credentials_given_aws_skip_signature(moto, s3, monkeypatch, capsys):
    """What the no-credentials error tells a command-line user to set (storage_options are the API's only).
    (moto checks HEAD against an action of its own, s3:HeadObject; S3 against s3:GetObject.)"""
    jaxckpt.save(f"{s3}/public/ck", {"w": np.arange(3)})
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": "*",
              "Action": ["s3:GetObject", "s3:HeadObject", "s3:ListBucket"], "Resource": ["arn:aws:s3:::cli-paths",
                                                                         "arn:aws:s3:::cli-paths/*"]}]}
    objservers.s3_client(moto.endpoint).put_bucket_policy(Bucket="cli-paths", Policy=json.dumps(policy))
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    rc, _, err = run(capsys, "show", f"{s3}/public/ck")
    assert rc == 1 and "for a public bucket set AWS_SKIP_SIGNATURE=true" in err
    monkeypatch.setenv("AWS_SKIP_SIGNATURE", "true")
    rc, out, err = run(capsys, "show", f"{s3}/public/ck")
    assert rc == 0 and out.startswith(f"{s3}/public/ck\n"), err
    assert jaxckpt.restore(f"{s3}/public/ck")["w"].tolist() == [0, 1, 2]


def test_show_opens_an_encrypted_mindspore_file_with_its_key(tmp_path, capsys):
    from jaxckpt import fmt_mindspore_write

    key = bytes(range(16))
    (tmp_path / "ms.key").write_bytes(key)
    fmt_mindspore_write.write(str(tmp_path / "net.ckpt"), [("w", np.arange(6, dtype=np.float32))], enc_key=key,
                              enc_mode="AES-CBC")
    rc, _, err = run(capsys, "show", tmp_path / "net.ckpt")
    assert rc == 1 and err.endswith("is encrypted (AES-CBC); pass dec_key= (and dec_mode='AES-CBC'; --dec-key-file "
                                    "and --dec-mode AES-CBC on the command line)\n")
    rc, out, _ = run(capsys, "show", tmp_path / "net.ckpt", "--dec-key-file", tmp_path / "ms.key", "--dec-mode", "AES-CBC")
    assert rc == 0 and "mindspore checkpoint" in out and out.split("\n\n")[1].splitlines()[1].split()[:3] == [
        "w", "(6,)", "float32"]


def test_safetensors_to_safetensors_keeps_its_metadata(tmp_path, capsys):
    safetensors.numpy.save_file({"t": np.arange(4, dtype=np.float32)}, str(tmp_path / "a.safetensors"),
                                metadata={"format": "pt", "note": "kept"})
    assert run(capsys, "convert", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--to", "safetensors")[0] == 0
    with safetensors.safe_open(str(tmp_path / "b.safetensors"), "np") as f:
        assert f.metadata() == {"format": "pt", "note": "kept"} and f.get_tensor("t").tolist() == [0, 1, 2, 3]
