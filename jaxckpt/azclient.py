"""``az://container/prefix`` (Azure Blob Storage) through obstore
(``jaxckpt.obstoreclient``: the requests and their errors); this module turns
Azure configuration into the store.

Configuration, as Azure tools read it: the standard environment
(``AZURE_STORAGE_ACCOUNT_NAME``, then one credential, in ``_CREDENTIALS``'s
order: ``AZURE_STORAGE_TOKEN``, ``AZURE_STORAGE_ACCOUNT_KEY``, workload
identity's ``AZURE_FEDERATED_TOKEN_FILE``, a service principal's
``AZURE_CLIENT_ID`` / ``AZURE_CLIENT_SECRET`` / ``AZURE_TENANT_ID``,
``AZURE_STORAGE_SAS_TOKEN``, ``AZURE_USE_AZURE_CLI=true``;
``AZURE_STORAGE_ENDPOINT`` for another endpoint, ``AZURE_STORAGE_USE_EMULATOR``
for Azurite; obstore reads them), then the user's ``storage_options``, which
win: any key of obstore's ``AzureConfig`` (``account_name``, ``account_key``,
``sas_key``, ``endpoint``, ...), of its ``ClientConfig`` and ``max_retries`` /
``retry_timeout`` (seconds). With no credential configured, obstore asks the
VM's managed identity (the instance metadata service).

Commit and lock: a PUT with ``If-None-Match: *`` (create) or ``If-Match``
(update), as on S3. Large objects go up as blocks committed by one Put Block
List (the object appears whole or not at all). Integrity: jaxckpt's own
checksums, verified on every read; obstore sends no Content-MD5 to Azure.
"""

from __future__ import annotations

import os

from jaxckpt import obstoreclient
from jaxckpt.errors import StorageAccessError, UnsupportedLocationError

INSTALL = "pip install 'jaxckpt[azure]'"
MANAGED_IDENTITY = "the VM's managed identity (instance metadata service; no credentials were configured)"

# (storage_options keys, environment variables, what it is in words): the
# credentials obstore (object_store's Azure builder) takes, in its order; the
# first one configured is named in access errors (its name only, never its value).
_CREDENTIALS = (
    (("skip_signature",), ("AZURE_SKIP_SIGNATURE",), "no credentials (unsigned requests)"),
    (("token", "bearer_token"), ("AZURE_STORAGE_TOKEN",), "a bearer token"),
    (("account_key", "access_key", "master_key"),
     ("AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_ACCESS_KEY", "AZURE_STORAGE_MASTER_KEY"), "the account key"),
    (("federated_token_file",), ("AZURE_FEDERATED_TOKEN_FILE",), "workload identity (a federated token file)"),
    (("client_secret",), ("AZURE_STORAGE_CLIENT_SECRET", "AZURE_CLIENT_SECRET"),
     "a service principal's client secret"),
    (("sas_key", "sas_token"), ("AZURE_STORAGE_SAS_KEY", "AZURE_STORAGE_SAS_TOKEN"), "a SAS token"),
    (("use_azure_cli",), ("AZURE_USE_AZURE_CLI",), "the Azure CLI's login"),
    (("use_emulator",), ("AZURE_STORAGE_USE_EMULATOR",), "the storage emulator's well-known account key"),
)

def _option(options: dict, name: str):
    """``storage_options[name]``, also under obstore's ``azure_`` / ``azure_storage_`` spellings."""
    for key in (name, f"azure_{name}", f"azure_storage_{name}"):
        if key in options:
            return options[key]
    return None


def _set(value) -> bool:
    return value is not None and str(value).strip().lower() not in ("", "false", "0")


def credential_source(options: dict) -> str:
    """Which credentials obstore will use, in words (never a secret)."""
    for keys, env, words in _CREDENTIALS:
        for k in keys:
            if _set(_option(options, k)):
                return f"{words} (storage_options[{k!r}])"
        for name in env:
            if _set(os.environ.get(name)):
                return f"{words} ({name})"
    return MANAGED_IDENTITY


class AzureClient(obstoreclient.ObstoreClient):
    """One container of an Azure storage account."""

    BUCKET = "container"
    MISSING_BUCKET = ("ContainerNotFound",)
    DENIED = ("AuthorizationFailure", "AuthenticationFailed", "AuthorizationPermissionMismatch", "403 Forbidden")
    MAX_PARTS = 50_000  # blocks of one blob, of at most 4000 MiB each
    MAX_PART_BYTES = 4000 << 20
    MAX_OBJECT_BYTES = 50_000 * (4000 << 20)

    def __init__(self, container: str, options: dict):
        self.url = f"az://{container}"
        self._ob = obstoreclient.import_obstore(self.url, INSTALL)
        self.credentials = credential_source(options)
        emulator = _set(_option(options, "use_emulator")) or _set(os.environ.get("AZURE_STORAGE_USE_EMULATOR"))
        if not (_option(options, "account_name") or os.environ.get("AZURE_STORAGE_ACCOUNT_NAME") or emulator):
            raise StorageAccessError(f"{self.url}: no Azure storage account named: set AZURE_STORAGE_ACCOUNT_NAME "
                                     "or storage_options={'account_name': ...}")
        config, client, retry = obstoreclient.split_options(options)
        endpoint = (_option(options, "endpoint") or os.environ.get("AZURE_STORAGE_ENDPOINT")
                    or os.environ.get("AZURE_ENDPOINT") or "")
        if str(endpoint).startswith("http://"):
            client.setdefault("allow_http", True)
        try:
            self._store = self._ob.store.AzureStore(container, config=config or None, client_options=client or None,
                                                    retry_config=retry or None)
        except Exception as e:  # unknown option keys, malformed values
            raise UnsupportedLocationError(f"{self.url}: bad storage_options: "
                                           f"{obstoreclient.first_line(str(e))}") from None
