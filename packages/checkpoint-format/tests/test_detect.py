"""Spec §2 detection, checked clause by clause and against tarfile.is_tarfile."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import tarfile

import pytest
from checkpoint_format import PREFIX_SIZE, detect, sniff, validate
from checkpoint_format._tarheader import build_header, is_header_block
from hypothesis import given, settings
from hypothesis import strategies as st


def _tar(*, fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        info = tarfile.TarInfo("model.bin")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    return buf.getvalue()


def _kind(data: bytes) -> str:
    return detect(data[:PREFIX_SIZE], complete=len(data) <= PREFIX_SIZE).kind


@pytest.mark.parametrize(
    ("label", "data", "kind", "compression"),
    [
        ("zero bytes", b"", "none", "none"),
        ("plain tar", _tar(), "tarball", "none"),
        ("v7 tar", _tar(fmt=tarfile.USTAR_FORMAT), "tarball", "none"),
        ("gzip tar", gzip.compress(_tar(), mtime=0), "tarball", "gzip"),
        ("bzip2 tar", bz2.compress(_tar()), "tarball", "bzip2"),
        ("xz tar", lzma.compress(_tar()), "tarball", "xz"),
        ("text", b"hello world\n" * 100, "raw", "none"),
        ("512 zero bytes then data", bytes(512) + b"weights", "raw", "none"),
        ("all zero raw", bytes(4096), "raw", "none"),
        ("gzip of an empty archive", gzip.compress(bytes(10240), mtime=0), "tarball", "gzip"),
        ("gzip of two zero blocks", gzip.compress(bytes(1024), mtime=0), "tarball", "gzip"),
        ("gzip of 1 MiB of zeros", gzip.compress(bytes(1 << 20), mtime=0), "raw", "gzip"),
        ("gzip of 512 zeros", gzip.compress(bytes(512), mtime=0), "raw", "gzip"),
        ("gzip of text", gzip.compress(b"not a tar" * 100, mtime=0), "raw", "gzip"),
        ("corrupt gzip", b"\x1f\x8b\x08" + os.urandom(200), "raw", "gzip"),
        ("bzip2 of zeros past one record", bz2.compress(bytes(20480)), "raw", "bzip2"),
    ],
)
def test_detection_table(label: str, data: bytes, kind: str, compression: str) -> None:
    detection = detect(data[:PREFIX_SIZE], complete=len(data) <= PREFIX_SIZE)
    assert (detection.kind, detection.compression) == (kind, compression), label
    assert detection.reason.startswith(("CF-DETECT", "CF-OBJ"))


def test_empty_archive_needs_the_whole_stream_in_the_prefix() -> None:
    # The same bytes, but the caller says more follows: the stream has not ended.
    data = gzip.compress(bytes(10240), mtime=0)
    assert detect(data, complete=False).kind == "raw"


def test_prefix_beyond_the_limit_is_ignored() -> None:
    # A tar header that only appears after PREFIX_SIZE bytes of gzip header cannot be seen.
    data = b"\x1f\x8b\x08\x04" + bytes(6) + (65535).to_bytes(2, "little") + bytes(65535)
    data += gzip.compress(_tar())[10:]
    assert _kind(data) == "raw"


def test_sniff_replays_the_prefix() -> None:
    payload = os.urandom(PREFIX_SIZE * 3 + 17)
    detection, stream = sniff(io.BytesIO(payload))
    assert detection.kind == "raw"
    assert stream.read() == payload


def test_sniff_reads_a_bounded_prefix() -> None:
    class Counting(io.BytesIO):
        high = 0

        def read(self, size=-1):
            data = super().read(size)
            Counting.high = max(Counting.high, self.tell())
            return data

    sniff(Counting(os.urandom(10 << 20)))
    assert Counting.high <= PREFIX_SIZE


def test_signed_checksum_header_is_a_tar_header() -> None:
    header = bytearray(build_header(b"x", mode=0o644, size=0, mtime=0, typeflag=b"0"))
    header[120] = 0xFF  # a high byte: signed and unsigned sums now differ
    signed = 256 + sum(
        b if b < 128 else b - 256 for i, b in enumerate(header) if not 148 <= i < 156
    )
    header[148:156] = b"%06o\0 " % (signed & 0o777777) if signed >= 0 else bytes(8)
    if signed >= 0:
        assert is_header_block(bytes(header))


def _only_fields_refused_by_tarfile(block: bytes) -> bool:
    """tarfile refuses the block for a field other than its checksum."""
    try:
        tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.HeaderError as exc:
        return str(exc) != "bad checksum"
    return False


# Found by hypothesis in CI: the checksum field starts with a NUL (value 0), the block's
# signed sum is -256, and the mode field holds bytes that are not octal.
_CHECKSUM_HOLDS_FIELDS_DO_NOT = bytes.fromhex(
    "0000020303030b0b0c0c0c0d0e0f14151a1a1b1e1e1f202225272c2c2e2e313237393a3c3c3e4040464c4c4d"
    "50525454575858595d60606163676a6c6c6d6e6f6f707577797c7d7e828287878d919599999a9b9c9ca5a7ac"
    "b0b2b4b5b7b7b8bdbdbdbfc0c0c1c2c3c3c3c6c7c7cbcbcdcdcdced0d1d2d7d8d8dbdbdcdcdddddedfe0e2e2"
    "e3e6e8e9eaeaebf0f1f6f7f8fafafbff00112536485d79a100010102020203030404050506060609090a0b0b"
    "0b0d0d0d0d0d0e0f101010101011111213141516171719191c1f20202021212225262626262627292a2b2b2c"
    "2d2e2e2f31313132333335353738383838393a3a3b3d3d3d3d3e3e3e3f3f4040414242434444444545484949"
    "4a4b4c4c4c4d4d4e4f50505153535454565858585c5d5d5d5d60616161616262636464656667676768696a6a"
    "6a6c6c707373757577777878797a7b7b7c7c7d7e7f8081838386868687898a8a8b8c8e8f9091919191929393"
    "94949697999b9d9d9ea0a2a3a4a5a6a6a7a8a8a8a9aaaaababacacadaeafb0b0b0b1b1b1b2b4b5b6b6b7b7b7"
    "b7b8b8b9bababbbcbfc0c1c1c1c1c2c2c3c5c5c6c6c6c7c7c8c8c9cacbcccccdcdcdcfcfd0d0d0d1d1d2d3d3"
    "d4d4d4d5d6d8d9d9d9d9dadbdbdedfe1e1e1e2e2e3e3e3e4e5e6e6e6e7e7e8e8e8e9ebebebebebecececedee"
    "eeefeff0f0f0f1f1f2f2f2f3f3f3f4f4f4f4f5f6f8f9fbfdfdfdfefe"
)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=512, max_size=2048))
def test_random_blocks_agree_with_tarfile(data: bytes) -> None:
    """Uncompressed classification matches tarfile.is_tarfile, except the zero-block rule and
    a block whose checksum holds but whose other fields do not parse: CF-DETECT-03 judges the
    checksum alone, so that is a corrupt tarball (an error, CF-INTEG-02), where tarfile
    calls it no tar at all (and upstream would restore it as a raw payload)."""
    ours = _kind(data) == "tarball"
    theirs = tarfile.is_tarfile(io.BytesIO(data))
    if data[:512] == bytes(512):
        assert (ours, theirs) == (False, True)  # CF-DETECT-04: v1 keeps the payload
    elif ours and not theirs and _only_fields_refused_by_tarfile(data[:512]):
        assert any(v.rule == "CF-INTEG-02" for v in validate(io.BytesIO(data)).violations)
    else:
        assert ours == theirs


def test_a_block_whose_checksum_holds_and_whose_fields_do_not_is_a_corrupt_tarball() -> None:
    data = _CHECKSUM_HOLDS_FIELDS_DO_NOT
    assert is_header_block(data) and _kind(data) == "tarball"
    assert not tarfile.is_tarfile(io.BytesIO(data)) and _only_fields_refused_by_tarfile(data)
    assert any(v.rule == "CF-INTEG-02" for v in validate(io.BytesIO(data)).violations)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 0o7777), st.integers(0, 8**11 - 1), st.binary(max_size=99))
def test_valid_headers_with_checksums_agree_with_tarfile(mode: int, size: int, name: bytes) -> None:
    name = name.replace(b"\0", b"") or b"x"
    block = build_header(name, mode=mode, size=size, mtime=0, typeflag=b"0")
    assert is_header_block(block)
    assert tarfile.is_tarfile(io.BytesIO(block + bytes(1024)))


@pytest.mark.parametrize(("value", "ns"), [
    ("1700000000", 1_700_000_000 * 10**9),
    ("1700000000.123456789", 1_700_000_000_123_456_789),
    ("5e-05", 50_000),  # Python's str(float) for small times (CF-MARK-05)
    ("1.7e9", 1_700_000_000 * 10**9),
    ("-1.5", -1_500_000_000),
    ("-0.000000001", -1),
    ("1.", 1_000_000_000),
    ("999999999999.999999999", 999_999_999_999_999_999_999),
    ("1e-9999999", 0),
])
def test_pax_mtime_forms(value: str, ns: int) -> None:
    from checkpoint_format._tarheader import parse_pax_mtime

    assert parse_pax_mtime(value) == ns


@pytest.mark.parametrize(
    "value",
    # "1e9999999" once escaped as decimal.Overflow: its exponent is past the decimal context.
    ["", "abc", "1.2.3", "0x10", "1e999999", "1e9999999", "-1E+99999999", "9" * 80, "nan", "inf"],
)
def test_bad_pax_mtimes_are_refused(value: str) -> None:
    from checkpoint_format._tarheader import HeaderError, parse_pax_mtime

    with pytest.raises(HeaderError, match="pax mtime"):
        parse_pax_mtime(value)


def test_pax_mtimes_do_not_depend_on_the_callers_decimal_context() -> None:
    import decimal

    from checkpoint_format._tarheader import parse_pax_mtime

    values = ["1.700000000123456789e9", "-1e-999999999", "5e-05", "1e-9999999"]
    expected = [parse_pax_mtime(v) for v in values]
    assert expected[:2] == [1_700_000_000_123_456_789, -1]
    with decimal.localcontext() as ctx:
        ctx.prec = 12
        ctx.traps[decimal.Underflow] = True
        assert [parse_pax_mtime(v) for v in values] == expected
