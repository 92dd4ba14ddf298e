"""Snapshots for background saves: freeze what the caller passed, in milliseconds, so the
training loop can go on while the upload runs.

The object a background save publishes must hold exactly what the source held when
``save(..., wait=False)`` returned, or the save must fail. Per kind of data:

- ``bytes``: immutable, kept by reference (no copy).
- ``bytearray``, ``memoryview`` and other buffers: copied into ``bytes`` (about 1.7 s per GiB
  on the development VM, where fresh pages are slow); the caller may mutate the original
  right after.
- files and directory trees: rebuilt in a snapshot directory on the source's file system (in
  the temporary directory when that is on the same file system, else beside the source),
  each file by the cheapest means that works:

  1. a reflink (``FICLONE``: XFS, Btrfs, bcachefs...): a copy-on-write clone, independent of
     the source from then on;
  2. a hard link: the same inode under a second name. Deleting or renaming the source
     (Hugging Face's ``save_total_limit`` rotation) and replacing it atomically (write a
     temporary file, then rename it over: what Lightning and Hugging Face do) leave it
     untouched. Writing *into* the source in place (``open(path, "wb")``) would change it,
     so its size, modification time, change time and link count are recorded at capture
     and checked again before the object is published (see :meth:`Snapshot.verify`): a
     change fails the save, naming the file;
  3. a copy, when neither is possible (another file system, no permission): blocking, but
     always exact.

The snapshot directory is removed when the save ends, published or not, before the future
completes. Each holds a lock while it lives; one left behind by a process that was killed
(its lock is free) is removed by the next capture in the same place. Directories named like
snapshots are never captured themselves (a snapshot beside a source must not end up inside a
later save of the parent directory).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from checkpoint_format import changed_in_place, remove_tree

from ._fs import walk_tree

__all__ = ["Snapshot", "capture"]

_FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)
_PREFIX = ".flyte-checkpoint-snapshot-"
_LOCK = ".lock"  # inside each snapshot root, flock()ed while the snapshot lives
_LOCK_SETUP = ".lock-setup"  # the lock file until it is locked
_CLOCK_REALTIME_COARSE = 5  # linux/time.h; Python's time module does not name it
_no_reflink: set[int] = set()  # st_dev of file systems that refused FICLONE

#: The inodes that live snapshots of this process hard-linked, by (st_dev, st_ino), with
#: each snapshot's name for it. A snapshot linking or unlinking an inode already there moves
#: its change time and link count under the others' records: under this lock, it first checks
#: the others against the inode as it was (a real in-place write is caught then), then
#: records for them the inode as its own link left it.
_links_lock = threading.Lock()
_live_links: dict[tuple[int, int], list[tuple[Snapshot, Path]]] = {}


class SnapshotChangedError(OSError):
    """A hard-linked file was written in place after the snapshot was taken (CF-WRITE-07)."""

    rule = "CF-WRITE-07"


@dataclass
class Snapshot:
    """A frozen copy of one save's data: ``source`` is what the upload reads."""

    source: Path | bytes
    root: Path | None = None  # the snapshot directory, removed by cleanup()
    #: Hard-linked files and their stat at capture: the link shares the inode, so an
    #: in-place write would show here.
    linked: dict[Path, os.stat_result] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)  # files per mechanism
    seconds: float = 0.0
    lock: int | None = None  # a descriptor holding the root's lock
    #: Linked files found written in place while another snapshot linked or unlinked them.
    changed: dict[Path, str] = field(default_factory=dict)

    def verify(self) -> None:
        """Raise if a hard-linked file may have changed since capture (called before
        publishing).

        Size and modification time can be put back (``rsync --inplace -t``, ``os.utime``);
        the change time cannot: every write, ``utime`` and ``chmod`` sets it, and
        :func:`capture` returns only once the clock the kernel stamps files with has moved
        past the change times it recorded, so a later write cannot carry the same one. A
        removed or replaced name (rotation, an atomic replace) also sets it, but lowers the
        link count: that is accepted (see :func:`checkpoint_format.changed_in_place`).
        Another snapshot of this process linking the same file re-records it here (see
        ``_live_links``).
        """
        with _links_lock:
            found = dict(self.changed)
            for path, then in self.linked.items():
                if path not in found:
                    why = changed_in_place(then, os.lstat(path))
                    if why is not None:
                        found[path] = why
        for path, why in found.items():
            name = path.relative_to(self.root) if self.root else path
            raise SnapshotChangedError(
                f"{name} was written in place after save(..., wait=False) returned (it is"
                f" hard-linked into the snapshot, and {why}); not publishing a torn"
                " checkpoint. Write checkpoint files to a new name and rename them into"
                " place, or save with wait=True"
            )

    def cleanup(self) -> None:
        """Remove the snapshot directory; never raises (one left behind is removed by a
        later capture once its lock is released here)."""
        self._unlink_shared()
        if self.root is not None:
            remove_tree(self.root)
            self.root = None
        if self.lock is not None:
            with contextlib.suppress(OSError):
                os.close(self.lock)
            self.lock = None

    def _unlink_shared(self) -> None:
        """Leave ``_live_links``; a link to an inode other live snapshots hold is removed
        here, one at a time under the lock, so that their records follow the link count."""
        with _links_lock:
            for path in list(self.linked):
                then = self.linked.pop(path)
                key = (then.st_dev, then.st_ino)
                holders = [(s, p) for s, p in _live_links.get(key, []) if s is not self]
                if holders:
                    _live_links[key] = holders
                    # Best effort, one link at a time: the others stay registered.
                    with contextlib.suppress(OSError), _rerecording(holders, path):
                        os.unlink(path)
                else:
                    _live_links.pop(key, None)

    def describe(self) -> str:
        if not self.counts:
            return f"captured in {self.seconds * 1e3:.0f} ms"
        how = ", ".join(f"{n} by {kind}" for kind, n in sorted(self.counts.items()) if n)
        return f"captured in {self.seconds * 1e3:.0f} ms ({how})"


