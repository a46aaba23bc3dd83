"""The requests of ``objclient.ObjectClient`` made through obstore (Rust's
``object_store``: releases the GIL for every request, retries with backoff,
conditional PUTs, concurrent multipart uploads), whatever the cloud.

``jaxckpt/s3client.py`` (``s3://``) and ``jaxckpt/azclient.py`` (``az://``)
build the store from their cloud's configuration and name the server's error
codes that mean "no such bucket" and "access denied"; everything else is here.
"""

from __future__ import annotations

import datetime
from typing import Any, Iterable

from jaxckpt import objclient
from jaxckpt.errors import BucketNotFoundError, StorageAccessError, StorageError, UnsupportedLocationError
from jaxckpt.objclient import Conflict, NotFound, ObjectInfo

# obstore's ``ClientConfig`` keys: ``storage_options`` entries with these names
# go to ``client_options``; ``max_retries`` / ``retry_timeout`` (seconds) to its
# ``RetryConfig``; every other key to the store's own config.
CLIENT_KEYS = {"allow_http", "allow_invalid_certificates", "connect_timeout", "default_content_type",
               "default_headers", "http1_only", "http2_only", "pool_idle_timeout", "pool_max_idle_per_host",
               "proxy_url", "proxy_ca_certificate", "proxy_excludes", "randomize_addresses", "read_timeout",
               "timeout", "user_agent", "root_certificate"}
UPLOAD_CONCURRENCY = 8  # parts of one multipart upload in flight


def import_obstore(url: str, install: str) -> Any:
    """The obstore module, or ``UnsupportedLocationError`` naming the install line."""
    try:
        import obstore
        import obstore.store  # noqa: F401
    except ImportError as e:
        raise UnsupportedLocationError(f"{url}: {url.partition(':')[0]}:// locations need the obstore package "
                                       f"({e}); install it with: {install}") from None
    return obstore


def split_options(options: dict) -> tuple[dict, dict, dict]:
    """``storage_options`` as (store config, client options, retry config)."""
    config, client, retry = {}, {}, {}
    for k, v in options.items():
        if k in CLIENT_KEYS:
            client[k] = v
        elif k == "max_retries":
            retry["max_retries"] = int(v)
        elif k == "retry_timeout":
            retry["retry_timeout"] = datetime.timedelta(seconds=float(v))
        else:
            config[k] = v
    return config, client, retry


def first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else text
    return line if len(line) <= 400 else line[:397] + "..."


