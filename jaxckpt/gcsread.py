"""Reads of one GCS bucket through obstore's ``GCSStore`` (Rust's
``object_store``, GCS's XML API): the ranged data reads of restores, which
google-cloud-storage makes several times slower, and whole-object gets (a
manifest, a lease: one request, where google-cloud-storage's pinned download
takes two). Used by ``gcsclient.GcsClient``, which keeps every write on
google-cloud-storage.

Authentication is the client's: ``GcsClient`` resolves the google-auth
credentials once (``gcsclient._resolve_auth``) and :class:`GcsReader` hands
them on. Anonymous credentials become ``skip_signature``; any other
credentials reach obstore through a ``credential_provider`` callable
(:class:`_GoogleToken`) that refreshes them under a lock. A provider is given
in every case, so obstore never reads an ADC file or asks the instance
metadata service on its own; ``base_url`` and ``skip_signature`` are always
set, so ``GOOGLE_BASE_URL`` / ``GOOGLE_SKIP_SIGNATURE`` in the environment
cannot make the reads differ from the writes.

Keys that ``object_store`` would rewrite (empty, ``.`` or ``..`` segments,
a leading or trailing ``/``) are not readable here: :func:`parsable` says
which are, the caller reads the others through google-cloud-storage.
"""

from __future__ import annotations

import datetime
import threading
from typing import Any, Callable

from jaxckpt import errors, objclient

INSTALL = "pip install 'jaxckpt[gcs]'"
DEFAULT_BASE_URL = "https://storage.googleapis.com"
MAX_RETRIES = 10           # object_store's default; the retry deadline bounds them too
TOKEN_MARGIN_S = 225.0     # a token is renewed this long before it expires (google-auth's threshold)


def load_obstore(url: str) -> Any:
    """The obstore module (``UnsupportedLocationError`` naming the install line if missing)."""
    try:
        import obstore
        import obstore.store  # noqa: F401
    except ImportError as e:
        raise errors.UnsupportedLocationError(
            f"{url}: Google Cloud Storage needs the obstore package ({e}); "
            f"install it with: {INSTALL}") from None
    return obstore


def parsable(key: str) -> bool:
    """Whether obstore reads exactly ``key`` (its ``Path`` refuses or rewrites the others)."""
    return bool(key) and all(part not in ("", ".", "..") for part in key.split("/"))


class _GoogleToken:
    """obstore's ``credential_provider``: the bearer token of google-auth
    ``credentials``, refreshed when missing or about to expire. obstore may
    call it from several threads at once: one refresh at a time."""

    def __init__(self, credentials):
        self._credentials = credentials
        self._lock = threading.Lock()
        self._request = None

    def __call__(self) -> dict:
        with self._lock:
            creds = self._credentials
            if not creds.valid:  # no token yet, or within google-auth's refresh threshold
                if self._request is None:
                    import google.auth.transport.requests

                    self._request = google.auth.transport.requests.Request()
                creds.refresh(self._request)
            return {"token": creds.token, "expires_at": _renew_at(creds.expiry)}


