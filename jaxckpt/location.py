"""Where a checkpoint is: :class:`Location`, parsed from what a user passed.

A local path (made absolute), a ``file://`` URL, or an object-store URL
(``s3://``, ``gs://`` / ``gcs://``, ``az://``), checked here once, before
anything is sent: a bucket name that the store would refuse, ``.`` or ``..``
path segments, control characters in a key, a NUL in any path. Any other
scheme raises ``UnsupportedLocationError``: a URL never becomes a local
directory. Used by every layer that takes a path; ``jaxckpt.storage``
re-exports it.
"""

from __future__ import annotations

import dataclasses
import os
import re

from jaxckpt.errors import UnsupportedLocationError

_URL_RE = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<rest>.*)$", re.DOTALL)
_OBJECT_STORES = {"s3": "s3", "gs": "gs", "gcs": "gs", "az": "az"}  # scheme -> backend
_UNSUPPORTED_STORES = ("abfs", "abfss", "azure", "adl", "r2", "oss", "hf")
_SUPPORTED = "local paths, file://, s3://, gs:// and az://"
_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{1,221}[a-z0-9]")
_AZURE_CONTAINER = re.compile(r"[a-z0-9](?:[a-z0-9]|-(?!-)){1,61}[a-z0-9]")


def _hashable(options: dict | None) -> tuple:
    """``storage_options`` as a hashable tuple (unhashable values, e.g. a
    credentials object, by identity)."""
    out = []
    for k, v in sorted((options or {}).items()):
        try:
            hash(v)
        except TypeError:
            v = ("<unhashable>", id(v))
        out.append((str(k), v))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class Location:
    """Where a checkpoint (or a directory of them) is: a scheme and a path.

    ``scheme`` is ``"file"`` for local paths (``path`` absolute and normalised),
    ``"s3"``, ``"gs"`` or ``"az"`` for object storage (``path`` is ``bucket/key/prefix``,
    no trailing slash). ``options`` are the user's ``storage_options`` (never shown:
    they may hold secrets). ``str(location)`` is what messages show: the path or URL."""
    scheme: str
    path: str
    options: tuple = dataclasses.field(default=(), repr=False)

    @classmethod
    def parse(cls, where: "str | os.PathLike | Location", options: dict | None = None) -> "Location":
        """A location from what a user passed: a local path (relative ones are
        made absolute now), a ``file://``, ``s3://``, ``gs://`` or ``az://`` URL, or a
        Location. Another scheme raises ``UnsupportedLocationError``: a URL
        never becomes a local path."""
        if isinstance(where, Location):
            return where if options is None else dataclasses.replace(where, options=_hashable(options))
        text = os.fspath(where)
        if isinstance(text, bytes):
            text = os.fsdecode(text)
        if "\0" in text:
            raise UnsupportedLocationError(f"{text!r}: a path cannot hold a NUL character")
        m = _URL_RE.match(text)
        if m is None:
            _refuse_broken_url(text)
            return cls("file", os.path.abspath(text), _hashable(options))
        scheme, rest = m.group("scheme").lower(), m.group("rest")
        if scheme == "file":
            host, slash, path = rest.partition("/")
            if host not in ("", "localhost") or not slash:
                raise UnsupportedLocationError(f"{text}: a file:// URL names a local path (file:///abs/path); "
                                               f"found host {host!r}")
            return cls("file", os.path.abspath("/" + path), _hashable(options))
        if scheme in _OBJECT_STORES:
            backend = _OBJECT_STORES[scheme]
            return cls(backend, _object_path(text, rest, backend), _hashable(options))
        if scheme in _UNSUPPORTED_STORES:
            azure = scheme in ("abfs", "abfss", "azure", "adl")
            hint = " (for Azure Blob Storage write az://container/path)" if azure else ""
            raise UnsupportedLocationError(f"{text}: {scheme}:// object storage is not supported by this version "
                                           f"of jaxckpt{hint} (supported: {_SUPPORTED})")
        raise UnsupportedLocationError(f"{text}: unknown storage scheme {scheme + '://'!r} "
                                       f"(supported: {_SUPPORTED})")

    def __str__(self) -> str:
        return self.path if self.scheme == "file" else f"{self.scheme}://{self.path}"

    @property
    def is_local(self) -> bool:
        return self.scheme == "file"

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rpartition("/")[2]

    @property
    def parent(self) -> "Location":
        if self.scheme != "file":
            head = self.path.rpartition("/")[0]
            return dataclasses.replace(self, path=head or self.path)
        return dataclasses.replace(self, path=os.path.dirname(self.path.rstrip("/")) or "/")

    def join(self, name: str) -> "Location":
        if self.scheme != "file":
            return dataclasses.replace(self, path=f"{self.path.rstrip('/')}/{name}")
        return dataclasses.replace(self, path=os.path.join(self.path, name))


def _refuse_broken_url(text: str) -> None:
    """``s3:/bucket/x`` (or ``gs:bucket``) is a URL with a slash missing, not a local directory named ``s3:``
    (``./s3:/x`` is one, if that is really meant)."""
    head = text.split("/", 1)[0]
    scheme = head.partition(":")[0]
    known = scheme.lower() in _OBJECT_STORES or (head == scheme + ":" and scheme.lower() in _UNSUPPORTED_STORES + ("file",))
    if ":" in head and known:
        raise UnsupportedLocationError(f"{text}: looks like {scheme}://... with a '/' missing (a local path that "
                                       f"starts this way: ./{text})")


def _object_path(text: str, rest: str, backend: str) -> str:
    """``bucket/key/prefix`` from the part of an object-store URL after ``://``
    (``az://``: ``container/key/prefix``)."""
    parts = [p for p in rest.split("/") if p]
    if not parts:
        raise UnsupportedLocationError(f"{text}: no bucket named (expected e.g. s3://bucket/run/100)")
    if any(p in (".", "..") for p in parts):
        raise UnsupportedLocationError(f"{text}: '.' and '..' are not path components in a bucket")
    control = next((ch for ch in rest if ord(ch) < 0x20 or ord(ch) == 0x7f), None)
    if control is not None:  # the clients refuse them in keys, some only when reading back
        raise UnsupportedLocationError(f"{text!r}: control character {control!r} in an object key")
    if backend == "az" and not _AZURE_CONTAINER.fullmatch(parts[0]):
        raise UnsupportedLocationError(f"{text}: {parts[0]!r} is not a valid Azure container name (3-63 "
                                       "characters: lowercase letters, digits and single '-' between them)")
    if not _BUCKET_NAME.fullmatch(parts[0]):
        raise UnsupportedLocationError(f"{text}: {parts[0]!r} is not a valid bucket name (3-63 characters: "
                                       "lowercase letters, digits, '.', '-', '_')")
    return "/".join(parts)
