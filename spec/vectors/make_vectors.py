#!/usr/bin/env python3
"""Regenerate the test vectors of the checkpoint format spec (spec/checkpoint-format.md).

    python spec/vectors/make_vectors.py [--out DIR]

Writes small objects under ``<area>/`` (detect, valid, extract, limit, integ, mark, raw, asm) and
the index ``vectors.json`` next to this script, or under ``--out``. The output is
deterministic: every mtime is fixed, gzip headers carry MTIME 0, our writer runs with stored
deflate blocks (level 0, so the bytes do not depend on zlib or ISA-L being used), and the
index is written with sorted keys. Re-running it must give byte-identical files; the test
suite (tests/test_spec_vectors.py) checks that.

Index entries: ``file`` (relative to this directory), ``rule`` (the spec rule the vector
exercises), ``description``, optional ``limits`` (``Limits`` fields to read it with) and
``expect``:

- ``{"kind": "none"}``: no checkpoint (CF-OBJ-03);
- ``{"kind": "raw" | "tarball", "members": [...]}``: restores to exactly these entries of
  the target, each ``{"name", "type": "file"|"dir"|"symlink"|"hardlink", "size"}`` plus
  ``sha256`` (files and hard links: the content), ``linkname`` (links), and where the vector
  is about them ``mode`` and ``mtime_ns``. Directories a reader creates implicitly
  (CF-EXTRACT-10) are listed too. A raw payload restores as the single file ``payload``;
- ``{"kind": "tarball", "error": "<class>", "rule": "CF-...", "member": name or null}``:
  restoring raises that error. ``limit`` names the ``Limits`` field for CF-LIMIT-01 errors.

Standard library only, plus the reference package for its writer and tar header helpers.
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import hashlib
import io
import json
import lzma
import os
import shutil
import struct
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from checkpoint_format import (
    end_piece,
    plan_union,
    scan_tree,
    write_head,
    write_segment,
    write_tarball,
)
from checkpoint_format import padding as gzip_padding
from checkpoint_format._tarheader import (
    BLOCK,
    PAX_GLOBAL,
    build_header,
    padding,
    pax_header,
)

HERE = Path(__file__).resolve().parent
AREAS = ("detect", "valid", "extract", "limit", "integ", "mark", "raw", "asm")
MAX_VECTOR_SIZE = 64 * 1024 - 1
MTIME = 1_700_000_000  # 2023-11-14T22:13:20Z, every header's integer mtime
MTIME_NS = MTIME * 1_000_000_000
END = bytes(2 * BLOCK)  # end-of-archive marker

# --------------------------------------------------------------------------- tar building


def header(
    name: str | bytes,
    typeflag: bytes = b"0",
    *,
    size: int = 0,
    mode: int = 0o644,
    mtime: int = MTIME,
    linkname: str | bytes = b"",
) -> bytes:
    """One valid ustar header block (names longer than 100 bytes are cut: use pax ``path``)."""
    raw_name = name.encode() if isinstance(name, str) else name
    raw_link = linkname.encode() if isinstance(linkname, str) else linkname
    return build_header(
        raw_name, mode=mode, size=size, mtime=mtime, typeflag=typeflag, linkname=raw_link
    )


def with_checksum(block: bytes | bytearray, style: str = "octal") -> bytes:
    """Recompute a block's checksum: ``octal`` (unsigned sum), ``signed`` or ``base256``."""
    block = bytearray(block)
    block[148:156] = b" " * 8
    value = sum(struct.unpack("512b", bytes(block))) if style == "signed" else sum(block)
    if style == "base256":
        block[148:156] = b"\x80" + value.to_bytes(7, "big")
    else:
        block[148:156] = b"%06o\0 " % value
    return bytes(block)


def pax(*records: tuple[str, str]) -> bytes:
    """A pax extended header (type ``x``) for the next member."""
    return pax_header(list(records))


def raw_pax(data: bytes, typeflag: bytes = b"x") -> bytes:
    """An extended header member carrying ``data`` verbatim (for malformed records)."""
    return header("././@PaxHeader", typeflag, size=len(data), mtime=0) + data + padding(len(data))


def marker(version: str = "1.0", *extra: tuple[str, str]) -> bytes:
    """The CF-MARK-01 global header."""
    return pax_header([("FLYTECKPT.version", version), *extra], PAX_GLOBAL)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_member(
    name: str,
    data: bytes,
    *,
    digest: bool | str = True,
    records: tuple[tuple[str, str], ...] = (),
    mode: int = 0o644,
    typeflag: bytes = b"0",
    header_name: str | None = None,
) -> bytes:
    """A regular file: optional pax header (digest, ``records``), ustar header, data, padding."""
    recs = list(records)
    if digest is True:
        recs.append(("FLYTECKPT.sha256", sha(data)))
    elif isinstance(digest, str):
        recs.append(("FLYTECKPT.sha256", digest))
    head = header(
        header_name if header_name is not None else name, typeflag, size=len(data), mode=mode
    )
    return (pax(*recs) if recs else b"") + head + data + padding(len(data))


def dir_member(name: str, mode: int = 0o755, records: tuple[tuple[str, str], ...] = ()) -> bytes:
    return (pax(*records) if records else b"") + header(name, b"5", mode=mode)


def symlink_member(name: str, target: str) -> bytes:
    return header(name, b"2", mode=0o777, linkname=target)


def hardlink_member(name: str, target: str) -> bytes:
    return header(name, b"1", linkname=target)


def marked(*members: bytes) -> bytes:
    """A marked v1 tar stream: marker, members, end-of-archive marker."""
    return marker() + b"".join(members) + END


def legacy(*members: bytes) -> bytes:
    """An unmarked (legacy v1) tar stream."""
    return b"".join(members) + END


def gz(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=9, mtime=0)


def bz(data: bytes) -> bytes:
    return bz2.compress(data, 9)


def xz(data: bytes) -> bytes:
    return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=6)


# --------------------------------------------------------------------------- expectations


def F(name: str, data: bytes, **extra: int) -> dict:
    return {"name": name, "type": "file", "size": len(data), "sha256": sha(data), **extra}


def D(name: str, **extra: int) -> dict:
    return {"name": name, "type": "dir", "size": 0, **extra}


def S(name: str, target: str) -> dict:
    return {"name": name, "type": "symlink", "size": 0, "linkname": target}


def H(name: str, target: str, data: bytes) -> dict:
    return {
        "name": name, "type": "hardlink", "size": len(data), "sha256": sha(data), "linkname": target
    }


def tarball(*members: dict) -> dict:
    return {"kind": "tarball", "members": sorted(members, key=lambda m: m["name"])}


def raw(data: bytes) -> dict:
    return {"kind": "raw", "members": [F("payload", data)]}


def error(cls: str, rule: str, member: str | None, *, limit: str | None = None) -> dict:
    expect = {"kind": "tarball", "error": cls, "rule": rule, "member": member}
    if limit is not None:
        expect["limit"] = limit
    return expect


UNSAFE, LIMIT, CORRUPT, UNSUPPORTED = (
    "UnsafeMemberError",
    "LimitExceededError",
    "CorruptArchiveError",
    "UnsupportedFormatError",
)

# --------------------------------------------------------------------------- trees on disk


def _set_times(path: Path, mtime_ns: int) -> None:
    os.utime(path, ns=(mtime_ns, mtime_ns), follow_symlinks=False)


def build_tree(root: Path, spec: list[tuple]) -> None:
    """Create entries ``(kind, name, arg, mode, mtime_ns)`` in order, then fix dir times."""
    dirs: list[tuple[Path, int]] = []
    for kind, name, arg, mode, mtime_ns in spec:
        path = root / name
        if kind == "dir":
            path.mkdir()
            os.chmod(path, mode)
            dirs.append((path, mtime_ns))
            continue
        if kind == "file":
            path.write_bytes(arg)
            os.chmod(path, mode)
        elif kind == "symlink":
            os.symlink(arg, path)
        elif kind == "hardlink":
            os.link(root / arg, path)
        _set_times(path, mtime_ns)
    for path, mtime_ns in reversed(dirs):  # contents first changed the directory times
        _set_times(path, mtime_ns)


