"""The same save, overwrite and deletion on a local directory and in a bucket
(moto's S3, Azurite, fake-gcs-server, all on 127.0.0.1) must end the same way:
what a save may take, what an overwrite refuses or replaces, what a deletion
leaves. Each place is looked at with its own tools (``os``, boto3, Azure's
REST API, google-cloud-storage), not through jaxckpt."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

import azservers
import jaxckpt
import objservers
from jaxckpt.format import MANIFEST_NAME

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
S3_OPTIONS = {"access_key_id": "testing", "secret_access_key": "testing", "region": "us-east-1"}


class Place:
    """A local directory or a bucket: URLs of names in it, and its files as its own tools see them."""

    def __init__(self, kind: str, root: str, options: dict | None, endpoint: str | None = None):
        self.kind, self.root, self.options, self.endpoint = kind, root, options, endpoint
        self.bucket = root.partition("://")[2]

    def url(self, name: str) -> str:
        return f"{self.root}/{name}"

    def files(self, name: str) -> list[str]:
        """Every file (object) under ``name``, relative to it."""
        if self.kind == "local":
            top = self.url(name)
            return sorted(os.path.relpath(os.path.join(d, f), top) for d, _, fs in os.walk(top) for f in fs)
        prefix = name + "/"
        if self.kind == "s3":
            r = objservers.s3_client(self.endpoint).list_objects_v2(Bucket=self.bucket, Prefix=prefix)
            keys = [o["Key"] for o in r.get("Contents", [])]
        elif self.kind == "az":
            keys = azservers.list_blobs(self.endpoint, self.bucket, prefix)
        else:
            keys = [b.name for b in objservers.gcs_client(self.endpoint).list_blobs(self.bucket, prefix=prefix)]
        return sorted(k[len(prefix):] for k in keys)

    def put(self, name: str, data: bytes) -> None:
        """A file of the user's (or, with a trailing '/', a folder: an empty directory, a zero-byte marker)."""
        if self.kind == "local":
            path = self.url(name)
            os.makedirs(path if name.endswith("/") else os.path.dirname(path), exist_ok=True)
            if not name.endswith("/"):
                with open(path, "wb") as f:
                    f.write(data)
        elif self.kind == "s3":
            objservers.s3_client(self.endpoint).put_object(Bucket=self.bucket, Key=name, Body=data)
        elif self.kind == "az":
            azservers.put_blob(self.endpoint, self.bucket, name, data)
        else:
            objservers.gcs_client(self.endpoint).bucket(self.bucket).blob(name).upload_from_string(data)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    moto = objservers.start_moto()
    azurite = azservers.start_azurite(tmp_path_factory.mktemp("azurite"))
    gcs = objservers.start_fake_gcs(tmp_path_factory.mktemp("gcs"))
    yield {"s3": moto, "az": azurite, "gs": gcs}
    for srv in (moto, azurite, gcs):
        srv.stop()


_names = iter(range(10**6))


@pytest.fixture(params=["local", "s3", "az", "gs"])
def place(request, tmp_path) -> Place:
    kind = request.param
    if kind == "local":
        return Place("local", str(tmp_path), None)
    srv = request.getfixturevalue("servers")[kind]
    name = f"parity-{next(_names)}"
    if kind == "s3":
        objservers.make_bucket(srv.endpoint, name)
        return Place(kind, f"s3://{name}", {"endpoint": srv.endpoint, **S3_OPTIONS}, srv.endpoint)
    if kind == "az":
        azservers.make_container(srv.endpoint, name)
        options = {"account_name": azservers.ACCOUNT, "account_key": azservers.KEY, "endpoint": srv.endpoint}
        return Place(kind, f"az://{name}", options, srv.endpoint)
    objservers.make_gcs_bucket(srv.endpoint, name)
    return Place(kind, f"gs://{name}", {"endpoint": srv.endpoint, "anonymous": True}, srv.endpoint)


def state(v: int) -> dict:
    return {"w": np.full((64, 16), v, np.float32), "step": v}


def restored(place: Place, name: str) -> dict:
    out = jaxckpt.restore(place.url(name), storage_options=place.options)
    return {"w": np.asarray(out["w"]), "step": out["step"]}


def same(a: dict, b: dict) -> bool:
    return a["w"].tobytes() == b["w"].tobytes() and a["step"] == b["step"]


def checkpoint_files(files: list[str]) -> bool:
    """Exactly a committed checkpoint's files: its manifest and one data file (object)."""
    return len(files) == 2 and MANIFEST_NAME in files and files[0].startswith("data-")


def test_a_save_takes_an_empty_directory_or_folder_made_ahead(place):
    for name, overwrite in (("made", False), ("made-too", True)):
        if place.kind != "gs":  # fake-gcs-server keeps no zero-byte 'name/' objects (GCS does)
            place.put(name + "/", b"")
        jaxckpt.save(place.url(name), state(1), overwrite=overwrite, storage_options=place.options)
        assert same(restored(place, name), state(1))
    with pytest.raises(jaxckpt.CheckpointExistsError, match="a checkpoint already exists"):
        jaxckpt.save(place.url("made"), state(2), storage_options=place.options)


