"""The one I/O event loop, and the bridge that derives blocking twins from coroutines.

Every storage operation is written once, as a coroutine, and always runs on a dedicated
event loop in a daemon thread (as fsspec does). Async callers hop onto it and await the
result from their own loop; blocking callers submit the coroutine and wait. Because all
backend clients live on that single loop, their sessions are never shared across loops.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import functools
import os
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

__all__ = ["SyncInAsyncError", "io_loop", "on_io_loop", "refuse_in_loop", "run_sync",
           "sync_twin"]

T = TypeVar("T")

_lock = threading.Lock()
_state: tuple[int, asyncio.AbstractEventLoop, threading.Thread] | None = None
_reset_hooks: list[Callable[[], None]] = []
_exit_hooks: list[Callable[[], Awaitable[None]]] = []


class SyncInAsyncError(RuntimeError):
    """A blocking ``*_sync`` method was called from inside a running event loop.

    Waiting there would block the loop, and deadlock if the loop is the one doing the I/O.
    """


def on_new_loop(hook: Callable[[], None]) -> None:
    """Register a hook that drops state bound to a previous I/O loop (e.g. after a fork)."""
    _reset_hooks.append(hook)


def on_exit(hook: Callable[[], Awaitable[None]]) -> None:
    """Register a coroutine function run on the I/O loop when the process exits (e.g. one
    that closes cached client sessions). The loop knows nothing of what the hooks close."""
    _exit_hooks.append(hook)


def io_loop() -> asyncio.AbstractEventLoop:
    """Return the I/O loop, starting its thread on first use and again after a fork."""
    global _state
    with _lock:
        if _state is None or _state[0] != os.getpid():
            # After a fork the parent's loop thread does not exist in the child: start anew
            # and forget every client bound to the old loop.
            for hook in _reset_hooks:
                hook()
            loop = asyncio.new_event_loop()
            thread = threading.Thread(
                target=loop.run_forever, name="checkpoint-io-loop", daemon=True
            )
            thread.start()
            _state = (os.getpid(), loop, thread)
        return _state[1]


def _run_exit_hooks() -> None:
    """Run the exit hooks while the loop thread still runs (``atexit`` comes before daemon
    threads stop): otherwise, for instance, aiohttp prints "Unclosed client session" at the
    end of every process that touched S3, GCS or Azure."""
    state = _state
    if state is None or state[0] != os.getpid() or not state[2].is_alive():
        return
    for hook in _exit_hooks:
        with contextlib.suppress(Exception):  # best effort: the process is ending either way
            asyncio.run_coroutine_threadsafe(hook(), state[1]).result(timeout=5)


atexit.register(_run_exit_hooks)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


async def on_io_loop(factory: Callable[[], Awaitable[T]]) -> T:
    """Await ``factory()`` on the I/O loop, from whatever loop the caller runs on."""
    loop = io_loop()
    if _running_loop() is loop:
        return await factory()
    future = asyncio.run_coroutine_threadsafe(_call(factory), loop)
    # Cancelling the caller cancels the wrapped future, which cancels the task on the I/O loop.
    return await asyncio.wrap_future(future)


async def _call(factory: Callable[[], Awaitable[T]]) -> T:
    return await factory()


def refuse_in_loop(name: str, twin: str | None = None) -> None:
    """Raise :class:`SyncInAsyncError` if called from inside a running event loop: the
    blocking call ``name`` (e.g. ``"exists_sync"``) would stall the loop; the error points to
    ``twin``, its awaitable (by default ``name`` without ``_sync``)."""
    if _running_loop() is not None:
        twin = twin or name.removesuffix("_sync")
        raise SyncInAsyncError(
            f"{name}() blocks and was called from inside a running event loop, where it "
            f"would stall or deadlock the loop; use `await {twin}(...)` there instead"
        )


def run_sync(
    factory: Callable[[], Awaitable[T]], *, name: str, timeout: float | None = None
) -> T:
    """Block until ``factory()`` has run on the I/O loop and return its result.

    ``factory`` is only called once we know we are not inside a running loop, so a refused
    call never leaves an un-awaited coroutine behind.
    """
    refuse_in_loop(name)
    future = asyncio.run_coroutine_threadsafe(_call(factory), io_loop())
    try:
        return future.result(timeout)
    except concurrent.futures.TimeoutError:
        future.cancel()
        raise TimeoutError(f"{name}() did not finish within {timeout} s") from None
    except BaseException:
        # KeyboardInterrupt and friends: stop the work on the I/O loop too.
        future.cancel()
        raise


def sync_twin(coroutine_function: Callable[..., Awaitable[T]]) -> Callable[..., T]:
    """Derive the blocking twin of a coroutine function (or method)."""
    name = f"{coroutine_function.__name__}_sync"

    @functools.wraps(coroutine_function)
    def twin(*args: Any, **kwargs: Any) -> T:
        return run_sync(lambda: coroutine_function(*args, **kwargs), name=name)

    twin.__name__ = name
    twin.__qualname__ = coroutine_function.__qualname__ + "_sync"
    twin.__doc__ = f"Blocking twin of :meth:`{coroutine_function.__qualname__}`."
    return twin
