"""``DistributedCheckpoint``: one checkpoint object saved and loaded by every rank of a group.

Every method that touches the store is a collective: each rank of the group calls it, in the
same order. The steps of each, and what flows between ranks (through :class:`Collectives`):

save (each rank passes its directory, or ``None``)
    1. *scan*: each rank scans its tree (``scan_tree``: stats and digests, in parallel);
       the manifests (or each rank's refusal) are gathered on every rank.
    2. *plan*: rank 0 makes the union (``plan_union``: the same file from several ranks is
       stored once, in the lowest rank; different content under one path is refused naming
       the path and the ranks) and begins one :class:`~checkpoint_io.SharedUpload` with
       ``size + 2`` segments: the head, one per rank, the end. It broadcasts the plan and the
       upload's token.
    3. *segments*: rank 0 writes the head and the end; every rank writes its own members as
       its segment, in parallel (padded to the store's minimum part size with records that
       add nothing to the tar stream); the receipts (or each rank's failure) are gathered.
    4. *commit*: rank 0 commits once every segment succeeded, else aborts; the outcome is
       broadcast, and every rank returns or raises the same :class:`CheckpointSaveError`.

  A rank that fails, is killed or hangs past the timeout makes every rank raise naming it;
  the upload is aborted, the previous object is untouched. (A crash of rank 0 itself after
  step 2 leaves an unfinished upload for the store's lifecycle rule or
  ``checkpoint_io.sweep_shared_uploads``.) When the outcome of a commit cannot be broadcast,
  rank 0 says what it knows (published, or not) and the others that the outcome is unknown.

  A background save (``wait=False``) first agrees, in the caller's thread, on which rank
  freezes files that several ranks of a node pass (:meth:`_divide_shared`).

After any failed step the helper refuses every later collective at once (the ranks are out
of step): build a new one on every rank.

load
    Rank 0 chooses the object (the resume rule of the helper, when it has one) and broadcasts
    it; the lowest rank of each node (ranks with the same :func:`node_identity`) downloads
    and restores it; the node's other ranks get the same local path. A failed restore raises
    :class:`CheckpointLoadError` on every rank.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pathlib
import stat
import threading
import time
from concurrent.futures import Future
from typing import Any

from checkpoint_format import CheckpointFormatError, format_size

from .._background import Background
from .._checkpoint import Checkpoint
from .._errors import CheckpointError, CheckpointLoadError, CheckpointSaveError, rule_of
from .._fs import walk_tree
from .._pipeline import ensure_local_parent
from .._snapshot import _PREFIX, capture
from ._collectives import CollectiveError, Collectives, node_identity
from ._new import new_collectives

__all__ = ["DistributedCheckpoint"]

logger = logging.getLogger("flyte_checkpoint")

_KEPT = "the previous object is unchanged"
_UNKNOWN = ("the outcome is unknown: rank 0 commits alone and then tells the others, so it may"
            " have published the object; look at the destination")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, (CheckpointError, CheckpointFormatError)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _failure(exc: BaseException) -> tuple[str, str | None]:
    return _describe(exc), rule_of(exc)


class _NoData:
    """What a rank that saves nothing hands the background machinery instead of a snapshot."""

    source = None

    def verify(self) -> None:
        pass

    def cleanup(self) -> None:
        pass

    def describe(self) -> str:
        return "nothing of its own"


class _Refusal(_NoData):
    """A rank whose data could not be frozen: it still takes part, and fails the save."""

    def __init__(self, error: tuple[str, str | None]) -> None:
        self.error = error


class DistributedCheckpoint:
    """The multi-rank face of a :class:`~flyte_checkpoint.Checkpoint`: every rank of
    ``group`` saves its share of one atomic object and each node loads it once.

    ``checkpoint`` is this rank's helper (every rank's has the same locations: what
    ``flyte.ctx().checkpoint`` or ``Checkpoint.from_env()`` gives each torchrun worker).
    ``group`` is a ``torch.distributed`` process group (``None``: the default one; torch is
    imported only then), or any :class:`Collectives`. ``timeout`` bounds each step, in
    seconds (default: the helper's ``Settings.distributed_timeout``,
    ``CHECKPOINT_DISTRIBUTED_TIMEOUT``, 1,800 s).

    Every method that touches the store is a collective: :meth:`load`/:meth:`load_sync`,
    :meth:`save`/:meth:`save_sync` and :meth:`close` are called by every rank, in the same
    order. A save takes a directory on each rank, or ``None`` on ranks with nothing to add.
    """

    def __init__(self, checkpoint: Checkpoint, group: Any = None, *,
                 timeout: float | None = None) -> None:
        if not isinstance(checkpoint, Checkpoint):
            raise TypeError("DistributedCheckpoint wraps a flyte_checkpoint.Checkpoint, not"
                            f" {type(checkpoint).__name__}")
        self._checkpoint = checkpoint
        settings = checkpoint.settings
        self._timeout = settings.distributed_timeout if timeout is None else float(timeout)
        if not self._timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
        self._group: Collectives = new_collectives(group, timeout=self._timeout)
        #: A group made here (not one the caller passed as Collectives) is released by
        #: close().
        self._owns_group = self._group is not group
        self._closed = False
        self._node = node_identity(settings.node_id)
        self._turn = threading.Lock()  # one collective operation at a time, in call order
        self._pending: Background | None = None
        self._failed: CheckpointSaveError | None = None
        self._loaded = False
        self._loaded_path: pathlib.Path | None = None
        #: The object the last load restored (the resume rule may pick this attempt's own
        #: destination or an earlier attempt's rather than ``remote_source``); ``None`` before
        #: a load and when there was none.
        self.restored_from: str | None = None
        self._leader = True  # whether this rank restored for its node (until a load says)
        #: The first collective step that failed: the ranks are out of step from then on.
        self._broken: tuple[str, str] | None = None

    # ------------------------------------------------------------------ properties

    @property
    def checkpoint(self) -> Checkpoint:
        """This rank's helper."""
        return self._checkpoint

    @property
    def rank(self) -> int:
        return self._group.rank

    @property
    def size(self) -> int:
        return self._group.size

    @property
    def path(self) -> pathlib.Path:
        """Local directory of the restored checkpoint: after a load, the one its node's first
        rank restored into (the same on every rank of a node)."""
        if self._loaded_path is not None:
            return self._loaded_path
        return self._checkpoint.path

    @property
    def remote_destination(self) -> str:
        return self._checkpoint.remote_destination

    @property
    def remote_source(self) -> str | None:
        return self._checkpoint.remote_source

    def prev_exists(self) -> bool:
        return self._checkpoint.prev_exists()

    def __repr__(self) -> str:
        return (f"DistributedCheckpoint({self._checkpoint!r}, rank={self.rank},"
                f" size={self.size})")

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Collective: wait for a background save in flight, then, once every rank is done
        with the restored files, remove the local workspaces. Raises a background save's
        failure not raised before. A second call does nothing."""
        if self._closed:
            return
        try:
            with self._turn:
                self._settle("close()")
        finally:
            try:
                if self._broken is None:  # a broken group cannot meet: do not wait for it
                    self._group.barrier(step="close")
            except CollectiveError as exc:
                logger.warning("checkpoint close: %s; removing this rank's files anyway", exc)
            finally:
                self._loaded, self._loaded_path = False, None
                self._checkpoint.close()
                self._closed = True
                release = getattr(self._group, "close", None) if self._owns_group else None
                if release is not None:
                    release()

    def __enter__(self) -> DistributedCheckpoint:
        return self

    def __exit__(self, exc_type: object, *exc_info: object) -> None:
        try:
            self.close()
        except CheckpointSaveError:
            if exc_type is None:
                raise

    async def __aenter__(self) -> DistributedCheckpoint:
        return self

    async def __aexit__(self, exc_type: object, *exc_info: object) -> None:
        await asyncio.get_running_loop().run_in_executor(
            None, self.__exit__, exc_type, *exc_info)

    # ------------------------------------------------------------------ load

    def load_sync(self) -> pathlib.Path | None:
        """Collective: restore the checkpoint once per node; every rank gets the path (or
        ``None`` when there is no previous checkpoint)."""
        with self._turn:
            self._settle("a load")
            self._refuse_if_broken(CheckpointLoadError)
            return self._load_collective()

    async def load(self) -> pathlib.Path | None:
        return await _in_thread(self.load_sync)

    def _load_collective(self) -> pathlib.Path | None:
        if self._loaded:
            return self._loaded_path
        group, rank = self._group, self._group.rank
        where = self.remote_source or self.remote_destination
        joined = self._collect(group.all_gather_object,
                               (self._node, (self.remote_destination, self.remote_source)),
                               step="load: nodes", error=CheckpointLoadError, uri=where)
        _same_locations(where, CheckpointLoadError, [j[1] for j in joined])
        nodes = [j[0] for j in joined]
        firsts = {node: nodes.index(node) for node in nodes}
        leader = firsts[self._node]
        self._leader = leader == rank
        choice: tuple[str | None, tuple[str, str | None] | None] = (None, None)
        if rank == 0:
            try:
                choice = (self._checkpoint._source(), None)
            except Exception as exc:
                choice = (None, _failure(exc))
        uri, refused = self._collect(group.broadcast_object, choice, src=0,
                                     step="load: source", error=CheckpointLoadError, uri=where)
        if refused is not None:
            raise CheckpointLoadError(f"rank 0: {refused[0]}", where, refused[1])
        outcome: tuple[str | None, tuple[str, str | None] | None] = (None, None)
        if self._leader:
            started = time.perf_counter()
            try:
                restored = self._checkpoint._load_from(uri)
                outcome = (None if restored is None else str(restored), None)
                logger.info("checkpoint load: rank %d restored %s for its node (%d rank(s))"
                            " in %.2f s", rank, uri, nodes.count(self._node),
                            time.perf_counter() - started)
            except Exception as exc:
                outcome = (None, _failure(exc))
        outcomes = self._collect(group.all_gather_object, outcome, step="load: restore",
                                 error=CheckpointLoadError, uri=uri or where)
        failed = [(r, o[1]) for r, o in enumerate(outcomes) if o[1] is not None]
        if failed:
            text = "; ".join(f"rank {r} (restoring for node {nodes[r]!r}) failed: {why}"
                             for r, (why, _) in failed)
            raise CheckpointLoadError(
                f"checkpoint at {uri} was not restored on every node: {text}", uri or where,
                failed[0][1][1])
        restored_path = outcomes[leader][0]
        self.restored_from = uri if restored_path is not None else None
        self._loaded = True
        self._loaded_path = None if restored_path is None else pathlib.Path(restored_path)
        return self._loaded_path

    # ------------------------------------------------------------------ save

    def save_sync(self, data: pathlib.Path | str | None, *,
                  wait: bool = True) -> Future[None] | None:
        """Collective: save the union of every rank's directory as one object.

        ``data`` is this rank's directory, or ``None`` when it adds nothing. With
        ``wait=False`` each rank freezes its directory (a hard-link snapshot) and gets a
        :class:`concurrent.futures.Future` at once; the uploads and the commit go on in a
        thread that talks only to the checkpoint's own group. Every rank's future (or call)
        ends alike: ``None`` once the object is published, or the same
        :class:`CheckpointSaveError`."""
        if not wait:
            return self._save_background(data)
        with self._turn:
            self._settle("a new save")
            self._refuse_if_broken(CheckpointSaveError)
            self._save_collective(self._checked(data), None)
        return None

    async def save(self, data: pathlib.Path | str | None, *,
                   wait: bool = True) -> asyncio.Future[None] | None:
        loop = asyncio.get_running_loop()
        if not wait:
            future = await loop.run_in_executor(None, self._save_background, data)
            return asyncio.wrap_future(future, loop=loop)
        await _in_thread(lambda: self.save_sync(data))
        return None

    def _checked(self, data: Any) -> pathlib.Path | _Refusal | None:
        """This rank's directory, ``None``, or the refusal it carries into the save (so the
        other ranks fail at once, naming it, instead of waiting for it)."""
        if data is None:
            return None
        try:
            if not isinstance(data, (str, pathlib.PurePath)) or isinstance(data, bytes):
                raise TypeError(f"a multi-rank save takes a directory (or None) on each rank,"
                                f" not {type(data).__name__}")
            path = pathlib.Path(data)
            st = path.stat()
            if not stat.S_ISDIR(st.st_mode):
                raise NotADirectoryError(f"{path} is not a directory; a multi-rank save takes"
                                         " a directory (or None) on each rank")
            self._checkpoint._refuse_destination_inside(path)
            return path
        except Exception as exc:
            return _Refusal(_failure(exc))

    def _save_background(self, data: Any) -> Future[None]:
        checked = self._checked(data)
        with self._turn:
            self._settle("a new save")
            self._refuse_if_broken(CheckpointSaveError)
            checked, omit, copy = self._divide_shared(checked)
            if isinstance(checked, pathlib.Path):
                try:
                    snapshot: Any = capture(checked, omit=omit, copy=copy)
                except Exception as exc:
                    snapshot = _Refusal((f"the data could not be frozen for a background"
                                         f" save: {_describe(exc)}", rule_of(exc)))
            else:
                snapshot = checked if checked is not None else _NoData()
            logger.info("checkpoint save: rank %d in the background to %s, %s", self.rank,
                        self.remote_destination, snapshot.describe())
            background = Background(self.remote_destination, snapshot, self._upload_snapshot,
                                    self._record_failure)
            background.start()
            self._pending = background
        return background.future

    def _divide_shared(self, checked: pathlib.Path | _Refusal | None
                       ) -> tuple[pathlib.Path | _Refusal | None, frozenset[str],
                                  frozenset[tuple[int, int]]]:
        """Collective, before a background save freezes: what this rank freezes of files
        that other ranks of its node pass too.

        A snapshot hard-links each file, and a new link moves the file's change time: seen
        from another process's snapshot of the same file, that is an in-place rewrite
        (CF-WRITE-07), and the save would fail. So each file is frozen by one rank only:
        a directory that several ranks of a node pass (the same real path) is frozen and
        contributed by the lowest of them, the others contribute nothing; where trees only
        share some files (hard links), a file the lower rank holds under the same name is
        left to it, and one it holds under another name is copied (not linked) here.
        Returns this rank's data and the ``omit`` and ``copy`` of :func:`capture`."""
        none: frozenset[Any] = frozenset()
        dest = self.remote_destination
        group, rank = self._group, self._group.rank
        real = os.path.realpath(checked) if isinstance(checked, pathlib.Path) else None
        places = self._collect(group.all_gather_object, (self._node, real),
                               step="save: shared directories", error=CheckpointSaveError,
                               uri=dest)
        # The ranks that freeze a directory: the first of each (node, real path).
        freezing = [r for r, place in enumerate(places)
                    if place[1] is not None and places.index(place) == r]
        owner = places.index((self._node, real)) if real is not None else rank
        if owner != rank:
            logger.info("checkpoint save: rank %d passes the directory rank %d passes on this"
                        " node (%s): frozen and contributed there", rank, owner, real)
            checked = None
        nodes = [places[r][0] for r in freezing]
        if all(nodes.count(node) == 1 for node in nodes):
            return checked, none, none  # no node where two ranks freeze: nothing shared
        # Some node has several ranks freezing directories: which files do they share?
        mine: dict[tuple[int, int], list[str]] | None = None
        if rank in freezing and isinstance(checked, pathlib.Path):
            try:
                mine = _files_by_inode(checked)
            except OSError:
                mine = None  # the freeze fails on its own and says why
        held = self._collect(group.all_gather_object, mine, step="save: shared files",
                             error=CheckpointSaveError, uri=dest)
        if mine is None:
            return checked, none, none
        omit: set[str] = set()
        copy: set[tuple[int, int]] = set()
        for lower in range(rank):
            theirs = held[lower]
            if theirs is None or places[lower][0] != self._node:
                continue
            for inode, names in mine.items():
                if inode not in theirs:
                    continue
                for name in names:
                    if name in theirs[inode]:
                        omit.add(name)
                    else:
                        copy.add(inode)
        if omit or copy:
            logger.info("checkpoint save: rank %d shares %d file(s) with lower ranks of its"
                        " node: %d left to them, %d copied", rank, len(omit) + len(copy),
                        len(omit), len(copy))
        return checked, frozenset(omit), frozenset(copy)

    def _upload_snapshot(self, snapshot: Any) -> None:
        data = snapshot if isinstance(snapshot, _Refusal) else snapshot.source
        self._save_collective(data, snapshot)

    def _record_failure(self, error: CheckpointSaveError) -> None:
        self._failed = error

    def _settle(self, why: str) -> None:
        """Wait for the background save in flight; raise a failure not raised before."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.join()
        failed, self._failed = self._failed, None
        if failed is not None:
            after = ("raised by close(), which waited for it" if why == "close()"
                     else f"{why} was not started")
            raise CheckpointSaveError(f"{failed} (a background save; {after})", failed.uri,
                                      failed.rule) from failed

    def _save_collective(self, data: pathlib.Path | _Refusal | None, snapshot: Any) -> None:
        from checkpoint_format import (
            UnionConflictError,
            end_piece,
            padding,
            plan_union,
            scan_tree,
            write_head,
            write_segment,
        )
        from checkpoint_io import SharedUpload

        group, rank, size = self._group, self._group.rank, self._group.size
        dest = self.remote_destination
        settings = self._checkpoint.settings
        started = time.perf_counter()

        # 1. scan
        manifest, refused = None, None
        if isinstance(data, _Refusal):
            refused = data.error
        elif data is not None:
            try:
                manifest = scan_tree(data, workers=settings.compress_threads,
                                     limits=settings.limits)
            except Exception as exc:
                refused = _failure(exc)
        scanned = self._collect(group.all_gather_object, (manifest, refused, dest),
                                step="save: scan", error=CheckpointSaveError, uri=dest)
        _same_locations(dest, CheckpointSaveError, [s[2] for s in scanned])
        self._raise_refusals(dest, [(r, s[1]) for r, s in enumerate(scanned)])
        manifests = [s[0] for s in scanned]
        if all(m is None for m in manifests):
            raise CheckpointSaveError(
                f"checkpoint not saved to {dest} ({_KEPT}): no rank passed a directory",
                dest)

        # 2. plan, and the upload begun by rank 0
        upload = None
        announced: tuple[Any, str | None, tuple[str, str | None] | None] = (None, None, None)
        if rank == 0:
            try:
                plan = plan_union(manifests)
                ensure_local_parent(dest)
                upload = SharedUpload.begin_sync(self._checkpoint._file(dest),
                                                 segments=size + 2)
                announced = (plan, upload.token, None)
            except UnionConflictError as exc:
                announced = (None, None, (f"the ranks' trees conflict: {exc}", rule_of(exc)))
            except Exception as exc:
                announced = (None, None, (f"rank 0 could not begin the upload:"
                                          f" {_describe(exc)}", rule_of(exc)))
        try:
            plan, token, refused = self._collect(group.broadcast_object, announced, src=0,
                                                 step="save: plan", error=CheckpointSaveError,
                                                 uri=dest)
        except CheckpointSaveError:
            _abort(upload)
            raise
        if refused is not None:
            raise CheckpointSaveError(f"checkpoint not saved to {dest} ({_KEPT}): {refused[0]}",
                                      dest, refused[1])

        # 3. every rank's segment, in parallel
        receipts: list[Any] = []
        refused = None
        stored = 0
        try:
            if upload is None:
                upload = SharedUpload.join(self._checkpoint._file(dest), token)
            if rank == 0:
                receipts.append(_piece(upload, 0, padding, lambda sink: write_head(plan, sink)))
            names = plan.assigned[rank] or []

            def segment(sink: Any) -> None:
                nonlocal stored
                if names:
                    assert isinstance(data, pathlib.Path) and manifest is not None
                    stored = write_segment(data, manifest, names, sink,
                                           workers=settings.compress_threads)
                if snapshot is not None:  # an in-place write since the freeze: not this one
                    snapshot.verify()

            receipts.append(_piece(upload, rank + 1, padding, segment))
            if rank == 0:
                receipts.append(_piece(upload, size + 1, None,
                                       lambda sink: sink.write(end_piece())))
        except Exception as exc:
            refused = _failure(exc)
        except BaseException:
            # An interrupt on this rank (KeyboardInterrupt, SystemExit): the others fail at
            # the next step; rank 0 ends the upload it began instead of leaving it to sweeps.
            _abort(upload if rank == 0 else None)
            raise
        try:
            written = self._collect(group.all_gather_object, (receipts, refused),
                                    step="save: segments", error=CheckpointSaveError, uri=dest)
        except CheckpointSaveError:
            _abort(upload if rank == 0 else None)
            raise

        # 4. commit by rank 0
        outcome: tuple[str, str | None] | None = None
        committed = False
        if rank == 0:
            failures = [(r, w[1]) for r, w in enumerate(written) if w[1] is not None]
            if failures:
                _abort(upload)
                outcome = (_refusal_text(failures), failures[0][1][1])
            else:
                try:
                    upload.commit_sync([receipt for w in written for receipt in w[0]])
                    committed = True
                except Exception as exc:
                    _abort(upload)
                    outcome = (f"rank 0 could not commit: {_describe(exc)}", rule_of(exc))
        try:
            outcome = group.broadcast_object(outcome, src=0, step="save: commit")
        except CollectiveError as exc:
            self._broken = ("save: commit", str(exc))
            if rank != 0:
                told = _UNKNOWN
            elif committed:
                told = ("the object is published (whole, the union of every rank's tree), but"
                        " the other ranks could not be told and raise an unknown outcome")
            else:
                told = _KEPT
            raise CheckpointSaveError(f"checkpoint save to {dest}: {told}: rank {rank} gave"
                                      f" up: {exc}", dest) from exc
        if outcome is not None:
            raise CheckpointSaveError(f"checkpoint not saved to {dest} ({_KEPT}): {outcome[0]}",
                                      dest, outcome[1])
        seconds = time.perf_counter() - started
        logger.info("checkpoint save: rank %d of %d stored %s of its own in %.2f s; one object"
                    " for all at %s", rank, size, format_size(stored), seconds, dest)

    # ------------------------------------------------------------------ collectives

    def _collect(self, call: Any, obj: Any, *, step: str, error: type[CheckpointError],
                 uri: str, src: int | None = None) -> Any:
        """One collective; its failure as ``error`` (naming the missing ranks) on this rank."""
        try:
            if src is None:
                return call(obj, step=step)
            return call(obj, src=src, step=step)
        except CollectiveError as exc:
            self._broken = (step, str(exc))
            verb = "saved to" if error is CheckpointSaveError else "loaded from"
            kept = f" ({_KEPT})" if error is CheckpointSaveError else "; nothing was restored"
            raise error(f"checkpoint not {verb} {uri}{kept}: rank {self._group.rank} gave up:"
                        f" {exc}", uri) from exc

    def _refuse_if_broken(self, error: type[CheckpointError]) -> None:
        """Fail at once once a collective step failed: the ranks are out of step (some
        never reached it, the group's connections may be closed), so no later step could
        meet. A new helper, made on every rank, starts a fresh group."""
        if self._broken is None:
            return
        step, why = self._broken
        what = "saved to" if error is CheckpointSaveError else "loaded from"
        uri = (self.remote_destination if error is CheckpointSaveError
               else self.remote_source or self.remote_destination)
        raise error(f"checkpoint not {what} {uri}: this DistributedCheckpoint's group failed"
                    f" at step {step!r} ({why}) and cannot be used again; build a new"
                    " DistributedCheckpoint on every rank (a restarted job does)", uri)

    @staticmethod
    def _raise_refusals(dest: str, answers: list[tuple[int, tuple[str, str | None] | None]]
                        ) -> None:
        failures = [(r, a) for r, a in answers if a is not None]
        if failures:
            raise CheckpointSaveError(
                f"checkpoint not saved to {dest} ({_KEPT}): {_refusal_text(failures)}", dest,
                failures[0][1][1])


def _same_locations(uri: str, error: type[CheckpointError], locations: list[Any]) -> None:
    """Every rank's helper must name the same object(s): a rank that does not is a bug of
    the job's setup, refused before anything is written or restored."""
    if any(location != locations[0] for location in locations):
        seen = "; ".join(f"rank {r}: {location!r}" for r, location in enumerate(locations))
        raise error(f"checkpoint at {uri}: the ranks' helpers name different locations"
                    f" ({seen}); every rank must wrap a Checkpoint of the same locations",
                    uri)


def _files_by_inode(root: pathlib.Path) -> dict[tuple[int, int], list[str]]:
    """The regular files under ``root`` by ``(st_dev, st_ino)``: their names (relative
    POSIX paths, as :func:`capture` walks them)."""
    found: dict[tuple[int, int], list[str]] = {}
    for relative, _path, st in walk_tree(root, skip_dir=_PREFIX):
        if stat.S_ISREG(st.st_mode):
            found.setdefault((st.st_dev, st.st_ino), []).append(relative)
    return found


def _refusal_text(failures: list[tuple[int, tuple[str, str | None]]]) -> str:
    return "; ".join(f"rank {rank} failed: {why}" for rank, (why, _) in failures)


def _piece(upload: Any, index: int, pad: Any, fill: Any) -> Any:
    """Segment ``index`` of ``upload`` filled by ``fill(sink)``; its receipt. A failure
    aborts the segment (nothing of it stays in the store) and propagates."""
    writer = upload.open_segment_sync(index, pad=pad)
    try:
        fill(writer)
        return writer.close()
    except BaseException:
        try:
            writer.abort()
        except Exception as exc:
            logger.warning("checkpoint save to %s: could not abort segment %d: %s",
                           upload.file.path, index, exc)
        raise


def _abort(upload: Any) -> None:
    if upload is None:
        return
    try:
        upload.abort_sync()
    except Exception as exc:  # the store's lifecycle rule or the sweep removes what is left
        logger.warning("checkpoint save to %s: could not abort shared upload %s (the store's"
                       " lifecycle rule or sweep_shared_uploads removes it): %s",
                       upload.file.path, upload.upload, exc)


async def _in_thread(work: Any) -> Any:
    """Run a collective on a worker thread. A cancelled awaiting task does not stop it (the
    other ranks are in the same step): it finishes, and the cancellation goes through."""
    future = asyncio.get_running_loop().run_in_executor(None, work)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        while not future.done():
            try:
                await asyncio.shield(future)
            except asyncio.CancelledError:
                continue
            except BaseException:
                break
        raise
