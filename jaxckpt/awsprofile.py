"""AWS named profiles for ``s3://``: the files ``aws configure`` writes.

obstore (Rust's ``object_store``) reads AWS settings from the environment
only: for a user whose keys live in ``~/.aws/credentials`` it would fall
through to the instance metadata service and fail after its retries. This
module reads the profile the way the AWS CLI does and hands obstore what it
found:

* which profile: ``storage_options["profile"]``, else ``AWS_PROFILE``
  (``AWS_DEFAULT_PROFILE``), else ``default``;
* where: ``AWS_SHARED_CREDENTIALS_FILE`` (``~/.aws/credentials``; section
  ``[name]``) and ``AWS_CONFIG_FILE`` (``~/.aws/config``; ``[default]`` or
  ``[profile name]``); a key in the credentials file wins over the same key
  in the config file;
* static keys (``aws_access_key_id``, ``aws_secret_access_key``,
  ``aws_session_token``) reach obstore as a credential provider, so that no
  ``AWS_*`` variable mixes in (obstore would otherwise add a stray
  ``AWS_SESSION_TOKEN`` to the profile's keys); ``region`` and
  ``endpoint_url`` fill ``region`` / ``endpoint`` where neither
  ``storage_options`` nor the environment set them;
* a profile that gets its credentials another way (``role_arn``, ``sso_*``,
  ``credential_process``, ``web_identity_token_file``) is resolved by boto3
  (``obstore.auth.boto3.Boto3CredentialProvider``, refreshed by obstore):
  without boto3 that is an error naming ``pip install boto3``.

As in the AWS CLI, keys in ``storage_options`` or ``AWS_ACCESS_KEY_ID`` win
over a profile unless the profile is named in ``storage_options``. A profile
named (by option or ``AWS_PROFILE``) but found in neither file is an error;
an absent ``default`` profile is not.
"""

from __future__ import annotations

import configparser
import dataclasses
import os
from typing import Any, Mapping

from jaxckpt.errors import StorageAccessError

_DELEGATED = ("role_arn", "credential_process", "sso_session", "sso_start_url", "web_identity_token_file")
_REGION_ENV = ("AWS_REGION", "AWS_DEFAULT_REGION")
_ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT")
_OPTION_KEYS = {"access_key_id", "aws_access_key_id", "secret_access_key", "aws_secret_access_key"}
IMDS = "the instance metadata service (no credentials were configured)"  # obstore's last resort (s3client)


def direct_source(options: Mapping[str, Any], environ: Mapping[str, str] = os.environ) -> str | None:
    """The credentials given directly, which win over a profile not named in
    ``options`` (as in the AWS CLI), in words (never a secret); None if none."""
    if options.get("skip_signature"):
        return "none (skip_signature: anonymous requests)"
    if environ.get("AWS_SKIP_SIGNATURE", "").lower() in ("true", "1"):  # obstore reads it too
        return "none (AWS_SKIP_SIGNATURE: anonymous requests)"
    if _OPTION_KEYS & set(options):
        return "storage_options['access_key_id']"
    if environ.get("AWS_ACCESS_KEY_ID"):
        return "the environment (AWS_ACCESS_KEY_ID)"
    if environ.get("AWS_WEB_IDENTITY_TOKEN_FILE"):
        return "web identity (AWS_WEB_IDENTITY_TOKEN_FILE)"
    return None


@dataclasses.dataclass(frozen=True)
class Profile:
    """What a profile adds to obstore's ``S3Config`` (``config``: region, endpoint),
    its credentials as an obstore credential provider, and where they came from,
    in words (``source``, for error messages); both None for a profile that
    holds no credentials (a region only): obstore then looks further."""

    source: str | None
    config: dict
    provider: Any = None