def _renew_at(expiry: datetime.datetime | None) -> datetime.datetime | None:
    """When obstore should ask again: ``TOKEN_MARGIN_S`` (at most half the
    lifetime left) before ``expiry`` (google-auth's naive UTC); None: never."""
    if expiry is None:
        return None
    if expiry.tzinfo is None:
        expiry = expiry.replace(tzinfo=datetime.timezone.utc)
    left = (expiry - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
    return expiry - datetime.timedelta(seconds=max(0.0, min(TOKEN_MARGIN_S, left / 2)))


def _never_called() -> dict:
    raise errors.StorageAccessError("anonymous GCS reads ask for no token")


class GcsReader:
    """Ranged reads of bucket ``bucket`` (``url`` = ``gs://bucket``).

    ``endpoint``: the API endpoint or None (Google's); ``credentials``: the
    google-auth credentials (``AnonymousCredentials``: unsigned requests);
    ``source``: their description for messages; ``timeout``: seconds per
    request, or a ``(connect, read)`` pair; ``retry_deadline``: seconds of
    retries per read; ``bucket_missing(exc)``: whether a 404 is the bucket's.
    """

    def __init__(self, url: str, bucket: str, endpoint: str | None, credentials, source: str,
                 timeout, retry_deadline: float, bucket_missing: Callable[[Exception], bool]):
        from google.auth.credentials import AnonymousCredentials

        self._ob = load_obstore(url)
        self.url = url
        self._source = source
        self._bucket_missing = bucket_missing
        base_url = (endpoint or DEFAULT_BASE_URL).rstrip("/")
        anonymous = isinstance(credentials, AnonymousCredentials)
        provider = _never_called if anonymous else _GoogleToken(credentials)
        try:
            self._store = self._ob.store.GCSStore(
                bucket, base_url=base_url, skip_signature=anonymous, credential_provider=provider,
                client_options=_client_options(base_url, timeout, retry_deadline),
                retry_config=_retry_config(retry_deadline))
        except Exception as e:  # a malformed endpoint, a bad GOOGLE_SERVICE_ACCOUNT in the environment
            raise errors.UnsupportedLocationError(
                f"{url}: cannot set up reads through obstore (endpoint {base_url}): {_first_line(e)}") from None

    def read_into(self, key: str, view: memoryview, offset: int) -> int:
        """Fill the byte ``view`` from ``offset`` with one ranged GET; the bytes
        received (fewer where the object ends first, 0 at or past its end)."""
        try:
            got = self._ob.get_range(self._store, key, start=offset, length=view.nbytes)
        except Exception as e:
            if "status code: 416" in str(e):
                return 0  # the range starts at or past the end
            raise self._error(e, key) from None
        return objclient.copy_into(view, got, f"{self.url}/{key}")

    def get(self, key: str, cap: int) -> tuple[bytes, str | None]:
        """The whole object ``key`` and its generation, with one GET (the body
        and the ``x-goog-generation`` of one answer); ``ValueError`` if the
        answer announces more than ``cap`` bytes, before its body is read."""
        try:
            answer = self._ob.get(self._store, key)
        except Exception as e:
            raise self._error(e, key) from None
        size = answer.meta["size"]
        if size > cap:
            raise ValueError(f"{self.url}/{key}: object of {size} bytes, more than the {cap} expected at most")
        try:
            data = bytes(answer.bytes())
        except Exception as e:
            raise self._error(e, key) from None
        return data, answer.meta.get("version")

    def _error(self, exc: Exception, key: str) -> Exception:
        """The objclient / jaxckpt exception for obstore's ``exc`` (naming the
        URL and the credential source, never a token)."""
        ex = self._ob.exceptions
        where = f"{self.url}/{key}"
        if isinstance(exc, (ex.NotFoundError, FileNotFoundError)):
            if self._bucket_missing(exc):
                return errors.BucketNotFoundError(
                    f"{self.url}: bucket does not exist (or is hidden from {self._source})")
            return objclient.NotFound(where)
        if isinstance(exc, (ex.PermissionDeniedError, ex.UnauthenticatedError, PermissionError)):
            return errors.StorageAccessError(f"{where}: access refused with {self._source}: {_first_line(exc)}")
        return errors.StorageError(f"{where}: could not read (after retries): {_first_line(exc)}")


def _client_options(base_url: str, timeout, retry_deadline: float) -> dict:
    """obstore's ``ClientConfig`` from GcsClient's ``timeout`` (connect and
    between-reads timeouts, as google's ``(connect, read)``); a whole request
    is bounded by the larger of them and the retry deadline."""
    connect, read = (timeout if isinstance(timeout, tuple) else (timeout, timeout))
    seconds = datetime.timedelta
    return {"allow_http": base_url.startswith("http://"),
            "connect_timeout": seconds(seconds=float(connect)), "read_timeout": seconds(seconds=float(read)),
            "timeout": seconds(seconds=max(float(connect), float(read), retry_deadline))}


def _retry_config(retry_deadline: float) -> dict:
    """obstore's ``RetryConfig``: what object_store deems transient (server
    and connection errors) is retried with backoff until ``retry_deadline``
    seconds after the first attempt."""
    return {"max_retries": MAX_RETRIES if retry_deadline > 0 else 0,
            "retry_timeout": datetime.timedelta(seconds=max(retry_deadline, 0.0))}


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= 400 else line[:397] + "..."
