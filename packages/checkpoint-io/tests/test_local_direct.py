"""Large local writes bypass the page cache with O_DIRECT, and fall back where it is refused."""

from __future__ import annotations

import errno
import fcntl
import os

import pytest
from checkpoint_io import File, _local
from checkpoint_io._local import _DirectWriter

BLOCK = _DirectWriter.ALIGN


def _data(size: int, seed: int = 0) -> bytes:
    return bytes((i * 31 + seed) % 251 for i in range(size))


def _open(path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)


def test_whole_blocks_go_direct_and_the_tail_does_not(tmp_path):
    path = tmp_path / "obj"
    fd = _open(path)
    writer = _DirectWriter(fd)
    try:
        first, second = _data(3 * BLOCK), _data(2 * BLOCK + 123, seed=1)
        writer.pwrite(fd, first, 0)
        assert writer._direct
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
        writer.pwrite(fd, second, len(first))
        assert not writer._direct  # the unaligned tail was written buffered
        assert not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
    finally:
        writer.close()
        os.close(fd)
    assert path.read_bytes() == first + second


@pytest.mark.parametrize("code", [errno.EINVAL, errno.EOPNOTSUPP])
def test_a_write_refused_at_write_time_is_redone_buffered(tmp_path, monkeypatch, code):
    real = _local.pwrite_all
    refused = []

    def refuse_direct(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(offset)
            raise OSError(code, os.strerror(code))
        real(fd, data, offset)

    monkeypatch.setattr(_local, "pwrite_all", refuse_direct)
    path = tmp_path / "obj"
    fd = _open(path)
    writer = _DirectWriter(fd)
    try:
        data = _data(4 * BLOCK, seed=2)
        writer.pwrite(fd, data[: 2 * BLOCK], 0)
        writer.pwrite(fd, data[2 * BLOCK :], 2 * BLOCK)
    finally:
        writer.close()
        os.close(fd)
    assert refused == [0]  # refused once, then never tried again
    assert path.read_bytes() == data


def test_other_write_errors_propagate(tmp_path, monkeypatch):
    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_local, "pwrite_all", full)
    fd = _open(tmp_path / "obj")
    writer = _DirectWriter(fd)
    try:
        with pytest.raises(OSError) as caught:
            writer.pwrite(fd, _data(BLOCK), 0)
        assert caught.value.errno == errno.ENOSPC
    finally:
        writer.close()
        os.close(fd)


def test_a_file_system_without_o_direct_is_written_buffered(tmp_path, monkeypatch):
    real = fcntl.fcntl

    def no_direct(fd, cmd, arg=0):
        if cmd == fcntl.F_SETFL and arg & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, cmd, arg)

    monkeypatch.setattr(_local.fcntl, "fcntl", no_direct)
    path = tmp_path / "obj"
    fd = _open(path)
    writer = _DirectWriter(fd)
    try:
        assert not writer._direct
        data = _data(3 * BLOCK + 5, seed=3)
        writer.pwrite(fd, data, 0)
    finally:
        writer.close()
        os.close(fd)
    assert path.read_bytes() == data


@pytest.mark.parametrize("size", [0, 1, BLOCK, 64 * 1024, 64 * 1024 + 1, 3 * 64 * 1024 + 4097])
def test_file_round_trip_across_part_and_block_edges(tmp_path, size):
    file = File(path=str(tmp_path / "store" / "obj.bin")).with_options(part_size=64 * 1024)
    data = _data(size, seed=size % 7)
    with file.open_sync("wb") as out:
        for start in range(0, size, 10_000):
            out.write(data[start : start + 10_000])
    assert (tmp_path / "store" / "obj.bin").read_bytes() == data
    assert [p.name for p in (tmp_path / "store").iterdir()] == ["obj.bin"]  # no temp left


def test_a_write_that_outlives_its_attempt_is_harmless(tmp_path, monkeypatch):
    # Found in review: a part write stalled past attempt_timeout kept running after the
    # retry, and wrote from the shared aligned buffer, which by then held a later part.
    import threading
    import time

    from checkpoint_io import RetryPolicy

    real = os.pwrite
    calls = []
    lock = threading.Lock()

    def stall_the_first(fd, data, offset):
        with lock:
            calls.append(offset)
            first = len(calls) == 1
        time.sleep(0.4 if first else 0.05)  # the rest of the upload outlasts the stall
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", stall_the_first)
    part = 64 * 1024
    data = b"".join(bytes([i]) * part for i in range(20))  # part i is all byte i
    file = File(path=str(tmp_path / "obj.bin")).with_options(
        part_size=part, retry=RetryPolicy(attempt_timeout=0.2, base_delay=0.0, max_delay=0.0)
    )
    with file.open_sync("wb") as out:
        out.write(data)
    time.sleep(0.5)  # let the stalled write finish, whenever it does
    assert (tmp_path / "obj.bin").read_bytes() == data
    assert len(calls) > 20  # the stalled part was written twice


