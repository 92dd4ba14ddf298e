"""Gzip members inflated on several cores (CF-WRITE-11, CF-INTEG-06): the output, its order,
the bound on members in flight, and the fallbacks for members without a usable record."""

from __future__ import annotations

import gzip
import io
import os
import struct
import tarfile
import threading
import zlib

import pytest
from checkpoint_format import CorruptArchiveError, _codec, restore, write_tarball
from checkpoint_format._codec import GzipMembers, gzip_member, member_record


def _members(count: int, size: int = 64 << 10) -> tuple[list[bytes], bytes]:
    slices = [os.urandom(size // 2) + bytes(size // 2) for _ in range(count)]
    return slices, b"".join(gzip_member(piece, "auto") for piece in slices)


def _decode(data: bytes, width: int, read_size: int = 1 << 20) -> bytes:
    """Decode ``data`` through a source whose reads return at most ``read_size`` bytes."""
    source = io.BytesIO(data)

    def read(size: int) -> bytes:
        return source.read(min(size, read_size))

    return b"".join(GzipMembers(read, width=width, read_size=read_size).chunks())


def test_the_record_is_what_gzip_readers_skip():
    piece = os.urandom(1000)
    member = gzip_member(piece, 6)
    assert member_record(member) == (len(member), len(piece))
    assert gzip.decompress(member) == piece
    assert zlib.decompressobj(wbits=31).decompress(member) == piece


@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("read_size", [1, 7, 1 << 20])
def test_members_come_out_in_order_whatever_the_width_and_the_reads(width, read_size):
    slices, data = _members(9 if read_size > 1 else 3, 16 << 10)
    assert _decode(data, width, read_size) == b"".join(slices)


def test_no_more_members_in_flight_than_the_window(monkeypatch):
    inflating = 0
    most = 0
    lock = threading.Lock()
    real = _codec.inflate_member

    def counting(data, size, offset):
        nonlocal inflating, most
        with lock:
            inflating += 1
            most = max(most, inflating)
        try:
            return real(data, size, offset)
        finally:
            with lock:
                inflating -= 1

    monkeypatch.setattr(_codec, "inflate_member", counting)
    slices, data = _members(40)
    source = io.BytesIO(data)
    members = GzipMembers(source.read, width=3)
    taken = []
    for out in members.chunks():
        taken.append(out)
        # What was read but not yet handed on: at most width + 1 members (and one read).
        assert source.tell() - sum(map(len, taken)) // 2 <= 5 * (64 << 10) + (1 << 20)
    assert b"".join(taken) == b"".join(slices) and 1 <= most <= 3


def test_members_without_a_record_and_over_the_bound_stream_through_one_decompressor():
    plain = gzip.compress(b"plain member\n" * 1000, mtime=0)
    big = os.urandom(1 << 20) * 17  # 17 MiB: its record is over WHOLE_MEMBER_MAX
    assert len(big) > _codec.WHOLE_MEMBER_MAX
    slices, recorded = _members(3)
    data = recorded + plain + gzip_member(big, 0) + recorded + bytes(100)
    expected = b"".join(slices) + b"plain member\n" * 1000 + big + b"".join(slices)
    assert _decode(data, 2) == expected


def _with_record(member: bytes, length: int, inflated: int) -> bytes:
    patched = bytearray(member)
    struct.pack_into("<QQ", patched, 16, length, inflated)
    return bytes(patched)


@pytest.mark.parametrize("width", [1, 3])
@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda n, i: (n + 1, i), id="longer"),
        pytest.param(lambda n, i: (n - 1, i), id="shorter"),
        pytest.param(lambda n, i: (n, i + 1), id="inflates-to-less"),
        pytest.param(lambda n, i: (n, i - 1), id="inflates-to-more"),
        pytest.param(lambda n, i: (n, (20 << 20)), id="streamed-and-wrong"),
    ],
)
def test_a_record_that_disagrees_with_its_member_is_corrupt_and_nothing_after_it_is_delivered(
    width, change
):
    slices, _ = _members(6)
    members = [gzip_member(piece, "auto") for piece in slices]
    members[3] = _with_record(members[3], *change(*member_record(members[3])))
    source = io.BytesIO(b"".join(members))
    delivered = []
    with pytest.raises(CorruptArchiveError) as caught:
        for out in GzipMembers(source.read, width=width).chunks():
            delivered.append(out)
    assert caught.value.rule == "CF-INTEG-06" and "record" in str(caught.value)
    # A member inflated whole delivers nothing; one streamed is checked when it ends, after
    # its output. Nothing after the faulty member is delivered either way.
    got = b"".join(delivered)
    assert got.startswith(b"".join(slices[:3])) and b"".join(slices[:4]).startswith(got)


