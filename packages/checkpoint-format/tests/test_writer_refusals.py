"""Trees the writer must refuse (CF-WRITE-02, -05, -07), each with a clear error."""

from __future__ import annotations

import io
import os
import socket
import threading
import time
from pathlib import Path

import pytest
from checkpoint_format import WriteRefusedError, changed_in_place, write_tarball


def _write(src: Path) -> bytes:
    sink = io.BytesIO()
    write_tarball(src, sink)
    return sink.getvalue()


def test_fifo_is_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(WriteRefusedError,
                       match=r"member 'pipe': a FIFO cannot be saved .*\(CF-WRITE-05\)") as info:
        _write(tmp_path)
    assert (info.value.rule, info.value.member) == ("CF-WRITE-05", "pipe")


def test_socket_is_refused(tmp_path: Path) -> None:
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(tmp_path / "s.sock"))
        with pytest.raises(WriteRefusedError, match=r"member 's.sock': a socket"):
            _write(tmp_path)
    finally:
        sock.close()


def test_absolute_symlink_is_refused(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "etc").symlink_to("/etc")
    with pytest.raises(WriteRefusedError,
                       match=r"member 'sub/etc': symbolic link target '/etc' is not a "
                             r"relative path") as info:
        _write(tmp_path)
    assert info.value.rule == "CF-WRITE-05"


def test_symlink_escaping_the_tree_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "up").symlink_to("../outside")
    with pytest.raises(WriteRefusedError, match=r"member 'up': .*points outside the target"):
        _write(src)


def test_link_that_leaves_and_comes_back_by_the_roots_name_is_refused(tmp_path: Path) -> None:
    """Judged on names, as a reader does: the reader cannot know the root's name."""
    root = tmp_path / "ckpt"
    (root / "d").mkdir(parents=True)
    (root / "f").write_text("x")
    (root / "d" / "l").symlink_to("../../ckpt/f")
    with pytest.raises(WriteRefusedError,
                       match=r"member 'd/l': .*points outside the target.*CF-WRITE-05"):
        _write(root)


@pytest.mark.parametrize("pairs", [[("a", "b"), ("b", "a")], [("s", "s")]])
def test_symlink_loops_are_refused(tmp_path: Path, pairs) -> None:
    for name, target in pairs:
        (tmp_path / name).symlink_to(target)
    with pytest.raises(WriteRefusedError, match=r"part of a symbolic link loop.*CF-WRITE-05"):
        _write(tmp_path)


def test_every_saved_link_restores(tmp_path: Path) -> None:
    """What the writer accepts, the reader accepts: a saved checkpoint always loads."""
    from checkpoint_format import restore

    root = tmp_path / "src"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "f").write_text("x")
    (root / "up").symlink_to("a/b/..")
    (root / "via").symlink_to("up/b/f")  # through another link
    (root / "a" / "b" / "back").symlink_to("../../via")
    (root / "dangling").symlink_to("a/nothing")
    blob = _write(root)
    restore(io.BytesIO(blob), tmp_path / "out")
    assert (tmp_path / "out" / "a" / "b" / "back").read_text() == "x"


def test_symlink_to_the_root_itself_is_allowed(tmp_path: Path) -> None:
    (tmp_path / "self").symlink_to(".")
    assert _write(tmp_path)


@pytest.mark.skipif(os.uname().sysname != "Linux",
                    reason="needs a file system that stores raw bytes")
def test_non_utf8_name_is_refused(tmp_path: Path) -> None:
    with open(os.path.join(os.fsencode(tmp_path), b"bad-\xff.bin"), "wb") as f:
        f.write(b"x")
    with pytest.raises(WriteRefusedError, match=r"name is not valid UTF-8 \(CF-WRITE-02\)"):
        _write(tmp_path)


def test_file_growing_during_save_is_refused(tmp_path: Path) -> None:
    """A trainer still writing its checkpoint must not produce a silently torn archive."""
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(12 << 20))

    class SlowSink(io.BytesIO):
        grown = False

        def write(self, data):
            if not SlowSink.grown and self.tell() > (5 << 20):
                with open(big, "ab") as f:
                    f.write(b"more")
                SlowSink.grown = True
            return super().write(data)

    with pytest.raises(WriteRefusedError,
                       match=r"member 'big.bin': file changed during save") as info:
        write_tarball(tmp_path, SlowSink(), chunk_size=1 << 20, workers=1)
    assert info.value.rule == "CF-WRITE-07"


