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

Integrity: requests are signed with SigV4 over the payload's SHA-256 (the
server refuses a body that does not match); ``checksum_algorithm="sha256"``
adds S3's stored object checksum on top.
"""

from __future__ import annotations

import os

from jaxckpt import awsprofile, obstoreclient
from jaxckpt.errors import StorageAccessError, UnsupportedLocationError

INSTALL = "pip install 'jaxckpt[s3]'"
IMDS = awsprofile.IMDS


def credential_source(options: dict) -> str:
    """Which credentials obstore will use when no AWS profile supplies them, in words (never a secret)."""
    direct = awsprofile.direct_source(options)
    if direct:
        return direct
    if os.environ.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") or os.environ.get("AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        return "container credentials (AWS_CONTAINER_CREDENTIALS_*)"
    return IMDS


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
                "metadata service; for a public bucket pass storage_options={'skip_signature': True}")
        config, client, retry = obstoreclient.split_options(options)
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