def our_writer(spec: list[tuple], *, chunk_size: int = 4 << 20) -> bytes:
    """The reference writer's output for a tree; level 0 so that the codec does not matter."""
    with tempfile.TemporaryDirectory(prefix="make-vectors-") as scratch:
        root = Path(scratch) / "tree"
        root.mkdir()
        build_tree(root, spec)
        sink = io.BytesIO()
        write_tarball(root, sink, level=0, workers=1, chunk_size=chunk_size)
        return sink.getvalue()


def assembled_pieces(trees: list[list[tuple] | None]) -> list[bytes]:
    """The pieces of the assembled object (spec §9) of contributors' trees, by the reference
    writer (level 0, one thread): ``[head, segment 0, ..., segment N-1, end]``. ``None``: a
    contributor with no tree."""
    with tempfile.TemporaryDirectory(prefix="make-vectors-") as scratch:
        manifests = []
        for rank, spec in enumerate(trees):
            if spec is None:
                manifests.append(None)
                continue
            root = Path(scratch) / f"rank-{rank}"
            root.mkdir()
            build_tree(root, spec)
            manifests.append(scan_tree(root, workers=1))
        plan = plan_union(manifests)
        head = io.BytesIO()
        write_head(plan, head, level=0)
        pieces = [head.getvalue()]
        for rank, manifest in enumerate(manifests):
            segment = io.BytesIO()
            if manifest is not None:
                write_segment(manifest.root, manifest, plan.assigned[rank], segment, workers=1,
                              level=0)
            pieces.append(segment.getvalue())
        return [*pieces, end_piece()]


def _anonymous(info: tarfile.TarInfo) -> tarfile.TarInfo:
    # Upstream keeps the saving user's ids and names; fixed here so that the bytes do not
    # depend on who regenerates the vectors.
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def upstream_sdk(spec: list[tuple]) -> bytes:
    """What the upstream SDK writes for a directory: ``tarfile.open(path, "w:gz")`` and
    ``tar.add(child, arcname=child.name)`` for each top-level child (pax format, float mtimes
    as pax ``mtime`` records, padded to a 10 KiB record, gzip level 9 with FNAME)."""
    with tempfile.TemporaryDirectory(prefix="make-vectors-") as scratch:
        root = Path(scratch) / "tree"
        root.mkdir()
        build_tree(root, spec)
        sink = io.BytesIO()
        # tarfile's "w:gz" stamps the current time into the gzip header; the same GzipFile
        # with MTIME 0 is otherwise byte-for-byte what it writes.
        with (
            gzip.GzipFile("checkpoint.tar.gz", "wb", 9, sink, mtime=0) as gzf,
            tarfile.open(fileobj=gzf, mode="w") as tar,
        ):
            for child in sorted(root.iterdir()):
                tar.add(child, arcname=child.name, filter=_anonymous)
        return sink.getvalue()


def zlib_inflate(member: bytes) -> bytes:
    """What one whole gzip member inflates to."""
    import zlib

    return zlib.decompressobj(wbits=31).decompress(member)


def split_gzip_members(data: bytes) -> list[int]:
    """Offsets at which each member of a multi-member gzip stream ends."""
    import zlib

    ends = []
    pos = 0
    while pos < len(data):
        d = zlib.decompressobj(wbits=31)
        d.decompress(data[pos:])
        assert d.eof
        pos = len(data) - len(d.unused_data)
        ends.append(pos)
    return ends


# --------------------------------------------------------------------------- the vectors


class Vectors:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.index: list[dict] = []

    def add(
        self,
        area: str,
        name: str,
        data: bytes,
        rule: str,
        description: str,
        expect: dict,
        limits: dict | None = None,
    ) -> None:
        assert area in AREAS, area
        assert len(data) <= MAX_VECTOR_SIZE, (name, len(data))
        rel = f"{area}/{name}"
        assert all(entry["file"] != rel for entry in self.index), rel
        path = self.out / area / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        entry = {"file": rel, "rule": rule, "description": description, "expect": expect}
        if limits:
            entry["limits"] = limits
        self.index.append(entry)


HELLO = b"hello, checkpoint\n"


def detect_vectors(v: Vectors) -> None:
    one_file = marked(file_member("hello.txt", HELLO))
    expect_one = tarball(F("hello.txt", HELLO))
    v.add("detect", "empty-object.bin", b"", "CF-OBJ-03", "zero-byte object: no checkpoint",
          {"kind": "none"})
    v.add("raw", "empty-payload.bin", b"", "CF-WRITE-12",
          "what a writer must refuse to store for an empty file or byte string: it reads as"
          " no checkpoint (CF-OBJ-03)", {"kind": "none"})
    v.add("detect", "gzip-tar.tar.gz", gz(one_file), "CF-DETECT-02",
          "gzip magic 1F 8B 08, first decompressed block is a tar header", expect_one)
    v.add("detect", "bzip2-tar.tar.bz2", bz(one_file), "CF-DETECT-02",
          "bzip2 magic BZh9", expect_one)
    v.add("detect", "xz-tar.tar.xz", xz(one_file), "CF-DETECT-02",
          "xz magic FD 37 7A 58 5A 00", expect_one)
    v.add("detect", "plain-tar.tar", one_file, "CF-DETECT-04",
          "uncompressed tar: the first block is a tar header (rule 1)", expect_one)
    bzh0 = b"BZh0" + b"not bzip2: the level digit must be 1..9\n"
    v.add("detect", "bzh0-text.bin", bzh0, "CF-DETECT-02",
          "'BZh0' is not bzip2 magic: uncompressed, and not a tar header: raw", raw(bzh0))
    zeros512 = bytes(512)
    v.add("detect", "zero-block-payload.bin", zeros512, "CF-DETECT-04",
          "uncompressed, first block all zero (upstream's is_tarfile says empty tar): raw",
          raw(zeros512))
    zeros_then_data = bytes(1024) + b"tensor bytes after a zero prefix\n"
    v.add("detect", "zero-prefix-payload.bin", zeros_then_data, "CF-DETECT-04",
          "uncompressed, two zero blocks then data: raw (rule 2 is for compressed objects)",
          raw(zeros_then_data))
    v.add("detect", "gzip-empty-archive.gz", gz(bytes(10240)), "CF-DETECT-04",
          "gzip of 10,240 zero bytes (upstream's empty directory): empty tarball", tarball())
    v.add("detect", "gzip-1024-zeros.gz", gz(bytes(1024)), "CF-DETECT-04",
          "gzip of 1,024 zero bytes (smallest empty archive): empty tarball", tarball())
    v.add("detect", "bzip2-empty-archive.bz2", bz(bytes(10240)), "CF-DETECT-04",
          "bzip2 of 10,240 zero bytes: empty tarball", tarball())
    z512 = gz(bytes(512))
    v.add("detect", "gzip-512-zeros.gz", z512, "CF-DETECT-04",
          "gzip of 512 zero bytes: shorter than an empty archive, raw payload", raw(z512))
    z10752 = gz(bytes(10752))
    v.add("detect", "gzip-10752-zeros.gz", z10752, "CF-DETECT-01",
          "gzip of 10,752 zero bytes: the stream does not end within 10,241 decompressed"
          " bytes, so it is not an empty archive: raw", raw(z10752))
    z1m = gz(bytes(1 << 20))
    v.add("detect", "gzip-1MiB-zeros.gz", z1m, "CF-DETECT-04",
          "gzip of 1 MiB of zeros: a compressed raw payload, not an empty tarball", raw(z1m))
    text = gz(b"step=1200 loss=0.031\n" * 40)
    v.add("detect", "gzip-text.gz", text, "CF-DETECT-04",
          "gzip of non-tar text: raw payload (restored compressed, byte for byte)", raw(text))
    good = gz(one_file)
    bad_hcrc = good[:3] + b"\x02" + good[4:10] + b"\x00\x00" + good[10:]  # FHCRC, wrong CRC16
    v.add("detect", "gzip-corrupt-header.gz", bad_hcrc, "CF-DETECT-04",
          "gzip magic but the header CRC-16 (FHCRC) is wrong: cannot be decoded, raw",
          raw(bad_hcrc))
    bad_flags = good[:3] + b"\xe0" + good[4:]
    v.add("detect", "gzip-reserved-flags.gz", bad_flags, "CF-DETECT-04",
          "gzip magic but reserved FLG bits set (RFC 1952: a decoder must fail): raw",
          raw(bad_flags))
    bad_btype = good[:10] + b"\xff" + good[11:]
    v.add("detect", "gzip-corrupt-deflate.gz", bad_btype, "CF-DETECT-04",
          "gzip header fine, first deflate block has the reserved type 11: raw", raw(bad_btype))
    first_empty = gzip.compress(b"", mtime=0) + gz(one_file)
    v.add("detect", "gzip-empty-first-member.tar.gz", first_empty, "CF-DETECT-04",
          "multi-member gzip whose first member is empty: the stream S still starts with a"
          " tar header", expect_one)
    v7 = bytearray(header("v7.txt", b"\0", size=len(HELLO)))
    v7[257:500] = bytes(243)  # no ustar magic, version, uname, gname, devices, prefix
    v7[329:345] = bytes(16)
    v7 = with_checksum(v7) + HELLO + padding(len(HELLO)) + END
    v.add("detect", "v7-header.tar", v7, "CF-DETECT-03",
          "pre-POSIX (v7) header: no ustar magic, type NUL, valid checksum: tarball",
          tarball(F("v7.txt", HELLO)))
    name = "é-signed.txt".encode()  # bytes >= 0x80 make the signed and unsigned sums differ
    signed = with_checksum(header(name, size=len(HELLO)), "signed")
    signed_tar = legacy(signed + HELLO + padding(len(HELLO)))
    v.add("detect", "signed-checksum.tar", signed_tar, "CF-DETECT-03",
          "checksum field holds the signed-octet sum (old Sun tar): still a tar header",
          tarball(F("é-signed.txt", HELLO)))
    b256 = with_checksum(header("base256.txt", size=len(HELLO)), "base256")
    v.add("detect", "base256-checksum.tar", legacy(b256 + HELLO + padding(len(HELLO))),
          "CF-DETECT-03", "checksum field in base-256 (first byte 0x80)",
          tarball(F("base256.txt", HELLO)))
    spaced = bytearray(header("spaced.txt", size=len(HELLO)))
    spaced[148:156] = b" " * 8
    spaced[148:156] = (b"  %04o\0 " % sum(spaced) if sum(spaced) < 0o10000
                       else b" %05o\0 " % sum(spaced))
    v.add("detect", "spaced-checksum.tar", legacy(bytes(spaced) + HELLO + padding(len(HELLO))),
          "CF-DETECT-03", "octal checksum with leading spaces", tarball(F("spaced.txt", HELLO)))
    bad_sum = bytearray(header("bad.txt", size=len(HELLO)))
    bad_sum[0] ^= 0x01
    bad_sum = bytes(bad_sum) + HELLO + padding(len(HELLO)) + END
    v.add("detect", "bad-checksum-first-block.bin", bad_sum, "CF-DETECT-03",
          "uncompressed, first block's checksum does not verify: not a header, raw payload",
          raw(bad_sum))
    # CF-DETECT-05: classified as a tarball, a later fault is an error, never a raw payload.
    later = gz(marker() + file_member("hello.txt", HELLO) + b"\x01" * 1024)
    v.add("detect", "tarball-then-garbage.tar.gz", later, "CF-DETECT-05",
          "a tarball whose second 'header' is garbage: an error, not a raw payload",
          error(CORRUPT, "CF-INTEG-02", None))
    truncated = gz(one_file)[:-30]
    v.add("detect", "truncated-tarball.tar.gz", truncated, "CF-OBJ-04",
          "a truncated gzip tarball is an error, not 'no checkpoint' and not a raw payload",
          error(CORRUPT, "CF-INTEG-01", None))


