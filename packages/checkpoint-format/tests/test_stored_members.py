"""Sized gzip members made of stored deflate blocks (the writer's incompressible slices) are
copied out of the pieces they were read in, not inflated: the same bytes, and for any other
or damaged member exactly what inflating gives, result or error (CF-INTEG-03, CF-INTEG-06)."""

from __future__ import annotations

import itertools
import os
import struct

import pytest
from checkpoint_format import CorruptArchiveError, _codec
from checkpoint_format._codec import gzip_member, inflate_member
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# 200,000 bytes: four stored blocks, the last one short.
DATA = os.urandom(200_000)
MEMBER = gzip_member(DATA, 0)
HEADER = 12 + struct.unpack_from("<H", MEMBER, 10)[0]  # fixed header, XLEN, the extra field


def _split(member: bytes, cuts: list[int]) -> list[bytes | memoryview]:
    """``member`` in pieces cut at ``cuts``, as views of one buffer (as the network's are)."""
    view = memoryview(member)
    bounds = [0, *sorted({c for c in cuts if 0 < c < len(member)}), len(member)]
    return [view[a:b] for a, b in itertools.pairwise(bounds)]


def _outcome(pieces, size: int, *, stored: bool, monkeypatch) -> tuple[str, object]:
    with monkeypatch.context() as patch:
        if not stored:
            patch.setattr(_codec, "_stored_member", lambda pieces, size: None)
        try:
            return "ok", b"".join(inflate_member(list(pieces), size, 7))
        except CorruptArchiveError as exc:
            return "error", (exc.rule, str(exc))


def test_the_writers_stored_members_are_copied_not_inflated(monkeypatch):
    class NoInflating:
        def decompressobj(self, *args, **kwargs):
            raise AssertionError("a stored member went through the inflater")

        crc32 = staticmethod((_codec._fast_zlib or _codec.zlib).crc32)

    monkeypatch.setattr(_codec, "_fast_zlib", NoInflating())
    assert b"".join(inflate_member([MEMBER], len(DATA), 0)) == DATA
    assert inflate_member([gzip_member(b"", 0)], 0, 0) == []


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.integers(min_value=1, max_value=len(MEMBER) - 1), max_size=12))
def test_any_split_into_pieces_gives_the_same_bytes(monkeypatch, cuts):
    pieces = _split(MEMBER, cuts)
    assert _codec._stored_member(pieces, len(DATA)) == [DATA]
    assert b"".join(inflate_member(pieces, len(DATA), 0)) == DATA


def test_compressed_and_other_headers_go_through_the_inflater():
    compressible = b"weights " * 50_000
    assert _codec._stored_member([gzip_member(compressible, 1)], len(compressible)) is None
    import gzip

    named = gzip.compress(DATA, compresslevel=0)  # FNAME-less, but no FEXTRA record: flags 0
    assert _codec._stored_member([named], len(DATA)) is None
    assert b"".join(inflate_member([named], len(DATA), 0)) == DATA


def _damaged(kind: str) -> tuple[bytes, int]:
    member = bytearray(MEMBER)
    size = len(DATA)
    if kind == "payload byte":
        member[HEADER + 5 + 1000] ^= 0x01
    elif kind == "crc":
        member[-8] ^= 0x01
    elif kind == "isize":
        member[-4] ^= 0x01
    elif kind == "nlen":
        member[HEADER + 3] ^= 0x01
    elif kind == "block type":
        member[HEADER] |= 0x06  # reserved BTYPE 11
    elif kind == "no final block":
        last = HEADER + 3 * (5 + 0xFFFF)
        member[last] &= 0xFE
    elif kind == "truncated":
        del member[-3:]
    elif kind == "bytes after":
        member += b"\x00\x00"
    elif kind == "record says more":
        size += 1
    elif kind == "record says less":
        size -= 1
    return bytes(member), size


@pytest.mark.parametrize("kind", ["payload byte", "crc", "isize", "nlen", "block type",
                                  "no final block", "truncated", "bytes after",
                                  "record says more", "record says less"])
def test_damage_is_refused_as_inflating_refuses_it(kind, monkeypatch):
    member, size = _damaged(kind)
    for pieces in ([member], _split(member, [3, HEADER + 2, 70_000, len(member) - 4])):
        fast = _outcome(pieces, size, stored=True, monkeypatch=monkeypatch)
        slow = _outcome(pieces, size, stored=False, monkeypatch=monkeypatch)
        assert fast == slow
        assert fast[0] == "error", kind


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(min_value=0, max_value=len(MEMBER) - 1),
                          st.integers(min_value=1, max_value=255)), min_size=1, max_size=3),
       st.lists(st.integers(min_value=1, max_value=len(MEMBER) - 1), max_size=4),
       st.integers(min_value=-2, max_value=2))
def test_any_damage_gives_what_inflating_gives(monkeypatch, flips, cuts, size_change):
    member = bytearray(MEMBER)
    for at, mask in flips:
        member[at] ^= mask
    pieces = _split(bytes(member), cuts)
    size = len(DATA) + size_change
    assert _outcome(pieces, size, stored=True, monkeypatch=monkeypatch) == \
        _outcome(pieces, size, stored=False, monkeypatch=monkeypatch)
