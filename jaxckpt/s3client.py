"""``s3://`` buckets through obstore (``jaxckpt.obstoreclient``: the requests
and their errors); this module turns AWS configuration into the store.

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

A bucket in another region than the one configured (S3 answers ``301
PermanentRedirect`` with no ``Location``, which object_store does not follow)
gives a ``StorageError`` naming the region in use, where it came from, and the
bucket's own region, asked of S3 with one unsigned ``HEAD`` of the bucket.

Integrity: requests are signed with SigV4 over the payload's SHA-256 (the
server refuses a body that does not match); ``checksum_algorithm="sha256"``
adds S3's stored object checksum on top.
"""

from __future__ import annotations

import os
import re
import threading
import urllib.error
import urllib.request

from jaxckpt import awsprofile, obstoreclient
from jaxckpt.errors import StorageAccessError, StorageError, UnsupportedLocationError

INSTALL = "pip install 'jaxckpt[s3]'"
IMDS = awsprofile.IMDS
REGION_REDIRECT = "incorrectly configured region"  # object_store's words for S3's 301 without a Location
_REGION_NAME = re.compile(r"[a-z0-9-]{2,40}")
_ENDPOINT_KEYS = ("endpoint", "aws_endpoint", "endpoint_url", "aws_endpoint_url", "aws_endpoint_url_s3")
_ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT")


def credential_source(options: dict) -> str:
    """Which credentials obstore will use when no AWS profile supplies them, in words (never a secret)."""
    direct = awsprofile.direct_source(options)
    if direct:
        return direct
    if os.environ.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") or os.environ.get("AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        return "container credentials (AWS_CONTAINER_CREDENTIALS_*)"
    return IMDS


def region_in_use(options: dict, profile_config: dict) -> tuple[str, str]:
    """The region object_store signs for, and where it came from, in words:
    ``storage_options``, the AWS profile, ``AWS_REGION``, a default region,
    else us-east-1."""
    for source, values, keys in (("storage_options", options, ("region", "aws_region")),
                                 ("the AWS profile", profile_config, ("region",)),
                                 ("AWS_REGION", os.environ, ("AWS_REGION",)),
                                 ("storage_options", options, ("default_region", "aws_default_region")),
                                 ("AWS_DEFAULT_REGION", os.environ, ("AWS_DEFAULT_REGION",))):
        for key in keys:
            if values.get(key):
                return str(values[key]), source
    return "us-east-1", "the default, as none is configured"


def bucket_region(base: str, bucket: str, timeout: float = 10.0) -> str | None:
    """The region S3 reports for ``bucket`` at endpoint ``base``: the
    ``x-amz-bucket-region`` header of an unsigned HEAD of the bucket (sent
    with a 200, 301 or 403 alike); None if there is none or no answer."""
    request = urllib.request.Request(f"{base.rstrip('/')}/{bucket}", method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            found = answer.headers.get("x-amz-bucket-region")
    except urllib.error.HTTPError as e:
        found = e.headers.get("x-amz-bucket-region")
    except (OSError, ValueError):
        return None
    return found if found and _REGION_NAME.fullmatch(found) else None


class S3Client(obstoreclient.ObstoreClient):
    """One S3 (or S3-compatible) bucket."""

    MISSING_BUCKET = ("NoSuchBucket",)
    DENIED = ("AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId", "403 Forbidden")

    def __init__(self, bucket: str, options: dict):
        self.url = f"s3://{bucket}"
        self._ob = obstoreclient.import_obstore(self.url, INSTALL)
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
                "metadata service; for a public bucket set AWS_SKIP_SIGNATURE=true or pass "
                "storage_options={'skip_signature': True}")
        config, client, retry = obstoreclient.split_options(options)
        self._region = region_in_use(config, profile.config if profile else {})
        if profile:
            config = {**profile.config, **config}
        self._endpoint = next((str(config[k]) for k in _ENDPOINT_KEYS if config.get(k)), None) or next(
            (os.environ[v] for v in _ENDPOINT_VARS if os.environ.get(v)), None)
        self._redirect_lock = threading.Lock()
        self._redirect_text: str | None = None
        if "endpoint" in config and str(config["endpoint"]).startswith("http://"):
            client.setdefault("allow_http", True)
        extra = {"credential_provider": profile.provider} if profile and profile.provider else {}
        try:
            self._store = self._ob.store.S3Store(bucket, config=config or None, client_options=client or None,
                                                 retry_config=retry or None, **extra)
        except Exception as e:  # unknown option keys, malformed values
            raise UnsupportedLocationError(f"{self.url}: bad storage_options: {e}") from None

    def _error(self, e: Exception, key: str, what: str) -> Exception:
        if REGION_REDIRECT in str(e):
            return StorageError(f"{self.describe(key)}: could not {what}: {self._wrong_region()}")
        return super()._error(e, key, what)

    def _wrong_region(self) -> str:
        """What to set, once per client (one HEAD asks S3 for the bucket's region)."""
        with self._redirect_lock:
            if self._redirect_text is None:
                region, source = self._region
                found = bucket_region(self._endpoint or f"https://s3.{region}.amazonaws.com", self.bucket)
                if found is None or found == region:
                    self._redirect_text = (f"S3 redirected the request: the bucket is not in region {region!r} "
                                           f"(from {source}); set AWS_REGION (or storage_options={{'region': ...}}) "
                                           "to the bucket's region")
                else:
                    endpoint = (f", and an endpoint of that region (or none) instead of {self._endpoint}"
                                if self._endpoint and "amazonaws.com" in self._endpoint else "")
                    self._redirect_text = (f"the bucket is in region {found!r}, not {region!r} (from {source}): set "
                                           f"AWS_REGION={found} or storage_options={{'region': {found!r}}}{endpoint}")
            return self._redirect_text
