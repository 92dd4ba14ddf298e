"""The reader's and writer's helper threads: digests checked off-thread, nothing left running."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import threading
from pathlib import Path

import pytest
from checkpoint_format import (
    CorruptArchiveError,
    WriteRefusedError,
    restore,
    validate,
    write_tarball,
)

_HELPERS = ("checkpoint-decode", "checkpoint-verify", "checkpoint-emit", "checkpoint-gzip")


def _helper_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(_HELPERS)]


def _marked_tar(name: str, data: bytes, digest: str) -> bytes:
    """A marked, uncompressed tarball whose member carries the given digest."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT,
                      pax_headers={"FLYTECKPT.version": "1.0"}) as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.pax_headers = {"FLYTECKPT.sha256": digest}
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_large_member_digest_mismatch_is_caught_off_thread(tmp_path: Path) -> None:
    data = os.urandom(3 << 20)  # above the inline-hash size: verified on the verify thread
    wrong = hashlib.sha256(b"something else").hexdigest()
    blob = _marked_tar("weights.bin", data, wrong)
    with pytest.raises(CorruptArchiveError,
                       match=r"member 'weights.bin': SHA-256 mismatch.*\(CF-INTEG-04\)") as info:
        restore(io.BytesIO(blob), tmp_path / "out")
    assert (info.value.rule, info.value.member) == ("CF-INTEG-04", "weights.bin")
    assert not (tmp_path / "out").exists()
    report = validate(io.BytesIO(blob))
    assert [(v.rule, v.member) for v in report.violations] == [("CF-INTEG-04", "weights.bin")]
    assert _helper_threads() == []


def test_large_member_with_the_right_digest_restores(tmp_path: Path) -> None:
    data = os.urandom(3 << 20)
    blob = _marked_tar("weights.bin", data, hashlib.sha256(data).hexdigest())
    restore(io.BytesIO(blob), tmp_path / "out")
    assert (tmp_path / "out" / "weights.bin").read_bytes() == data
    assert _helper_threads() == []


class _FailingSink(io.BytesIO):
    """A sink whose upload fails once it holds more than ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self._limit = limit

    def write(self, data):
        if self.tell() > self._limit:
            raise OSError("upload failed")
        return super().write(data)


def test_no_helper_thread_outlives_a_write_or_a_failed_write(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.bin").write_bytes(os.urandom(9 << 20))
    write_tarball(tmp_path / "src", io.BytesIO(), chunk_size=1 << 20)
    assert _helper_threads() == []

    with pytest.raises(OSError, match="upload failed"):
        write_tarball(tmp_path / "src", _FailingSink(2 << 20), chunk_size=1 << 20)
    assert _helper_threads() == []


def _open_descriptors() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_no_file_stays_open_after_a_write_or_a_failed_write(tmp_path: Path) -> None:
    """The workers read large files' data and the last read closes each: whether the write
    succeeds, its sink fails with reads still queued, or a file shrinks under the reads."""
    src = tmp_path / "src"
    src.mkdir()
    for index in range(4):
        (src / f"{index}.bin").write_bytes(os.urandom(9 << 20))
    before = _open_descriptors()
    write_tarball(src, io.BytesIO(), chunk_size=1 << 20)
    assert _open_descriptors() == before

    with pytest.raises(OSError, match="upload failed"):
        write_tarball(src, _FailingSink(3 << 20), chunk_size=1 << 20, workers=2)
    assert _open_descriptors() == before

    class Shrinking(io.BytesIO):
        def write(self, data):
            if self.tell() > (12 << 20):
                os.truncate(src / "1.bin", 1 << 20)
            return super().write(data)

    with pytest.raises(WriteRefusedError, match=r"member '1.bin': file changed during save"):
        write_tarball(src, Shrinking(), chunk_size=1 << 20, workers=2)
    assert _open_descriptors() == before
    assert _helper_threads() == []


@pytest.mark.skipif(not hasattr(os, "preadv"), reason="needs os.preadv")
def test_a_large_files_data_is_read_by_the_workers_straight_into_its_members(
        tmp_path: Path, monkeypatch) -> None:
    """No one thread reads every byte of a save: the calling thread walks the tree and
    writes headers; the pool hashes the pieces and reads the data into the members."""
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom((9 << 20) + 123)
    (src / "big.bin").write_bytes(data)
    real_preadv = os.preadv
    readers: dict[str, int] = {}

    def preadv(fd, buffers, offset):
        got = real_preadv(fd, buffers, offset)
        name = threading.current_thread().name
        readers[name] = readers.get(name, 0) + got
        return got

    monkeypatch.setattr(os, "preadv", preadv)
    sink = io.BytesIO()
    write_tarball(src, sink, workers=2)
    assert sum(readers.values()) == len(data)
    assert all(name.startswith("checkpoint-gzip") for name in readers), readers
    with tarfile.open(fileobj=io.BytesIO(sink.getvalue())) as tar:
        member = tar.extractfile("big.bin")
        assert member is not None and member.read() == data


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_a_member_that_cannot_be_laid_out_closes_its_file(tmp_path: Path, monkeypatch) -> None:
    """A worker failing before its read (no memory for the member) still lets go of the
    file: the save fails with that error and no descriptor stays open."""
    from checkpoint_format import _writer

    src = tmp_path / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(os.urandom(9 << 20))

    def no_memory(length):
        raise MemoryError("no room for the member")

    monkeypatch.setattr(_writer, "stored_member", no_memory)
    before = _open_descriptors()
    with pytest.raises(MemoryError, match="no room"):
        write_tarball(src, io.BytesIO(), chunk_size=1 << 20, workers=2)
    assert _open_descriptors() == before
    assert _helper_threads() == []
