"""Retrying one backend request with exponential backoff, full jitter and a deadline."""

from __future__ import annotations

import asyncio
import errno
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ._errors import (
    Fault,
    ObjectChangedError,
    RangesIgnoredError,
    StorageRetryError,
    classify,
)

__all__ = ["RetryPolicy", "call_with_retries"]

T = TypeVar("T")
log = logging.getLogger("checkpoint_io")


class RetryPolicy(BaseModel):
    """How hard to try one storage request before giving up.

    ``attempts`` counts the first try. Delays grow as ``base_delay * 2**n`` capped at
    ``max_delay``, each drawn uniformly from zero to that bound (full jitter). ``deadline``
    bounds the whole request, waits included; ``attempt_timeout`` bounds one try so a
    connection that hangs counts as a transient fault rather than stalling forever.
    """

    model_config = ConfigDict(frozen=True)

    attempts: int = Field(default=6, ge=1, le=100)
    base_delay: float = Field(default=0.2, ge=0)
    max_delay: float = Field(default=10.0, ge=0)
    deadline: float = Field(default=300.0, gt=0)
    attempt_timeout: float = Field(default=120.0, gt=0)

    @model_validator(mode="after")
    def _delays_ordered(self) -> RetryPolicy:
        if self.max_delay < self.base_delay:
            raise ValueError("max_delay must be >= base_delay")
        return self

    def backoff(self, retry: int) -> float:
        """The jittered wait before retry number ``retry`` (1-based)."""
        return random.uniform(0, min(self.max_delay, self.base_delay * 2 ** (retry - 1)))


def _translated(fault: Fault, exc: BaseException, uri: str, operation: str) -> OSError:
    if fault is Fault.CHANGED:
        err: OSError = ObjectChangedError(uri, operation)
    elif fault is Fault.UNSUPPORTED:
        err = RangesIgnoredError(uri, operation, str(exc))
    elif fault is Fault.MISSING:
        err = FileNotFoundError(errno.ENOENT, f"{operation}: no such object", uri)
    else:
        err = PermissionError(errno.EACCES, f"{operation}: access denied", uri)
    err.__cause__ = exc
    return err


async def call_with_retries(
    policy: RetryPolicy, uri: str, operation: str, request: Callable[[], Awaitable[T]]
) -> T:
    """Run ``request()`` until it succeeds, fails for good, or the policy runs out.

    A missing object, a refusal and a vanished pinned version are raised at once as
    ``FileNotFoundError``, ``PermissionError`` and :class:`ObjectChangedError` (naming
    ``uri``), a server that ignores ``Range`` as a :class:`RangesIgnoredError`; transient faults
    are retried and finally raised as :class:`StorageRetryError`; anything else propagates
    unchanged.
    """
    start = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        remaining = policy.deadline - (time.monotonic() - start)
        try:
            return await asyncio.wait_for(request(), min(policy.attempt_timeout, remaining))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            fault = classify(exc)
            if fault in (Fault.CHANGED, Fault.MISSING, Fault.DENIED, Fault.UNSUPPORTED):
                raise _translated(fault, exc, uri, operation) from exc
            if fault is Fault.FATAL:
                raise
            elapsed = time.monotonic() - start
            delay = policy.backoff(attempt)
            if attempt >= policy.attempts or elapsed + delay >= policy.deadline:
                reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                raise StorageRetryError(uri, operation, attempt, elapsed, reason) from exc
            log.debug("%s of %s: attempt %d failed (%r); retrying in %.2f s",
                      operation, uri, attempt, exc, delay)
            await asyncio.sleep(delay)