_CLOCK_REALTIME_COARSE = 5  # linux/time.h: the clock Linux stamps file times with


@pytest.mark.skipif(os.uname().sysname != "Linux", reason="needs Linux's coarse clock")
def test_in_place_rewrite_with_its_mtime_put_back_is_refused(tmp_path: Path) -> None:
    """rsync --inplace -t: the same size and modification time, other bytes. Only the change
    time (which utime cannot set) tells; the archive must not carry a torn copy."""
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(12 << 20))
    before = big.stat()

    class RewritingSink(io.BytesIO):
        done = False

        def write(self, data):
            if not RewritingSink.done and self.tell() > (5 << 20):
                # Change times come from the kernel's coarse clock: once it has passed the
                # file's, a write is sure to stamp a later one.
                while time.clock_gettime_ns(_CLOCK_REALTIME_COARSE) <= before.st_ctime_ns:
                    pass
                with open(big, "r+b") as f:
                    f.write(b"torn")
                os.utime(big, ns=(before.st_atime_ns, before.st_mtime_ns))
                RewritingSink.done = True
            return super().write(data)

    with pytest.raises(WriteRefusedError, match=r"member 'big.bin'.*change time moved") as info:
        write_tarball(tmp_path, RewritingSink(), chunk_size=1 << 20, workers=1)
    assert info.value.rule == "CF-WRITE-07"
    assert RewritingSink.done and big.stat().st_mtime_ns == before.st_mtime_ns


def test_file_replaced_between_stat_and_read_is_refused(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "a.txt"
    target.write_text("first")
    real_open = os.open

    def swapping_open(path, flags, *args, **kwargs):
        if str(path).endswith("a.txt"):
            target.write_text("second version")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", swapping_open)
    with pytest.raises(WriteRefusedError, match="CF-WRITE-07"):
        _write(tmp_path)


def test_missing_source_directory(tmp_path: Path) -> None:
    with pytest.raises(NotADirectoryError, match="is not a directory"):
        write_tarball(tmp_path / "nope", io.BytesIO())


def test_sink_errors_propagate_and_stop_the_pool(tmp_path: Path) -> None:
    (tmp_path / "data.bin").write_bytes(os.urandom(6 << 20))

    class Broken:
        def write(self, data):
            raise OSError("disk full")

    before = threading.active_count()
    with pytest.raises(OSError, match="disk full"):
        write_tarball(tmp_path, Broken(), chunk_size=1 << 20)
    assert threading.active_count() == before


@pytest.mark.skipif(os.uname().sysname != "Linux", reason="needs Linux's coarse clock")
def test_a_link_added_while_a_file_is_read_is_not_a_rewrite(tmp_path: Path) -> None:
    """A background save's snapshot of the same tree (another Checkpoint) hard-links the
    file being read: its change time moves and its link count rises, its bytes do not."""
    source = tmp_path / "src"
    source.mkdir()
    big = source / "big.bin"
    big.write_bytes(os.urandom(12 << 20))
    before = big.stat()
    link = tmp_path / "snapshot-link"

    class LinkingSink(io.BytesIO):
        def write(self, data):
            if not link.exists() and self.tell() > (5 << 20):
                while time.clock_gettime_ns(_CLOCK_REALTIME_COARSE) <= before.st_ctime_ns:
                    pass
                os.link(big, link)
            return super().write(data)

    sink = LinkingSink()
    stats = write_tarball(source, sink, chunk_size=1 << 20, workers=1)
    assert link.exists() and big.stat().st_ctime_ns != before.st_ctime_ns
    assert stats.file_bytes == 12 << 20


def test_changed_in_place_names_the_reason() -> None:
    def st(size=10, mtime=1, ctime=1, nlink=1):
        return os.stat_result((0o100644, 7, 1, nlink, 0, 0, size, 0, 0, 0,
                               0, mtime, ctime, 0, mtime, ctime))

    assert changed_in_place(st(), st()) is None
    assert "size or modification time" in changed_in_place(st(), st(size=11))
    assert "size or modification time" in changed_in_place(st(), st(mtime=2))
    assert "rsync --inplace -t" in changed_in_place(st(), st(ctime=2))
    assert changed_in_place(st(nlink=2), st(ctime=2, nlink=1)) is None  # a name removed
    assert "change time moved" in changed_in_place(st(), st(ctime=2, nlink=2))
    assert changed_in_place(st(), st(ctime=2, nlink=2), links_added=True) is None
    assert "change time" in changed_in_place(st(), st(ctime=2), links_added=True)