def raw_vectors(v: Vectors) -> None:
    text = b"not a tar archive: a raw payload, restored as the file 'payload'\n"
    v.add("raw", "text-payload.bin", text, "CF-RAW-01", "plain bytes: raw payload", raw(text))
    binary = bytes(range(256)) * 8
    v.add("raw", "binary-payload.bin", binary, "CF-RAW-01", "binary bytes: raw payload",
          raw(binary))
    big = bytes(range(251)) * 100
    v.add("raw", "limits-not-applied.bin", big, "CF-RAW-02",
          "a raw payload larger than max_total_size is still restored: limits are for tarballs",
          raw(big), limits={"max_total_size": 16, "max_members": 1})


def mark_vectors(v: Vectors) -> None:
    body = file_member("model.bin", HELLO)
    v.add("mark", "marker-1.0.tar.gz",
          gz(marker("1.0", ("FLYTECKPT.writer", "vectors 1")) + body + END),
          "CF-MARK-01", "marked v1.0 tarball with a writer record", tarball(F("model.bin", HELLO)))
    v.add("mark", "marker-1.7.tar.gz", gz(marker("1.7") + body + END), "CF-MARK-02",
          "a greater minor version is read", tarball(F("model.bin", HELLO)))
    v.add("mark", "marker-2.0.tar.gz", gz(marker("2.0") + body + END), "CF-MARK-02",
          "major version 2: refused, nothing restored", error(UNSUPPORTED, "CF-MARK-02", None))
    v.add("mark", "marker-abc.tar.gz", gz(marker("abc") + body + END), "CF-MARK-02",
          "marker value is not MAJOR.MINOR", error(UNSUPPORTED, "CF-MARK-02", None))
    v.add("mark", "marker-major-only.tar.gz", gz(marker("1") + body + END), "CF-MARK-02",
          "marker value '1' is not MAJOR.MINOR", error(UNSUPPORTED, "CF-MARK-02", None))
    v.add("mark", "legacy-unmarked.tar.gz",
          gz(legacy(dir_member("data"), file_member("data/model.bin", HELLO, digest=False))),
          "CF-MARK-03", "no marker and no digests: legacy v1, read normally",
          tarball(D("data"), F("data/model.bin", HELLO)))
    v.add("mark", "legacy-traversal.tar.gz",
          gz(legacy(file_member("ok.txt", HELLO, digest=False),
                    file_member("../escape.txt", HELLO, digest=False))),
          "CF-MARK-03", "legacy tarballs are read under every rule of section 5",
          error(UNSAFE, "CF-EXTRACT-02", "../escape.txt"))
    v.add("mark", "marked-missing-digest.tar.gz",
          gz(marked(file_member("a.txt", HELLO), file_member("b.txt", HELLO, digest=False))),
          "CF-MARK-04", "marked tarball, regular file without FLYTECKPT.sha256: corrupt",
          error(CORRUPT, "CF-MARK-04", "b.txt"))
    v.add("mark", "legacy-partial-digests.tar.gz",
          gz(legacy(file_member("a.txt", HELLO), file_member("b.txt", HELLO, digest=False))),
          "CF-MARK-04", "CF-MARK-04 does not apply to an unmarked tarball",
          tarball(F("a.txt", HELLO), F("b.txt", HELLO)))
    unknown = (
        marker("1.0", ("FLYTECKPT.foo", "bar"), ("comment", "global comment"))
        + file_member("a.txt", HELLO, records=(
            ("FLYTECKPT.foo", "ignored"), ("comment", "hello"), ("atime", "1.5"),
            ("uname", "someone"), ("SCHILY.xattr.user.x", "y"), ("ctime", "12")))
        + END
    )
    v.add("mark", "unknown-records.tar.gz", gz(unknown), "CF-MARK-05",
          "unknown FLYTECKPT. keys and pax keys a reader does not apply are ignored",
          tarball(F("a.txt", HELLO)))
    applied = marked(
        file_member("long/" + "n" * 120 + ".txt", HELLO,
                    records=(("path", "long/" + "n" * 120 + ".txt"),),
                    header_name="placeholder-name"),
        pax(("linkpath", "long/" + "n" * 120 + ".txt"), ("mtime", "1700000000.5"))
        + symlink_member("link", "placeholder"),
        pax(("size", str(len(HELLO))), ("FLYTECKPT.sha256", sha(HELLO)))
        + header("sized.txt", size=0) + HELLO + padding(len(HELLO)),
        file_member("timed.txt", HELLO, records=(("mtime", "1700000000.123456789"),)),
    )
    exponent = marked(file_member("tiny-time.txt", HELLO, records=(("mtime", "5e-05"),)),
                      file_member("big-time.txt", HELLO, records=(("mtime", "1.7E9"),)))
    v.add("mark", "pax-mtime-exponent.tar.gz", gz(exponent), "CF-MARK-05",
          "pax mtime in exponent notation, as tarfile writes str(float)",
          tarball(F("tiny-time.txt", HELLO, mtime_ns=50_000),
                  F("big-time.txt", HELLO, mtime_ns=MTIME_NS)))
    for key, value in (("path", "everything.txt"), ("size", "5"), ("linkpath", "x")):
        glob = pax_header([("FLYTECKPT.version", "1.0"), (key, value)], PAX_GLOBAL)
        v.add("mark", f"global-{key}.tar.gz", gz(glob + body + END), "CF-MARK-05",
              f"a global header that sets {key!r} for every member is corrupt",
              error(CORRUPT, "CF-INTEG-02", None))
    v.add("mark", "pax-applied.tar.gz", gz(applied), "CF-MARK-05",
          "pax path, linkpath, size and mtime override the ustar fields",
          tarball(D("long", mode=0o755), F("long/" + "n" * 120 + ".txt", HELLO),
                  S("link", "long/" + "n" * 120 + ".txt"), F("sized.txt", HELLO),
                  F("timed.txt", HELLO, mtime_ns=MTIME_NS + 123_456_789)))