def capture(source: Path | memoryview, *, omit: frozenset[str] = frozenset(),
            copy: frozenset[tuple[int, int]] = frozenset()) -> Snapshot:
    """Freeze ``source`` (a path that exists, or a byte buffer) for a background upload.

    For a directory, ``omit`` names files (relative POSIX paths) to leave out, and ``copy``
    the files (by ``(st_dev, st_ino)``) to copy (or reflink) rather than hard-link: another
    process's snapshot links them, and a second link would move their change time under its
    record (the ranks of one node sharing files, see ``DistributedCheckpoint``)."""
    started = time.perf_counter()
    if isinstance(source, memoryview):
        owner = source.obj
        immutable = isinstance(owner, bytes) and len(owner) == source.nbytes
        snapshot = Snapshot(owner if immutable else bytes(source), counts={})
    else:
        snapshot = _capture_path(source, omit, copy)
        _outwait_change_times(snapshot)
    snapshot.seconds = time.perf_counter() - started
    return snapshot


def _outwait_change_times(snapshot: Snapshot) -> None:
    """Return once file time stamps have moved past every change time recorded.

    A kernel without fine-grained time stamps stamps files from a clock that ticks every few
    milliseconds (CLOCK_REALTIME_COARSE), so a write in the tick of the capture would keep
    the change time recorded: wait for the next tick (at most one, about 4 ms). A change time
    ahead of that clock was stamped fine-grained (Linux 6.13+ multigrain time stamps, which
    give the next change after a stat a later stamp): no wait. Time stamps in whole seconds
    (an old or foreign file system) wait for the next second."""
    if not snapshot.linked:
        return
    stamps = [st.st_ctime_ns for st in snapshot.linked.values()]
    latest = max(stamps)
    if all(stamp % 1_000_000_000 == 0 for stamp in stamps):
        latest += 999_999_999  # whole seconds: the next stamp must be a later second
    elif latest > _file_clock_ns():
        return  # stamped fine-grained
    deadline = time.monotonic() + 2.0  # a clock stepped back must not hold the caller
    while _file_clock_ns() <= latest and time.monotonic() < deadline:
        time.sleep(0.0005)


def _file_clock_ns() -> int:
    """The clock Linux stamps file times with (CLOCK_REALTIME_COARSE); elsewhere, the
    real-time clock."""
    try:
        return time.clock_gettime_ns(_CLOCK_REALTIME_COARSE)
    except (AttributeError, OSError):
        return time.time_ns()


