"""The storage interface's location type: a URL never becomes a local path
(issue 15: "paths become a small value type that can later hold a URL")."""

from __future__ import annotations

import os

import numpy as np
import pytest

import jaxckpt
from jaxckpt import cli
from jaxckpt.storage import Location

TREE = {"a": np.arange(6, dtype=np.int32)}


def test_local_paths_and_file_urls_are_the_same_location(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Location.parse("ck") == Location("file", str(tmp_path / "ck"))
    assert Location.parse(f"file://{tmp_path}/ck") == Location.parse(tmp_path / "ck")
    assert Location.parse("file://localhost/x/y") == Location("file", "/x/y")
    loc = Location.parse(tmp_path / "run")
    assert (str(loc), loc.name, loc.join("7"), loc.parent) == (
        str(tmp_path / "run"), "run", Location("file", str(tmp_path / "run" / "7")), Location("file", str(tmp_path)))


def test_a_checkpoint_saved_through_a_file_url_restores_from_its_path(tmp_path):
    jaxckpt.save(f"file://{tmp_path}/ck", TREE)
    assert jaxckpt.restore(tmp_path / "ck")["a"].tobytes() == TREE["a"].tobytes()


NOT_YET = "object storage is not supported by this version of jaxckpt; use a local or shared file system path"


@pytest.mark.parametrize("url, found", [
    ("s3://bucket/run/100", f"s3:// {NOT_YET}"),
    ("gs://bucket/run", f"gs:// {NOT_YET}"),
    ("hdfs://namenode/run", "unknown storage scheme 'hdfs://' (supported: local paths and file://)"),
    ("file://otherhost/run", "a file:// URL names a local path (file:///abs/path); found host 'otherhost'"),
])
def test_a_url_never_becomes_a_local_directory(tmp_path, monkeypatch, url, found):
    monkeypatch.chdir(tmp_path)
    calls = {
        "save": lambda: jaxckpt.save(url, TREE),
        "restore": lambda: jaxckpt.restore(url),
        "inspect": lambda: jaxckpt.inspect(url),
        "load_checkpoint": lambda: jaxckpt.load_checkpoint(url),
        "load_into": lambda: jaxckpt.load_into(TREE, url),
        "AsyncCheckpointer.save": lambda: jaxckpt.AsyncCheckpointer().save(url, TREE),
        "CheckpointManager": lambda: jaxckpt.CheckpointManager(url),
    }
    for name, call in calls.items():
        with pytest.raises(jaxckpt.UnsupportedLocationError) as e:
            call()
        assert str(e.value) == f"{url}: {found}", name
    assert os.listdir(tmp_path) == []  # no 's3:' (or any) directory was made


@pytest.mark.parametrize("command", ["ls", "show", "verify"])
def test_the_cli_refuses_a_url_it_cannot_read(tmp_path, monkeypatch, capsys, command):
    monkeypatch.chdir(tmp_path)
    assert cli.main([command, "s3://bucket/run"]) == cli.EXIT_FAILED
    assert capsys.readouterr().err == (f"jaxckpt {command}: s3://bucket/run: s3:// object storage is not supported "
                                       "by this version of jaxckpt; use a local or shared file system path\n")
    assert os.listdir(tmp_path) == []