def extract_vectors(v: Vectors) -> None:
    def add(name: str, rule: str, description: str, tar: bytes, expect: dict) -> None:
        v.add("extract", name, gz(tar), rule, description, expect)

    ok = file_member("ok.txt", HELLO)
    add("absolute-name.tar.gz", "CF-EXTRACT-01", "absolute member name",
        marked(ok, file_member("/tmp/cf-escape.txt", HELLO)),
        error(UNSAFE, "CF-EXTRACT-01", "/tmp/cf-escape.txt"))
    add("dotdot-name.tar.gz", "CF-EXTRACT-02", "name '../x'",
        marked(ok, file_member("../x", HELLO)), error(UNSAFE, "CF-EXTRACT-02", "../x"))
    add("dotdot-inner.tar.gz", "CF-EXTRACT-02", "name 'a/../../x'",
        marked(ok, file_member("a/../../x", HELLO)), error(UNSAFE, "CF-EXTRACT-02", "a/../../x"))
    add("dotdot-contained.tar.gz", "CF-EXTRACT-02",
        "'a/../b' stays inside but still has a '..' component: refused",
        marked(file_member("a/../b", HELLO)), error(UNSAFE, "CF-EXTRACT-02", "a/../b"))
    add("dotslash-dotdot.tar.gz", "CF-EXTRACT-02", "name './../x'",
        marked(file_member("./../x", HELLO)), error(UNSAFE, "CF-EXTRACT-02", "./../x"))
    add("pax-path-traversal.tar.gz", "CF-EXTRACT-02",
        "safe ustar name, pax 'path' record '../x' overrides it",
        marked(file_member("../x", HELLO, records=(("path", "../x"),), header_name="safe.txt")),
        error(UNSAFE, "CF-EXTRACT-02", "../x"))
    add("symlink-absolute.tar.gz", "CF-EXTRACT-03", "symbolic link to an absolute path",
        marked(symlink_member("etc", "/etc")), error(UNSAFE, "CF-EXTRACT-03", "etc"))
    add("symlink-dotdot.tar.gz", "CF-EXTRACT-03", "symbolic link 'a/up' -> '../..'",
        marked(dir_member("a"), symlink_member("a/up", "../..")),
        error(UNSAFE, "CF-EXTRACT-03", "a/up"))
    add("symlink-empty.tar.gz", "CF-EXTRACT-03", "symbolic link with an empty target",
        marked(symlink_member("empty", "")), error(UNSAFE, "CF-EXTRACT-03", "empty"))
    add("symlink-chain-later.tar.gz", "CF-EXTRACT-03",
        "'l1' -> 'sub/l2/../..' is inside until 'sub/l2' -> '..' appears later in the archive",
        marked(symlink_member("l1", "sub/l2/../.."), dir_member("sub"),
               symlink_member("sub/l2", "..")),
        error(UNSAFE, "CF-EXTRACT-03", "l1"))
    # Each link of a forward chain waits on the next before any resolves: a reader that
    # recurses once per link fails on a long one (CF-LIMIT-02(4)); hops still count exactly.
    forward = [symlink_member(f"c{i:04d}", f"c{i + 1:04d}") for i in range(1099)]
    add("symlink-chain-forward.tar.gz", "CF-EXTRACT-03",
        "1,100 links 'c0000' -> 'c0001' -> ... -> 'c1099' -> '.': the first 1,059 take more"
        " than 40 hops, a loop",
        marked(*forward, symlink_member("c1099", ".")), error(UNSAFE, "CF-EXTRACT-03", "c0000"))
    add("symlink-chain-forward-40.tar.gz", "CF-EXTRACT-03",
        "41 links 'c00' -> 'c01' -> ... -> 'c40' -> '.': 'c00' takes exactly 40 hops, restored",
        marked(*(symlink_member(f"c{i:02d}", f"c{i + 1:02d}") for i in range(40)),
               symlink_member("c40", ".")),
        tarball(*(S(f"c{i:02d}", f"c{i + 1:02d}") for i in range(40)), S("c40", ".")))
    add("symlink-inside.tar.gz", "CF-EXTRACT-03",
        "links that stay inside, one through another link, are restored",
        marked(dir_member("a"), file_member("a/f.txt", HELLO), symlink_member("up", "a/.."),
               symlink_member("a/self", "."), symlink_member("via", "up/a/f.txt")),
        tarball(D("a"), F("a/f.txt", HELLO), S("up", "a/.."), S("a/self", "."),
                S("via", "up/a/f.txt")))
    add("hardlink-later.tar.gz", "CF-EXTRACT-04", "hard link to a member that comes later",
        marked(hardlink_member("h", "f.txt"), file_member("f.txt", HELLO)),
        error(UNSAFE, "CF-EXTRACT-04", "h"))
    add("hardlink-dir.tar.gz", "CF-EXTRACT-04", "hard link to a directory",
        marked(dir_member("d"), hardlink_member("h", "d")), error(UNSAFE, "CF-EXTRACT-04", "h"))
    add("hardlink-symlink.tar.gz", "CF-EXTRACT-04", "hard link to a symbolic link",
        marked(file_member("f.txt", HELLO), symlink_member("s", "f.txt"),
               hardlink_member("h", "s")),
        error(UNSAFE, "CF-EXTRACT-04", "h"))
    add("hardlink-missing.tar.gz", "CF-EXTRACT-04", "hard link to a name not in the archive",
        marked(hardlink_member("h", "nowhere.txt")), error(UNSAFE, "CF-EXTRACT-04", "h"))
    add("hardlink-valid.tar.gz", "CF-EXTRACT-04",
        "hard link to an earlier regular file, named with './'",
        marked(dir_member("d"), file_member("d/f.txt", HELLO), hardlink_member("h", "./d/f.txt")),
        tarball(D("d"), F("d/f.txt", HELLO), H("h", "d/f.txt", HELLO)))
    for flag, label in ((b"3", "chardev"), (b"4", "blockdev"), (b"6", "fifo"),
                        (b"S", "gnu-sparse"), (b"Z", "unknown-type")):
        add(f"type-{label}.tar.gz", "CF-EXTRACT-05", f"member of type {flag.decode()!r} refused",
            marked(ok, header(f"node-{label}", flag)),
            error(UNSAFE, "CF-EXTRACT-05", f"node-{label}"))
    add("pax-gnu-sparse.tar.gz", "CF-EXTRACT-05",
        "pax-format GNU sparse file (GNU.sparse.* records) refused",
        marked(file_member("sparse.bin", HELLO, records=(
            ("GNU.sparse.major", "1"), ("GNU.sparse.minor", "0"),
            ("GNU.sparse.name", "sparse.bin"), ("GNU.sparse.realsize", "4096")))),
        error(UNSAFE, "CF-EXTRACT-05", "sparse.bin"))
    add("regular-type-variants.tar.gz", "CF-EXTRACT-05",
        "type NUL (old regular) and '7' (contiguous) are regular files",
        marked(file_member("nul.txt", HELLO, typeflag=b"\0"),
               file_member("contiguous.txt", HELLO, typeflag=b"7")),
        tarball(F("nul.txt", HELLO), F("contiguous.txt", HELLO)))
    longname = "gnu/" + "l" * 150 + ".txt"
    gnu = header("././@LongLink", b"L", size=len(longname) + 1, mtime=0)
    gnu += longname.encode() + b"\0" + padding(len(longname) + 1)
    add("gnu-longname.tar.gz", "CF-EXTRACT-05",
        "GNU long-name header (type 'L') names the next member",
        marked(dir_member("gnu"), gnu + file_member(longname, HELLO, header_name="short")),
        tarball(D("gnu"), F(longname, HELLO)))
    evil = "../gnu-escape.txt"
    gnu_evil = header("././@LongLink", b"L", size=len(evil) + 1, mtime=0)
    gnu_evil += evil.encode() + b"\0" + padding(len(evil) + 1)
    add("gnu-longname-traversal.tar.gz", "CF-EXTRACT-02",
        "GNU long name '../gnu-escape.txt' overriding a safe ustar name",
        marked(gnu_evil + file_member(evil, HELLO, header_name="safe.txt")),
        error(UNSAFE, "CF-EXTRACT-02", evil))
    add("setuid-cleared.tar.gz", "CF-EXTRACT-06",
        "setuid file 04755 and setgid+sticky directory 03755 restore as 0755",
        marked(dir_member("d", mode=0o3755), file_member("d/tool", HELLO, mode=0o4755)),
        tarball(D("d", mode=0o755), F("d/tool", HELLO, mode=0o755)))
    add("duplicate-file-file.tar.gz", "CF-EXTRACT-07", "two regular files with the same name",
        marked(file_member("a.txt", HELLO), file_member("a.txt", b"other\n")),
        error(UNSAFE, "CF-EXTRACT-07", "a.txt"))
    add("duplicate-normalised.tar.gz", "CF-EXTRACT-07",
        "'a.txt' and './a.txt' are the same name after normalisation",
        marked(file_member("a.txt", HELLO), file_member("./a.txt", HELLO)),
        error(UNSAFE, "CF-EXTRACT-07", "a.txt"))
    add("duplicate-file-dir.tar.gz", "CF-EXTRACT-07", "a file, then a directory of the same name",
        marked(file_member("x", HELLO), dir_member("x")), error(UNSAFE, "CF-EXTRACT-07", "x"))
    add("duplicate-dir-file.tar.gz", "CF-EXTRACT-07", "a directory, then a file of the same name",
        marked(dir_member("x"), file_member("x", HELLO)), error(UNSAFE, "CF-EXTRACT-07", "x"))
    add("duplicate-dir-dir.tar.gz", "CF-EXTRACT-07",
        "two directories of the same name are allowed; the later one's mode wins",
        marked(dir_member("d", mode=0o700), file_member("d/f.txt", HELLO),
               dir_member("d/", mode=0o750)),
        tarball(D("d", mode=0o750), F("d/f.txt", HELLO)))
    add("below-file.tar.gz", "CF-EXTRACT-08", "a member below a regular file",
        marked(file_member("f", HELLO), file_member("f/x", HELLO)),
        error(UNSAFE, "CF-EXTRACT-08", "f/x"))
    add("below-symlink.tar.gz", "CF-EXTRACT-08",
        "a member written through a symbolic link: 'lnk' -> 'sub', then 'lnk/file'",
        marked(dir_member("sub"), symlink_member("lnk", "sub"), file_member("lnk/file", HELLO)),
        error(UNSAFE, "CF-EXTRACT-08", "lnk/file"))
    add("below-hardlink.tar.gz", "CF-EXTRACT-08", "a member below a hard link",
        marked(file_member("f", HELLO), hardlink_member("h", "f"), file_member("h/x", HELLO)),
        error(UNSAFE, "CF-EXTRACT-08", "h/x"))
    c256 = "c" * 256
    add("component-256.tar.gz", "CF-EXTRACT-09", "a 256-byte name component",
        marked(file_member(c256, HELLO, records=(("path", c256),), header_name="c")),
        error(UNSAFE, "CF-EXTRACT-09", c256))
    c255 = "é" * 127 + "c"  # 255 bytes of UTF-8
    add("component-255.tar.gz", "CF-EXTRACT-09", "a 255-byte (UTF-8) name component is fine",
        marked(file_member(c255, HELLO, records=(("path", c255),), header_name="c")),
        tarball(F(c255, HELLO)))
    add("metadata.tar.gz", "CF-EXTRACT-10",
        "modes, nanosecond mtimes, implicit parents (0755), names normalised ('./', '//', '/')",
        marked(
            pax(("mtime", "1700000000.987654321")) + header("./dir//", b"5", mode=0o750),
            file_member("./dir//run.sh", HELLO, mode=0o755,
                        records=(("mtime", "1700000001.000000001"),)),
            file_member("implicit/parent/data.txt", HELLO, mode=0o600),
            dir_member("."),
        ),
        tarball(D("dir", mode=0o750, mtime_ns=MTIME_NS + 987_654_321),
                F("dir/run.sh", HELLO, mode=0o755, mtime_ns=MTIME_NS + 1_000_000_001),
                D("implicit", mode=0o755), D("implicit/parent", mode=0o755),
                F("implicit/parent/data.txt", HELLO, mode=0o600, mtime_ns=MTIME_NS)))
    add("error-after-files.tar.gz", "CF-EXTRACT-11",
        "ten good files, then an unsafe member: nothing of the archive becomes visible",
        marked(*(file_member(f"good-{i}.txt", HELLO) for i in range(10)),
               file_member("../late-escape.txt", HELLO)),
        error(UNSAFE, "CF-EXTRACT-02", "../late-escape.txt"))


