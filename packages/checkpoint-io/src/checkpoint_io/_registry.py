"""Which backend serves a URI, its optional extra, and one cached client per configuration."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import logging
from typing import Any

from ._backend import Backend, BackendOptions
from ._loop import on_exit, on_new_loop

__all__ = ["backend_for", "close_backends", "data_path_for", "filesystem", "require_backend",
           "scheme_of"]


@dataclasses.dataclass(frozen=True)
class _Scheme:
    """How one URI scheme is served."""

    module: str  #: the backend's module in this package
    backend: str  #: its Backend class
    protocol: str  #: the fsspec protocol
    extra: str | None  #: the pip extra that brings the client, None when built in
    client: str | None  #: the client library's module


_S3 = _Scheme("_s3", "S3Backend", "s3", "s3", "s3fs")
_GCS = _Scheme("_gcs", "GCSBackend", "gs", "gcs", "gcsfs")
_AZURE = _Scheme("_azure", "AzureBackend", "abfs", "azure", "adlfs")
_SCHEMES: dict[str, _Scheme] = {
    "file": _Scheme("_local", "LocalBackend", "file", None, None),
    "memory": _Scheme("_memory", "MemoryBackend", "memory", None, None),
    "s3": _S3,
    "s3a": _S3,
    "gs": _GCS,
    "gcs": _GCS,
    "abfs": _AZURE,
    "abfss": _AZURE,
    "az": _AZURE,
}

_cache: dict[tuple[str, str, BackendOptions], Backend] = {}
on_new_loop(_cache.clear)
log = logging.getLogger("checkpoint_io")

#: Schemes the obstore data path can serve.
_FAST = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az"})
DATA_PATHS = ("auto", "obstore", "fsspec")
#: (scheme, path, reason) already logged: each is said once per process.
_said: set[tuple[str, str, str]] = set()


def _say(scheme: str, path: str, reason: str) -> None:
    if (scheme, path, reason) not in _said:
        _said.add((scheme, path, reason))
        log.info("checkpoint-io data path for %s://: %s (%s)", scheme, path, reason)


def data_path_for(uri: str, storage_options: dict[str, Any] | None = None,
                  options: BackendOptions | None = None) -> tuple[str, str]:
    """Which data path serves ``uri`` and why: ``("obstore" | "fsspec" | "builtin", reason)``.
    ``options.data_path="obstore"`` raises instead of falling back: :class:`MissingBackendError`
    without obstore, ``ValueError`` naming an option that does not translate."""
    scheme = scheme_of(uri)
    wanted = (options or BackendOptions()).data_path
    if wanted not in DATA_PATHS:
        raise ValueError(f"{uri}: data_path {wanted!r} is not one of {', '.join(DATA_PATHS)}")
    if scheme not in _FAST:
        return "builtin", "local and memory objects have one path"
    if wanted == "fsspec":
        return "fsspec", "data_path='fsspec' asks for it"
    if importlib.util.find_spec("obstore") is None:
        if wanted == "obstore":
            from ._errors import MissingBackendError

            raise MissingBackendError(scheme, _SCHEMES[scheme].extra, "obstore")
        return "fsspec", "obstore is not installed"
    from ._obstore import Untranslatable, check_store, store_config

    try:
        check_store(scheme, store_config(scheme, dict(storage_options or {})))
    except Untranslatable as exc:
        if wanted == "obstore":
            raise ValueError(f"{uri}: data_path='obstore' cannot serve it: {exc}") from None
        return "fsspec", str(exc)
    return "obstore", "obstore installed, storage options translated" if wanted == "auto" \
        else "data_path='obstore' asks for it"


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
    served = _SCHEMES[scheme]
    if served.client is not None and importlib.util.find_spec(served.client) is None:
        from ._errors import MissingBackendError

        raise MissingBackendError(scheme, served.extra, served.client)


def require_backend(uri: str) -> None:
    """Fail now if ``uri`` cannot be served: an unsupported scheme raises ``ValueError``, a
    missing client library :class:`MissingBackendError` naming the pip extra. Otherwise the
    client library is imported, so that the first transfer does not pay for it. No I/O."""
    scheme = scheme_of(uri)
    _require_client(scheme)
    served = _SCHEMES[scheme]
    importlib.import_module(f"checkpoint_io.{served.module}")
    if served.client is not None:
        importlib.import_module(served.client)


def _options_key(options: dict[str, Any]) -> str:
    return json.dumps(options, sort_keys=True, default=repr)


def backend_for(uri: str, storage_options: dict[str, Any] | None = None,
                options: BackendOptions | None = None) -> Backend:
    """The backend for ``uri``, shared by every File with the same client options and
    backend options. Call it on the I/O loop: cloud clients bind to the loop they are
    created on."""
    scheme = scheme_of(uri)
    client_options = dict(storage_options or {})
    options = options or BackendOptions()
    served = _SCHEMES[scheme]
    key = (served.module, _options_key(client_options), options)
    backend = _cache.get(key)
    if backend is None:
        path, reason = data_path_for(uri, client_options, options)
        if path == "obstore":
            from ._obstore import ObstoreBackend

            backend = ObstoreBackend(scheme, client_options, options)
        else:
            _require_client(scheme)
            module = importlib.import_module(f"checkpoint_io.{served.module}")
            backend = getattr(module, served.backend)(client_options, options)
        if path != "builtin":
            _say(scheme, path, reason)
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
    """A plain fsspec filesystem for ``uri``, with the same client options checkpoint-io's
    own clients get.

    Extra keyword arguments go to the filesystem's constructor (e.g. ``asynchronous``).
    """
    import fsspec

    scheme = scheme_of(uri)
    _require_client(scheme)
    options = {**(storage_options or {}), **kwargs}
    return fsspec.filesystem(_SCHEMES[scheme].protocol, **options)
