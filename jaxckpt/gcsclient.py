"""The :class:`~jaxckpt.objclient.ObjectClient` of one Google Cloud Storage
bucket (``gs://bucket``), on ``google-cloud-storage`` (the JSON API), with
ranged data reads through obstore (the XML API).

* ``put``: one upload (multipart up to 8 MiB, resumable above), with
  ``ifGenerationMatch=0`` for ``create`` and ``=<generation>`` for ``if_match``.
  The data's CRC32C goes in the object's metadata, so GCS refuses a body
  damaged in transit; the CRC32C in the answer is checked too (emulators do
  not verify it). A conditional put carries a one-off token in its custom
  metadata: when a retry meets 412 because the first attempt landed (its
  answer lost), the token shows the object is ours: no false ``Conflict``.
* ``put_stream`` (data objects): up to ``SINGLE_BYTES``, one media upload
  (``jaxckpt/gcsupload.py``: one request through google-auth's
  ``AuthorizedSession``, the body sent straight from the snapshot's buffers,
  its CRC32C in ``X-Goog-Hash`` for GCS to check, and checked again in the
  answer). The writer cuts each process's data into objects of about
  ``FILE_BYTES`` (``file_bytes``), so a save is many such uploads at once and
  no compose. Above ``SINGLE_BYTES`` (one leaf's shards larger than that),
  parts ``<key>.part-NNNNN`` (media uploads, 8 in flight) composed into
  ``key`` (32 sources per compose, in rounds), then deleted, also on failure
  (best effort). The last compose is one request:
  the object appears whole or not at all. Sources are pinned by generation,
  so parts replaced by a concurrent writer of the key fail the call rather
  than mix. (Nearline/Coldline buckets bill parts their minimum duration.)
* ``get``: one GET through obstore (``gcsread``): the answer's size is
  checked against the ``cap`` before its body is read, and its generation
  comes with the body. (No CRC32C on these reads, as on the ranged ones: what
  is read this way, a manifest or a lease, carries its own checksum or is
  checked by the code that reads it.) Keys obstore would rewrite: metadata
  first (the ``cap`` check), then a download pinned to that generation and
  checked by CRC32C (google-cloud-storage).
* ``read_into`` (the data reads of restores): one ranged GET through obstore's
  ``GCSStore`` (``jaxckpt/gcsread.py``: same endpoint and credentials, retries
  and timeouts from the same options), copied into the buffer. Keys obstore
  would rewrite (see ``gcsread.parsable``) are read through google-cloud-storage.

Errors: missing object ``objclient.NotFound``, missing bucket
``BucketNotFoundError``, 412 ``objclient.Conflict``, 401/403 and credential
failures ``StorageAccessError`` (naming the credential source, never a
secret), anything left after the retries (5xx, 429, connection errors:
exponential backoff within ``retry_deadline``; obstore's for ``read_into``)
``StorageError``. Each thread gets its own ``storage.Client`` (HTTP
session); credentials are shared, with the reader too.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import functools
import io
import os
import threading
import types
import uuid
from typing import Iterable, Iterator

from jaxckpt import errors, gcsread, gcsupload, objclient

# ``storage_options`` keys GcsClient accepts (see GcsClient's docstring).
OPTION_KEYS = frozenset({"project", "endpoint", "credentials", "anonymous", "timeout", "retry_deadline"})

DEFAULT_TIMEOUT = 60.0          # seconds per HTTP request (google's default)
DEFAULT_RETRY_DEADLINE = 120.0  # seconds of retries per call (google's default)
IN_FLIGHT = 8                   # concurrent part uploads / deletes
# Data objects of about 32 MiB: 8-10 in flight for a 300 MB save, each one
# request (see jaxckpt/gcsupload.py for what was measured).
FILE_BYTES = 32 << 20
SINGLE_BYTES = 64 << 20         # the largest object sent in one request (larger: parts and a compose)
COMPOSE_MAX = 32                # GCS limit of sources per compose request
GET_ATTEMPTS = 5                # re-reads of an object replaced during a get
TOKEN_KEY = "jaxckpt-put"       # custom-metadata key of a conditional put's token


@functools.cache
def _google() -> types.SimpleNamespace:
    """The google modules, imported on first use (``ImportError`` if missing)."""
    import http.client

    import google.auth
    import google.auth.credentials
    import google.auth.exceptions
    import google_crc32c
    import numpy as np
    import requests
    import urllib3
    from google.api_core import exceptions as api
    from google.cloud import storage
    from google.cloud.storage import exceptions as storage_exceptions
    from google.cloud.storage import retry as storage_retry

    transport = (api.GoogleAPIError, google.auth.exceptions.TransportError, requests.RequestException,
                 urllib3.exceptions.HTTPError, http.client.HTTPException, ConnectionError,
                 storage_exceptions.InvalidResponse, storage_exceptions.DataCorruption)
    refused = (api.Unauthorized, api.Forbidden, google.auth.exceptions.RefreshError,
               google.auth.exceptions.DefaultCredentialsError)
    return types.SimpleNamespace(auth=google.auth, api=api, storage=storage, retry=storage_retry,
                                 crc32c=google_crc32c, np=np, transport=transport, refused=refused)


def _load_google(url: str) -> types.SimpleNamespace:
    try:
        return _google()
    except ImportError as e:
        raise errors.UnsupportedLocationError(
            f"{url}: Google Cloud Storage needs the google-cloud-storage package ({e}); "
            "install it with: pip install 'jaxckpt[gcs]'") from e


class GcsClient(objclient.ObjectClient):
    """One GCS bucket. ``options`` are the user's ``storage_options``:

    * ``"project"`` (str): the billing/quota project (default: the ADC's; no call needs one).
    * ``"endpoint"`` (str): the API endpoint, e.g. an emulator
      ``"http://127.0.0.1:4443"`` or a private endpoint. Without it,
      ``STORAGE_EMULATOR_HOST`` is honoured as google's client does (and then
      requests are anonymous), else ``https://storage.googleapis.com``.
    * ``"credentials"``: a ``google.auth.credentials.Credentials`` object
      (a key file: ``google.oauth2.service_account.Credentials.from_service_account_file``).
    * ``"anonymous"`` (bool): send no credentials (public buckets, emulators).
      Unless it is False, a plain ``http://`` endpoint without
      ``"credentials"`` is anonymous too: no token is sent in clear text.
    * ``"timeout"`` (seconds, or a ``(connect, read)`` pair): per request,
      default 60; ``"retry_deadline"`` (seconds): how long transient errors
      (5xx, 429, connection errors) are retried in one call, default 120.

    Otherwise: application-default credentials (``google.auth.default()``);
    ``credential_source`` says which. ``list_page_size``: objects per ``list``."""

    file_bytes = FILE_BYTES

    def __init__(self, bucket: str, options: dict | None = None, *, list_page_size: int = 1000):
        self.url = f"gs://{bucket}"
        self._g = _load_google(self.url)
        options = dict(options or {})
        unknown = sorted(set(options) - OPTION_KEYS)
        if unknown:
            raise errors.UnsupportedLocationError(f"{self.url}: unknown storage_options {unknown}; GCS accepts {sorted(OPTION_KEYS)}")
        self._name = bucket
        self._page_size = list_page_size
        timeout = options.get("timeout", DEFAULT_TIMEOUT)
        self._timeout = tuple(timeout) if isinstance(timeout, (list, tuple)) else float(timeout)
        deadline = float(options.get("retry_deadline", DEFAULT_RETRY_DEADLINE))
        self._retry = self._g.retry.DEFAULT_RETRY.with_timeout(deadline)
        endpoint, self._credentials, project, self.credential_source = _resolve_auth(self._g, self.url, options)
        self._endpoint, self._deadline = endpoint or "https://storage.googleapis.com", deadline
        self._project = options.get("project", project)
        self._client_options = {"api_endpoint": endpoint} if endpoint else None
        self._reader = gcsread.GcsReader(self.url, bucket, endpoint, self._credentials,  # the ranged data reads
                                         self.credential_source, self._timeout, deadline, self._bucket_missing)
        self._uploader = gcsupload.MediaUploader(self.url, bucket, endpoint, self._credentials, self._timeout,
                                                 self._retry)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._clients: list = []
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._bucket_seen = False

    # ------------------------------------------------------------------ set-up
    def _client(self):
        """This thread's ``storage.Client`` (requests sessions are not shared between threads)."""
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._g.storage.Client(project=self._project, credentials=self._credentials,
                                            client_options=self._client_options)
            with self._lock:
                self._clients.append(client)
            self._local.client = client
        return client

    def _bucket(self):
        return self._client().bucket(self._name)

    def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(IN_FLIGHT, thread_name_prefix="jaxckpt-gcs")
            return self._executor

    def close(self) -> None:
        with self._lock:
            executor, self._executor = self._executor, None
            clients, self._clients = self._clients, []
        if executor is not None:
            executor.shutdown(wait=True)
        for client in clients:
            client.close()
        self._uploader.close()

    # ------------------------------------------------------------------ errors
    @contextlib.contextmanager
    def _translated(self, key: str) -> Iterator[None]:
        """Turn google's exceptions into objclient's and jaxckpt's."""
        g = self._g
        try:
            yield
        except g.api.PreconditionFailed as e:
            raise objclient.Conflict(f"{self.describe(key)}: precondition failed (HTTP 412)") from e
        except g.api.NotFound as e:
            if self._bucket_missing(e):
                raise errors.BucketNotFoundError(
                    f"{self.url}: bucket does not exist (or is hidden from {self.credential_source})") from e
            raise objclient.NotFound(self.describe(key)) from e
        except g.refused as e:
            raise errors.StorageAccessError(f"{self.describe(key)}: access refused with "
                                            f"{self.credential_source}: {_message(e)}") from e
        except g.api.RetryError as e:  # its own text is only "Timeout of 120.0s exceeded"
            cause = e.cause if e.cause is not None else e
            raise errors.StorageError(
                f"{self.describe(key)}: no success from {self._endpoint} after retrying for {self._deadline:g} s "
                f"(retry_deadline); the last error: {type(cause).__name__}: {_message(cause)}") from e
        except g.transport as e:
            raise errors.StorageError(f"{self.describe(key)}: {type(e).__name__}: {_message(e)}") from e

    def _bucket_missing(self, exc: Exception) -> bool:
        """Whether a 404 is the bucket's, not the object's (the message, else one bucket lookup)."""
        text = _message(exc).lower()
        if "bucket does not exist" in text:
            return True
        if "no such object" in text or "nosuchkey" in text or self._bucket_seen:
            return False
        try:
            exists = self._bucket().exists(timeout=self._timeout, retry=self._retry)
        except self._g.transport:
            return False  # e.g. 403 without storage.buckets.get: assume the bucket is there
        self._bucket_seen = exists
        return not exists

    # ------------------------------------------------------------------ writes
    def put(self, key: str, data: bytes | memoryview, *, create: bool = False,
            if_match: str | None = None) -> str:
        if create and if_match is not None:
            raise ValueError(f"{self.describe(key)}: put takes create or if_match, not both")
        match = 0 if create else None
        if if_match is not None:
            if not str(if_match).isdigit():
                raise ValueError(f"{self.describe(key)}: if_match must be a GCS generation, not {if_match!r}")
            match = int(if_match)
        with self._translated(key):
            return self._upload(key, [gcsupload.byte_view(data)], generation_match=match)

    def _upload(self, key: str, views: list[memoryview], generation_match: int | None = None) -> str:
        """Upload ``views`` (in order) as ``key``, CRC32C-checked; returns the generation."""
        blob = self._bucket().blob(key)
        crc = gcsupload.crc32c(views)
        blob.crc32c = crc  # sent in the object's metadata: the server checks the body against it
        token = uuid.uuid4().hex if generation_match is not None else None
        if token:
            blob.metadata = {TOKEN_KEY: token}
        # One copy, which the library would make anyway (it reads a whole part at once).
        data = b"".join(views)
        try:
            blob.upload_from_file(io.BytesIO(data), size=len(data), if_generation_match=generation_match,
                                  checksum=None, retry=self._retry, timeout=self._timeout)
        except self._g.api.PreconditionFailed:
            generation = self._landed(key, token)
            if generation is None:
                raise
            return generation
        if blob.crc32c != crc:
            raise errors.StorageError(f"{self.describe(key)}: the server stored CRC32C {blob.crc32c}, "
                                      f"the data has {crc}: damaged in transit")
        return str(blob.generation)

    def _landed(self, key: str, token: str | None) -> str | None:
        """The generation of ``key`` if it is the object our (retried) upload with ``token`` wrote."""
        if token is None:
            return None
        blob = self._bucket().blob(key)
        try:
            blob.reload(timeout=self._timeout, retry=self._retry)
        except self._g.api.NotFound:
            return None
        return str(blob.generation) if (blob.metadata or {}).get(TOKEN_KEY) == token else None

    def put_stream(self, key: str, chunks: Iterable[memoryview], size: int) -> None:
        if size <= SINGLE_BYTES:
            views = [v for part in gcsupload.split(chunks, size or 1, self.describe(key), size) for v in part]
            self._media(key, views)
            return
        parts = gcsupload.split(chunks, objclient.PART_BYTES, self.describe(key), size)
        temporary: list[str] = []  # every part object started: deleted at the end
        try:
            sources, crc = self._upload_parts(key, parts, temporary)
            _compose(self._pool(), self._compose_into, key, sources, crc, temporary)
        finally:
            self._delete_quietly(temporary)

    def _upload_parts(self, key: str, parts: Iterator[list[memoryview]], started: list[str]):
        """Upload the parts, ``IN_FLIGHT`` at a time, naming each in ``started``
        first; returns their (name, generation) in order and the CRC32C of all."""
        np = self._g.np
        futures: list[concurrent.futures.Future] = []
        crc = self._g.crc32c.Checksum()
        try:
            for i, views in enumerate(parts):
                if i >= IN_FLIGHT:  # bounds the parts held (and the chunks read ahead) at once
                    futures[i - IN_FLIGHT].result()
                for view in views:
                    crc.update(np.frombuffer(view, dtype=np.uint8))
                started.append(f"{key}.part-{i:05d}")
                futures.append(self._pool().submit(self._upload_part, started[-1], views))
            sources = [(name, f.result()) for name, f in zip(started, futures)]
        finally:
            concurrent.futures.wait(futures)  # none may land after the clean-up
        return sources, base64.b64encode(crc.digest()).decode()

    def _upload_part(self, name: str, views: list[memoryview]) -> str:
        return self._media(name, views)

    def _media(self, key: str, views: list[memoryview]) -> str:
        with self._translated(key):
            return self._uploader.upload(key, views)

    def _compose_into(self, key: str, sources: list[tuple[str, str]], crc: str | None = None) -> str:
        """One compose request of ``sources`` pinned to their generations; returns the generation."""
        bucket = self._bucket()
        blob = bucket.blob(key)
        with self._translated(key):
            try:
                # The same sources compose to the same object however often: safe to retry.
                blob.compose([bucket.blob(n) for n, _ in sources], retry=self._retry, timeout=self._timeout,
                             if_source_generation_match=[int(gen) for _, gen in sources])
            except self._g.api.PreconditionFailed as e:
                raise errors.StorageError(f"{self.describe(key)}: a part was replaced during the upload "
                                          "(another writer of the same key?)") from e
        if crc is not None and blob.crc32c != crc:
            raise errors.StorageError(f"{self.describe(key)}: the composed object has CRC32C "
                                      f"{blob.crc32c}, the data has {crc}")
        return str(blob.generation)

    # ------------------------------------------------------------------ reads
    def get(self, key: str, cap: int) -> tuple[bytes, str | None]:
        if gcsread.parsable(key):
            return self._reader.get(key, cap)
        with self._translated(key):
            for _ in range(GET_ATTEMPTS):
                blob = self._bucket().blob(key)
                blob.reload(timeout=self._timeout, retry=self._retry)
                if blob.size > cap:
                    raise ValueError(f"{self.describe(key)}: object of {blob.size} bytes, "
                                     f"more than the {cap} expected at most")
                generation = str(blob.generation)
                try:
                    data = blob.download_as_bytes(if_generation_match=int(generation), raw_download=True,
                                                  checksum="crc32c", retry=self._retry, timeout=self._timeout)
                except self._g.api.PreconditionFailed:
                    continue  # replaced since the metadata was read: read it again
                # Emulators may ignore the condition: the answer's generation tells.
                if str(blob.generation) == generation and len(data) <= cap:
                    return data, generation
        raise errors.StorageError(f"{self.describe(key)}: the object was replaced during each of "
                                  f"{GET_ATTEMPTS} reads")

    def read_into(self, key: str, buf: memoryview, offset: int) -> int:
        view = gcsupload.byte_view(buf)
        if not view.nbytes:
            return 0
        if gcsread.parsable(key):
            return self._reader.read_into(key, view, offset)
        writer = _ViewWriter(view)
        blob = self._bucket().blob(key)
        with self._translated(key):
            try:
                blob.download_to_file(writer, start=offset, end=offset + view.nbytes - 1, raw_download=True,
                                      checksum=None, retry=self._retry, timeout=self._timeout)
            except self._g.api.RequestRangeNotSatisfiable:
                return 0  # offset at or past the end
        return writer.written

    def head(self, key: str) -> objclient.ObjectInfo | None:
        blob = self._bucket().blob(key)
        try:
            with self._translated(key):
                blob.reload(timeout=self._timeout, retry=self._retry)
        except objclient.NotFound:
            return None
        return objclient.ObjectInfo(key, blob.size, str(blob.generation))

    def list(self, prefix: str) -> list[objclient.ObjectInfo]:
        with self._translated(prefix):
            blobs = self._client().list_blobs(self._bucket(), prefix=prefix, page_size=self._page_size,
                                              fields="items(name,size,generation),nextPageToken",
                                              retry=self._retry, timeout=self._timeout)
            return [objclient.ObjectInfo(b.name, b.size, str(b.generation)) for b in blobs]

    # ------------------------------------------------------------------ deletes
    def delete(self, keys: list[str]) -> None:
        keys = list(dict.fromkeys(keys))
        if len(keys) <= 1:
            for key in keys:
                self._delete_one(key)
            return
        for _ in self._pool().map(self._delete_one, keys):
            pass

    def _delete_one(self, key: str) -> None:
        try:
            with self._translated(key):
                self._bucket().blob(key).delete(timeout=self._timeout, retry=self._retry)
        except objclient.NotFound:
            pass

    def _delete_quietly(self, keys: list[str]) -> None:
        """Best-effort clean-up: a failure here must not hide the error being raised."""
        try:
            self.delete(keys)
        except (errors.StorageError, errors.BucketNotFoundError):
            pass


