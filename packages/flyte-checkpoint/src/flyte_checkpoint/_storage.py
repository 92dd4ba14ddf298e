"""Object-store settings found where the upstream Flyte SDK finds them, for our fsspec clients.

Upstream takes a store's endpoint and credentials from the ``storage=`` given to
``flyte.init`` when it matches the URI's protocol, else from environment variables: Flyte
sets ``FLYTE_AWS_ENDPOINT``, ``FLYTE_AWS_ACCESS_KEY_ID`` and ``FLYTE_AWS_SECRET_ACCESS_KEY``
in task pods where the store is not AWS itself (a sandbox's MinIO, say). Our helper must
reach the store upstream's would, with the same credentials, so it reads the same places
and turns them into s3fs and adlfs options. What it finds nothing for is left to the
clients' own lookup (the AWS and Azure credential chains, Google's default credentials).

``STORAGE_EMULATOR_HOST`` is the Google clients' own convention for an emulator: gcsfs reads
it for the endpoint, and then this edge adds anonymous access (``token="anon"``, unless
``storage_options`` give a token), so that no credential lookup reaches for a metadata
server that is not there. checkpoint-io, below, reads no variable at all.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from checkpoint_io import File, scheme_of

from ._settings import Settings

__all__ = ["file_for", "flyte_storage_options", "storage_options_for"]

#: The environment variables upstream reads for each field (``S3.auto()``, ``ABFS.auto()``).
_S3_ENV = {
    "endpoint": "FLYTE_AWS_ENDPOINT",
    "access_key_id": "FLYTE_AWS_ACCESS_KEY_ID",
    "secret_access_key": "FLYTE_AWS_SECRET_ACCESS_KEY",
    "addressing_style": "FLYTE_AWS_S3_ADDRESSING_STYLE",
}
_AZURE_ENV = {
    "account_name": "AZURE_STORAGE_ACCOUNT_NAME",
    "account_key": "AZURE_STORAGE_ACCOUNT_KEY",
    "tenant_id": "AZURE_TENANT_ID",
    "client_id": "AZURE_CLIENT_ID",
    "client_secret": "AZURE_CLIENT_SECRET",
}


def flyte_storage_options(uri: str, environ: dict[str, str] | None = None) -> dict[str, Any]:
    """fsspec options for ``uri`` from upstream's storage settings; empty when there are none
    (and for local and memory URIs, and GCS ones, whose upstream settings hold no
    credentials: there only an emulator's anonymous access)."""
    scheme = scheme_of(uri)
    if scheme in ("s3", "s3a"):
        fields = _settings("S3", _S3_ENV, environ)
        return _s3_options(fields)
    if scheme in ("abfs", "abfss", "az"):
        return {key: value for key, value in _settings("ABFS", _AZURE_ENV, environ).items()
                if value}
    if scheme in ("gs", "gcs"):
        env = os.environ if environ is None else environ
        return {"token": "anon"} if env.get("STORAGE_EMULATOR_HOST", "").strip() else {}
    return {}


def storage_options_for(uri: str, explicit: dict[str, Any] | None = None) -> dict[str, Any]:
    """What reaches ``uri``'s store: upstream's settings (read at each use, as upstream
    does), with ``explicit`` options over them."""
    return {**flyte_storage_options(uri), **(explicit or {})}


def file_for(uri: str, explicit: dict[str, Any] | None = None,
             settings: Settings | None = None) -> File:
    """A :class:`~checkpoint_io.File` for ``uri`` with :func:`storage_options_for` and the
    transfer options of ``settings`` (default: the layers' own defaults)."""
    options = storage_options_for(uri, explicit)
    file = File(path=uri).with_options(storage_options=options) if options else File(path=uri)
    return file.with_options(**settings.file_options()) if settings is not None else file


def _settings(kind: str, variables: dict[str, str],
              environ: dict[str, str] | None) -> dict[str, Any]:
    """The fields of the ``flyte.init(storage=...)`` object when it is a ``kind``, else of
    the environment; as upstream does, never a mix of the two."""
    configured = _initialized_storage()
    if configured is not None and type(configured).__name__ == kind:
        fields = {name: getattr(configured, name, None) for name in variables}
        if kind == "S3":
            fields["region"] = getattr(configured, "region", None)
        return fields
    env = os.environ if environ is None else environ
    return {name: env.get(variable) or None for name, variable in variables.items()}


def _initialized_storage() -> Any:
    """What ``flyte.init(storage=...)`` set in this process, or ``None``: upstream not
    imported (so not initialised), not initialised, or not the upstream SDK at all."""
    if "flyte" not in sys.modules:
        return None
    try:
        from flyte._initialize import get_storage  # upstream's own accessor

        return get_storage()
    except Exception:  # not initialised (InitializationError), or an SDK without it
        return None


def _s3_options(fields: dict[str, Any]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if fields.get("endpoint"):
        options["endpoint_url"] = fields["endpoint"]
    if fields.get("access_key_id") and fields.get("secret_access_key"):
        options["key"] = fields["access_key_id"]
        options["secret"] = fields["secret_access_key"]
    if fields.get("region"):
        options["client_kwargs"] = {"region_name": fields["region"]}
    if fields.get("addressing_style"):
        # Upstream asks for virtual-hosted requests only when the style is "virtual".
        style = "virtual" if fields["addressing_style"] == "virtual" else "path"
        options["config_kwargs"] = {"s3": {"addressing_style": style}}
    return options