def test_an_overwrite_refuses_a_place_that_holds_something_else(place):
    place.put("junk/notes.txt", b"mine")
    with pytest.raises(jaxckpt.CheckpointExistsError) as e:
        jaxckpt.save(place.url("junk"), state(1), overwrite=True, storage_options=place.options)
    assert str(e.value) == f"{place.url('junk')}: exists and is not a jaxckpt checkpoint; refusing to replace it"
    assert place.files("junk") == ["notes.txt"]  # the save's own files were removed, the user's kept


def test_an_overwrite_replaces_everything_the_checkpoint_held(place):
    jaxckpt.save(place.url("ck"), state(1), storage_options=place.options)
    place.put("ck/notes.txt", b"left in the checkpoint")
    jaxckpt.save(place.url("ck/inner"), state(7), storage_options=place.options)
    jaxckpt.save(place.url("ck"), state(2), overwrite=True, storage_options=place.options)
    assert checkpoint_files(place.files("ck")), place.files("ck")
    assert same(restored(place, "ck"), state(2))


def test_rotation_deletes_everything_under_a_step(place):
    opts = place.options
    with jaxckpt.CheckpointManager(place.url("run"), max_to_keep=1, storage_options=opts) as mgr:
        mgr.save(1, state(1), force=True)
        mgr.wait_until_finished()
        place.put("run/1/notes.txt", b"a user's file in a step")
        jaxckpt.save(place.url("run/1/inner"), state(9), storage_options=opts)
        mgr.save(2, state(2), force=True)
        mgr.wait_until_finished()
        assert mgr.all_steps() == [2]
        assert place.files("run/1") == []
        with pytest.raises(jaxckpt.CheckpointNotFoundError):
            jaxckpt.restore(place.url("run/1/inner"), storage_options=opts)
    jaxckpt.save(place.url("run/1"), state(5), storage_options=opts)  # nothing left is taken for a checkpoint
    assert same(restored(place, "run/1"), state(5))


def test_concurrent_overwrites_all_succeed_the_last_wins_and_nothing_is_left(place):
    opts = place.options
    for trial in range(3):
        name = f"race-{trial}"
        jaxckpt.save(place.url(name), state(0), storage_options=opts)
        errors: list[BaseException] = []

        def overwrite(v: int) -> None:
            try:
                jaxckpt.save(place.url(name), state(v), overwrite=True, storage_options=opts)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=overwrite, args=(v,)) for v in (1, 2, 3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert checkpoint_files(place.files(name)), place.files(name)
        assert any(same(restored(place, name), state(v)) for v in (1, 2, 3))


@pytest.mark.parametrize("url", ["s3://bucket-ok/run\t1", "gs://bucket-ok/a\nb", "az://container/x\x7f",
                                 "s3://bucket-ok/a\0b", "/tmp/a\0b"])
def test_a_control_character_in_a_path_is_refused_before_anything_is_sent(url):
    with pytest.raises(jaxckpt.UnsupportedLocationError) as e:
        jaxckpt.save(url, state(1))
    assert str(e.value).startswith(repr(url) + ": ")
    assert ("NUL" if "\0" in url else "control character") in str(e.value)


def test_something_other_than_a_checkpoint_in_the_way_is_named_as_such(place):
    place.put("file", b"a user's file")
    place.put("dir/notes.txt", b"a user's file")
    for name in (["file"] if place.kind == "local" else []) + ["dir"]:
        for overwrite in (False, True):
            with pytest.raises(jaxckpt.CheckpointExistsError) as e:
                jaxckpt.save(place.url(name), state(1), overwrite=overwrite, storage_options=place.options)
            assert str(e.value) == f"{place.url(name)}: exists and is not a jaxckpt checkpoint; refusing to replace it"
    assert place.files("dir") == ["notes.txt"]


def test_a_file_in_the_way_of_a_directory_is_a_checkpoint_error(tmp_path):
    (tmp_path / "file").write_bytes(b"x")
    for make in (lambda: jaxckpt.save(tmp_path / "file" / "ck", state(1)),
                 lambda: jaxckpt.CheckpointManager(tmp_path / "file" / "run")):
        with pytest.raises(jaxckpt.CheckpointError) as e:
            make()
        assert str(e.value) == f"{tmp_path / 'file'}: exists and is not a directory, so nothing can be made under it"
    jaxckpt.save(tmp_path / "ck", state(1))
    (tmp_path / "dir").mkdir()
    with pytest.raises(jaxckpt.CheckpointExistsError) as e:
        jaxckpt.convert(tmp_path / "ck", tmp_path / "dir", to="safetensors")
    assert str(e.value) == f"{tmp_path / 'dir'}: a directory is there; refusing to replace it with a file"
    assert os.listdir(tmp_path / "dir") == [] and sorted(os.listdir(tmp_path)) == ["ck", "dir", "file"]
