"""AWS named profiles (``jaxckpt/awsprofile.py``): which profile, which file, what
wins, and the errors; the signature-checked round trips are in
tests/test_objstore_seaweedfs.py."""

from __future__ import annotations

import os
import sys

import pytest

import jaxckpt
from jaxckpt import awsprofile, s3client


def files(tmp_path, credentials: str = "", config: str = "") -> dict:
    creds, conf = tmp_path / "credentials", tmp_path / "config"
    creds.write_text(credentials)
    conf.write_text(config)
    return {"AWS_SHARED_CREDENTIALS_FILE": str(creds), "AWS_CONFIG_FILE": str(conf)}


def test_static_keys_of_the_named_profile_and_what_wins(tmp_path):
    env = files(tmp_path, "[default]\naws_access_key_id = AKDEF\naws_secret_access_key = sdef\n"
                          "[ci]\naws_access_key_id = AKCI\naws_secret_access_key = sci\naws_session_token = tci\n",
                "[profile ci]\nregion = eu-west-3\nendpoint_url = http://127.0.0.1:9000\n"
                "aws_access_key_id = AKCONF\naws_secret_access_key = sconf\n")
    p = awsprofile.resolve({}, {**env, "AWS_PROFILE": "ci"})
    assert p.provider() == {"access_key_id": "AKCI", "secret_access_key": "sci", "token": "tci",
                            "expires_at": None}  # the credentials file wins
    assert p.config == {"region": "eu-west-3", "endpoint": "http://127.0.0.1:9000"}
    assert p.source == f"AWS profile 'ci' (AWS_PROFILE) in {tmp_path / 'credentials'}"
    assert "sci" not in repr(p) and "tci" not in repr(p)
    # the environment's region and endpoint, or the options', win over the profile's
    p = awsprofile.resolve({"region": "us-east-2"}, {**env, "AWS_PROFILE": "ci", "AWS_ENDPOINT_URL": "http://x"})
    assert "region" not in p.config and "endpoint" not in p.config
    p = awsprofile.resolve({}, env)
    assert p.config == {} and p.provider()["access_key_id"] == "AKDEF" and p.provider()["token"] is None
    assert p.source == f"AWS profile 'default' (the default profile) in {tmp_path / 'credentials'}"
    # keys given directly win over AWS_PROFILE (as in the AWS CLI); a profile named in the options wins over them
    assert awsprofile.resolve({}, {**env, "AWS_PROFILE": "ci", "AWS_ACCESS_KEY_ID": "AKENV"}) is None
    assert awsprofile.resolve({"access_key_id": "AKOPT"}, {**env, "AWS_PROFILE": "ci"}) is None
    p = awsprofile.resolve({"profile": "ci"}, {**env, "AWS_ACCESS_KEY_ID": "AKENV"})
    assert p.provider()["access_key_id"] == "AKCI" and "storage_options['profile']" in p.source


def test_a_profile_only_in_the_config_file(tmp_path):
    env = files(tmp_path, "", "[profile dev]\naws_access_key_id = AKD\naws_secret_access_key = sd\nregion = ap-south-1\n")
    p = awsprofile.resolve({"profile": "dev"}, env)
    assert p.config == {"region": "ap-south-1"} and p.provider()["secret_access_key"] == "sd"
    assert p.source == f"AWS profile 'dev' (storage_options['profile']) in {tmp_path / 'config'}"


def test_missing_and_broken_profiles_are_named(tmp_path):
    env = files(tmp_path, "[ci]\naws_access_key_id = AKCI\n", "[default]\nregion = us-west-1\n")
    with pytest.raises(jaxckpt.StorageAccessError) as e:
        awsprofile.resolve({}, {**env, "AWS_PROFILE": "prod"})
    assert str(e.value) == (f"AWS profile 'prod' (from AWS_PROFILE) is in neither {tmp_path / 'credentials'} "
                            f"nor {tmp_path / 'config'}")
    with pytest.raises(jaxckpt.StorageAccessError, match=r"AWS profile 'ci' \(AWS_PROFILE\) in .*credentials: "
                                                         r"aws_secret_access_key missing or empty$"):
        awsprofile.resolve({}, {**env, "AWS_PROFILE": "ci"})
    # the default profile holding only a region: no credentials from it, the region still applies
    p = awsprofile.resolve({}, env)
    assert p.config == {"region": "us-west-1"} and p.provider is None and p.source is None
    # no files at all, no profile named: nothing
    assert awsprofile.resolve({}, {"AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
                                   "AWS_CONFIG_FILE": str(tmp_path / "none")}) is None
    (tmp_path / "credentials").write_text("aws_access_key_id = outside any section\n")
    with pytest.raises(jaxckpt.StorageAccessError, match=r"cannot read the AWS profile file .*credentials: "
                                                         r"MissingSectionHeaderError"):
        awsprofile.resolve({}, env)
    with pytest.raises(jaxckpt.StorageAccessError, match=r"storage_options\['profile'\] must be a profile name"):
        awsprofile.resolve({"profile": ""}, env)


