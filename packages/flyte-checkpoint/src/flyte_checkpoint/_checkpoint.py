"""``flyte.Checkpoint``: resume a retried task from the previous attempt's checkpoint object.

Each operation is written once, as a blocking pipeline that streams between the local tree and
the object store (``_save_blocking`` / ``_load_blocking``). The sync methods call it directly;
the async methods run it on a worker thread, so the event loop never blocks and CPU-heavy
compression and hashing happen off it. A background save (``wait=False``) freezes the data in
a snapshot (``_snapshot``) and runs the same pipeline on a thread of its own (``_background``).
The pipelines' adapters are in ``_pipeline``, the errors in ``_errors``, the local workspaces
that loads restore into in ``_workspace``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pathlib
import stat
import threading
import time
from abc import ABC, abstractmethod
from concurrent.futures import Future
from typing import Any

from checkpoint_format import format_size, restore, write_tarball
from checkpoint_io import File, MissingBackendError, filesystem, refuse_in_loop, require_backend

from ._background import Background
from ._errors import (
    CheckpointError,
    CheckpointLoadError,
    CheckpointSaveError,
    load_error,
    rule_of,
    save_error,
)
from ._pipeline import (
    Cancelled,
    EmptyPayload,
    ReadStream,
    WriteSink,
    copy_bytes,
    copy_file,
    ensure_local_parent,
    in_thread,
    save_source,
    size_hint,
    size_of,
)
from ._progress import Progress
from ._resume import Resume
from ._settings import Settings
from ._snapshot import Snapshot, capture, special_kind
from ._storage import file_for, storage_options_for
from ._workspace import clear, workspaces

__all__ = [
    "ENV_DEST",
    "ENV_SRC",
    "BaseCheckpoint",
    "Checkpoint",
    "CheckpointError",
    "CheckpointLoadError",
    "CheckpointSaveError",
]

logger = logging.getLogger("flyte_checkpoint")

#: Environment variables read by :meth:`Checkpoint.from_env` (and set by ``flyte-checkpoint run``).
ENV_DEST = "FLYTE_CHECKPOINT_PATH"
ENV_SRC = "FLYTE_PREV_CHECKPOINT_PATH"



class BaseCheckpoint(ABC):
    """The interface of a task checkpoint helper: restore the previous attempt, save the next."""

    @property
    @abstractmethod
    def path(self) -> pathlib.Path:
        """Local directory holding the restored checkpoint."""

    @abstractmethod
    def prev_exists(self) -> bool:
        """Whether the runtime provided a previous-checkpoint location (a retry or resume)."""

    @abstractmethod
    async def load(self) -> pathlib.Path | None:
        """Restore the previous checkpoint (async)."""

    @abstractmethod
    async def save(self, data: pathlib.Path | str | bytes) -> None:
        """Save a directory, a file or bytes as the new checkpoint (async)."""

    @abstractmethod
    def load_sync(self) -> pathlib.Path | None:
        """Restore the previous checkpoint (blocking)."""

    @abstractmethod
    def save_sync(self, data: pathlib.Path | str | bytes) -> None:
        """Save a directory, a file or bytes as the new checkpoint (blocking)."""


def _location(value: str | os.PathLike[str] | None) -> str | None:
    """A URI or local path as a string; blank, ``""`` or ``''`` mean no location."""
    if value is None:
        return None
    text = os.fspath(value).strip().strip("\"'").strip()
    return text or None


class Checkpoint(BaseCheckpoint):
    """Checkpoint helper for Flyte tasks: one object per checkpoint, on any store.

    ``checkpoint_dest`` is where :meth:`save` writes; ``checkpoint_src`` is the previous
    attempt's checkpoint, if any. Both accept ``s3://``, ``gs://``, ``abfs://``/``az://``,
    ``memory://``, ``file://`` URIs, plain local paths and :class:`pathlib.Path`.

    The store is reached as upstream's helper reaches it: with the endpoint and credentials
    of ``flyte.init(storage=...)``, else of ``FLYTE_AWS_*`` (S3) and ``AZURE_*`` (Azure)
    variables, else the clients' own credential lookup; ``storage_options`` (fsspec options
    of s3fs, gcsfs or adlfs) take precedence over all of them.

    Saving a directory streams a gzip tar of its top-level entries into the object; saving a
    file or bytes stores them as they are. :meth:`load` restores a tarball under :attr:`path`
    and returns :attr:`path`, or puts any other object at ``path / "payload"`` and returns
    that; it returns ``None`` only when there is no previous checkpoint (no source, no
    object, or an empty object). Any other failure raises :class:`CheckpointLoadError`.

    Use it as a context manager, or call :meth:`close`, to remove the local workspace;
    otherwise it is removed when the process exits.

    A location that cannot be served fails here, at task start, not at the first save an
    hour later: an unsupported scheme raises ``ValueError``, a missing client library
    :class:`checkpoint_io.MissingBackendError` naming the pip extra to install.
    """

    def __init__(
        self,
        checkpoint_dest: str | os.PathLike[str],
        checkpoint_src: str | os.PathLike[str] | None = None,
        *,
        storage_options: dict[str, Any] | None = None,
        settings: Settings | None = None,
    ) -> None:
        # Read once, here: a bad CHECKPOINT_* value fails at task start (SettingsError), and
        # every later operation sees the same tunables.
        self._settings = Settings.from_env() if settings is None else settings
        if not isinstance(self._settings, Settings):
            raise TypeError(f"settings must be a flyte_checkpoint.Settings, got {settings!r}")
        dest = _location(checkpoint_dest)
        if dest is None:
            raise ValueError("Checkpoint needs a destination: checkpoint_dest is empty")
        self._dest = dest
        self._src = _location(checkpoint_src)
        for uri in (self._dest, self._src):
            if uri is not None:
                try:
                    require_backend(uri)  # and import the client now, not in the first save
                except MissingBackendError as missing:
                    raise missing.naming("flyte-checkpoint") from None
        self._storage_options = storage_options
        self._workspace: pathlib.Path | None = None
        self._workspace_lock = threading.Lock()
        # Held by a save from its wait for the one in flight until it has started (background)
        # or published (blocking), and by close(): saves from several threads run one after
        # the other, in the order they took it. No other lock is needed around the pipeline:
        # a blocking save runs under it after joining the background save in flight, and a
        # background save starts under it, after the same join, so no two ever overlap.
        self._turn = threading.Lock()
        self._load_lock = threading.Lock()
        self._loaded = False
        self._loaded_result: pathlib.Path | None = None
        self._pending_lock = threading.Lock()  # guards _pending
        self._pending: Background | None = None
        # A failure not yet raised by save()/close(). Written only by the background save in
        # flight, before it sets its ``finished`` event; read only once that save is joined
        # (the event orders the two) or when none is in flight. Unlocked on purpose: a
        # settle holds _pending_lock while it joins, so the writer cannot take it.
        self._failed: CheckpointSaveError | None = None
        # The resume rule (see _resume.py): set for the helper tasks get (from_env(), and
        # flyte.ctx().checkpoint after install()); a plain Checkpoint(dest, src) loads src.
        self._resume: Resume | None = None

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **options: Any) -> Checkpoint:
        """Build the helper from ``FLYTE_CHECKPOINT_PATH`` and ``FLYTE_PREV_CHECKPOINT_PATH``
        (what ``flyte-checkpoint run`` sets for each attempt), its :class:`Settings` from the
        same ``environ`` unless ``settings=`` is given."""
        env = os.environ if environ is None else environ
        dest = env.get(ENV_DEST, "")
        if not dest.strip():
            raise ValueError(f"{ENV_DEST} is not set: no checkpoint destination for this attempt")
        if options.get("settings") is None:
            options["settings"] = Settings.from_env(env)
        helper = cls(dest, env.get(ENV_SRC), **options)
        helper._resume = Resume(helper._dest, helper._src)
        return helper

    # ------------------------------------------------------------------ properties

    @property
    def settings(self) -> Settings:
        """The tunables this helper was built with (read once, at construction)."""
        return self._settings

    @property
    def remote_destination(self) -> str:
        """Where :meth:`save` writes."""
        return self._dest

    @property
    def remote_source(self) -> str | None:
        """The previous attempt's checkpoint, or ``None``."""
        return self._src

    @property
    def path(self) -> pathlib.Path:
        """Local directory holding the restored checkpoint (created on first use)."""
        with self._workspace_lock:
            if self._workspace is None:
                self._workspace = workspaces.create()
            path = self._workspace / "checkpoint"
        path.mkdir(exist_ok=True)
        return path

    def prev_exists(self) -> bool:
        return self._src is not None

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Wait for a background save in progress, then remove the local workspace (and with
        it the restored files). Also waits for a load in progress, so that no load can cache a
        path that close() has removed. Raises :class:`CheckpointSaveError` if a background
        save failed and no later ``save`` has raised it yet."""
        try:
            with self._turn:
                self._settle(why="close()")
        finally:
            with self._load_lock, self._workspace_lock:
                if self._workspace is not None:
                    workspaces.remove(self._workspace)
                    self._workspace = None
                    self._loaded = False
                    self._loaded_result = None

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, exc_type: object, *exc_info: object) -> None:
        self._close_quietly_if(exc_type is not None)

    async def __aenter__(self) -> Checkpoint:
        return self

    async def __aexit__(self, exc_type: object, *exc_info: object) -> None:
        await asyncio.get_running_loop().run_in_executor(
            None, self._close_quietly_if, exc_type is not None)

    def _close_quietly_if(self, unwinding: bool) -> None:
        """close(); while another exception propagates, a background failure is logged (it
        was already logged when it happened) rather than raised over that exception."""
        try:
            self.close()
        except CheckpointSaveError:
            if not unwinding:
                raise

    def __repr__(self) -> str:
        return f"Checkpoint(checkpoint_dest={self._dest!r}, checkpoint_src={self._src!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        """Copies and pickles are fresh helpers for the same locations: no workspace, nothing
        loaded, no save in flight (those belong to the process that made them)."""
        return (_rebuild, (type(self), self._dest, self._src, self._storage_options,
                           self._settings, self._resume))

    # ------------------------------------------------------------------ load

    def load_sync(self) -> pathlib.Path | None:
        refuse_in_loop("Checkpoint.load_sync", "checkpoint.load")
        return self._load_blocking(threading.Event())

    async def load(self) -> pathlib.Path | None:
        return await in_thread(self._load_blocking)

    def _options(self, uri: str) -> dict[str, Any]:
        """The store's options: upstream's storage settings, ``storage_options`` over them."""
        return storage_options_for(uri, self._storage_options)

    def _file(self, uri: str) -> File:
        return file_for(uri, self._storage_options, self._settings)

    def _objects_under(self, uri: str) -> list[str]:
        """What an object store lists under ``uri`` taken as a prefix (one request, made
        only when no object has that name). Local directories fail earlier, on open."""
        if "://" not in uri or uri.startswith("file://"):
            return []
        try:
            return list(filesystem(uri, self._options(uri)).ls(uri, detail=False))
        except Exception:  # nothing there, or listing not allowed: the object is just absent
            return []

    def _load_blocking(self, cancelled: threading.Event) -> pathlib.Path | None:
        with self._load_lock:
            if self._loaded:
                return self._loaded_result
            uri = self._source()
            if uri is None:
                return None
            return self._restore_from(uri, cancelled)

    def _load_from(self, uri: str | None) -> pathlib.Path | None:
        """Restore ``uri``, chosen elsewhere (by a multi-rank load's first rank), as
        :meth:`load` would."""
        with self._load_lock:
            if self._loaded:
                return self._loaded_result
            return None if uri is None else self._restore_from(uri, threading.Event())

    def _source(self) -> str | None:
        """The object a load restores: ``checkpoint_src``, or, under the resume rule, the
        newest candidate holding an object (one existence check each, in order)."""
        if self._resume is None:
            return self._src

        def holds_object(uri: str) -> bool:
            try:
                return self._file(uri).exists_sync()
            except Exception as exc:
                raise load_error(uri, exc) from exc

        return self._resume.choose(holds_object)

    def _restore_from(self, uri: str, cancelled: threading.Event) -> pathlib.Path | None:
        """Restore ``uri`` into :attr:`path` (the caller holds ``_load_lock``); caches and
        returns the result as :meth:`load` does."""
        target = self.path
        clear(target)
        started = time.perf_counter()
        with contextlib.ExitStack() as stack:
            try:
                remote = stack.enter_context(self._file(uri).open_sync("rb"))
            except FileNotFoundError as missing:
                listed = self._objects_under(uri)
                if listed:
                    raise CheckpointLoadError(
                        f"checkpoint at {uri} is a prefix holding objects ({listed[0]!r},"
                        " ...), not one checkpoint object (CF-OBJ-01); nothing was"
                        " restored (older flytekit checkpoints were directories of objects:"
                        " not treating this as 'no checkpoint', which would restart"
                        " training)",
                        uri, "CF-OBJ-01",
                    ) from missing
                logger.info("checkpoint load: no previous checkpoint at %s", uri)
                self._loaded, self._loaded_result = True, None
                return None
            except Exception as exc:
                raise load_error(uri, exc) from exc
            progress = Progress("load", uri, total=getattr(remote, "size", None),
                                setting=self._settings.progress)
            try:
                result = restore(ReadStream(remote, progress, cancelled), target,
                                 **self._settings.restore_options())
            except Exception as exc:
                raise load_error(uri, exc) from exc
        if result.path is None:
            logger.info("checkpoint load: %s is empty: no previous checkpoint", uri)
            self._loaded, self._loaded_result = True, None
            return None
        seconds = time.perf_counter() - started
        progress.done()
        if result.kind == "tarball":
            what = f"tarball ({result.detection.compression}, {result.members} members)"
        else:
            what = "raw payload"
        logger.info(
            "checkpoint load: %s, %s restored in %.2f s (%.0f MB/s) from %s",
            what,
            format_size(result.bytes),
            seconds,
            result.bytes / 1e6 / max(seconds, 1e-9),
            uri,
        )
        self._loaded, self._loaded_result = True, result.path
        return result.path

    # ------------------------------------------------------------------ save

    def save_sync(
        self, data: pathlib.Path | str | bytes | bytearray | memoryview, *, wait: bool = True
    ) -> Future[None] | None:
        """Save ``data`` as the new checkpoint.

        With ``wait=False`` the data is frozen in a snapshot (see :mod:`._snapshot`), the
        upload goes on in the background, and a :class:`concurrent.futures.Future` is
        returned at once: its result is ``None`` once the object is published, or a
        :class:`CheckpointSaveError`. One save runs at a time per Checkpoint: a new save
        first waits for the one in flight, and raises its failure if it failed.
        """
        refuse_in_loop("Checkpoint.save_sync", "checkpoint.save")
        if not wait:
            return self._save_background(data)
        self._save_in_turn(data, threading.Event())
        return None

    async def save(
        self, data: pathlib.Path | str | bytes | bytearray | memoryview, *, wait: bool = True
    ) -> asyncio.Future[None] | None:
        """Save ``data`` as the new checkpoint, without blocking the event loop.

        With ``wait=False`` this returns as soon as the data is frozen, with an awaitable
        (:class:`asyncio.Future`) that completes when the object is published.
        """
        loop = asyncio.get_running_loop()
        if not wait:
            future = await loop.run_in_executor(None, self._save_background, data)
            return asyncio.wrap_future(future, loop=loop)
        await in_thread(lambda cancelled: self._save_in_turn(data, cancelled))
        return None

    def _save_in_turn(self, data: Any, cancelled: threading.Event) -> None:
        source = self._checked_source(data)  # refused at the call, before any wait
        with self._turn:
            self._settle(why="a new save")
            self._save_blocking(source, cancelled)

    def _checked_source(self, data: Any) -> pathlib.Path | memoryview:
        """``data`` as what the pipeline reads; refuses, naming what is wrong, what cannot
        become a checkpoint that loads back as saved."""
        source = save_source(data)
        if isinstance(source, memoryview):
            if not source.nbytes:
                raise self._empty_refused("the data (0 bytes)")
            return source
        st = source.stat()  # follows a symlink, as the save does; never opens
        if stat.S_ISDIR(st.st_mode):
            self._refuse_destination_inside(source)
        elif not stat.S_ISREG(st.st_mode):
            raise save_error(
                self._dest, f"{source} is {special_kind(st.st_mode)}; only a directory, a"
                " regular file or bytes can be saved (CF-WRITE-05)", rule="CF-WRITE-05")
        elif st.st_size == 0:
            raise self._empty_refused(f"the file {source}")
        return source

    def _empty_refused(self, what: str) -> CheckpointSaveError:
        return CheckpointSaveError(
            f"checkpoint not saved to {self._dest}: {what} is empty, and an empty object"
            " reads as 'no checkpoint' (CF-OBJ-03), so a writer stores no empty raw payload"
            " (CF-WRITE-12); the previous checkpoint is kept", self._dest, "CF-WRITE-12")

    def _refuse_destination_inside(self, directory: pathlib.Path) -> None:
        """A local destination inside the directory saved would put each object into the
        next one (and a partial file into the tarball being written): refused."""
        if "://" in self._dest and not self._dest.startswith("file://"):
            return
        dest = os.path.realpath(self._dest.removeprefix("file://"))
        root = os.path.realpath(directory)
        if dest == root or dest.startswith(root.rstrip(os.sep) + os.sep):
            raise save_error(
                self._dest, f"the destination lies inside the directory being saved,"
                f" {directory}, so every object would hold the one before it; save a"
                " directory that does not contain the destination, or choose a destination"
                " outside it")

    # ------------------------------------------------------------------ background saves

    def _save_background(self, data: Any) -> Future[None]:
        source = self._checked_source(data)
        with self._turn, self._pending_lock:
            self._settle_locked(why="a new save")
            try:
                snapshot = capture(source)
            except Exception as exc:
                raise save_error(
                    self._dest, f"the data could not be frozen for a background save:"
                    f" {type(exc).__name__}: {exc}", rule=rule_of(exc)) from exc
            logger.info("checkpoint save: in the background to %s, %s", self._dest,
                        snapshot.describe())
            background = Background(self._dest, snapshot, self._upload_snapshot,
                                    self._record_failure)
            # Started before anyone can find it pending, so a save from another thread
            # waits for a running upload, never for a thread not yet started.
            background.start()
            self._pending = background
        return background.future

    def _upload_snapshot(self, snapshot: Snapshot) -> None:
        """A background save's upload: the blocking pipeline over the frozen data."""
        self._save_blocking(snapshot.source, threading.Event(), snapshot)

    def _record_failure(self, error: CheckpointSaveError) -> None:
        """A background save failed: the next save or close() raises it."""
        self._failed = error

    def _settle(self, why: str) -> None:
        with self._pending_lock:
            self._settle_locked(why)

    def _settle_locked(self, why: str) -> None:
        """Wait for the background save in flight; raise a failure not raised before."""
        pending = self._pending
        if pending is not None:
            if not pending.future.done():
                logger.info("checkpoint save: %s waits for the background save to %s",
                            why, self._dest)
            pending.join()  # returns before the future's done-callbacks run: they may save
            self._pending = None
        failed, self._failed = self._failed, None
        if failed is not None:
            if why == "close()":
                after = "raised by close(), which waited for it and then closed"
            else:
                after = f"{why} was not started"
            raise CheckpointSaveError(
                f"{failed} (a background save; {after})", failed.uri, failed.rule
            ) from failed

    def _save_blocking(
        self, data: Any, cancelled: threading.Event, snapshot: Snapshot | None = None
    ) -> None:
        source = data if isinstance(data, (pathlib.Path, memoryview)) else save_source(data)
        uri = self._dest
        started = time.perf_counter()
        progress = Progress("save", uri, total=size_of(source), show=snapshot is None,
                            setting=self._settings.progress)
        try:
            ensure_local_parent(uri)
            file = self._file(uri).with_options(size_hint=size_hint(source))
            with file.open_sync("wb") as remote:
                sink = WriteSink(remote, progress, cancelled)
                if isinstance(source, pathlib.Path) and source.is_dir():
                    sink.owned = True  # write_tarball never touches a member once written
                    stats = write_tarball(source, sink, **self._settings.write_options())
                    kind, size = (
                        f"directory as tarball ({stats.members} members)", stats.file_bytes
                    )
                elif isinstance(source, pathlib.Path):
                    kind, size = "file", copy_file(source, sink)
                else:
                    kind, size = "bytes", copy_bytes(source, sink)
                if not sink.written:  # a file emptied since the call: CF-WRITE-12
                    raise EmptyPayload("it was emptied before it was read")
                if snapshot is not None:  # an in-place write since capture: do not commit
                    snapshot.verify()
                if cancelled.is_set():  # cancelled after the last write: do not commit
                    raise Cancelled("save cancelled")
        except Cancelled:
            raise
        except EmptyPayload as empty:
            raise self._empty_refused(f"{source} ({empty})") from None
        except Exception as exc:
            raise save_error(uri, exc) from exc
        seconds = time.perf_counter() - started
        progress.done()
        logger.info(
            "checkpoint save: %s%s, %s (%s stored) in %.2f s (%.0f MB/s) to %s",
            kind,
            " (background)" if snapshot is not None else "",
            format_size(size),
            format_size(sink.written),
            seconds,
            size / 1e6 / max(seconds, 1e-9),
            uri,
        )


def _rebuild(cls: type[Checkpoint], dest: str, src: str | None,
             storage_options: dict[str, Any] | None,
             settings: Settings | None = None, resume: Resume | None = None) -> Checkpoint:
    # settings: None in pickles made before there were settings (read from the environment)
    helper = cls(dest, src, storage_options=storage_options, settings=settings)
    helper._resume = resume
    return helper
