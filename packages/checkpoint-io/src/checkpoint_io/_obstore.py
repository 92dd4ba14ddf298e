"""S3, GCS and Azure through obstore (the Rust ``object_store`` crate): the data path whose
per-byte work (TLS, HTTP, hashing of requests, buffer joins) runs on Rust threads that hold
no GIL, so that the I/O loop thread only hands buffers on.

Reads are ``get_async`` calls with a range and ``If-Match`` (the ETag seen when the object
was opened), their bodies streamed in the buffers obstore returns, as they are. obstore's
own retries are off for every request our retry policy drives (one attempt each). Uploads
are one ``put_async`` multipart upload fed part by part from an async generator: obstore
has no call to send part ``n`` of an upload, so the retries of single part requests happen
inside it, with the numbers of the File's :class:`RetryPolicy` (the only policy there is);
it completes the upload only when the generator ends, and aborts it when the generator
raises, which is how :meth:`Upload.abort` ends it.

Which options translate is :func:`store_config`'s business; what does not translate makes
the registry fall back to the fsspec backends, saying why.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import errno
import os
import re
import time
from collections.abc import AsyncIterator
from typing import Any

from ._backend import Backend, BackendOptions, MiB, PartPieces, Source, Upload, joined_range
from ._errors import RangeMismatch, StorageError, StorageRetryError, VersionMismatch
from ._retry import RetryPolicy

__all__ = ["ObstoreBackend", "Untranslatable", "store_config"]

#: Per request: obstore's default (30 s for a whole request, body included) would cut a long
#: GET that is merely slow; our policy's ``attempt_timeout`` bounds each block instead.
_REQUEST_TIMEOUT = "3600s"
_CONNECT_TIMEOUT = "30s"
#: What an upload's parts may hold, counted in parts: those in flight inside obstore (it
#: keeps our buffers, up to ``max_concurrency`` of them) and three more of their size, the
#: one obstore is filling, the one queued to it and the one the writer fills. Measured on a
#: 512 MiB save against moto (RSS growth, the e2e bound is 200 MiB): 8 parts of 16 MiB in
#: flight 257 MiB, 3 of them 178-194, 2 of them 167; 4 of 8 MiB 119, 6 of 8 MiB 135.
#: So 6 parts of 8 MiB (a save of known size) and 2 of 16 MiB (unknown size); fsspec's
#: path: 87-134 MiB.
_UPLOAD_BUDGET = 72 * MiB
#: Seconds a closing backend leaves obstore's threads to settle (see ObstoreBackend.close).
_SETTLE = 0.1


class Untranslatable(ValueError):
    """A storage option has no obstore equivalent; the message says which and why."""


# --- storage options -> store configs -----------------------------------------------------

#: fsspec options that only tune the fsspec filesystem object itself (its caches, listings,
#: block sizes): meaningless for the fast path, so they do not force a fallback.
_FSSPEC_ONLY = frozenset({
    "skip_instance_cache", "use_listings_cache", "listings_expiry_time", "max_paths",
    "default_block_size", "default_cache_type", "default_fill_cache", "asynchronous", "loop",
    "cache_regions", "version_aware", "use_ssl", "max_concurrency", "fixed_upload_size",
    "project", "consistency", "cache_timeout", "secure_serialize", "check_connection",
    "requester_pays_bucket", "session_kwargs", "timeout", "blocksize",
})


def _pop_fsspec_only(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k not in _FSSPEC_ONLY}


def _leftover(scheme: str, options: dict[str, Any]) -> None:
    if options:
        names = ", ".join(sorted(map(str, options)))
        raise Untranslatable(f"{scheme}:// storage option(s) {names} have no obstore equivalent")


def _client() -> dict[str, Any]:
    # allow_http only lets an http:// endpoint that was configured be used (emulators,
    # sandboxes); the stores' own endpoints are https either way. Upstream sets it too.
    return {"timeout": _REQUEST_TIMEOUT, "connect_timeout": _CONNECT_TIMEOUT,
            "allow_http": True}


def _s3_config(storage_options: dict[str, Any]) -> dict[str, Any]:
    opts = _pop_fsspec_only(dict(storage_options))
    config: dict[str, Any] = {}
    for ours, theirs in (("key", "access_key_id"), ("secret", "secret_access_key"),
                         ("token", "session_token")):
        value = opts.pop(ours, None)
        if value:
            config[theirs] = value
    client_kwargs = dict(opts.pop("client_kwargs", None) or {})
    for name, key in (("aws_access_key_id", "access_key_id"),
                      ("aws_secret_access_key", "secret_access_key"),
                      ("aws_session_token", "session_token"),
                      ("region_name", "region"), ("endpoint_url", "endpoint")):
        value = client_kwargs.pop(name, None)
        if value:
            config[key] = value
    verify = client_kwargs.pop("verify", None)
    if client_kwargs:
        raise Untranslatable(f"s3:// client_kwargs {', '.join(sorted(client_kwargs))} have no "
                             "obstore equivalent")
    endpoint = opts.pop("endpoint_url", None)
    if endpoint:
        config["endpoint"] = endpoint
    if opts.pop("anon", False):
        config["skip_signature"] = True
    if opts.pop("requester_pays", False):
        config["request_payer"] = True
    client = _client()
    if verify is False:
        client["allow_invalid_certificates"] = True
    elif isinstance(verify, str):
        raise Untranslatable("s3:// client_kwargs verify= a CA bundle path has no obstore "
                             "equivalent here")
    conf = dict(opts.pop("config_kwargs", None) or {})
    conf.pop("retries", None)  # ours is the only policy
    s3 = dict(conf.pop("s3", None) or {})
    style = s3.pop("addressing_style", None)
    if style is not None:
        config["virtual_hosted_style_request"] = style == "virtual"
    if s3:
        raise Untranslatable(f"s3:// config_kwargs s3 {', '.join(sorted(s3))} have no obstore "
                             "equivalent")
    for name, key in (("connect_timeout", "connect_timeout"), ("read_timeout", "timeout")):
        value = conf.pop(name, None)
        if value is not None:
            client[key] = f"{float(value):g}s"
    region = conf.pop("region_name", None)
    if region:
        config["region"] = region
    signature = conf.pop("signature_version", None)
    if signature is not None:
        if "UNSIGNED" not in str(signature):
            conf["signature_version"] = signature
        else:
            config["skip_signature"] = True
    _leftover("s3", {**opts, **{f"config_kwargs.{k}": v for k, v in conf.items()}})
    # Over TLS the payload needs no SHA-256 in the signature (TLS protects it in transit),
    # as botocore, and so s3fs, sign S3 requests over https; over http it stays signed.
    # The hash of every uploaded byte was the largest share of obstore's CPU on a save.
    if not str(config.get("endpoint", "https://")).startswith("http://") and \
            not config.get("skip_signature") and "AWS_UNSIGNED_PAYLOAD" not in os.environ:
        config["unsigned_payload"] = True
    return {"config": config, "client_options": client}


def _gcs_config(storage_options: dict[str, Any]) -> dict[str, Any]:
    opts = _pop_fsspec_only(dict(storage_options))
    config: dict[str, Any] = {}
    # gcsfs finds an emulator through the Google clients' own variable; the fast path must
    # reach the same endpoint (and never the real service instead), so it looks there too.
    endpoint = opts.pop("endpoint_url", None)
    token = opts.pop("token", None)
    emulator = os.environ.get("STORAGE_EMULATOR_HOST", "").strip()
    if not endpoint and emulator:
        endpoint = emulator
        if token is None:
            token = "anon"  # as gcsfs does for an emulator
    if token == "anon":
        config["skip_signature"] = True
    elif token in (None, "google_default", "cloud"):
        pass  # obstore's own chain: GOOGLE_APPLICATION_CREDENTIALS, the metadata server
    elif isinstance(token, dict):
        import json

        config["service_account_key"] = json.dumps(token)
    elif isinstance(token, (str, os.PathLike)) and os.path.isfile(token):
        config["application_credentials"] = os.fspath(token)
    else:
        raise Untranslatable(f"gs:// token {type(token).__name__} {token!r:.40} has no obstore "
                             "equivalent")
    if endpoint:
        if "://" not in endpoint:
            endpoint = f"http://{endpoint}"
        config["base_url"] = endpoint.rstrip("/")
    _leftover("gs", opts)
    return {"config": config, "client_options": _client()}


def _connection_string(value: str) -> dict[str, str]:
    fields = {}
    for part in value.split(";"):
        name, sep, val = part.partition("=")
        if sep:
            fields[name.strip()] = val.strip()
    return fields


def _account_of(endpoint: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
    host, path = parts.hostname or "", parts.path.strip("/")
    if ".blob." in host:
        return host.split(".", 1)[0]
    if path:
        return path.split("/", 1)[0]
    raise Untranslatable(f"abfs:// endpoint {endpoint} names no account, and no account_name "
                         "is given")


def _azure_config(storage_options: dict[str, Any]) -> dict[str, Any]:
    opts = _pop_fsspec_only(dict(storage_options))
    config: dict[str, Any] = {}
    endpoint = None
    # adlfs reads the connection string from its variable when no account is given.
    conn = opts.pop("connection_string", None)
    if conn is None and not opts.get("account_name"):
        conn = os.environ.get("AZURE_STORAGE_CONNECTION_STRING")
    if conn:
        fields = _connection_string(conn)
        if fields.get("AccountName"):
            config["account_name"] = fields["AccountName"]
        if fields.get("AccountKey"):
            config["account_key"] = fields["AccountKey"]
        if fields.get("SharedAccessSignature"):
            config["sas_key"] = fields["SharedAccessSignature"]
        if fields.get("BlobEndpoint"):
            endpoint = fields["BlobEndpoint"].rstrip("/")
        elif fields.get("EndpointSuffix") and fields.get("AccountName"):
            protocol = fields.get("DefaultEndpointsProtocol", "https")
            endpoint = f"{protocol}://{fields['AccountName']}.blob.{fields['EndpointSuffix']}"
    for ours, theirs in (("account_name", "account_name"), ("account_key", "account_key"),
                         ("sas_token", "sas_key"), ("tenant_id", "tenant_id"),
                         ("client_id", "client_id"), ("client_secret", "client_secret")):
        value = opts.pop(ours, None)
        if value:
            config[theirs] = value.lstrip("?") if theirs == "sas_key" else value
    host = opts.pop("account_host", None)
    if host:
        endpoint = host if "://" in host else f"https://{host}"
    if opts.pop("anon", None):
        config["skip_signature"] = True
    if endpoint:
        config["endpoint"] = endpoint
        if not config.get("account_name"):
            # A SAS connection string may name only the endpoint: the account is in it
            # (the first label of <account>.blob.<suffix>, or an emulator's first path part).
            config["account_name"] = _account_of(endpoint)
    _leftover("abfs", opts)
    return {"config": config, "client_options": _client()}


_TRANSLATORS = {"s3": _s3_config, "s3a": _s3_config, "gs": _gcs_config, "gcs": _gcs_config,
                "abfs": _azure_config, "abfss": _azure_config, "az": _azure_config}


def store_config(scheme: str, storage_options: dict[str, Any]) -> dict[str, Any]:
    """The obstore store arguments (``config``, ``client_options``) for fsspec-style
    ``storage_options`` of ``scheme``; raises :class:`Untranslatable` naming the option that
    has no equivalent. What the options leave out, obstore's own chain finds (``AWS_*``,
    ``GOOGLE_*``, ``AZURE_*`` variables, instance metadata)."""
    return _TRANSLATORS[scheme](storage_options)


def check_store(scheme: str, args: dict[str, Any]) -> None:
    """Build (and drop) a store from :func:`store_config`'s ``args``, which does no I/O:
    settings obstore itself refuses (an Azure account it cannot find, a malformed value)
    raise :class:`Untranslatable` with obstore's reason, so that they fall back instead
    of failing the first transfer."""
    from obstore.store import AzureStore, GCSStore, S3Store

    cls = {"s3": S3Store, "gcs": GCSStore, "azure": AzureStore}[_SCHEME_KIND[scheme]]
    try:
        cls("probe", config=dict(args["config"]), client_options=dict(args["client_options"]))
    except Exception as exc:
        raise Untranslatable(f"{scheme}:// obstore refuses these settings: "
                             f"{_first_line(exc)}") from None


# --- obstore's errors -> the signals _retry understands --------------------------------------

#: The status of an HTTP answer in obstore's message ("Server returned non-2xx status code:
#: 503 Service Unavailable"), else in its debug print of the error ("status: 503").
_STATUS = (re.compile(r"non-2xx status code:\s*(\d{3})\b"),
           re.compile(r"\bstatus(?: code)?:?\s*(?:Some\()?(\d{3})\b", re.IGNORECASE))
#: object_store's kinds of HTTP failure that another attempt may cure (its debug print).
_HTTP_KIND = re.compile(r"HttpError \{\s*kind: (Connect|Request|Timeout|Interrupted|Decode)\b")


_UNEXPECTED_RANGE = re.compile(r"Requested (\d+)\.\.(\d+), got (\d+)\.\.(\d+)")


def _kinds() -> dict[type, str]:
    """obstore's exception classes, by what they mean. obstore raises the builtin
    ``FileNotFoundError`` for a missing object (and ``NotFoundError`` only elsewhere); its
    HTTP failures other than these are ``GenericError``, whose message holds the status."""
    from obstore import exceptions

    return {exceptions.PreconditionError: "changed", exceptions.NotModifiedError: "changed",
            exceptions.PermissionDeniedError: "denied",
            exceptions.UnauthenticatedError: "denied", exceptions.NotFoundError: "missing"}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _status(text: str) -> int | None:
    for pattern in _STATUS:
        if (match := pattern.search(text)) is not None:
            return int(match[1])
    return None


def _signal(exc: BaseException, uri: str, size: int | str = "*") -> BaseException:
    """What an obstore error means, as an error ``_errors.classify`` knows: the obstore error
    becomes its ``__cause__``. The class decides where obstore's has a meaning of its own
    (a precondition, a denial, a missing object); else the HTTP status or the kind of
    transport failure in its message (obstore exposes neither as an attribute)."""
    if isinstance(exc, (FileNotFoundError, PermissionError)) and exc.filename is None:
        # obstore's own (it raises the builtin for a missing object): named by our URI.
        default = errno.ENOENT if isinstance(exc, FileNotFoundError) else errno.EACCES
        named = type(exc)(exc.errno or default, _first_line(exc), uri)
        named.__cause__ = exc
        return named
    if isinstance(exc, (FileNotFoundError, PermissionError, RangeMismatch, VersionMismatch,
                        StorageError, asyncio.CancelledError)):
        return exc
    kind = next((k for cls, k in _kinds().items() if isinstance(exc, cls)), None)
    text = str(exc)
    first = _first_line(exc)
    status = _status(text)
    if kind == "changed" or status == 412:
        signal: BaseException = VersionMismatch(first)
    elif kind == "denied" or status in (401, 403):
        signal = PermissionError(errno.EACCES, first, uri)
    elif kind == "missing" or status == 404:
        signal = FileNotFoundError(errno.ENOENT, first, uri)
    elif "non-partial response" in text or "NotPartial" in text:
        signal = RangeMismatch("a range", "200 with the whole object: it ignores Range "
                               "requests", ignored=True)
    elif (wrong := _UNEXPECTED_RANGE.search(text)) is not None:
        a, b, c, d = map(int, wrong.groups())
        signal = RangeMismatch(f"bytes {a}-{b - 1}/{size}", f"206 bytes {c}-{d - 1}/{size}")
    elif "Range" in text and ("UnexpectedRange" in text or "unexpected range" in text.lower()
                              or "InvalidRange" in text or "Content-Range" in text):
        signal = RangeMismatch("a range", first)
    elif (status is not None and (status >= 500 or status in (408, 429))) or (
            status is None and (_HTTP_KIND.search(text) or _looks_transient(first))):
        signal = ConnectionError(first)
    else:
        signal = OSError(errno.EIO, first, uri)
    signal.__cause__ = exc
    return signal


_TRANSIENT_WORDS = ("error sending request", "connection", "timed out", "timeout",
                    "broken pipe", "reset by peer", "incomplete", "end of file", "eof",
                    "error decoding response body", "body error", "request or response body")


def _looks_transient(text: str) -> bool:
    lower = text.lower()
    return any(word in lower for word in _TRANSIENT_WORDS)


@contextlib.contextmanager
def _translated(uri: str, size: int | str = "*"):
    try:
        yield
    except (asyncio.CancelledError, GeneratorExit):
        raise
    except Exception as exc:
        signal = _signal(exc, uri, size)
        if signal is exc:
            raise
        raise signal from exc


# --- reads -----------------------------------------------------------------------------------

class _ObstoreSource(Source):
    def __init__(self, backend: ObstoreBackend, store: Any, key: str, uri: str,
                 meta: dict) -> None:
        self._b = backend
        self._store, self._key, self._uri = store, key, uri
        self.size = int(meta["size"])
        self._etag = meta.get("e_tag")
        self._version = meta.get("version")

    async def read_range(self, start: int, end: int):
        return await joined_range(self, start, end)

    async def stream_range(self, start: int, end: int) -> AsyncIterator[Any]:
        """One GET for ``[start, end)`` pinned by ``If-Match`` (and the version where the
        store has one), its body yielded in the buffers obstore hands out, once obstore has
        checked that the answer carries that range (it refuses a whole object for a part,
        and a ``Content-Range`` other than the one asked)."""
        import obstore

        options: dict[str, Any] = {"range": (start, end)}
        if self._etag:
            options["if_match"] = self._etag
        if self._version and self._b.pins_version:
            options["version"] = self._version
        with _translated(self._uri, self.size):
            try:
                result = await obstore.get_async(self._store, self._key, options=options)
            except FileNotFoundError as exc:
                # The object was there when opened: the pinned version is gone.
                raise VersionMismatch(f"{self._uri}: gone since it was opened") from exc
            meta = result.meta
            # The answer's own ETag and version too: a server that ignores If-Match (as
            # fake-gcs-server's XML API does) must still never have two versions mixed.
            if (self._etag and meta.get("e_tag") and meta["e_tag"] != self._etag) or (
                    self._version and meta.get("version")
                    and meta["version"] != self._version):
                raise VersionMismatch(f"{self._uri}: opened {self._etag}, now "
                                      f"{meta.get('e_tag')}")
            served = tuple(result.range)
            if served != (start, end):
                raise RangeMismatch(f"bytes {start}-{end - 1}/{self.size}",
                                    f"bytes {served[0]}-{served[1] - 1}")
            stream = result.stream(min_chunk_size=self._b.read_block)
        while True:
            with _translated(self._uri):
                try:
                    chunk = await stream.__anext__()
                except StopAsyncIteration:
                    return
            yield chunk


# --- uploads ---------------------------------------------------------------------------------

_END = object()


class _Aborted(Exception):
    """Raised into obstore's multipart upload to make it abort."""


