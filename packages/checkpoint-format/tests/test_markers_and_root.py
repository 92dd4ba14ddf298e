"""Format markers and members naming the target itself (CF-MARK-01/02, CF-EXTRACT-05/07)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from checkpoint_format import (
    CorruptArchiveError,
    UnsafeMemberError,
    UnsupportedFormatError,
    restore,
)
from checkpoint_format._tarheader import PAX_GLOBAL, build_header, pax_header

END = bytes(1024)


def _file(name: bytes, data: bytes = b"hi") -> bytes:
    header = build_header(name, mode=0o644, size=len(data), mtime=0, typeflag=b"0")
    return header + data + bytes(-len(data) % 512)


def _restore(blob: bytes, tmp_path: Path):
    return restore(io.BytesIO(blob), tmp_path / "out")


def test_a_huge_version_number_is_refused_cleanly(tmp_path: Path) -> None:
    marker = pax_header([("FLYTECKPT.version", "1" + "0" * 5000 + ".0")], PAX_GLOBAL)
    with pytest.raises(UnsupportedFormatError,
                       match=r"format marker '10{20}.*' is not MAJOR.MINOR "
                             r"\(CF-MARK-02\)") as info:
        _restore(marker + _file(b"a") + END, tmp_path)
    assert len(str(info.value)) < 200
    assert not (tmp_path / "out").exists()


def test_a_marker_after_members_is_corrupt(tmp_path: Path) -> None:
    marker = pax_header([("FLYTECKPT.version", "1.0")], PAX_GLOBAL)
    with pytest.raises(CorruptArchiveError,
                       match=r"format marker at tar offset 1024, not at the start "
                             r"\(CF-MARK-01\)"):
        _restore(_file(b"a") + marker + _file(b"b") + END, tmp_path)


def test_a_device_named_dot_is_refused_not_skipped(tmp_path: Path) -> None:
    device = build_header(b"./", mode=0o644, size=0, mtime=0, typeflag=b"3")
    with pytest.raises(UnsafeMemberError,
                       match=r"member './': character device members are refused "
                             r"\(CF-EXTRACT-05\)"):
        _restore(device + END, tmp_path)


def test_a_file_named_dot_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UnsafeMemberError,
                       match=r"member '\.': a file named as the target directory itself "
                             r"\(CF-EXTRACT-07\)"):
        _restore(_file(b".") + END, tmp_path)


def test_a_directory_named_dot_is_skipped(tmp_path: Path) -> None:
    root = build_header(b"./", mode=0o755, size=0, mtime=0, typeflag=b"5")
    result = _restore(root + _file(b"./a") + END, tmp_path)
    assert result.members == 1
    assert (tmp_path / "out" / "a").read_bytes() == b"hi"