def credential_process(tmp_path, key: str, secret: str) -> str:
    """A ``credential_process`` line: this Python printing the AWS process-credentials JSON."""
    script = tmp_path / "creds.py"
    script.write_text("import json\nprint(json.dumps({'Version': 1, 'AccessKeyId': %r, 'SecretAccessKey': %r}))\n"
                      % (key, secret))
    return f"credential_process = {sys.executable} {script}\n"


def test_a_profile_with_a_role_or_process_is_resolved_by_boto3(tmp_path, monkeypatch):
    env = files(tmp_path, "", "[profile proc]\n" + credential_process(tmp_path, "AKPROC", "sproc")
                + "[profile sso]\nsso_session = corp\nsso_account_id = 1\n")
    p = awsprofile.resolve({"profile": "proc"}, env)
    from obstore.auth.boto3 import Boto3CredentialProvider
    assert isinstance(p.provider, Boto3CredentialProvider) and p.config == {}
    assert p.provider()["access_key_id"] == "AKPROC"
    with pytest.raises(jaxckpt.StorageAccessError) as e:
        awsprofile.resolve({"profile": "sso"}, env)
    assert str(e.value) == (f"AWS profile 'sso' (storage_options['profile']) in {tmp_path / 'config'}: boto3 could "
                            'not get its credentials: InvalidConfigError: The specified sso-session does not exist: '
                            '"corp"')
    monkeypatch.setitem(sys.modules, "botocore.session", None)
    with pytest.raises(jaxckpt.StorageAccessError) as e:
        awsprofile.resolve({"profile": "proc"}, env)
    assert str(e.value) == (f"AWS profile 'proc' (storage_options['profile']) in {tmp_path / 'config'}: the profile "
                            "gets its credentials through credential_process, which boto3 resolves: pip install boto3")


def test_no_credentials_with_the_metadata_service_disabled_fail_at_once(tmp_path, monkeypatch):
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(jaxckpt.StorageAccessError) as e:
        jaxckpt.restore("s3://no-creds-bucket/run/1", storage_options={"endpoint": "http://127.0.0.1:9"})
    assert str(e.value) == (
        "s3://no-creds-bucket: no AWS credentials: none in storage_options, the environment (AWS_ACCESS_KEY_ID) or "
        "an AWS profile (~/.aws/credentials), and AWS_EC2_METADATA_DISABLED=true rules out the instance metadata "
        "service; for a public bucket set AWS_SKIP_SIGNATURE=true or pass storage_options={'skip_signature': True}")
    monkeypatch.setenv("AWS_PROFILE", "gone")
    with pytest.raises(jaxckpt.StorageAccessError, match=r"^s3://no-creds-bucket: AWS profile 'gone' \(from "
                                                         r"AWS_PROFILE\) is in neither /dev/null nor /dev/null$"):
        jaxckpt.restore("s3://no-creds-bucket/run/1", storage_options={"endpoint": "http://127.0.0.1:9"})


def test_a_profile_without_credentials_leaves_the_source_to_the_rest_of_the_chain(tmp_path, monkeypatch):
    """A default profile that sets only a region must not hide web identity or
    container credentials (nor, with the metadata service disabled, raise)."""
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in files(tmp_path, "", "[default]\nregion = us-west-1\n").items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", "http://127.0.0.1:9/creds")
    c = s3client.S3Client("region-only-bucket", {"endpoint": "http://127.0.0.1:9"})
    assert c.credentials == "container credentials (AWS_CONTAINER_CREDENTIALS_*)"
    monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(tmp_path / "token"))
    monkeypatch.setenv("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/r")
    assert s3client.S3Client("region-only-bucket", {"endpoint": "http://127.0.0.1:9"}).credentials == \
        "web identity (AWS_WEB_IDENTITY_TOKEN_FILE)"
