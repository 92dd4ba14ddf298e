"""Several live snapshots of one file (two Checkpoints saving one directory in the
background, a mirror plus a manual save): each hard link one makes moves the inode's change
time and link count under the others, which must neither take that for an in-place rewrite
nor miss a real one."""

from __future__ import annotations

import os
import pathlib
import threading

import pytest
from checkpoint_format import restore
from flyte_checkpoint import Checkpoint
from flyte_checkpoint._snapshot import SnapshotChangedError, capture


@pytest.fixture(autouse=True)
def own_tempdir(tmp_path, monkeypatch):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    return scratch


@pytest.fixture
def source(tmp_path) -> pathlib.Path:
    tree = tmp_path / "work" / "ckpt"
    tree.mkdir(parents=True)
    (tree / "w.bin").write_bytes(b"A" * 100_000)
    return tree


def _rewrite_keeping_mtime(path: pathlib.Path) -> None:
    """rsync --inplace -t: same inode, same size, the old mtime put back."""
    before = os.stat(path)
    with open(path, "r+b") as handle:
        handle.write(b"B" * before.st_size)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def _hard_linked(snapshot) -> bool:
    return snapshot.counts["hard link"] == 1


def test_a_second_snapshot_of_a_file_leaves_the_first_valid(source):
    first = capture(source)
    second = capture(source)
    try:
        if not (_hard_linked(first) and _hard_linked(second)):
            pytest.skip("this file system reflinks or copies: no shared inode")
        first.verify()
        second.verify()
        second.cleanup()
        first.verify()  # the second's link removed: its change time moved again
    finally:
        second.cleanup()
        first.cleanup()


@pytest.mark.parametrize("when", ["after both captures", "between the captures",
                                  "after the second's cleanup"])
def test_a_rewrite_is_still_caught_with_two_snapshots(source, when):
    weights = source / "w.bin"
    first = capture(source)
    if when == "between the captures":
        _rewrite_keeping_mtime(weights)
    second = capture(source)
    try:
        if not (_hard_linked(first) and _hard_linked(second)):
            pytest.skip("this file system reflinks or copies: no shared inode")
        if when == "after the second's cleanup":
            second.cleanup()
        if when != "between the captures":
            _rewrite_keeping_mtime(weights)
        with pytest.raises(SnapshotChangedError, match=r"ckpt/w\.bin was written in place"
                           r".*change time moved"):
            first.verify()
        if when == "after both captures":
            with pytest.raises(SnapshotChangedError, match=r"w\.bin was written in place"):
                second.verify()
        elif when == "between the captures":
            second.verify()  # captured the rewritten bytes: its own copy is whole
    finally:
        second.cleanup()
        first.cleanup()


def test_two_checkpoints_save_one_directory_in_the_background(tmp_path, source):
    """A mirror and a manual save of the same tree, both wait=False: both publish it."""
    stores = [tmp_path / "store-a" / "ckpt", tmp_path / "store-b" / "ckpt"]
    first, second = (Checkpoint(str(dest)) for dest in stores)
    gate = threading.Event()
    original = first._save_blocking

    def held(data, cancelled, snapshot=None):  # the first upload waits for the second capture
        assert gate.wait(60)
        return original(data, cancelled, snapshot)

    first._save_blocking = held
    with first, second:
        pending = first.save_sync(source, wait=False)
        done = second.save_sync(source, wait=False)
        gate.set()
        pending.result(timeout=60)
        done.result(timeout=60)
    for number, dest in enumerate(stores):
        target = tmp_path / f"restored-{number}"
        with open(dest, "rb") as stream:
            restore(stream, target)
        assert (target / "w.bin").read_bytes() == b"A" * 100_000


def test_a_capture_works_where_the_file_system_has_no_flock(source, own_tempdir, monkeypatch):
    """flock() failing as on a mount without it (a fault this one cannot make): the
    snapshot is taken unlocked; a later capture's sweep leaves it alone."""
    import errno

    from flyte_checkpoint import _snapshot

    def flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(_snapshot.fcntl, "flock", flock)
    first = capture(source)
    try:
        second = capture(source)  # sweeps the place first
        assert first.root.exists()
        second.cleanup()
        first.verify()
    finally:
        first.cleanup()
    assert list(own_tempdir.iterdir()) == []