def resolve(options: Mapping[str, Any], environ: Mapping[str, str] = os.environ) -> Profile | None:
    """The profile that applies to ``options`` (the user's ``storage_options``, ``profile``
    included) in ``environ``, or None where none does."""
    explicit = options.get("profile")
    if explicit is not None and (not isinstance(explicit, str) or not explicit):
        raise StorageAccessError(f"storage_options['profile'] must be a profile name, not {explicit!r}")
    named = explicit or environ.get("AWS_PROFILE") or environ.get("AWS_DEFAULT_PROFILE")
    if not explicit and direct_source(options, environ):
        return None
    name = named or "default"
    how = "storage_options['profile']" if explicit else ("AWS_PROFILE" if named else "the default profile")
    creds_path = _path(environ, "AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials")
    config_path = _path(environ, "AWS_CONFIG_FILE", "~/.aws/config")
    creds = _section(creds_path, name)
    conf = _section(config_path, name if name == "default" else f"profile {name}")
    if creds is None and conf is None:
        if named:
            raise StorageAccessError(f"AWS profile {name!r} (from {how}) is in neither {creds_path} nor {config_path}")
        return None
    merged = {**(conf or {}), **(creds or {})}
    where = creds_path if creds is not None and "aws_access_key_id" in creds else (
        config_path if creds is None else f"{creds_path} and {config_path}")
    source = f"AWS profile {name!r} ({how}) in {where}"
    config = _settings(merged, options, environ)
    provider = None
    if "aws_access_key_id" in merged or "aws_secret_access_key" in merged:
        missing = [k for k in ("aws_access_key_id", "aws_secret_access_key") if not merged.get(k)]
        if missing:
            raise StorageAccessError(f"{source}: {' and '.join(missing)} missing or empty")
        provider = StaticCredentials(merged["aws_access_key_id"], merged["aws_secret_access_key"],
                                     merged.get("aws_session_token") or None)
    elif any(k in merged for k in _DELEGATED):
        provider = _boto3_provider(name, source, [k for k in _DELEGATED if k in merged], creds_path, config_path)
    elif named:
        raise StorageAccessError(f"{source}: no credentials in it (aws_access_key_id and aws_secret_access_key, "
                                 f"or one of {', '.join(_DELEGATED)})")
    else:
        source = None  # the profile sets a region or endpoint only
    return Profile(source, config, provider)


class StaticCredentials:
    """An obstore credential provider of fixed keys (they never expire); its repr shows no secret."""

    def __init__(self, key_id: str, secret: str, token: str | None):
        self._creds = {"access_key_id": key_id, "secret_access_key": secret, "token": token, "expires_at": None}

    def __call__(self) -> dict:
        return dict(self._creds)

    def __repr__(self) -> str:
        return f"StaticCredentials(access_key_id={self._creds['access_key_id'][:4]}...)"


def _settings(merged: dict, options: Mapping[str, Any], environ: Mapping[str, str]) -> dict:
    """Region and endpoint from the profile, where the options and environment leave them unset."""
    out = {}
    if merged.get("region") and not ({"region", "aws_region"} & set(options)) and not any(
            environ.get(v) for v in _REGION_ENV):
        out["region"] = merged["region"]
    if merged.get("endpoint_url") and not ({"endpoint", "aws_endpoint", "endpoint_url"} & set(options)) and not any(
            environ.get(v) for v in _ENDPOINT_ENV):
        out["endpoint"] = merged["endpoint_url"]
    return out


def _path(environ: Mapping[str, str], var: str, default: str) -> str:
    return os.path.expanduser(environ.get(var) or default)


def _section(path: str, name: str) -> dict | None:
    """Section ``name`` of the INI file at ``path`` (None: no such file or section)."""
    parser = configparser.RawConfigParser(default_section="\0 no defaults")  # every section stands alone
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    except (OSError, UnicodeDecodeError, configparser.Error) as e:
        raise StorageAccessError(f"cannot read the AWS profile file {path}: {type(e).__name__}: {e}") from None
    if not parser.has_section(name):
        return None
    return {k.lower(): v.strip() for k, v in parser.items(name)}


def _boto3_provider(name: str, source: str, kinds: list[str], creds_path: str, config_path: str) -> Any:
    """boto3's resolver for profile ``name``, reading the same two files as above."""
    try:
        import botocore.session
    except ImportError:
        raise StorageAccessError(f"{source}: the profile gets its credentials through {', '.join(kinds)}, "
                                 "which boto3 resolves: pip install boto3") from None
    from obstore.auth.boto3 import Boto3CredentialProvider  # obstore >= 0.12.1, as the s3 extra requires
    session = botocore.session.Session()
    for var, value in (("credentials_file", creds_path), ("config_file", config_path), ("profile", name)):
        session.set_config_variable(var, value)
    try:
        return Boto3CredentialProvider(session)  # resolves the credentials once now
    except Exception as e:  # botocore's: no such sso-session, a failing process, STS refusing, ...
        raise StorageAccessError(f"{source}: boto3 could not get its credentials: {type(e).__name__}: {e}") from None
