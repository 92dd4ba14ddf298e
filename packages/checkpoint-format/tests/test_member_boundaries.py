"""What may follow a compressed member (CF-INTEG-05) and the gzip header's reserved flags
(CF-INTEG-03), judged the same by both decoders: ``GzipMembers`` (what restores and validates
read gzip with) and ``Decoder`` (detection's, and the reader's for bzip2 and xz)."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma

import pytest
from checkpoint_format import CorruptArchiveError
from checkpoint_format._codec import BZIP2, GZIP, XZ, Decoder, GzipMembers, gzip_member

PAYLOAD = b"checkpoint bytes " * 200


def _with_reserved_flag(member: bytes) -> bytes:
    return member[:3] + bytes([member[3] | 0x20]) + member[4:]


def _by_decoder(compression: str, data: bytes, step: int) -> bytes:
    decoder = Decoder(compression)
    pieces = (data[start : start + step] for start in range(0, len(data), step))
    out = b"".join(chunk for piece in pieces for chunk in decoder.feed(piece))
    decoder.finish()
    return out


def _by_members(data: bytes, step: int) -> bytes:
    source = io.BytesIO(data)
    return b"".join(GzipMembers(lambda n: source.read(min(n, step)), width=2).chunks())


def _gzip_decoders() -> list:
    decoders = []
    for step in (1, 7, 1 << 20):
        decoders.append(pytest.param(lambda data, s=step: _by_decoder(GZIP, data, s),
                                     id=f"Decoder-{step}"))
        decoders.append(pytest.param(lambda data, s=step: _by_members(data, s),
                                     id=f"GzipMembers-{step}"))
    return decoders


OURS = gzip_member(PAYLOAD, 6)  # with the member-size record (CF-WRITE-11)
PLAIN = gzip.compress(PAYLOAD, mtime=0)  # without: GzipMembers streams it

GZIP_CASES = [
    # (what, object, expected output or the rule of the error)
    ("two members", OURS + PLAIN, 2 * PAYLOAD),
    ("zero bytes after the last member", PLAIN + bytes(600), PAYLOAD),
    ("garbage after the last member", OURS + b"junk", "CF-INTEG-05"),
    ("garbage after the zero bytes", PLAIN + bytes(100) + b"\x1f\x8b", "CF-INTEG-05"),
    ("reserved flags, first member with record", _with_reserved_flag(OURS), "CF-INTEG-03"),
    ("reserved flags, first member without", _with_reserved_flag(PLAIN), "CF-INTEG-03"),
    ("reserved flags, second member with record", PLAIN + _with_reserved_flag(OURS),
     "CF-INTEG-03"),
    ("reserved flags, second member without", OURS + _with_reserved_flag(PLAIN),
     "CF-INTEG-03"),
]


@pytest.mark.parametrize("decode", _gzip_decoders())
@pytest.mark.parametrize(("what", "data", "expected"), GZIP_CASES, ids=[c[0] for c in GZIP_CASES])
def test_both_gzip_decoders_judge_boundaries_and_flags_alike(decode, what, data, expected):
    if isinstance(expected, bytes):
        assert decode(data) == expected, what
        return
    with pytest.raises(CorruptArchiveError) as caught:
        decode(data)
    assert caught.value.rule == expected, what
    if expected == "CF-INTEG-05":
        assert "unexpected data after the last gzip member" in str(caught.value)
    else:
        assert "reserved flag bits set" in str(caught.value)


@pytest.mark.parametrize(("compression", "compress"), [(BZIP2, bz2.compress), (XZ, lzma.compress)])
@pytest.mark.parametrize("step", [1, 1 << 20])
def test_bzip2_and_xz_follow_the_same_boundary_rule(compression, compress, step):
    member = compress(PAYLOAD)
    assert _by_decoder(compression, member + member + bytes(300), step) == 2 * PAYLOAD
    for tail in (b"junk", bytes(10) + b"junk"):
        with pytest.raises(CorruptArchiveError) as caught:
            _by_decoder(compression, member + tail, step)
        assert caught.value.rule == "CF-INTEG-05"
        assert f"unexpected data after the last {compression} member" in str(caught.value)