def _capture_path(source: Path, omit: frozenset[str] = frozenset(),
                  copy: frozenset[tuple[int, int]] = frozenset()) -> Snapshot:
    source = Path(os.path.abspath(source))  # ".", "..", "x/..": a name to rebuild under
    if not source.is_dir():
        source = Path(os.path.realpath(source))  # link the file, not a symlink to it
    root, lock = _snapshot_root(source)
    snapshot = Snapshot(root / (source.name or "source"), root=root, lock=lock,
                        counts={"reflink": 0, "hard link": 0, "copy": 0})
    try:
        if source.is_dir():
            _mirror_tree(source, snapshot.source, snapshot, omit, copy)
        else:
            _clone(source, snapshot.source, snapshot)
    except BaseException:
        snapshot.cleanup()
        raise
    return snapshot


def _snapshot_root(source: Path) -> tuple[Path, int]:
    """A fresh, locked directory on the source's file system, so that links work: in the
    temporary directory if it is on that file system (nothing appears beside the user's
    files), else beside the source, else (a read-only parent) in the temporary directory,
    where files are then copied. Snapshots that killed processes left there are removed."""
    device = os.stat(source).st_dev
    temporary = Path(tempfile.gettempdir())
    places = [source.parent, temporary]
    with contextlib.suppress(OSError):
        if os.stat(temporary).st_dev == device:
            places = [temporary, source.parent]
    for place in places:
        _remove_stale(place)
        try:
            root = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-", dir=place))
        except OSError:
            continue
        # The lock is taken under a name no sweep looks at, then renamed into place: a
        # sweep that found the lock file unlocked between its creation and the flock took
        # this live snapshot for a killed process's and removed it (with 4 ranks of a job
        # capturing into one temporary directory at once).
        try:
            lock = os.open(root / _LOCK_SETUP, os.O_CREAT | os.O_RDWR, 0o600)
        except BaseException:
            remove_tree(root)
            raise
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError as exc:
            # No flock on this file system: go on unlocked. A later capture cannot lock it
            # either, and leaves what it cannot lock alone (see _abandoned).
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(lock)
                remove_tree(root)
                raise
        try:
            os.rename(root / _LOCK_SETUP, root / _LOCK)
        except BaseException:
            os.close(lock)
            remove_tree(root)
            raise
        return root, lock
    raise OSError(errno.EACCES, "no writable place for a snapshot", str(source.parent))


def _remove_stale(parent: Path) -> None:
    """Remove snapshots whose lock nobody holds: their process is gone (a lock, unlike a
    pid, also tells on a volume that other machines share)."""
    with contextlib.suppress(Exception), os.scandir(parent) as entries:
        for entry in entries:
            if entry.name.startswith(_PREFIX) and _abandoned(Path(entry.path)):
                remove_tree(entry.path)  # best effort: never fails the capture


def _abandoned(root: Path) -> bool:
    try:
        fd = os.open(root / _LOCK, os.O_RDWR)
    except FileNotFoundError:
        # Being set up (mkdtemp, then the lock) or torn down: leave it unless it is old.
        with contextlib.suppress(OSError):
            return time.time() - os.lstat(root).st_mtime > 3600
        return False
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False  # held: alive
    finally:
        os.close(fd)
    return True


def _mirror_tree(source: Path, target: Path, snapshot: Snapshot,
                 omit: frozenset[str] = frozenset(),
                 copy: frozenset[tuple[int, int]] = frozenset()) -> None:
    """Rebuild ``source`` under ``target``: directories and symlinks recreated with their
    modes and times, regular files cloned. Anything else fails the capture, as the writer
    would refuse it (CF-WRITE-05). Iterative: depth is bounded by ``PATH_MAX`` only."""
    directories: list[tuple[Path, os.stat_result]] = [(target, os.stat(source))]
    target.mkdir()
    # Another save's snapshot is never captured (CF: it is not the user's data).
    for relative, src, st in walk_tree(source, skip_dir=_PREFIX):
        dst = target / relative
        if stat.S_ISDIR(st.st_mode):
            dst.mkdir()
            directories.append((dst, st))
        elif stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(src), dst)
            os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
        elif stat.S_ISREG(st.st_mode):
            if relative in omit:
                continue
            _clone(Path(src), dst, snapshot, link=(st.st_dev, st.st_ino) not in copy)
        else:
            raise SpecialFileError(src, st.st_mode)
    for directory, st in reversed(directories):  # deepest first: children change mtimes
        os.chmod(directory, stat.S_IMODE(st.st_mode))
        os.utime(directory, ns=(st.st_atime_ns, st.st_mtime_ns))