# ---------------------------------------------------------------------- helpers
def _compose(pool, compose_into, key: str, sources: list[tuple[str, str]], crc: str, temporary: list[str]) -> None:
    """Compose ``sources`` (name, generation) into ``key`` with ``compose_into``
    (one request), 32 at a time on ``pool`` through intermediate objects
    ``<key>.part-rR-NNNNN`` (named in ``temporary``); the result's CRC32C is checked against ``crc``."""
    rnd = 0
    while len(sources) > COMPOSE_MAX:
        groups = [sources[i:i + COMPOSE_MAX] for i in range(0, len(sources), COMPOSE_MAX)]
        names = [f"{key}.part-r{rnd}-{j:05d}" for j in range(len(groups))]
        temporary.extend(names)
        futures = [pool.submit(compose_into, n, grp) for n, grp in zip(names, groups)]
        concurrent.futures.wait(futures)
        sources = [(n, f.result()) for n, f in zip(names, futures)]
        rnd += 1
    compose_into(key, sources, crc)


def _resolve_auth(g: types.SimpleNamespace, url: str, options: dict):
    """(endpoint or None, credentials, project or None, description of the source),
    for google's clients and the obstore reader alike."""
    endpoint = options.get("endpoint")
    from_env = endpoint is None and bool(os.environ.get("STORAGE_EMULATOR_HOST"))
    if from_env:
        endpoint = os.environ["STORAGE_EMULATOR_HOST"]
        if "://" not in endpoint:
            endpoint = "http://" + endpoint
    creds = options.get("credentials")
    if creds is not None:
        if not isinstance(creds, g.auth.credentials.Credentials):
            raise ValueError(f"{url}: storage_options['credentials'] must be a "
                             f"google.auth.credentials.Credentials, not {type(creds).__name__}")
        # Scoped here (google's Client would scope a copy of its own): the reader refreshes the same object.
        creds = g.auth.credentials.with_scopes_if_required(creds, g.storage.Client.SCOPE)
        return endpoint, creds, None, "storage_options['credentials']"
    anonymous, wanted = g.auth.credentials.AnonymousCredentials(), options.get("anonymous")
    if wanted:
        return endpoint, anonymous, None, "anonymous (storage_options['anonymous'])"
    if from_env and wanted is None:
        return endpoint, anonymous, None, "anonymous (emulator STORAGE_EMULATOR_HOST)"
    if endpoint and endpoint.startswith("http://") and wanted is None:
        return endpoint, anonymous, None, "anonymous (plain-http endpoint)"
    try:
        creds, project = g.auth.default(scopes=g.storage.Client.SCOPE)
    except g.refused as e:
        raise errors.StorageAccessError(
            f"{url}: no application-default credentials ({e}); run `gcloud auth "
            "application-default login`, set GOOGLE_APPLICATION_CREDENTIALS, or pass "
            "storage_options 'credentials' or 'anonymous'") from e
    return endpoint, creds, project, "application-default credentials"


def _message(exc: Exception) -> str:
    return str(getattr(exc, "message", None) or exc)


class _ViewWriter(io.RawIOBase):
    """A write-only file filling a byte view from its start; refuses to overflow it."""

    def __init__(self, view: memoryview):
        super().__init__()
        self._view = view
        self.written = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        piece = gcsupload.byte_view(data)
        end = self.written + piece.nbytes
        if end > self._view.nbytes:
            raise ValueError(f"the server sent more than the {self._view.nbytes} bytes asked for")
        self._view[self.written:end] = piece
        self.written = end
        return piece.nbytes