def limit_vectors(v: Vectors) -> None:
    def add(name, description, data, expect, limits):
        v.add("limit", name, data, "CF-LIMIT-01", description, expect, limits)

    files = [file_member(f"f{i}.txt", HELLO) for i in range(4)]
    add("max-members.tar.gz", "4 members, max_members=3", gz(marked(*files)),
        error(LIMIT, "CF-LIMIT-01", "f3.txt", limit="max_members"), {"max_members": 3})
    add("max-members-ok.tar.gz", "4 members, max_members=4", gz(marked(*files)),
        tarball(*(F(f"f{i}.txt", HELLO) for i in range(4))), {"max_members": 4})
    nested = gz(marked(file_member("a/b/c/f.txt", HELLO)))
    add("max-implied-dirs.tar.gz", "'a/b/c/f.txt' with no directory members implies 3,"
        " max_implied_dirs=2", nested,
        error(LIMIT, "CF-LIMIT-01", "a/b/c/f.txt", limit="max_implied_dirs"),
        {"max_implied_dirs": 2})
    add("max-implied-dirs-ok.tar.gz", "'a/b/c/f.txt' implies 3 directories,"
        " max_implied_dirs=3", nested,
        tarball(D("a"), D("a/b"), D("a/b/c"), F("a/b/c/f.txt", HELLO)),
        {"max_implied_dirs": 3})
    many = b"".join(pax((f"X.unknown-{i}", "v" * 4000)) for i in range(64))
    v.add("limit", "many-pax-headers.tar.gz", gz(marked(many + file_member("f.txt", HELLO))),
          "CF-LIMIT-02", "64 consecutive pax headers of unknown keys before one member: only"
          " what applies is kept, the member restores", tarball(F("f.txt", HELLO)), None)
    add("max-total-size.tar.gz", "two 18-byte files, max_total_size=30",
        gz(marked(*files[:2])), error(LIMIT, "CF-LIMIT-01", "f1.txt", limit="max_total_size"),
        {"max_total_size": 30})
    declared = header("huge.bin", size=0)
    declared = bytearray(declared)
    declared[124:136] = b"\x80" + (1 << 60).to_bytes(11, "big")
    add("declared-size.tar.gz",
        "a header declares 2^60 bytes that are not there: refused by max_total_size before"
        " any data is read (not reported as truncation)",
        gz(marker() + with_checksum(declared)),
        error(LIMIT, "CF-LIMIT-01", "huge.bin", limit="max_total_size"), None)
    name40 = "n" * 36 + ".txt"
    add("max-name-length.tar.gz", "a 40-byte name, max_name_length=32",
        gz(marked(file_member(name40, HELLO))),
        error(LIMIT, "CF-LIMIT-01", name40, limit="max_name_length"), {"max_name_length": 32})
    add("max-name-length-link.tar.gz", "a 40-byte symbolic link target, max_name_length=32",
        gz(marked(file_member(name40[:20], HELLO), symlink_member("lnk", "./" + "n" * 38))),
        error(LIMIT, "CF-LIMIT-01", "lnk", limit="max_name_length"), {"max_name_length": 32})
    zeros = bytes(256 << 10)
    bomb = bz(marked(file_member("zeros.bin", zeros)))
    add("expansion-ratio.tar.bz2",
        "bzip2: 256 KiB of zeros from ~100 bytes, max_expansion_ratio=100 after 4 KiB",
        bomb, error(LIMIT, "CF-LIMIT-01", "zeros.bin", limit="max_expansion_ratio"),
        {"max_expansion_ratio": 100, "ratio_grace_bytes": 4096})
    add("expansion-ratio-ok.tar.bz2", "the same bzip2 bomb under the default limits",
        bomb, tarball(F("zeros.bin", zeros)), None)
    huge_pax = header("././@PaxHeader", b"x", size=1 << 30, mtime=0)
    add("extended-header-declared.tar.gz",
        "a pax header declares 1 GiB (over the 1 MiB default): refused before it is read",
        gz(marker() + huge_pax), error(LIMIT, "CF-LIMIT-01", None, limit="max_extended_header"),
        None)
    big_pax = pax(("comment", "x" * 2000)) + header("a.txt", size=0) + END
    add("extended-header-small-limit.tar.gz", "a 2 KiB pax header, max_extended_header=1024",
        gz(marker() + big_pax), error(LIMIT, "CF-LIMIT-01", None, limit="max_extended_header"),
        {"max_extended_header": 1024})
    gnu_name = "g" * 3000
    gnu = header("././@LongLink", b"L", size=len(gnu_name) + 1, mtime=0)
    gnu += gnu_name.encode() + b"\0" + padding(len(gnu_name) + 1)
    add("extended-header-gnu.tar.gz", "a 3 KiB GNU long name, max_extended_header=1024",
        gz(marker() + gnu + file_member(gnu_name, HELLO, header_name="g") + END),
        error(LIMIT, "CF-LIMIT-01", None, limit="max_extended_header"),
        {"max_extended_header": 1024})


