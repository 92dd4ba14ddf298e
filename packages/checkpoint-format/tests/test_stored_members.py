"""Members filled in place (``stored_member`` + ``seal_member``): the bytes ``gzip_member``
gives, for every size around the stored-block and sample boundaries and every level."""

from __future__ import annotations

import os

import pytest
from checkpoint_format._codec import gzip_member, seal_member, stored_member

SIZES = [0, 1, 100, 16383, 16384, 16385, 65535, 65536, 65537, 3 * 65535 + 7, (1 << 20) + 3]


def _filled(data: bytes):
    member, slots = stored_member(len(data))
    offset = 0
    for slot in slots:
        slot[:] = data[offset : offset + slot.nbytes]
        offset += slot.nbytes
    assert offset == len(data)
    return member, slots


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("kind", ["random", "zeros", "half"])
@pytest.mark.parametrize("level", ["auto", 0, 1, 6])
def test_a_member_filled_in_place_is_the_member_gzip_member_writes(size, kind, level):
    if kind == "random":
        data = os.urandom(size)
    elif kind == "zeros":
        data = bytes(size)
    else:  # the sample (its middle) decides: compressible there, random elsewhere
        data = os.urandom(size // 2) + bytes(size - size // 2)
    assert bytes(seal_member(*_filled(data), level)) == gzip_member(data, level)


def test_a_stored_member_is_sealed_in_its_own_buffer():
    member, slots = _filled(os.urandom(100_000))
    assert seal_member(member, slots, "auto") is member


def test_a_bad_level_is_refused_as_gzip_member_refuses_it():
    with pytest.raises(ValueError, match="compression level must be 0-9"):
        seal_member(*_filled(b"abc" * 100), 10)