def test_a_record_past_the_end_is_truncation():
    first, last = (gzip_member(os.urandom(1000), 0) for _ in range(2))
    length, inflated = member_record(last)
    with pytest.raises(CorruptArchiveError) as caught:
        _decode(first + _with_record(last, length + 10, inflated), 2)
    assert caught.value.rule == "CF-INTEG-01"


class _ThenZeros(io.RawIOBase):
    """``data``, then ``zeros`` zero bytes (as a longer object would go on); counts what
    is read and refuses to serve more than ``guard`` bytes in all."""

    def __init__(self, data: bytes, zeros: int, guard: int = 256 << 20) -> None:
        super().__init__()
        self._data, self._zeros, self._guard = memoryview(data), zeros, guard
        self.served = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        if self._data:
            n = min(len(buffer), len(self._data))
            buffer[:n] = self._data[:n]
            self._data = self._data[n:]
        else:
            n = min(len(buffer), self._zeros)
            buffer[:n] = bytes(n)
            self._zeros -= n
        self.served += n
        if self.served > self._guard:
            raise OSError(f"read {self.served} bytes, past the {self._guard} of the test")
        return n


def _one_member_claiming(length: int) -> bytes:
    """A whole tarball in one gzip member whose record says it is ``length`` bytes."""
    sink = io.BytesIO()
    with tarfile.open(fileobj=sink, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("a.txt")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    member = gzip_member(sink.getvalue(), 0)
    return _with_record(member, length, member_record(member)[1])


@pytest.mark.parametrize(
    ("zeros", "rule"),
    [
        pytest.param(0, "CF-INTEG-01", id="object-ends"),
        pytest.param(40 << 20, "CF-INTEG-01", id="object-ends-within-64MiB"),
        pytest.param(1 << 40, "CF-INTEG-06", id="object-goes-on"),
    ],
)
def test_a_record_past_the_end_looks_at_most_64_mib_ahead(zeros: int, rule: str, tmp_path):
    # The record says 1 TiB (any u64): only 64 MiB past the member are read to tell
    # truncation (CF-INTEG-01) from a disagreement (CF-INTEG-06). It read the whole TiB.
    data = _one_member_claiming(1 << 40)
    source = _ThenZeros(data, zeros)
    with pytest.raises(CorruptArchiveError) as caught:
        restore(source, tmp_path / "t")
    assert caught.value.rule == rule and "record says" in str(caught.value)
    assert source.served <= len(data) + (64 << 20) + (2 << 20)
    assert not (tmp_path / "t").exists()


def test_garbage_after_the_last_member_is_refused_after_the_members_before_it():
    _slices, data = _members(3)
    with pytest.raises(CorruptArchiveError) as caught:
        _decode(data + b"junk", 2)
    assert caught.value.rule == "CF-INTEG-05"


def test_a_restore_uses_the_pool_and_python_tarfile_reads_the_same_object(tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    for i in range(6):
        (tree / f"shard-{i}.bin").write_bytes(os.urandom(3 << 20))
    sink = io.BytesIO()
    write_tarball(tree, sink)
    threads_before = {t.name for t in threading.enumerate()}
    result = restore(io.BytesIO(sink.getvalue()), tmp_path / "out")
    assert result.format_version == "1.1"
    for i in range(6):
        name = f"shard-{i}.bin"
        assert (tmp_path / "out" / name).read_bytes() == (tree / name).read_bytes()
    assert {t.name for t in threading.enumerate()} == threads_before  # the pool is gone
    with tarfile.open(fileobj=io.BytesIO(sink.getvalue()), mode="r:gz") as tar:
        assert sorted(tar.getnames()) == sorted(f"shard-{i}.bin" for i in range(6))


@pytest.mark.parametrize("threads", [1, 3])
def test_digests_hashed_on_a_pool_still_catch_every_mismatch(tmp_path, threads):
    from checkpoint_format import validate

    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a-big.bin").write_bytes(os.urandom(9 << 20))  # piecewise digest, pooled
    (tree / "b-small.txt").write_bytes(b"small\n")  # plain digest
    (tree / "c-big.bin").write_bytes(os.urandom(5 << 20))
    sink = io.BytesIO()
    write_tarball(tree, sink)
    tar = bytearray(gzip.decompress(sink.getvalue()))
    for key in (b"FLYTECKPT.sha256-pieces=", b"FLYTECKPT.sha256="):
        start = 0
        while (start := tar.find(key, start)) != -1:  # every digest record: flip its first digit
            digit = start + len(key)
            tar[digit] = ord("0") if tar[digit] != ord("0") else ord("1")
            start = digit
    tampered = gzip.compress(bytes(tar), compresslevel=1, mtime=0)
    with pytest.raises(CorruptArchiveError) as caught:
        restore(io.BytesIO(tampered), tmp_path / "out", decode_threads=threads)
    # Small members are checked as they end, large ones before anything is published.
    assert caught.value.rule == "CF-INTEG-04" and caught.value.member == "b-small.txt"
    assert not (tmp_path / "out").exists()
    report = validate(io.BytesIO(tampered), decode_threads=threads)
    assert sorted((v.rule, v.member) for v in report.violations) == [
        ("CF-INTEG-04", "a-big.bin"), ("CF-INTEG-04", "b-small.txt"), ("CF-INTEG-04", "c-big.bin")
    ]


def test_the_thread_setting_is_checked(tmp_path):
    from checkpoint_format._width import DECODE_WIDTH_CAP, cores

    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(ValueError, match=f"decode_threads must be .*got {bad!r}"):
            _codec.decode_width(bad)
        with pytest.raises(ValueError, match="decode_threads must be"):
            restore(io.BytesIO(gzip.compress(b"x")), tmp_path / "out", decode_threads=bad)
        assert list(tmp_path.iterdir()) == []  # refused before anything was made
    assert _codec.decode_width(2) == 2
    assert _codec.decode_width() == min(cores(), DECODE_WIDTH_CAP)


def test_a_plain_gzip_past_the_ratio_grace_is_judged_by_what_was_fed(tmp_path):
    # Upstream's objects are one gzip member without a record: streamed, and the expansion
    # ratio must count the compressed bytes as they go in, not when the member ends.
    data = os.urandom(70 << 20)
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as archive:
        info = tarfile.TarInfo("model.bin")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    result = restore(io.BytesIO(gzip.compress(tar.getvalue(), 1)), tmp_path / "out")
    assert result.members == 1 and (tmp_path / "out" / "model.bin").read_bytes() == data


def test_pooled_digests_keep_no_view_of_a_member_once_its_data_has_ended():
    from checkpoint_format._reader import TarReader

    tree = io.BytesIO()
    with tarfile.open(fileobj=tree, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for i in range(4):
            data = bytes([i]) * ((4 << 20) + 1)  # a full piece and a partial one
            from checkpoint_format._digest import TreeHasher

            hasher = TreeHasher()
            hasher.update(data)
            info = tarfile.TarInfo(f"f{i}.bin")
            info.size = len(data)
            info.pax_headers = {"FLYTECKPT.sha256-pieces": hasher.hexdigest()}
            archive.addfile(info, io.BytesIO(data))
    stream = gzip.compress(tree.getvalue(), 1)
    with TarReader(io.BytesIO(stream), "gzip", decode_threads=3) as reader:
        for _member, chunks in reader.members():
            for _ in chunks:
                pass
            assert all(not hasher._views for hasher, _, _ in reader._deferred)
        assert len(reader._deferred) == 4
