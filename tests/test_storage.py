"""The storage interface's location type: a URL never becomes a local path
(issue 15: "paths become a small value type that can later hold a URL")."""

from __future__ import annotations

import os
import sys

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


def test_object_store_urls_are_bucket_and_key_never_local_paths():
    loc = Location.parse("s3://bucket1/run//100/", {"endpoint": "http://127.0.0.1:1", "secret_access_key": "s3cr3t"})
    assert (loc.scheme, loc.path, str(loc), loc.name, str(loc.parent), str(loc.join("m"))) == (
        "s3", "bucket1/run/100", "s3://bucket1/run/100", "100", "s3://bucket1/run", "s3://bucket1/run/100/m")
    assert "s3cr3t" not in repr(loc) and "s3cr3t" not in str(loc)  # options may hold secrets
    assert loc.join("m").options == loc.options
    assert Location.parse("gcs://bucket1/x") == Location.parse("gs://bucket1/x")
    az = Location.parse("az://my-container/run/7")
    assert (az.scheme, az.path, str(az), str(az.parent)) == ("az", "my-container/run/7", "az://my-container/run/7",
                                                             "az://my-container/run")


def test_a_checkpoint_saved_through_a_file_url_restores_from_its_path(tmp_path):
    jaxckpt.save(f"file://{tmp_path}/ck", TREE)
    assert jaxckpt.restore(tmp_path / "ck")["a"].tobytes() == TREE["a"].tobytes()


SUPPORTED = "(supported: local paths, file://, s3://, gs:// and az://)"


@pytest.mark.parametrize("url, found", [
    ("abfs://container@account.dfs.core.windows.net/run", "abfs:// object storage is not supported by this version "
                                                          f"of jaxckpt (for Azure Blob Storage write "
                                                          f"az://container/path) {SUPPORTED}"),
    ("r2://bucket/run/100", f"r2:// object storage is not supported by this version of jaxckpt {SUPPORTED}"),
    ("az://my--container/run", "'my--container' is not a valid Azure container name (3-63 characters: lowercase "
                               "letters, digits and single '-' between them)"),
    ("az://my_container/run", "'my_container' is not a valid Azure container name (3-63 characters: lowercase "
                              "letters, digits and single '-' between them)"),
    ("hdfs://namenode/run", f"unknown storage scheme 'hdfs://' {SUPPORTED}"),
    ("s3://", "no bucket named (expected e.g. s3://bucket/run/100)"),
    ("s3://Bucket/run", "'Bucket' is not a valid bucket name (3-63 characters: lowercase letters, digits, '.', '-', "
                        "'_')"),
    ("gs://bucket/run/../other", "'.' and '..' are not path components in a bucket"),
    ("file://otherhost/run", "a file:// URL names a local path (file:///abs/path); found host 'otherhost'"),
    ("s3:/bucket/run", "looks like s3://... with a '/' missing (a local path that starts this way: ./s3:/bucket/run)"),
    ("GS:bucket/run", "looks like GS://... with a '/' missing (a local path that starts this way: ./GS:bucket/run)"),
    ("abfs:/c/run", "looks like abfs://... with a '/' missing (a local path that starts this way: ./abfs:/c/run)"),
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
    assert cli.main([command, "r2://bucket/run"]) == cli.EXIT_USAGE  # a path no store takes: a usage error
    assert capsys.readouterr().err == (f"jaxckpt {command}: r2://bucket/run: r2:// object storage is not supported "
                                       f"by this version of jaxckpt {SUPPORTED}\n")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("url, extra", [("s3://no-extra-1/run", "s3"), ("az://no-extra-2/run", "azure"),
                                        ("gs://no-extra-3/run", "gcs")])
def test_a_missing_extra_names_its_install_line(monkeypatch, url, extra):
    for module in ("obstore", "google.cloud.storage"):
        monkeypatch.setitem(sys.modules, module, None)  # what an environment without the package sees
    with pytest.raises(jaxckpt.UnsupportedLocationError) as e:
        jaxckpt.restore(url)
    assert str(e.value).startswith(f"{url.rpartition('/')[0]}: ") and f"pip install 'jaxckpt[{extra}]'" in str(e.value)
