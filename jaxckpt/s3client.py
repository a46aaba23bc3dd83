"""``s3://`` buckets through obstore (Rust's ``object_store``: releases the
GIL for every request, retries with backoff, conditional PUTs, concurrent
multipart uploads). Implements ``objclient.ObjectClient``.

Configuration, as AWS tools read it: the standard environment
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
``AWS_REGION``, ``AWS_ENDPOINT_URL``, ``AWS_ALLOW_HTTP``, ...; obstore reads
them), the named profile of ``~/.aws/credentials`` / ``~/.aws/config``
(``AWS_PROFILE``; read by ``jaxckpt.awsprofile``, which obstore does not), then
the user's ``storage_options``, which win: ``profile``, any key of obstore's
``S3Config`` (``endpoint``, ``region``, ``access_key_id``, ...), of its
``ClientConfig`` (``allow_http``, ``timeout``, ``connect_timeout``, ...), and
``max_retries`` / ``retry_timeout`` (seconds) for its ``RetryConfig``. With
nothing configured, obstore asks the instance metadata service, unless
``AWS_EC2_METADATA_DISABLED=true`` (the AWS SDKs' switch), which makes that an
immediate ``StorageAccessError``.

Integrity: requests are signed with SigV4 over the payload's SHA-256 (the
server refuses a body that does not match); ``checksum_algorithm="sha256"``
adds S3's stored object checksum on top.
"""

from __future__ import annotations

import datetime
import os
from typing import Any, Iterable

from jaxckpt import awsprofile, objclient
from jaxckpt.errors import BucketNotFoundError, StorageAccessError, StorageError, UnsupportedLocationError
from jaxckpt.objclient import Conflict, NotFound, ObjectInfo

INSTALL = "pip install 'jaxckpt[s3]'"
_CLIENT_KEYS = {"allow_http", "allow_invalid_certificates", "connect_timeout", "default_content_type",
                "default_headers", "http1_only", "http2_only", "pool_idle_timeout", "pool_max_idle_per_host",
                "proxy_url", "proxy_ca_certificate", "proxy_excludes", "randomize_addresses", "read_timeout",
                "timeout", "user_agent", "root_certificate"}
_UPLOAD_CONCURRENCY = 8


def _obstore() -> Any:
    try:
        import obstore
        import obstore.store  # noqa: F401
    except ImportError:
        raise UnsupportedLocationError(f"s3:// locations need the obstore package: {INSTALL}") from None
    return obstore


IMDS = awsprofile.IMDS


def credential_source(options: dict) -> str:
    """Which credentials obstore will use when no AWS profile supplies them, in words (never a secret)."""
    direct = awsprofile.direct_source(options)
    if direct:
        return direct
    if os.environ.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") or os.environ.get("AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        return "container credentials (AWS_CONTAINER_CREDENTIALS_*)"
    return IMDS


def _split_options(options: dict) -> tuple[dict, dict, dict]:
    config, client, retry = {}, {}, {}
    for k, v in options.items():
        if k in _CLIENT_KEYS:
            client[k] = v
        elif k == "max_retries":
            retry["max_retries"] = int(v)
        elif k == "retry_timeout":
            retry["retry_timeout"] = datetime.timedelta(seconds=float(v))
        else:
            config[k] = v
    return config, client, retry


class S3Client(objclient.ObjectClient):
    """One S3 (or S3-compatible) bucket."""

    def __init__(self, bucket: str, options: dict):
        self._ob = _obstore()
        self.url = f"s3://{bucket}"
        self.bucket = bucket
        try:
            profile = awsprofile.resolve(options)
        except StorageAccessError as e:
            raise StorageAccessError(f"{self.url}: {e}") from None
        options = {k: v for k, v in options.items() if k != "profile"}
        self.credentials = (profile and profile.source) or credential_source(options)
        if self.credentials == IMDS and os.environ.get("AWS_EC2_METADATA_DISABLED", "").lower() == "true":
            raise StorageAccessError(
                f"{self.url}: no AWS credentials: none in storage_options, the environment (AWS_ACCESS_KEY_ID) or "
                "an AWS profile (~/.aws/credentials), and AWS_EC2_METADATA_DISABLED=true rules out the instance "
                "metadata service; for a public bucket pass storage_options={'skip_signature': True}")
        config, client, retry = _split_options(options)
        if profile:
            config = {**profile.config, **config}
        if "endpoint" in config and str(config["endpoint"]).startswith("http://"):
            client.setdefault("allow_http", True)
        extra = {"credential_provider": profile.provider} if profile and profile.provider else {}
        try:
            self._store = self._ob.store.S3Store(bucket, config=config or None, client_options=client or None,
                                                 retry_config=retry or None, **extra)
        except Exception as e:  # unknown option keys, malformed values
            raise UnsupportedLocationError(f"{self.url}: bad storage_options: {e}") from None

    # ------------------------------------------------------------------ errors
    def _error(self, e: Exception, key: str, what: str) -> Exception:
        """The jaxckpt error (or objclient exception) for an obstore exception."""
        ex = self._ob.exceptions
        text = str(e)
        where = self.describe(key)
        if "NoSuchBucket" in text:
            return BucketNotFoundError(f"{self.url}: the bucket does not exist (while trying to {what} {where})")
        if isinstance(e, ex.AlreadyExistsError) or isinstance(e, ex.PreconditionError):
            return Conflict(where)
        if isinstance(e, (ex.NotFoundError, FileNotFoundError)):
            return NotFound(where)
        if isinstance(e, (ex.PermissionDeniedError, ex.UnauthenticatedError, PermissionError)) or _is_denied(text):
            return StorageAccessError(f"{where}: access denied while trying to {what}; credentials from "
                                      f"{self.credentials}: {_first_line(text)}")
        return StorageError(f"{where}: could not {what} (after retries): {_first_line(text)}")

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
        multipart = size > objclient.PART_BYTES
        self._call("write", key, self._ob.put, self._store, key, iter(chunks), use_multipart=multipart,
                   chunk_size=objclient.PART_BYTES, max_concurrency=_UPLOAD_CONCURRENCY)

    def get(self, key: str, cap: int) -> tuple[bytes, str | None]:
        r = self._call("read", key, self._ob.get, self._store, key)
        if r.meta["size"] > cap:
            raise ValueError(f"{self.describe(key)}: {r.meta['size']} bytes, more than the cap of {cap}")
        return bytes(self._call("read", key, r.bytes)), r.meta.get("e_tag")

    def read_into(self, key: str, buf: memoryview, offset: int) -> int:
        n = len(buf)
        if n == 0:
            return 0
        got = self._call("read", key, self._ob.get_range, self._store, key, start=offset, end=offset + n)
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


def _is_denied(text: str) -> bool:
    return any(s in text for s in ("AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId", "403 Forbidden"))


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else text
    return line if len(line) <= 400 else line[:397] + "..."