class _ObstoreUpload(Upload):
    """One ``put_async`` multipart upload, fed part by part (in order) while it runs."""

    ordered = True  # the generator feeding obstore hands it the parts in order
    # obstore cuts its parts from whatever buffers it is fed, keeping them (no copy): a
    # part comes as the writer's own pieces, not copied into a part buffer first.
    takes_pieces = True

    def __init__(self, backend: ObstoreBackend, bucket: str, key: str, uri: str) -> None:
        self._b = backend
        self._bucket, self._key, self._uri = bucket, key, uri
        self.policy: RetryPolicy = RetryPolicy()  # the writer sets the transfer's
        self._task: asyncio.Future | None = None
        self._queue: asyncio.Queue | None = None
        self._started = 0.0
        self._taken = 0  # parts obstore has taken from the feed
        self._width = 1  # parts obstore may have in flight

    async def _feed(self) -> AsyncIterator[Any]:
        assert self._queue is not None
        while True:
            item = await self._queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            self._taken += 1
            yield item

    def _start(self, chunk: int) -> None:
        import obstore

        self._queue = asyncio.Queue(maxsize=1)
        self._started = time.monotonic()
        store = self._b.store(self._bucket, self.policy or RetryPolicy())
        # The caller's width where it set one (a big node's memory), else the budget's.
        self._width = self.concurrency or max(2, min(self._b.upload_concurrency,
                                                     _UPLOAD_BUDGET // max(chunk, 1) - 3))
        self._task = asyncio.ensure_future(obstore.put_async(
            store, self._key, self._feed(), use_multipart=True, chunk_size=chunk,
            max_concurrency=self._width))

    def _failure(self, operation: str) -> BaseException:
        assert self._task is not None and self._task.done()
        exc = self._task.exception() if not self._task.cancelled() else None
        if exc is None:
            return OSError(errno.EIO, f"{operation}: the upload ended early", self._uri)
        signal = _signal(exc, self._uri)
        if isinstance(signal, (ConnectionError, RangeMismatch)):
            # obstore made the policy's attempts already: the verdict is final.
            reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else \
                type(exc).__name__
            err = StorageRetryError(self._uri, operation, self.policy.attempts,
                                    time.monotonic() - self._started, reason)
            err.__cause__ = exc
            return err
        return signal

    async def _hand(self, item: Any, operation: str) -> None:
        assert self._queue is not None and self._task is not None
        if self._task.done():
            raise self._failure(operation)
        putter = asyncio.ensure_future(self._queue.put(item))
        try:
            await asyncio.wait({putter, self._task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not putter.done():
                putter.cancel()
        if not putter.done() or putter.cancelled():
            raise self._failure(operation)

    async def _hand_part(self, data, operation: str) -> None:
        views = data.views if isinstance(data, PartPieces) else [memoryview(data)]
        for view in views:
            await self._hand(view, operation)

    async def put_part(self, number: int, data) -> None:
        if self._task is None:
            self._start(len(data))
        await self._hand_part(data, f"upload part {number}")

    async def finish(self, number: int, data, total: int) -> None:
        if self._task is None:
            self._start(max(len(data), self._b.min_part_size))
        if len(data):
            await self._hand_part(data, f"upload part {number}")
        await self._hand(_END, "complete upload")
        assert self._task is not None
        with contextlib.suppress(Exception):
            await asyncio.shield(self._task)
        if self._task.exception() is not None:
            # obstore fails the upload on its first failed part request: name the earliest
            # part that can still have been in flight then, else the completion.
            first = max(1, self._taken - self._width + 1)
            raise self._failure(f"upload part {first}" if self._taken else "complete upload")
        self._task = None

    async def put_whole(self, data) -> None:
        import obstore

        with _translated(self._uri):
            await obstore.put_async(self._b.store(self._bucket), self._key, memoryview(data),
                                    use_multipart=False)

    async def abort(self) -> None:
        task, self._task = self._task, None
        if task is None or task.done():
            return  # never started, or obstore aborted it on its own failure already
        assert self._queue is not None
        # Raising in the generator makes obstore abort the multipart upload itself; it takes
        # the item once a part slot frees up, so give it a bounded while.
        with contextlib.suppress(asyncio.QueueFull):
            while not self._queue.empty():
                self._queue.get_nowait()
            self._queue.put_nowait(_Aborted("aborted"))
        done, _ = await asyncio.wait({task}, timeout=30)
        if not done:
            task.cancel()
        with contextlib.suppress(BaseException):
            await task


# --- the backend -----------------------------------------------------------------------------

_SCHEME_KIND = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs",
                "abfs": "azure", "abfss": "azure", "az": "azure"}


class ObstoreBackend(Backend):
    """The hooks for one store kind over obstore. One store per bucket (and per retry
    policy for multipart uploads, whose part requests obstore retries itself)."""

    concurrency = 8
    # Reads: 8 ranges of 8 MiB in flight from the first request (see Transfer.read_widening),
    # where the fsspec path may grow past 8 within the memory budget: each request in flight
    # holds buffers inside obstore too, about 3 MiB beside its range (16 ranges of 4 MiB
    # cost a 512 MiB load 40 MiB more RSS than 8 of 8 and ran no faster through the shaping
    # proxy: 2.16 s against 2.04 s; 4 of 8 MiB, the width before, took 3.05 s).
    read_concurrency = 8
    max_in_flight = 8
    widen = True
    widen_writes = False  # writes keep their fixed width, as before reads widened here
    # Uploads hand obstore their parts in order; it keeps its own bounded number in
    # flight (see _ObstoreUpload).
    #: Parts do not grow (``max_part_size`` is the smallest): obstore cuts a multipart
    #: upload into parts of the first part's size, so a File keeps the part size it starts
    #: with; the writer says so clearly when a stream outgrows ``max_parts`` of them.
    #: ``pins_version``: reads also carry the version seen at open (GCS generations).
    pins_version = False

    def __init__(self, scheme: str, storage_options: dict[str, Any],
                 options: BackendOptions | None = None) -> None:
        super().__init__(storage_options, options)
        self.scheme = scheme
        self.kind = _SCHEME_KIND[scheme]
        self._args = store_config(scheme, storage_options)
        self._stores: dict[tuple, Any] = {}
        self._uploads: Backend | None = None
        if self.kind == "s3":
            # 16 MiB parts, which obstore does not grow: 10,000 of them hold 156 GiB. A
            # write of known size (size_hint) starts at 8 MiB: 6 in flight within the
            # upload budget, not 2, and parts as large as the size needs.
            self.part_size = 16 * MiB
            self.sized_part_size = 8 * MiB
            self.min_part_size = 5 * MiB
            self.max_parts = 10_000
        elif self.kind == "gcs":
            # Reads over obstore; uploads through gcsfs's resumable session (or composite
            # parts): object_store writes GCS objects with the XML API's multipart uploads,
            # which fake-gcs-server does not serve, so that path could not be tested here.
            from ._gcs import GCSBackend

            self._uploads = GCSBackend(storage_options, options)
            self.composite_uploads = self._uploads.composite_uploads
            for name in ("part_size", "min_part_size", "part_multiple", "max_parts",
                         "max_part_size", "concurrency"):
                setattr(self, name, getattr(self._uploads, name))
            # The generation is the version: a read pinned to it never mixes versions,
            # also where If-Match is not honoured (fake-gcs-server's XML API).
            self.pins_version = True
        else:
            self.part_size = 8 * MiB
            self.max_parts = 50_000
        if self._uploads is None:
            self.max_part_size = self.min_part_size  # no growth (see pins_version's note)
        self.upload_concurrency = self.concurrency

    def split(self, path: str) -> tuple[str, str]:
        _, _, rest = path.partition("://")
        bucket, _, key = rest.partition("/")
        if self.kind == "azure" and "@" in bucket:
            bucket = bucket.split("@", 1)[0]
        if not bucket or not key:
            raise IsADirectoryError(f"{path}: names a bucket, not an object")
        return bucket, key

    def store(self, bucket: str, policy: RetryPolicy | None = None) -> Any:
        """The store for ``bucket``: without ``policy`` it makes one attempt per request
        (our retry loop drives it); with one, obstore retries by its numbers (uploads)."""
        key = (bucket, None if policy is None else policy.model_dump_json())
        store = self._stores.get(key)
        if store is None:
            from obstore.store import AzureStore, GCSStore, S3Store

            cls = {"s3": S3Store, "gcs": GCSStore, "azure": AzureStore}[self.kind]
            client = dict(self._args["client_options"])
            if policy is None:
                retry = {"max_retries": 0, "retry_timeout": datetime.timedelta(seconds=300)}
            else:
                retry = {
                    "max_retries": policy.attempts - 1,
                    "backoff": {"init_backoff": datetime.timedelta(seconds=policy.base_delay),
                                "max_backoff": datetime.timedelta(seconds=policy.max_delay),
                                "base": 2},
                    "retry_timeout": datetime.timedelta(seconds=policy.deadline),
                }
                client["timeout"] = f"{policy.attempt_timeout:g}s"
            store = cls(bucket, config=dict(self._args["config"]), client_options=client,
                        retry_config=retry)
            self._stores[key] = store
        return store

    async def _head(self, path: str) -> tuple[Any, str, dict]:
        import obstore

        bucket, key = self.split(path)
        store = self.store(bucket)
        with _translated(path):
            return store, key, await obstore.head_async(store, key)

    async def size(self, path: str) -> int:
        return int((await self._head(path))[2]["size"])

    async def open_source(self, path: str) -> Source:
        store, key, meta = await self._head(path)
        return _ObstoreSource(self, store, key, path, meta)

    def new_upload(self, path: str) -> Upload:
        if self._uploads is not None:
            return self._uploads.new_upload(path)
        return _ObstoreUpload(self, *self.split(path), path)

    async def close(self) -> None:
        had_stores = bool(self._stores)
        self._stores.clear()
        if self._uploads is not None:
            await self._uploads.close()
        if had_stores:
            # obstore 0.12's runtime threads finish work of their own a little after a call
            # returns and a store is dropped; one of them touching Python while the
            # interpreter finalizes aborts the process (SIGABRT after a successful save:
            # 3 exits in 8 against moto, none with this pause). Closing is what runs at
            # exit (checkpoint-io's exit hook), so the pause comes before finalization.
            await asyncio.sleep(_SETTLE)