class SpecialFileError(OSError):
    """A FIFO, socket or device where a checkpoint can hold only files, directories and
    links (CF-WRITE-05)."""

    rule = "CF-WRITE-05"

    def __init__(self, path: str | os.PathLike[str], mode: int) -> None:
        super().__init__(errno.EINVAL, f"{special_kind(mode)} cannot be saved in a checkpoint"
                         " (only directories, regular files and symlinks; CF-WRITE-05)",
                         os.fspath(path))


def special_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "a file of unknown type"


def open_regular(path: str | os.PathLike[str]) -> int:
    """A descriptor of the regular file at ``path`` (symlinks followed), opened so that a
    FIFO swapped in cannot block: ``SpecialFileError`` for anything else."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise SpecialFileError(path, mode)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _clone(src: Path, dst: Path, snapshot: Snapshot, *, link: bool = True) -> None:
    st = os.stat(src)
    if not stat.S_ISREG(st.st_mode):
        raise SpecialFileError(src, st.st_mode)
    if st.st_dev not in _no_reflink and _reflink(src, dst, st):
        snapshot.counts["reflink"] += 1
        return
    if not link:
        _copy(src, dst, st)
        snapshot.counts["copy"] += 1
        return
    with _links_lock:
        holders = _live_links.get((st.st_dev, st.st_ino), [])
        try:
            with _rerecording(holders, src):
                os.link(src, dst)
        except OSError:
            linked = None
        else:
            linked = os.lstat(dst)  # after the link, which sets the change time
            snapshot.linked[dst] = linked
            _live_links.setdefault((linked.st_dev, linked.st_ino), []).append((snapshot, dst))
    if linked is None:
        _copy(src, dst, st)
        snapshot.counts["copy"] += 1
        return
    snapshot.counts["hard link"] += 1


@contextlib.contextmanager
def _rerecording(holders: list[tuple[Snapshot, Path]], name: Path) -> Iterator[None]:
    """Around a link or unlink of ``name`` (under ``_links_lock``) whose inode other live
    snapshots (``holders``) linked: check them against the inode now, then re-record it for
    them as the operation left it. A change found first is kept for their verify(); only a
    rewrite with its mtime put back in the microseconds of the operation itself, from
    another thread or process, can escape."""
    if not holders:
        yield
        return
    now = os.lstat(name)
    if any(other.linked[path].st_ino != now.st_ino for other, path in holders):
        yield  # ``name`` was replaced since it was stat'ed: not their inode
        return
    for other, path in holders:
        if path not in other.changed:
            why = changed_in_place(other.linked[path], now)
            if why is not None:
                other.changed[path] = why
    yield
    for other, path in holders:
        after = os.lstat(path)
        if (after.st_dev, after.st_ino) != (now.st_dev, now.st_ino):
            continue  # not the inode linked, after all: the next verify() judges
        if path not in other.changed and (after.st_size, after.st_mtime_ns) != (
                now.st_size, now.st_mtime_ns):
            other.changed[path] = "its size or modification time changed"
        other.linked[path] = after


def _copy(src: Path, dst: Path, st: os.stat_result) -> None:
    with open(open_regular(src), "rb") as source, open(dst, "xb") as target:
        shutil.copyfileobj(source, target, 8 << 20)
    os.chmod(dst, stat.S_IMODE(st.st_mode))
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))


def _reflink(src: Path, dst: Path, st: os.stat_result) -> bool:
    """Clone ``src`` to ``dst`` copy-on-write; False (and ``dst`` absent) where unsupported."""
    source = open(open_regular(src), "rb")  # noqa: SIM115 - closed below, after the clone
    try:
        with source, open(dst, "xb") as target:
            fcntl.ioctl(target.fileno(), _FICLONE, source.fileno())
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(dst)
        if exc.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL,
                         errno.ENOSYS, errno.EPERM):
            _no_reflink.add(st.st_dev)
            return False
        raise
    os.chmod(dst, stat.S_IMODE(st.st_mode))
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
    return True
