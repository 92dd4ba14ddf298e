"""CF-MARK-04 digests: plain SHA-256 for small files, the piecewise form for large ones."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest
from checkpoint_format import CorruptArchiveError, restore, validate, write_tarball
from checkpoint_format._digest import PIECE, TreeHasher


def _reference(data: bytes) -> str:
    pieces = b"".join(
        hashlib.sha256(data[i : i + PIECE]).digest() for i in range(0, len(data), PIECE)
    )
    return hashlib.sha256(pieces).hexdigest()


@pytest.mark.parametrize("size", [0, 1, PIECE - 1, PIECE, PIECE + 1, 2 * PIECE, 2 * PIECE + 7])
def test_tree_hasher_matches_the_spec_definition(size: int) -> None:
    data = os.urandom(size)
    hasher = TreeHasher()
    for start in range(0, size, 999_983):  # feed across piece boundaries
        hasher.update(data[start : start + 999_983])
    assert hasher.hexdigest() == _reference(data)


def _marked(name: str, data: bytes, records: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT,
                      pax_headers={"FLYTECKPT.version": "1.0"}) as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.pax_headers = records
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_writer_uses_the_piecewise_digest_past_one_piece(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    big, small = os.urandom(2 * PIECE + 12345), os.urandom(1000)
    (src / "big.bin").write_bytes(big)
    (src / "small.bin").write_bytes(small)
    blob = io.BytesIO()
    write_tarball(src, blob)
    with tarfile.open(fileobj=io.BytesIO(blob.getvalue())) as tar:
        headers = {m.name: m.pax_headers for m in tar.getmembers()}
    assert headers["big.bin"]["FLYTECKPT.sha256-pieces"] == _reference(big)
    assert "FLYTECKPT.sha256" not in headers["big.bin"]
    assert headers["small.bin"]["FLYTECKPT.sha256"] == hashlib.sha256(small).hexdigest()
    restore(io.BytesIO(blob.getvalue()), tmp_path / "out")
    assert (tmp_path / "out" / "big.bin").read_bytes() == big
    report = validate(io.BytesIO(blob.getvalue()))
    assert report.valid and report.digests_present == 2


def test_piecewise_digest_mismatch_is_corrupt(tmp_path: Path) -> None:
    data = os.urandom(PIECE + 10)
    blob = _marked("w.bin", data, {"FLYTECKPT.sha256-pieces": _reference(data[::-1])})
    with pytest.raises(CorruptArchiveError,
                       match=r"member 'w.bin': SHA-256 mismatch.*\(CF-INTEG-04\)"):
        restore(io.BytesIO(blob), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_both_digest_records_are_corrupt(tmp_path: Path) -> None:
    data = b"x" * 10
    records = {"FLYTECKPT.sha256": hashlib.sha256(data).hexdigest(),
               "FLYTECKPT.sha256-pieces": _reference(data)}
    with pytest.raises(CorruptArchiveError,
                       match=r"member 'w.bin': both FLYTECKPT.sha256 and "
                             r"FLYTECKPT.sha256-pieces records \(CF-INTEG-02\)"):
        restore(io.BytesIO(_marked("w.bin", data, records)), tmp_path / "out")


def test_marked_member_without_any_digest_is_corrupt(tmp_path: Path) -> None:
    with pytest.raises(CorruptArchiveError,
                       match=r"no FLYTECKPT.sha256 or FLYTECKPT.sha256-pieces record "
                             r"\(CF-MARK-04\)"):
        restore(io.BytesIO(_marked("w.bin", b"x", {})), tmp_path / "out")
