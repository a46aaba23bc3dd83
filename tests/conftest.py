"""Test setup: 8 virtual CPU devices, so sharding tests get real meshes."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Object-store clients must never reach a cloud or the instance metadata
# service (169.254.169.254): pin credentials, region and a loopback endpoint
# (a closed port) for every test; tests with a server pass its endpoint.
for _k, _v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ALLOW_HTTP": "true",
               "AWS_EC2_METADATA_DISABLED": "true", "GOOGLE_CLOUD_PROJECT": "test",
               "STORAGE_EMULATOR_HOST": "http://127.0.0.1:9", "NO_GCE_CHECK": "true",
               "GCE_METADATA_HOST": "127.0.0.1:9", "GCE_METADATA_IP": "127.0.0.1:9",
               "AZURE_STORAGE_ENDPOINT": "http://127.0.0.1:9/devstoreaccount1",
               "AZURE_MSI_ENDPOINT": "http://127.0.0.1:9/metadata/identity/oauth2/token"}.items():
    os.environ[_k] = _v
for _k in ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):  # no developer's ~/.aws profile either
    os.environ[_k] = os.devnull
os.environ.pop("AWS_SESSION_TOKEN", None)
os.environ.pop("AWS_PROFILE", None)
for _k in [k for k in os.environ if k.startswith("AZURE_") and k not in ("AZURE_STORAGE_ENDPOINT", "AZURE_MSI_ENDPOINT")]:
    os.environ.pop(_k)  # no developer's Azure account or credentials

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def ckdir(tmp_path):
    """A fresh directory for checkpoints."""
    return tmp_path


@pytest.fixture
def no_progress_env(monkeypatch):
    """Progress bars decided by the code under test, not by the caller's JAXCKPT_PROGRESS."""
    from jaxckpt import progress
    monkeypatch.delenv(progress.ENV_VAR, raising=False)


@pytest.fixture(scope="module")
def server():
    """A fork server for the crash and concurrency tests (tests/torture_worker.py)."""
    import torture_worker
    s = torture_worker.ForkServer()
    yield s
    s.close()


# ----------------------------------------------------------------------------- no pickle (issue 6)
import nopickle  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--allow-pickle", action="store_true",
                     help="run without the no-pickle guard (pickle's loaders patched to raise)")


def pytest_configure(config):
    config.addinivalue_line("markers", "allow_pickle(reason): this test may unpickle, for third-party code only; "
                                       "give the reason")


@pytest.fixture(autouse=True, scope="session")
def _no_pickle_session(request):
    """Patch pickle's loaders to raise for the whole session (module fixtures included)."""
    if request.config.getoption("--allow-pickle"):
        yield
        return
    nopickle.install()
    yield
    nopickle.uninstall()


@pytest.fixture(autouse=True)
def _no_pickle(request, _no_pickle_session):
    """``@pytest.mark.allow_pickle("reason")`` lifts the guard for one test (third-party code only)."""
    if request.node.get_closest_marker("allow_pickle") and not request.config.getoption("--allow-pickle"):
        nopickle.uninstall()
        try:
            yield
        finally:
            nopickle.install()
        return
    yield


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """Fail a test during which anything tried to unpickle, even if the error was swallowed."""
    seen = len(nopickle.ATTEMPTS)
    result = yield
    tried = nopickle.ATTEMPTS[seen:]
    if tried:
        pytest.fail(f"this test unpickled ({', '.join(tried)}): no code path may use pickle's loaders "
                    "(mark it @pytest.mark.allow_pickle('why') if third-party code needs it)", pytrace=False)
    return result
