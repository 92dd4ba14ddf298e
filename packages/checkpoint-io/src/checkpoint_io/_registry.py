"""Which backend serves a URI, its optional extra, and one cached client per configuration."""

from __future__ import annotations

import importlib
import importlib.util
import json
from typing import Any

from ._backend import Backend
from ._loop import on_exit, on_new_loop

__all__ = ["backend_for", "close_backends", "filesystem", "require_backend", "scheme_of"]

# scheme -> (backend module, class, fsspec protocol, pip extra or None, client module)
_SCHEMES: dict[str, tuple[str, str, str, str | None, str | None]] = {
    "file": ("_local", "LocalBackend", "file", None, None),
    "memory": ("_memory", "MemoryBackend", "memory", None, None),
    "s3": ("_s3", "S3Backend", "s3", "s3", "s3fs"),
    "s3a": ("_s3", "S3Backend", "s3", "s3", "s3fs"),
    "gs": ("_gcs", "GCSBackend", "gs", "gcs", "gcsfs"),
    "gcs": ("_gcs", "GCSBackend", "gs", "gcs", "gcsfs"),
    "abfs": ("_azure", "AzureBackend", "abfs", "azure", "adlfs"),
    "abfss": ("_azure", "AzureBackend", "abfs", "azure", "adlfs"),
    "az": ("_azure", "AzureBackend", "abfs", "azure", "adlfs"),
}

_cache: dict[tuple[str, str], Backend] = {}
on_new_loop(_cache.clear)


def scheme_of(uri: str) -> str:
    """The URI's scheme, ``file`` for plain local paths."""
    head, sep, _ = uri.partition("://")
    if not sep:
        return "file"
    scheme = head.lower()
    if scheme not in _SCHEMES:
        supported = ", ".join(f"{s}://" for s in sorted(_SCHEMES))
        raise ValueError(f"{uri}: unsupported scheme {scheme}:// (supported: {supported})")
    return scheme


def _require_client(scheme: str) -> None:
    _, _, _, extra, client = _SCHEMES[scheme]
    if client is not None and importlib.util.find_spec(client) is None:
        from ._errors import MissingBackendError

        raise MissingBackendError(scheme, extra, client)


def require_backend(uri: str) -> None:
    """Fail now if ``uri`` cannot be served: an unsupported scheme raises ``ValueError``, a
    missing client library :class:`MissingBackendError` naming the pip extra. Otherwise the
    client library is imported, so that the first transfer does not pay for it. No I/O."""
    scheme = scheme_of(uri)
    _require_client(scheme)
    module_name, _, _, _, client = _SCHEMES[scheme]
    importlib.import_module(f"checkpoint_io.{module_name}")
    if client is not None:
        importlib.import_module(client)


def _options_key(options: dict[str, Any]) -> str:
    return json.dumps(options, sort_keys=True, default=repr)


def backend_for(uri: str, storage_options: dict[str, Any] | None = None) -> Backend:
    """The backend for ``uri``, shared by every File with the same options. Call it on the
    I/O loop: cloud clients bind to the loop they are created on."""
    scheme = scheme_of(uri)
    options = dict(storage_options or {})
    module_name, class_name, _, _, _ = _SCHEMES[scheme]
    key = (module_name, _options_key(options))
    backend = _cache.get(key)
    if backend is None:
        _require_client(scheme)
        module = importlib.import_module(f"checkpoint_io.{module_name}")
        backend = getattr(module, class_name)(options)
        _cache[key] = backend
    return backend


async def close_backends() -> None:
    """Close every cached client session (they are recreated on next use)."""
    backends = list(_cache.values())
    _cache.clear()
    failures = []
    for backend in backends:  # every one, even after a failure
        try:
            await backend.close()
        except Exception as exc:
            failures.append(exc)
    if failures:
        raise failures[0]


# Closed at exit while the I/O loop still runs; registered here so that _loop needs no
# knowledge of backends (it used to import this module lazily: an import circle).
on_exit(close_backends)


def filesystem(uri: str, storage_options: dict[str, Any] | None = None, **kwargs: Any):
    """A plain fsspec filesystem for ``uri``, configured as checkpoint-io configures its
    own clients (emulator endpoints, anonymous access to a GCS emulator, ...).

    Extra keyword arguments go to the filesystem's constructor (e.g. ``asynchronous``).
    """
    import fsspec

    scheme = scheme_of(uri)
    _require_client(scheme)
    _, _, protocol, _, _ = _SCHEMES[scheme]
    options = {**(storage_options or {}), **kwargs}
    if protocol == "gs":
        from gcsfs.core import GCSFileSystem

        from ._gcs import gcs_defaults

        return GCSFileSystem(**gcs_defaults(options))
    return fsspec.filesystem(protocol, **options)
