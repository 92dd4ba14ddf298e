"""Large restored files are written by a pool at their offsets, and whole gzip members reach
the inflaters as the buffers the source handed out; the restore stays all or nothing."""

from __future__ import annotations

import errno
import io
import os
import threading
from pathlib import Path

import pytest
from checkpoint_format import _codec, _extract, restore, write_tarball

MiB = 1 << 20


@pytest.fixture
def tarball(tmp_path: Path) -> bytes:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "big.bin").write_bytes(os.urandom(13 * MiB + 5))
    (tree / "small.txt").write_bytes(b"hello")
    out = io.BytesIO()
    write_tarball(tree, out)
    return out.getvalue()


class PiecesReader(io.RawIOBase):
    """An object reader with ``read_pieces``: hands out its data in small buffers (as a
    network does), and records whether anything read it any other way."""

    def __init__(self, data: bytes, piece: int = 64 * 1024) -> None:
        super().__init__()
        self._view = memoryview(data)
        self._at = 0
        self._piece = piece
        self.joined_reads = 0
        self.handed = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        end = len(self._view) if size is None or size < 0 else self._at + size
        data = bytes(self._view[self._at:end])
        self._at += len(data)
        if len(data) > 65536:  # more than the prefix classification reads
            self.joined_reads += 1
        return data

    def read_pieces(self, size: int = -1) -> list[memoryview]:
        end = len(self._view) if size is None or size < 0 else min(self._at + size,
                                                                   len(self._view))
        pieces = [self._view[at:min(at + self._piece, end)]
                  for at in range(self._at, end, self._piece)]
        self._at = end
        self.handed += len(pieces)
        return pieces


def test_a_large_file_is_written_by_the_pool_at_its_offsets(tarball, tmp_path, monkeypatch):
    writers: list[str] = []
    real = os.pwrite

    def pwrite(fd, data, offset):
        writers.append(threading.current_thread().name)
        return real(fd, data, offset)

    monkeypatch.setattr(_extract.os, "pwrite", pwrite)
    result = restore(io.BytesIO(tarball), tmp_path / "out", decode_threads=2)
    assert (tmp_path / "out" / "big.bin").stat().st_size == 13 * MiB + 5
    assert (tmp_path / "out" / "small.txt").read_bytes() == b"hello"
    assert result.members == 2
    assert len(writers) >= 4  # 4 MiB pieces
    assert {name.rsplit("_", 1)[0] for name in writers} == {"checkpoint-write"}
    assert not [t for t in threading.enumerate() if t.name.startswith("checkpoint-write")]


def test_one_thread_writes_in_order_in_the_reading_thread(tarball, tmp_path, monkeypatch):
    writers: list[str] = []
    monkeypatch.setattr(_extract.os, "pwrite", lambda *a: writers.append("pwrite"))
    restore(io.BytesIO(tarball), tmp_path / "out", decode_threads=1)
    assert writers == []
    assert (tmp_path / "out" / "big.bin").stat().st_size == 13 * MiB + 5


def test_a_failed_piece_write_names_the_member_and_publishes_nothing(tarball, tmp_path,
                                                                     monkeypatch):
    calls = []
    real = _extract._pwrite_all

    def full(fd, piece, offset):
        calls.append(offset)
        if offset >= 8 * MiB:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, piece, offset)

    monkeypatch.setattr(_extract, "_pwrite_all", full)
    with pytest.raises(OSError) as info:
        restore(io.BytesIO(tarball), tmp_path / "out", decode_threads=2)
    assert info.value.errno == errno.ENOSPC
    assert "while restoring member 'big.bin'" in str(info.value)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]


def test_whole_members_reach_the_inflaters_as_the_source_pieces(tarball, tmp_path,
                                                                monkeypatch):
    seen: list[list] = []
    real = _codec.inflate_member

    def spy(pieces, inflated, offset):
        seen.append(list(pieces))
        return real(pieces, inflated, offset)

    monkeypatch.setattr(_codec, "inflate_member", spy)
    source = PiecesReader(tarball)
    restore(source, tmp_path / "out", decode_threads=2)
    assert (tmp_path / "out" / "big.bin").stat().st_size == 13 * MiB + 5
    assert seen and any(len(pieces) > 4 for pieces in seen)
    # Members came as views of the source's buffer, not as bytes joined by a read().
    assert all(isinstance(p, memoryview) for pieces in seen for p in pieces[1:])
    assert source.joined_reads == 0 and source.handed > 0


def test_a_raw_payload_is_written_by_the_pool_from_the_source_pieces(tmp_path, monkeypatch):
    data = b"not a tarball " + os.urandom(9 * MiB)
    writers: list[str] = []
    real = os.pwrite

    def pwrite(fd, piece, offset):
        writers.append(threading.current_thread().name)
        return real(fd, piece, offset)

    monkeypatch.setattr(_extract.os, "pwrite", pwrite)
    source = PiecesReader(data)
    result = restore(source, tmp_path / "out", decode_threads=2)
    assert result.kind == "raw" and result.path.read_bytes() == data
    assert writers and {name.rsplit("_", 1)[0] for name in writers} == {"checkpoint-write"}
    assert source.joined_reads == 0