def integ_vectors(v: Vectors) -> None:
    payload = bytes(range(256)) * 4  # 1 KiB: two blocks of data
    stream = marked(file_member("a.bin", payload), file_member("b.txt", HELLO))
    data_at = stream.index(payload)

    def add(name, rule, description, data, expect):
        v.add("integ", name, data, rule, description, expect)

    add("truncated-mid-data.tar.gz", "CF-INTEG-01",
        "the tar stream ends in the middle of a.bin's data (the gzip stream itself is whole)",
        gz(stream[: data_at + 700]), error(CORRUPT, "CF-INTEG-01", "a.bin"))
    add("truncated-mid-header.tar", "CF-INTEG-01", "the stream ends inside a header block",
        stream[: data_at + 1024 + 100], error(CORRUPT, "CF-INTEG-01", None))
    add("missing-end-marker.tar.gz", "CF-INTEG-01", "no end-of-archive marker at all",
        gz(stream[:-1024]), error(CORRUPT, "CF-INTEG-01", None))
    add("single-zero-block.tar.gz", "CF-INTEG-01", "one zero block instead of two",
        gz(stream[:-512]), error(CORRUPT, "CF-INTEG-01", None))
    add("truncated-gzip.tar.gz", "CF-INTEG-01",
        "the gzip stream is cut inside its last member, while a.bin's data is being read",
        gz(stream)[:-200], error(CORRUPT, "CF-INTEG-01", "a.bin"))
    add("pax-before-end.tar.gz", "CF-INTEG-01",
        "a pax header of keys a reader ignores, then the end-of-archive marker: its member is"
        " missing",
        gz(marked(file_member("a.bin", payload), pax(("comment", "no member follows")))),
        error(CORRUPT, "CF-INTEG-01", None))
    tree = [("file", "a.bin", payload, 0o644, MTIME_NS), ("file", "b.txt", HELLO, 0o644, MTIME_NS)]
    multi = our_writer(tree, chunk_size=512)
    ends = split_gzip_members(multi)
    assert len(ends) >= 4, ends
    add("truncated-member-boundary.tar.gz", "CF-INTEG-01",
        "our writer's multi-member gzip cut exactly after a complete gzip member",
        multi[: ends[len(ends) // 2]], error(CORRUPT, "CF-INTEG-01", None))
    second = stream.index(b"b.txt\0")  # the ustar header block of b.txt
    assert second % BLOCK == 0
    flipped = bytearray(stream)
    flipped[second + 1] ^= 0x20
    add("bad-header-checksum.tar", "CF-INTEG-02",
        "a header after the first fails its checksum", bytes(flipped),
        error(CORRUPT, "CF-INTEG-02", None))
    bad_size = bytearray(header("a.txt", size=len(HELLO)))
    bad_size[124:136] = b"0000000002x\0"
    add("bad-numeric-field.tar", "CF-INTEG-02", "size field is not octal (checksum valid)",
        legacy(with_checksum(bad_size) + HELLO + padding(len(HELLO))),
        error(CORRUPT, "CF-INTEG-02", None))
    malformed = raw_pax(b"99 path=a.txt\n") + header("a.txt", size=len(HELLO))
    add("malformed-pax.tar", "CF-INTEG-02", "pax record whose length runs past the header",
        marker() + malformed + HELLO + padding(len(HELLO)) + END,
        error(CORRUPT, "CF-INTEG-02", None))
    good = gz(stream)
    crc = bytearray(good)
    crc[-8] ^= 0xFF
    add("bad-gzip-crc.tar.gz", "CF-INTEG-03",
        "single-member gzip whose trailer CRC-32 does not match; the deflate data decodes, so"
        " S starts with a tar header: a tarball, then corrupt",
        bytes(crc), error(CORRUPT, "CF-INTEG-03", None))
    isize = bytearray(good)
    isize[-1] ^= 0x01
    add("bad-gzip-isize.tar.gz", "CF-INTEG-03", "gzip trailer ISIZE does not match",
        bytes(isize), error(CORRUPT, "CF-INTEG-03", None))
    stored = bytearray(gzip.compress(stream, compresslevel=0, mtime=0))
    # One stored deflate block: 10 bytes of gzip header and 5 of block header precede the tar
    # bytes. Change a byte of b.txt's padding, which the tar reader ignores: only the CRC-32
    # can tell.
    assert len(stream) < 0xFFFF
    stored[15 + second + BLOCK + 100] ^= 0x55
    add("bad-deflate-data.tar.gz", "CF-INTEG-03",
        "a data byte of a stored deflate block changed: CRC mismatch", bytes(stored),
        error(CORRUPT, "CF-INTEG-03", None))
    first, rest = stream[:BLOCK * 4], stream[BLOCK * 4:]
    second_bz = bytearray(bz(rest))
    second_bz[len(second_bz) // 2] ^= 0x10
    add("bad-bzip2.tar.bz2", "CF-INTEG-03",
        "two bzip2 streams, a bit flipped inside the second: the first decodes to a tar"
        " header, so a tarball, then corrupt", bz(first) + bytes(second_bz),
        error(CORRUPT, "CF-INTEG-03", None))
    second_gz = bytearray(gz(rest))
    second_gz[-8] ^= 0xFF
    add("bad-gzip-crc-second-member.tar.gz", "CF-INTEG-03",
        "two gzip members, the second's CRC-32 is wrong", gz(first) + bytes(second_gz),
        error(CORRUPT, "CF-INTEG-03", None))
    wrong = marked(file_member("a.txt", b"tampered contents\n", digest=sha(HELLO)))
    add("digest-mismatch.tar", "CF-INTEG-04", "content does not match FLYTECKPT.sha256",
        wrong, error(CORRUPT, "CF-INTEG-04", "a.txt"))
    add("digest-mismatch-legacy.tar.gz", "CF-INTEG-04",
        "an unmarked tarball's digest records are verified too",
        gz(legacy(file_member("a.txt", b"tampered contents\n", digest=sha(HELLO)))),
        error(CORRUPT, "CF-INTEG-04", "a.txt"))
    add("data-after-end.tar", "CF-INTEG-05", "non-zero bytes after the end-of-archive marker",
        stream + b"\0" * 512 + b"trailing garbage", error(CORRUPT, "CF-INTEG-05", None))
    add("data-after-end.tar.gz", "CF-INTEG-05",
        "non-zero bytes after the end-of-archive marker, inside the gzip stream",
        gz(stream + bytes(1024) + b"x"), error(CORRUPT, "CF-INTEG-05", None))
    add("garbage-after-gzip.tar.gz", "CF-INTEG-05", "bytes after the last gzip member",
        good + b"junk after the gzip stream", error(CORRUPT, "CF-INTEG-05", None))
    expect_ok = tarball(F("a.bin", payload), F("b.txt", HELLO))
    add("zeros-after-end.tar", "CF-INTEG-05",
        "zero bytes after the end marker (a whole 10 KiB record, then some) are allowed",
        stream + bytes(10240 - len(stream) % 10240) + bytes(100), expect_ok)
    add("zeros-after-gzip.tar.gz", "CF-INTEG-05", "zero bytes after the last gzip member",
        good + bytes(64), expect_ok)

    # CF-WRITE-11 / CF-INTEG-06: the member-size record of our writer's gzip members.
    members = [multi[start:end] for start, end in zip([0, *ends], ends, strict=False)]
    assert all(member[3] & 0x04 and member[12:14] == b"FK" for member in members)
    expect_multi = tarball(F("a.bin", payload), F("b.txt", HELLO))

    def recorded(member: bytes, length: int | None = None, inflated: int | None = None,
                 subfield_length: int = 16) -> bytes:
        """``member`` with its record rewritten (our header: the record's data at 16..32)."""
        old_length, old_inflated = struct.unpack_from("<QQ", member, 16)
        patched = bytearray(member)
        struct.pack_into("<QQ", patched, 16, old_length if length is None else length,
                         old_inflated if inflated is None else inflated)
        struct.pack_into("<H", patched, 14, subfield_length)
        return bytes(patched)

    def swap(index: int, member: bytes) -> bytes:
        return b"".join([*members[:index], member, *members[index + 1:]])

    middle = len(members) // 2
    length, inflated = struct.unpack_from("<QQ", members[middle], 16)
    add("size-record-multi-member.tar.gz", "CF-WRITE-11",
        "our writer's stream of 512-byte slices: every gzip member carries a member-size record",
        multi, expect_multi)
    add("size-record-mixed.tar.gz", "CF-WRITE-11",
        "gzip members with a member-size record, then plain members without one",
        b"".join(members[:middle]) + gz(b"".join(
            zlib_inflate(member) for member in members[middle:])), expect_multi)
    add("size-record-long.tar.gz", "CF-INTEG-06",
        "a gzip member's record says it is one byte longer than it is",
        swap(middle, recorded(members[middle], length=length + 1)),
        error(CORRUPT, "CF-INTEG-06", "a.bin"))
    add("size-record-short.tar.gz", "CF-INTEG-06",
        "a gzip member's record says it is one byte shorter than it is",
        swap(middle, recorded(members[middle], length=length - 1)),
        error(CORRUPT, "CF-INTEG-06", "a.bin"))
    add("size-record-inflated.tar.gz", "CF-INTEG-06",
        "a gzip member's record says it inflates to one byte less than it does",
        swap(middle, recorded(members[middle], inflated=inflated - 1)),
        error(CORRUPT, "CF-INTEG-06", "a.bin"))
    add("size-record-large-wrong.tar.gz", "CF-INTEG-06",
        "a record over 16 MiB (a reader may stream such a member) that disagrees with the member",
        swap(middle, recorded(members[middle], inflated=(32 << 20) + 1)),
        error(CORRUPT, "CF-INTEG-06", None))
    add("size-record-bad-len.tar.gz", "CF-INTEG-06",
        "the member-size subfield's LEN is 15, not 16 (its data still fits the extra field)",
        swap(middle, recorded(members[middle], subfield_length=15)),
        error(CORRUPT, "CF-INTEG-06", "a.bin"))
    last_length = struct.unpack_from("<Q", members[-1], 16)[0]
    add("size-record-past-end.tar.gz", "CF-INTEG-01",
        "the last gzip member's record says it runs 100 bytes past the end of the object",
        swap(len(members) - 1, recorded(members[-1], length=last_length + 100)),
        error(CORRUPT, "CF-INTEG-01", None))
    add("size-record-huge-past-end.tar.gz", "CF-INTEG-01",
        "the last gzip member's record says it is 2^64 - 1 bytes (so a reader may stream it):"
        " the object ends first, truncation",
        swap(len(members) - 1, recorded(members[-1], length=(1 << 64) - 1)),
        error(CORRUPT, "CF-INTEG-01", None))


def valid_vectors(v: Vectors) -> None:
    minimal = [("file", "hello.txt", HELLO, 0o644, MTIME_NS)]
    v.add("valid", "CF-WRITE-minimal.tar.gz", our_writer(minimal), "CF-WRITE-01",
          "the reference writer's output for one file",
          tarball(F("hello.txt", HELLO, mode=0o644, mtime_ns=MTIME_NS)))
    weights = bytes(range(256)) * 16
    ns = MTIME_NS + 123_456_789
    tree = [
        ("dir", "données", None, 0o755, ns),
        ("file", "données/模型.bin", weights, 0o644, ns),
        ("dir", "empty", None, 0o700, ns),
        ("dir", "nested", None, 0o755, ns),
        ("dir", "nested/a", None, 0o755, ns),
        ("dir", "nested/a/b", None, 0o755, ns),
        ("file", "nested/a/b/c.txt", HELLO, 0o600, ns),
        ("hardlink", "nested/z-hard.txt", "nested/a/b/c.txt", 0, ns),
        ("symlink", "link", "nested/a/b/c.txt", 0, ns),
        ("file", "run.sh", b"#!/bin/sh\necho ok\n", 0o755, ns),
        ("file", "zero.bin", b"", 0o644, ns),
    ]
    members = tarball(
        D("données", mode=0o755, mtime_ns=ns), F("données/模型.bin", weights, mtime_ns=ns),
        D("empty", mode=0o700, mtime_ns=ns), D("nested", mtime_ns=ns), D("nested/a"),
        D("nested/a/b"), F("nested/a/b/c.txt", HELLO, mode=0o600, mtime_ns=ns),
        H("nested/z-hard.txt", "nested/a/b/c.txt", HELLO), S("link", "nested/a/b/c.txt"),
        F("run.sh", b"#!/bin/sh\necho ok\n", mode=0o755), F("zero.bin", b""),
    )
    v.add("valid", "writer-tree.tar.gz", our_writer(tree), "CF-WRITE-02",
          "the reference writer: unicode names, empty dir, symlink, hard link, nested dirs,"
          " nanosecond mtimes", members)
    v.add("valid", "writer-multimember.tar.gz", our_writer(tree, chunk_size=512), "CF-WRITE-01",
          "the same tree as a multi-member gzip stream (512-byte slices, stored blocks)", members)
    v.add("valid", "writer-empty-dir.tar.gz", our_writer([]), "CF-MARK-01",
          "the reference writer's output for an empty directory: the end-of-archive marker"
          " alone, no global header (CF-MARK-01's exception)",
          tarball())
    up_ns = MTIME_NS + 250_000_000
    upstream_tree = [
        ("file", "checkpoint.pt", weights, 0o644, up_ns),
        ("dir", "optimizer", None, 0o755, up_ns),
        ("file", "optimizer/state-ü.json", b'{"step": 1200}\n', 0o644, up_ns),
        ("hardlink", "optimizer/state-copy.json", "optimizer/state-ü.json", 0, up_ns),
        ("symlink", "latest", "checkpoint.pt", 0, up_ns),
    ]
    v.add("valid", "upstream-sdk.tar.gz", upstream_sdk(upstream_tree), "CF-MARK-03",
          "upstream Flyte SDK style: tarfile 'w:gz', top-level children added, pax float"
          " mtimes, no marker, no digests",
          tarball(F("checkpoint.pt", weights, mtime_ns=up_ns), D("optimizer", mtime_ns=up_ns),
                  # tarfile adds a directory's entries sorted: the copy comes first and
                  # becomes the file, the original becomes the hard link.
                  F("optimizer/state-copy.json", b'{"step": 1200}\n', mtime_ns=up_ns),
                  H("optimizer/state-ü.json", "optimizer/state-copy.json", b'{"step": 1200}\n'),
                  S("latest", "checkpoint.pt")))
    v.add("valid", "upstream-empty-dir.tar.gz", upstream_sdk([]), "CF-DETECT-04",
          "upstream Flyte SDK style, empty directory: a gzip of one zero 10 KiB record",
          tarball())
    prefix_name = "p" * 120 + "/file.txt"
    ustar = bytearray(header("file.txt", size=len(HELLO)))
    ustar[345:500] = ("p" * 120).encode().ljust(155, b"\0")
    v.add("valid", "ustar-prefix.tar", legacy(with_checksum(ustar) + HELLO + padding(len(HELLO))),
          "CF-EXTRACT-10",
          "a long name split into the ustar prefix and name fields; its parent is implicit",
          tarball(D("p" * 120, mode=0o755), F(prefix_name, HELLO)))


def asm_vectors(v: Vectors) -> None:
    """Assembled objects (spec §9): pieces joined byte by byte."""
    ns = MTIME_NS + 987_654_321
    shard = [bytes([rank]) * 3000 + bytes(range(256)) * (rank + 1) for rank in range(3)]
    config = b'{"layers": 4, "world_size": 3}\n'
    ranks = [
        [("dir", "model", None, 0o755, ns), ("file", "model/shard-0.bin", shard[0], 0o644, ns),
         ("file", "config.json", config, 0o644, ns)],
        [("dir", "model", None, 0o755, ns), ("dir", "model/opt", None, 0o700, ns),
         ("file", "model/opt/state-1.bin", shard[1], 0o600, ns),
         ("symlink", "latest", "model/opt/state-1.bin", 0, ns)],
        [("dir", "model", None, 0o755, ns), ("file", "model/shard-2.bin", shard[2], 0o644, ns),
         ("hardlink", "model/shard-2.alias", "model/shard-2.bin", 0, ns)],
    ]
    union = tarball(
        D("model", mode=0o755, mtime_ns=ns), F("model/shard-0.bin", shard[0], mtime_ns=ns),
        F("config.json", config, mode=0o644), D("model/opt", mode=0o700, mtime_ns=ns),
        F("model/opt/state-1.bin", shard[1], mode=0o600, mtime_ns=ns),
        S("latest", "model/opt/state-1.bin"), F("model/shard-2.bin", shard[2]),
        H("model/shard-2.alias", "model/shard-2.bin", shard[2]),
    )
    pieces = assembled_pieces(ranks)
    v.add("asm", "three-segments.tar.gz", b"".join(pieces), "CF-ASM-01",
          "head, three segments (files, a symlink, a hard link), end piece, joined byte by byte",
          union)
    deep = assembled_pieces([
        [("dir", "x", None, 0o755, ns), ("file", "x/zz.txt", HELLO, 0o644, ns)],
        [("dir", "x", None, 0o755, ns), ("dir", "x/y", None, 0o750, ns),
         ("dir", "x/y/z", None, 0o755, ns), ("file", "x/y/z/f.txt", HELLO, 0o644, ns),
         ("file", "top.txt", HELLO, 0o644, ns)],
    ])
    v.add("asm", "head-directories.tar.gz", b"".join(deep), "CF-ASM-02",
          "the head holds the 1.2 marker and every directory of the union (x, x/y, x/y/z, rank"
          " 1's) before any file; members are in pre-order within each segment, not across",
          tarball(D("x", mtime_ns=ns), D("x/y", mode=0o750, mtime_ns=ns),
                  D("x/y/z", mtime_ns=ns), F("x/zz.txt", HELLO), F("x/y/z/f.txt", HELLO),
                  F("top.txt", HELLO)))
    minimum = 12 << 10  # an object store's minimum part size, scaled down
    padded = [piece + gzip_padding(minimum - len(piece)) for piece in pieces[:-1]]
    assert all(len(piece) == minimum for piece in padded)
    v.add("asm", "padded-pieces.tar.gz", b"".join([*padded, pieces[-1]]), "CF-ASM-06",
          "every piece but the end padded to 12 KiB with padding members (FP records): the"
          " padding adds nothing to the tar stream", union)
    between = (pieces[0] + gzip_padding(26) + gzip_padding(30_000) + pieces[1] + gzip_padding(27)
               + pieces[2] + pieces[3] + gzip_padding(1000) + pieces[4])
    v.add("asm", "padding-between-members.tar.gz", between, "CF-ASM-06",
          "padding members of the smallest size and of 30,000 bytes between pieces",
          union)
    idle = assembled_pieces([ranks[0], [], ranks[2]])
    v.add("asm", "empty-segment.tar.gz",
          b"".join([idle[0], idle[1], gzip_padding(4096), idle[3], idle[4]]), "CF-ASM-03",
          "rank 1 holds nothing: its segment is padding alone",
          tarball(D("model", mode=0o755, mtime_ns=ns), F("model/shard-0.bin", shard[0]),
                  F("config.json", config), F("model/shard-2.bin", shard[2]),
                  H("model/shard-2.alias", "model/shard-2.bin", shard[2])))
    later = ns + 60_000_000_000
    shared = [
        [("file", "config.json", config, 0o644, ns), ("file", "a.bin", shard[0], 0o644, ns)],
        [("file", "config.json", config, 0o644, later), ("file", "b.bin", shard[1], 0o644, ns)],
        [("dir", "d", None, 0o755, ns), ("file", "config.json", config, 0o644, later)],
    ]
    v.add("asm", "duplicate-kept-once.tar.gz", b"".join(assembled_pieces(shared)), "CF-ASM-07",
          "config.json held identically by three ranks (mtimes differ): written once, by rank"
          " 0, with its mtime",
          tarball(F("config.json", config, mtime_ns=ns), F("a.bin", shard[0]),
                  F("b.bin", shard[1]), D("d")))
    linked = [
        [("file", "w.bin", shard[0], 0o644, ns)],
        [("file", "w.bin", shard[0], 0o644, ns), ("hardlink", "w.link", "w.bin", 0, ns)],
    ]
    v.add("asm", "hardlink-across-segments.tar.gz", b"".join(assembled_pieces(linked)),
          "CF-ASM-04",
          "rank 1's hard link names w.bin, which rank 0 writes (identical): the link points"
          " backwards across segments",
          tarball(F("w.bin", shard[0]), H("w.link", "w.bin", shard[0])))
    empty = assembled_pieces([[], None, []])
    assert empty == [b"", b"", b"", b"", end_piece()]
    v.add("asm", "empty-union.tar.gz", b"".join(empty), "CF-ASM-05",
          "no rank holds anything: the end piece alone, no head, no marker", tarball())
    dirs_only = assembled_pieces([[("dir", "a", None, 0o755, ns)], [("dir", "b", None, 0o700, ns)]])
    v.add("asm", "directories-only.tar.gz", b"".join(dirs_only), "CF-ASM-05",
          "only directories: the head and the end piece, empty segments",
          tarball(D("a", mtime_ns=ns), D("b", mode=0o700, mtime_ns=ns)))
    # What readers do with objects whose writer broke the assembly rules.
    twice = assembled_pieces([shared[0], [("file", "config.json", config, 0o644, ns)]])
    rank1 = assembled_pieces([[("file", "config.json", config, 0o644, ns)]])[1]
    v.add("asm", "name-in-two-segments.tar.gz", b"".join([*twice[:3], rank1, twice[-1]]),
          "CF-ASM-04",
          "a writer that ignored CF-ASM-07 wrote config.json in two segments: refused",
          error(UNSAFE, "CF-EXTRACT-07", "config.json"))
    seg_w = assembled_pieces([[("file", "w.bin", shard[0], 0o644, ns)]])
    seg_link = assembled_pieces(linked)
    v.add("asm", "hardlink-forward.tar.gz",
          b"".join([seg_w[0], seg_link[2], seg_w[1], seg_w[2]]), "CF-ASM-04",
          "segments out of order: the hard link precedes the file it names, refused",
          error(UNSAFE, "CF-EXTRACT-04", "w.link"))


GENERATORS: tuple[Callable[[Vectors], None], ...] = (
    detect_vectors, raw_vectors, mark_vectors, extract_vectors, limit_vectors, integ_vectors,
    valid_vectors, asm_vectors,
)


def generate(out: Path) -> list[dict]:
    """Write every vector and the index under ``out``; return the index."""
    out.mkdir(parents=True, exist_ok=True)
    for area in AREAS:
        shutil.rmtree(out / area, ignore_errors=True)
    vectors = Vectors(out)
    for generator in GENERATORS:
        generator(vectors)
    text = json.dumps(vectors.index, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    (out / "vectors.json").write_text(text, encoding="utf-8")
    return vectors.index


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE,
                        help="output directory (default: %(default)s)")
    args = parser.parse_args(argv)
    index = generate(args.out)
    print(f"wrote {len(index)} vectors to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