def test_finish_retried_after_a_late_publish_does_not_write_the_tail_twice(tmp_path):
    from checkpoint_io._loop import run_sync

    upload = _local._LocalUpload(str(tmp_path / "obj.bin"))
    head, tail = _data(3 * BLOCK, seed=4), _data(100, seed=5)

    async def go():
        await upload.begin()
        await upload.put_part(1, head)
        await upload.finish(2, tail, len(head) + len(tail))
        await upload.finish(2, tail, len(head) + len(tail))  # as a retry would

    run_sync(go, name="upload")
    assert (tmp_path / "obj.bin").read_bytes() == head + tail
    assert [p.name for p in tmp_path.iterdir()] == ["obj.bin"]


def test_direct_writes_can_be_turned_off(tmp_path):
    path = tmp_path / "obj"
    fd = _open(path)
    writer = _DirectWriter(fd, direct=False)
    try:
        assert not writer._direct
        data = _data(2 * BLOCK, seed=6)
        writer.pwrite(fd, data, 0)
        assert not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
    finally:
        writer.close()
        os.close(fd)
    assert path.read_bytes() == data


def _quick_retries(**kwargs):
    from checkpoint_io import RetryPolicy

    return RetryPolicy(attempt_timeout=0.2, base_delay=0.0, max_delay=0.0, **kwargs)


def test_a_publish_that_outlives_its_attempt_is_awaited_not_failed(tmp_path, monkeypatch):
    # Found in review: the retry of a finish whose fsync ran late failed the commit,
    # although the object was then published whole.
    import time

    real = os.fsync
    calls = []

    def slow_first_fsync(fd):
        calls.append(fd)
        if len(calls) == 1:
            time.sleep(0.5)
        return real(fd)

    monkeypatch.setattr(os, "fsync", slow_first_fsync)
    part = 64 * 1024
    data = _data(3 * part + 100, seed=7)
    file = File(path=str(tmp_path / "obj.bin")).with_options(
        part_size=part, retry=_quick_retries()
    )
    with file.open_sync("wb") as out:
        out.write(data)
    assert (tmp_path / "obj.bin").read_bytes() == data
    assert [p.name for p in tmp_path.iterdir()] == ["obj.bin"]
    assert len(calls) == 2  # the file once (by the attempt that ran late), then its directory


def test_retries_go_ahead_beside_a_stalled_write(tmp_path, monkeypatch):
    # Found in review: retries used to queue behind the stalled write on a lock, filling
    # the executor (an unrelated write then waited for the stall) and failing the upload.
    import threading
    import time

    real = os.pwrite
    release = threading.Event()
    landed = threading.Event()
    calls = []

    def stall_the_first(fd, data, offset):
        calls.append(offset)
        if len(calls) == 1:
            release.wait(10)
            try:
                return real(fd, data, offset)
            finally:
                landed.set()
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", stall_the_first)
    part = 64 * 1024
    data = _data(3 * part + 100, seed=8)
    file = File(path=str(tmp_path / "obj.bin")).with_options(
        part_size=part, retry=_quick_retries()
    )
    started = time.monotonic()
    with file.open_sync("wb") as out:
        out.write(data)
    other = File(path=str(tmp_path / "other.bin"))
    with other.open_sync("wb") as out:
        out.write(b"small")
    elapsed = time.monotonic() - started
    release.set()
    assert landed.wait(10)  # the stalled write lands late, with the same bytes at the same place
    assert elapsed < 5
    assert (tmp_path / "obj.bin").read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["obj.bin", "other.bin"]


def test_abort_removes_the_temp_file_even_when_close_fails(tmp_path, monkeypatch):
    from checkpoint_io._loop import run_sync

    upload = _local._LocalUpload(str(tmp_path / "obj.bin"))

    async def go():
        await upload.begin()
        await upload.put_part(1, _data(2 * BLOCK))
        real_close = os.close

        def failing_close(fd):
            real_close(fd)
            raise OSError(errno.EDQUOT, "Disk quota exceeded")  # a deferred write error

        monkeypatch.setattr(os, "close", failing_close)
        try:
            await upload.abort()
        finally:
            monkeypatch.setattr(os, "close", real_close)

    run_sync(go, name="upload")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("direct", [True, False])
def test_the_direct_writes_switch_reaches_the_writer_of_a_file(tmp_path, monkeypatch, direct):
    """``File.with_options(direct_writes=)`` is a backend option: it picks (and keys) the
    backend whose uploads build the writer."""
    from checkpoint_io import File

    seen = []
    real = _DirectWriter.__init__

    def spy(self, fd, *, direct=True):
        seen.append(direct)
        real(self, fd, direct=direct)

    monkeypatch.setattr(_DirectWriter, "__init__", spy)
    data = _data(3 * BLOCK + 100, seed=7)
    file = File(path=str(tmp_path / "obj.bin")).with_options(part_size=BLOCK,
                                                              direct_writes=direct)
    with file.open_sync("wb") as out:
        out.write(data)
    assert (tmp_path / "obj.bin").read_bytes() == data
    assert seen and set(seen) == {direct}
