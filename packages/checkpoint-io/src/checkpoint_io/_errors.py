"""Error types, and the one place that decides what a backend's error means.

The errors a caller sees have two roots. :class:`StorageError` is an ``OSError``: a store
that kept failing, or an object that changed under a read, is an I/O error, as it would be
on a local file (and local file errors reach callers as the plain ``OSError`` they are).
:class:`MissingBackendError` is an ``ImportError``: the client library is not installed, a
matter of the installation, not of any transfer. :class:`VersionMismatch` and
:class:`RangeMismatch` are signals between a backend hook and the retry loop, which turns
them into a :class:`StorageError`; callers never see them raised.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import socket

__all__ = ["Fault", "MissingBackendError", "ObjectChangedError", "RangeMismatch",
           "RangesIgnoredError", "SharedUploadError", "StorageError", "StorageRetryError",
           "VersionMismatch", "classify"]


class MissingBackendError(ImportError):
    """The client library for a URI scheme is not installed; the message names the extra."""

    def __init__(self, scheme: str, extra: str, module: str,
                 distribution: str = "checkpoint-io") -> None:
        super().__init__(
            f"{scheme}:// needs the optional dependency {module!r}: "
            f"pip install '{distribution}[{extra}]'"
        )
        self.scheme = scheme
        self.extra = extra
        self.module = module

    def naming(self, distribution: str) -> MissingBackendError:
        """The same error, naming ``distribution``'s extra (a package that re-exports ours)."""
        return MissingBackendError(self.scheme, self.extra, self.module, distribution)


class StorageError(OSError):
    """A transfer failed in the store: ``uri`` names the object, ``operation`` what was
    being done; the backend's own error is the ``__cause__``."""

    uri: str
    operation: str


class StorageRetryError(StorageError):
    """A transient fault persisted through every retry the policy allowed.

    ``uri``, ``operation`` and ``attempts`` say what was tried; the backend's last error is
    the ``__cause__``.
    """

    def __init__(self, uri: str, operation: str, attempts: int, elapsed: float, reason: str):
        super().__init__(
            errno.EIO,
            f"{operation} of {uri} failed after {attempts} attempt"
            f"{'s' if attempts != 1 else ''} over {elapsed:.1f} s of transient errors; "
            f"last: {reason}",
        )
        self.uri = uri
        self.operation = operation
        self.attempts = attempts
        self.elapsed = elapsed

    def __str__(self) -> str:
        return self.strerror or super().__str__()

    def __reduce__(self):  # keep it picklable across processes
        return (
            _rebuild_retry_error,
            (self.uri, self.operation, self.attempts, self.elapsed, self.strerror),
        )


def _rebuild_retry_error(uri, operation, attempts, elapsed, message):
    err = StorageRetryError(uri, operation, attempts, elapsed, "")
    err.strerror = message
    return err


class ObjectChangedError(StorageError):
    """The object was replaced or deleted while it was being read.

    A reader is pinned to the version it opened (ETag, generation, inode); when a request
    that resumes or continues the read finds another version, reading on would mix the
    bytes of two versions, so the read fails instead. Open the object again to read the
    new version. The backend's refusal is the ``__cause__``.
    """

    def __init__(self, uri: str, operation: str) -> None:
        super().__init__(
            errno.ESTALE,
            f"{operation} of {uri}: the object was replaced or deleted while being read; "
            "refusing to mix versions (open it again to read the new one)",
        )
        self.uri = uri
        self.operation = operation

    def __str__(self) -> str:
        return self.strerror or super().__str__()

    def __reduce__(self):
        return (ObjectChangedError, (self.uri, self.operation))


class RangesIgnoredError(StorageError):
    """The server (or a proxy in front of it) answered a ranged GET with the whole object:
    it does not do ranges, so the read failed without retrying. The
    :class:`RangeMismatch` is the ``__cause__``."""

    def __init__(self, uri: str, operation: str, reason: str) -> None:
        super().__init__(errno.EIO, f"{operation} of {uri} failed: {reason}")
        self.uri = uri
        self.operation = operation
        self.reason = reason

    def __str__(self) -> str:
        return self.strerror or super().__str__()

    def __reduce__(self):
        return (RangesIgnoredError, (self.uri, self.operation, self.reason))


class SharedUploadError(StorageError):
    """A shared upload (``SharedUpload``) cannot go on as asked: its token is bad or names
    another object, it was committed or aborted already, a segment's receipt is missing,
    duplicated or from another upload, a segment is too small. ``index`` is the segment
    concerned (``None`` when the whole upload is); never retried."""

    def __init__(self, uri: str, operation: str, reason: str,
                 index: int | None = None) -> None:
        super().__init__(errno.EINVAL, f"{operation} of {uri}: {reason}")
        self.uri = uri
        self.operation = operation
        self.reason = reason
        self.index = index

    def __str__(self) -> str:
        return self.strerror or super().__str__()

    def __reduce__(self):
        return (SharedUploadError, (self.uri, self.operation, self.reason, self.index))


class VersionMismatch(Exception):
    """Raised by a backend hook when the version it was pinned to is gone."""