class ObstoreClient(objclient.ObjectClient):
    """One bucket (container) of an obstore store. A subclass sets ``url``,
    ``credentials`` (where they came from, in words), ``_ob`` (the obstore
    module) and ``_store``, and the server's error codes below."""

    url: str
    credentials: str
    _ob: Any
    _store: Any
    BUCKET = "bucket"  # what the store calls a bucket, in messages
    MISSING_BUCKET: tuple[str, ...] = ()  # text in an error that means the bucket does not exist
    DENIED: tuple[str, ...] = ("403 Forbidden",)  # text in an error that means the credentials were refused
    MAX_PARTS = 10_000  # parts (blocks) of one multipart upload, the most bytes of one, of an object
    MAX_PART_BYTES = 5 << 30
    MAX_OBJECT_BYTES = 5 << 40

    # ------------------------------------------------------------------ errors
    def _error(self, e: Exception, key: str, what: str) -> Exception:
        """The jaxckpt error (or objclient exception) for an obstore exception."""
        ex = self._ob.exceptions
        text = str(e)
        where = self.describe(key)
        if any(s in text for s in self.MISSING_BUCKET):
            return BucketNotFoundError(f"{self.url}: the {self.BUCKET} does not exist (while trying to {what} {where})")
        if isinstance(e, (ex.AlreadyExistsError, ex.PreconditionError)):
            return Conflict(where)
        if isinstance(e, (ex.NotFoundError, FileNotFoundError)):
            return NotFound(where)
        if (isinstance(e, (ex.PermissionDeniedError, ex.UnauthenticatedError, PermissionError))
                or any(s in text for s in self.DENIED)):
            return StorageAccessError(f"{where}: access denied while trying to {what}; credentials from "
                                      f"{self.credentials}: {first_line(text)}")
        if "Error performing token request" in text:
            return StorageAccessError(f"{where}: could not obtain credentials from {self.credentials} "
                                      f"while trying to {what}: {first_line(text)}")
        if "invalid path" in text:  # an object name the client cannot hold (an empty or '..' segment): no retry
            return StorageError(f"{where}: could not {what}: {first_line(text)}")
        return StorageError(f"{where}: could not {what} (after retries): {first_line(text)}")

    def _call(self, what: str, key: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (objclient.NotFound, objclient.Conflict):
            raise
        except Exception as e:
            if isinstance(e, (StorageError, BucketNotFoundError)):
                raise
            raise self._error(e, key, what) from None

    # ------------------------------------------------------------------ requests
    def put(self, key: str, data: bytes | memoryview, *, create: bool = False,
            if_match: str | None = None) -> str:
        mode = "create" if create else ({"e_tag": if_match} if if_match is not None else "overwrite")
        r = self._call("write", key, self._ob.put, self._store, key, data, mode=mode, use_multipart=False)
        return r["e_tag"]

    def put_stream(self, key: str, chunks: Iterable[memoryview], size: int) -> None:
        part = self.part_bytes(key, size)
        self._call("write", key, self._ob.put, self._store, key, iter(chunks), use_multipart=size > part,
                   chunk_size=part, max_concurrency=UPLOAD_CONCURRENCY)

    def part_bytes(self, key: str, size: int) -> int:
        """The part size of a ``size``-byte upload: ``PART_BYTES``, or larger
        (whole MiB) where the store's part count would not otherwise suffice
        (S3: 10,000 parts, so 16 MiB parts end at 156 GiB per object);
        ``StorageError`` before anything is sent if the object cannot be stored."""
        part = max(objclient.PART_BYTES, -(-size // self.MAX_PARTS))
        part = -(-part // (1 << 20)) << 20
        if part > self.MAX_PART_BYTES or size > self.MAX_OBJECT_BYTES:
            raise StorageError(f"{self.describe(key)}: {size} bytes is more than one object can hold here "
                               f"({self.MAX_PARTS} parts of at most {self.MAX_PART_BYTES >> 20} MiB, "
                               f"{self.MAX_OBJECT_BYTES >> 30} GiB in all); save from more processes, or cut the "
                               "state into several checkpoints")
        return part

    def get(self, key: str, cap: int) -> tuple[bytes, str | None]:
        r = self._call("read", key, self._ob.get, self._store, key)
        if r.meta["size"] > cap:
            raise ValueError(f"{self.describe(key)}: {r.meta['size']} bytes, more than the cap of {cap}")
        return bytes(self._call("read", key, r.bytes)), r.meta.get("e_tag")

    def read_into(self, key: str, buf: memoryview, offset: int) -> int:
        n = len(buf)
        if n == 0:
            return 0
        try:
            got = self._call("read", key, self._ob.get_range, self._store, key, start=offset, end=offset + n)
        except StorageError as e:
            if "status code: 416" in str(e):
                return 0  # the range starts at or past the end (a truncated object): the caller says so
            raise
        return objclient.copy_into(buf, got, self.describe(key))

    def head(self, key: str) -> ObjectInfo | None:
        try:
            meta = self._call("look up", key, self._ob.head, self._store, key)
        except NotFound:
            return None
        return ObjectInfo(key, meta["size"], meta.get("e_tag"))

    def list(self, prefix: str) -> list[ObjectInfo]:
        def pages() -> list[ObjectInfo]:  # the listing is fetched page by page as it is iterated
            return [ObjectInfo(m["path"], m["size"], m.get("e_tag"))
                    for page in self._ob.list(self._store, prefix) for m in page]
        return self._call("list", prefix, pages)

    def delete(self, keys: list[str]) -> None:
        if keys:
            try:
                self._call("delete", keys[0], self._ob.delete, self._store, list(keys))
            except NotFound:
                pass