class RangeMismatch(Exception):
    """Raised by a backend hook when a ranged GET is answered with other bytes than asked
    (another ``Content-Range``, a whole object, another length). Transient: a server or
    cache that served the wrong range once may serve the right one on the next request;
    after the policy's attempts the read fails with :class:`StorageRetryError` whose
    message and ``__cause__`` carry this error's ``asked`` and ``served``.

    ``ignored``: the answer was a 200 with the whole object, for part of it: the server (or
    a proxy in front of it) does not do ranges, and will answer the same way every time.
    That is not retried: the read fails at once with a :class:`StorageError` saying so."""

    def __init__(self, asked: str, served: str, *, ignored: bool = False) -> None:
        super().__init__(f"asked for {asked}, the server answered with {served}")
        self.asked = asked
        self.served = served
        self.ignored = ignored

    def __reduce__(self):
        return (_rebuild_range_mismatch, (self.asked, self.served, self.ignored))


def _rebuild_range_mismatch(asked: str, served: str, ignored: bool) -> RangeMismatch:
    return RangeMismatch(asked, served, ignored=ignored)


class Fault(enum.Enum):
    CHANGED = "changed"  # the pinned version is gone: never retried
    MISSING = "missing"  # the object (or bucket) is not there: never retried
    DENIED = "denied"  # credentials or policy refuse it: never retried
    TRANSIENT = "transient"  # worth another attempt
    UNSUPPORTED = "unsupported"  # the server cannot do what was asked (ranges): never retried
    FATAL = "fatal"  # anything else: raised as is


# Class names (anywhere in the MRO) of connection-level failures in the optional client
# libraries. Matching names keeps this module free of imports of the cloud extras.
_TRANSIENT_CLASS_NAMES = frozenset(
    {
        # aiohttp
        "ClientConnectionError",
        "ClientPayloadError",
        "ServerDisconnectedError",
        "ServerTimeoutError",
        # botocore
        "HTTPClientError",
        "EndpointConnectionError",
        "ConnectionClosedError",
        "ReadTimeoutError",
        "ConnectTimeoutError",
        "ResponseStreamingError",
        "IncompleteReadError",
        # azure-core
        "ServiceRequestError",
        "ServiceResponseError",
        # requests / urllib3 / http.client (gcsfs maps 502 to requests' ProxyError)
        "ProxyError",
        "ChunkedEncodingError",
        "ReadTimeout",
        "IncompleteRead",
        "ProtocolError",
        # fsspec
        "FSTimeoutError",
    }
)

_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "ServerBusy",
        "OperationTimedOut",
        "InternalServerError",
    }
)
# S3 and Azure answer a read whose If-Match ETag no longer matches with 412.
_CHANGED_CODES = frozenset({"PreconditionFailed", "ConditionNotMet"})
_MISSING_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NotFound", "BlobNotFound",
                            "ContainerNotFound", "ResourceNotFound"})
_DENIED_CODES = frozenset({"AccessDenied", "Forbidden", "AuthorizationFailure",
                           "AuthenticationFailed", "InvalidAccessKeyId",
                           "SignatureDoesNotMatch", "AuthorizationPermissionMismatch"})


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _status_and_code(exc: BaseException) -> tuple[int | None, str | None]:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):  # botocore ClientError
        err = response.get("Error") or {}
        meta = response.get("ResponseMetadata") or {}
        status = meta.get("HTTPStatusCode")
        code = err.get("Code")
        if status is None and isinstance(code, str) and code.isdigit():
            status = int(code)
        return status, code
    status = getattr(exc, "status_code", None)  # azure HttpResponseError
    code = getattr(exc, "error_code", None)
    if status is None:
        raw = getattr(exc, "code", None)  # gcsfs HttpError
        if raw is None:
            raw = getattr(exc, "status", None)  # aiohttp ClientResponseError
        if isinstance(raw, str) and raw.isdigit():
            raw = int(raw)
        status = raw if isinstance(raw, int) else None
    return status, (str(code) if code is not None else None)


def _classify_one(exc: BaseException) -> Fault | None:
    if isinstance(exc, StorageError):
        # Already a verdict: a shared upload's refusal, or a client that retried on its own
        # (obstore's uploads).
        return Fault.FATAL
    if isinstance(exc, VersionMismatch):
        return Fault.CHANGED
    if isinstance(exc, RangeMismatch):
        return Fault.UNSUPPORTED if exc.ignored else Fault.TRANSIENT
    if isinstance(exc, FileNotFoundError):
        return Fault.MISSING
    if isinstance(exc, PermissionError):
        return Fault.DENIED
    status, code = _status_and_code(exc)
    if code in _CHANGED_CODES or status == 412:
        return Fault.CHANGED
    if code in _MISSING_CODES or status == 404:
        return Fault.MISSING
    if code in _DENIED_CODES or status in (401, 403):
        return Fault.DENIED
    if code in _TRANSIENT_CODES or status in (408, 429) or (status or 0) >= 500:
        return Fault.TRANSIENT
    if isinstance(exc, OSError) and str(exc).startswith("Forbidden"):  # gcsfs 403
        return Fault.DENIED
    names = {cls.__name__ for cls in type(exc).__mro__}
    if names & _TRANSIENT_CLASS_NAMES:
        return Fault.TRANSIENT
    if isinstance(exc, (ConnectionError, TimeoutError, asyncio.TimeoutError, socket.timeout)):
        return Fault.TRANSIENT
    return None


def classify(exc: BaseException) -> Fault:
    """Say what a backend error means, looking through its chain of causes."""
    for link in _chain(exc):
        fault = _classify_one(link)
        if fault is not None:
            return fault
    return Fault.FATAL
