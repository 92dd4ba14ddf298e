"""Hostile archives: every attack a tarball can carry, built byte by byte in this file.

Each refused archive must raise exactly the error class of its rule, with ``.rule`` and
``.member`` set and both named in the message, and must leave no trace: the target absent
(or still empty if it existed), no ``.partial-`` staging directory, and nothing new or
changed anywhere under the sandbox around the target (spec §5, CF-EXTRACT-11).
"""

from __future__ import annotations

import bz2
import dataclasses
import gc
import gzip
import hashlib
import io
import os
import stat
import tempfile
import threading
import time
import zlib
from pathlib import Path

import pytest
from checkpoint_format import (
    CheckpointFormatError,
    CorruptArchiveError,
    LimitExceededError,
    Limits,
    UnsafeMemberError,
    restore,
    validate,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

BLOCK = 512
END = bytes(2 * BLOCK)
MTIME = 1_700_000_000
DATA = b"checkpoint bytes\n"

# --------------------------------------------------------------------------- raw tar bytes


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def header(
    name: str | bytes,
    typeflag: bytes = b"0",
    *,
    size: int = 0,
    mode: int = 0o644,
    mtime: int = MTIME,
    linkname: str | bytes = b"",
    fields: dict[int, bytes] | None = None,
) -> bytes:
    """A ustar header block with a correct checksum; ``fields`` overwrite bytes at offsets."""
    raw_name = name.encode() if isinstance(name, str) else name
    raw_link = linkname.encode() if isinstance(linkname, str) else linkname
    block = bytearray(BLOCK)
    block[0:100] = raw_name[:100].ljust(100, b"\0")
    block[100:108] = _octal(mode, 8)
    block[108:116] = _octal(0, 8)
    block[116:124] = _octal(0, 8)
    block[124:136] = _octal(size, 12)
    block[136:148] = _octal(mtime, 12)
    block[156:157] = typeflag
    block[157:257] = raw_link[:100].ljust(100, b"\0")
    block[257:265] = b"ustar\x0000"
    block[329:337] = _octal(0, 8)
    block[337:345] = _octal(0, 8)
    for offset, value in (fields or {}).items():
        block[offset : offset + len(value)] = value
    return fix_checksum(block)


def fix_checksum(block: bytes | bytearray) -> bytes:
    block = bytearray(block)
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def pad(size: int) -> bytes:
    return bytes(-size % BLOCK)


def record(key: str | bytes, value: str | bytes) -> bytes:
    key = key.encode() if isinstance(key, str) else key
    value = value.encode() if isinstance(value, str) else value
    body = b" " + key + b"=" + value + b"\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length = len(str(length)) + len(body)
    return str(length).encode() + body


def extended(payload: bytes, typeflag: bytes = b"x", *, declared: int | None = None) -> bytes:
    size = len(payload) if declared is None else declared
    return header("././@PaxHeader", typeflag, size=size, mtime=0) + payload + pad(len(payload))


def pax(*records: tuple[str | bytes, str | bytes]) -> bytes:
    return extended(b"".join(record(k, v) for k, v in records))


def marker(version: str = "1.0") -> bytes:
    return extended(record("FLYTECKPT.version", version), b"g")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file(
    name: str, data: bytes = DATA, *, mode: int = 0o644, header_name: str | None = None,
    records: tuple = (), digest: str | bool | None = True, typeflag: bytes = b"0",
) -> bytes:
    recs = list(records)
    if digest is True:
        recs.append(("FLYTECKPT.sha256", sha(data)))
    elif isinstance(digest, str):
        recs.append(("FLYTECKPT.sha256", digest))
    head = header(header_name or name, typeflag, size=len(data), mode=mode)
    return (pax(*recs) if recs else b"") + head + data + pad(len(data))


def directory(name: str, mode: int = 0o755) -> bytes:
    return header(name, b"5", mode=mode)


def symlink(name: str, target: str) -> bytes:
    return header(name, b"2", mode=0o777, linkname=target)


def hardlink(name: str, target: str) -> bytes:
    return header(name, b"1", linkname=target)


def gnu_long(name: str, typeflag: bytes = b"L") -> bytes:
    raw = name.encode() + b"\0"
    return header("././@LongLink", typeflag, size=len(raw), mtime=0) + raw + pad(len(raw))


def marked(*members: bytes) -> bytes:
    return marker() + b"".join(members) + END


def gz(data: bytes, level: int = 6) -> bytes:
    return gzip.compress(data, compresslevel=level, mtime=0)


# --------------------------------------------------------------------------- the sandbox


@dataclasses.dataclass
class Sandbox:
    """``root/outer/parent/target``, with bystanders that an escape would disturb."""

    root: Path
    parent: Path
    target: Path

    @classmethod
    def make(cls, root: Path, *, existing_target: bool = False) -> Sandbox:
        parent = root / "outer" / "parent"
        parent.mkdir(parents=True)
        (root / "outer" / "bystander.txt").write_bytes(b"outside the target\n")
        (parent / "neighbour.txt").write_bytes(b"next to the target\n")
        target = parent / "target"
        if existing_target:
            target.mkdir()
        return cls(root, parent, target)

    def snapshot(self) -> dict[str, tuple]:
        entries = {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            for name in dirnames + filenames:
                path = Path(dirpath) / name
                if path == self.target or self.target in path.parents:
                    continue
                st = path.lstat()
                content = path.read_bytes() if stat.S_ISREG(st.st_mode) else None
                link = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
                entries[str(path.relative_to(self.root))] = (st.st_mode, content, link)
        return entries

    def assert_clean(self, before: dict, *, existing_target: bool) -> None:
        assert self.snapshot() == before, "something was written outside the target"
        staging = [p.name for p in self.parent.iterdir() if ".partial-" in p.name]
        assert staging == [], f"staging directory left behind: {staging}"
        if existing_target:
            assert self.target.is_dir() and not self.target.is_symlink()
            assert list(self.target.iterdir()) == [], "pre-existing target is no longer empty"
        else:
            assert not os.path.lexists(self.target), "target exists after a failed restore"


# Absolute names point here, so that an escape would land inside the sandbox's reach.
ABSOLUTE = f"/tmp/cf-hostile-{os.getpid()}-escape.txt"


def assert_refused(
    data: bytes,
    root: Path,
    error: type[CheckpointFormatError],
    rule: str,
    member: str | None,
    *,
    limits: Limits | None = None,
    existing_target: bool = False,
) -> CheckpointFormatError:
    box = Sandbox.make(root, existing_target=existing_target)
    before = box.snapshot()
    with pytest.raises(CheckpointFormatError) as caught:
        restore(io.BytesIO(data), box.target, limits=limits or Limits())
    err = caught.value
    assert type(err) is error, f"{type(err).__name__}: {err}"
    assert err.rule == rule, str(err)
    assert err.member == member, str(err)
    assert f"({rule})" in str(err)
    if member is not None:
        assert repr(member) in str(err)
    box.assert_clean(before, existing_target=existing_target)
    assert not os.path.lexists(ABSOLUTE)
    # The validator sees the same violation (the reader is shared).
    report = validate(io.BytesIO(data), limits=limits or Limits())
    assert rule in {v.rule for v in report.violations}, report.violations
    return err


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    data: bytes
    error: type[CheckpointFormatError]
    rule: str
    member: str | None
    limits: Limits | None = None


OK = file("ok.txt")

CASES = [
    # ---- CF-EXTRACT-01/02: names
    Case("dotdot", marked(OK, file("../x")), UnsafeMemberError, "CF-EXTRACT-02", "../x"),
    Case("inner-dotdot", marked(OK, file("a/../../x")), UnsafeMemberError, "CF-EXTRACT-02",
         "a/../../x"),
    Case("dot-slash-dotdot", marked(file("./../x")), UnsafeMemberError, "CF-EXTRACT-02",
         "./../x"),
    Case("deep-dotdot", marked(file("../../../../../../../../x")), UnsafeMemberError,
         "CF-EXTRACT-02", "../../../../../../../../x"),
    Case("trailing-dotdot-dir", marked(directory("a/..")), UnsafeMemberError, "CF-EXTRACT-02",
         "a/.."),
    Case("absolute", marked(OK, file(ABSOLUTE)), UnsafeMemberError, "CF-EXTRACT-01", ABSOLUTE),
    Case("double-slash-absolute", marked(file("//x")), UnsafeMemberError, "CF-EXTRACT-01", "//x"),
    Case("absolute-dir", marked(directory("/tmp")), UnsafeMemberError, "CF-EXTRACT-01", "/tmp"),
    Case("pax-path-overrides-safe-name",
         marked(file("../x", header_name="safe.txt", records=(("path", "../x"),))),
         UnsafeMemberError, "CF-EXTRACT-02", "../x"),
    Case("pax-path-absolute",
         marked(file(ABSOLUTE, header_name="safe.txt", records=(("path", ABSOLUTE),))),
         UnsafeMemberError, "CF-EXTRACT-01", ABSOLUTE),
    Case("gnu-longname-traversal", marked(gnu_long("../x") + file("../x", header_name="safe")),
         UnsafeMemberError, "CF-EXTRACT-02", "../x"),
    Case("gnu-longname-absolute", marked(gnu_long(ABSOLUTE) + file(ABSOLUTE, header_name="s")),
         UnsafeMemberError, "CF-EXTRACT-01", ABSOLUTE),
    # ---- CF-EXTRACT-03: symbolic links
    Case("symlink-absolute", marked(symlink("l", "/etc")), UnsafeMemberError, "CF-EXTRACT-03",
         "l"),
    Case("symlink-dotdot", marked(symlink("l", "..")), UnsafeMemberError, "CF-EXTRACT-03", "l"),
    Case("symlink-dotdot-nested", marked(directory("a"), symlink("a/l", "../..")),
         UnsafeMemberError, "CF-EXTRACT-03", "a/l"),
    Case("symlink-dotdot-deep", marked(symlink("a/b/l", "../../../outer/bystander.txt")),
         UnsafeMemberError, "CF-EXTRACT-03", "a/b/l"),
    Case("symlink-empty", marked(symlink("l", "")), UnsafeMemberError, "CF-EXTRACT-03", "l"),
    Case("symlink-pax-linkpath",
         marked(pax(("linkpath", "/etc/passwd")) + symlink("l", "harmless")),
         UnsafeMemberError, "CF-EXTRACT-03", "l"),
    Case("symlink-gnu-longlink",
         marked(gnu_long("../../" + "x" * 120, b"K") + symlink("l", "harmless")),
         UnsafeMemberError, "CF-EXTRACT-03", "l"),
    Case("symlink-chain-via-later-link",
         marked(symlink("l1", "sub/l2/../.."), directory("sub"), symlink("sub/l2", "..")),
         UnsafeMemberError, "CF-EXTRACT-03", "l1"),
    Case("symlink-chain-via-earlier-link",
         marked(symlink("up", "."), symlink("l", "up/up/up/..")),
         UnsafeMemberError, "CF-EXTRACT-03", "l"),
    Case("symlink-loop", marked(symlink("a", "b"), symlink("b", "a")), UnsafeMemberError,
         "CF-EXTRACT-03", "a"),
    # ---- CF-EXTRACT-08: writing through a link or below a file
    Case("member-below-symlink",
         marked(directory("sub"), symlink("lnk", "sub"), file("lnk/file")),
         UnsafeMemberError, "CF-EXTRACT-08", "lnk/file"),
    Case("member-below-escaping-symlink-name",
         marked(symlink("lnk", "."), file("lnk/file")),
         UnsafeMemberError, "CF-EXTRACT-08", "lnk/file"),
    Case("member-below-file", marked(file("f"), file("f/x")), UnsafeMemberError,
         "CF-EXTRACT-08", "f/x"),
    Case("dir-below-hardlink", marked(file("f"), hardlink("h", "f"), directory("h/d")),
         UnsafeMemberError, "CF-EXTRACT-08", "h/d"),
    # ---- CF-EXTRACT-04: hard links. A '..' or absolute link target is refused by the name
    # rules (CF-EXTRACT-02/-01) applied to the target, naming the link member.
    Case("hardlink-dotdot", marked(hardlink("h", "../x")), UnsafeMemberError, "CF-EXTRACT-02",
         "h"),
    Case("hardlink-absolute", marked(hardlink("h", "/etc/passwd")), UnsafeMemberError,
         "CF-EXTRACT-01", "h"),
    Case("hardlink-to-later-member", marked(hardlink("h", "f"), file("f")), UnsafeMemberError,
         "CF-EXTRACT-04", "h"),
    Case("hardlink-to-directory", marked(directory("d"), hardlink("h", "d")), UnsafeMemberError,
         "CF-EXTRACT-04", "h"),
    Case("hardlink-to-symlink", marked(file("f"), symlink("s", "f"), hardlink("h", "s")),
         UnsafeMemberError, "CF-EXTRACT-04", "h"),
    Case("hardlink-through-symlink",
         marked(directory("d"), file("d/f"), symlink("s", "d"), hardlink("h", "s/f")),
         UnsafeMemberError, "CF-EXTRACT-04", "h"),
    Case("hardlink-to-implicit-dir", marked(file("d/f"), hardlink("h", "d")),
         UnsafeMemberError, "CF-EXTRACT-04", "h"),
    Case("hardlink-to-itself", marked(hardlink("h", "h")), UnsafeMemberError, "CF-EXTRACT-04",
         "h"),
    # ---- CF-EXTRACT-05: member types
    *(
        Case(f"type-{label}", marked(OK, header(f"node-{label}", flag)), UnsafeMemberError,
             "CF-EXTRACT-05", f"node-{label}")
        for flag, label in (
            (b"3", "chardev"), (b"4", "blockdev"), (b"6", "fifo"), (b"S", "gnu-sparse"),
            (b"V", "volume"), (b"M", "multivolume"), (b"D", "gnu-dumpdir"), (b"A", "unknown"),
            (b"\xff", "high-byte"),
        )
    ),
    Case("type-fifo-with-data", marked(header("fifo", b"6", size=1000) + bytes(1024)),
         UnsafeMemberError, "CF-EXTRACT-05", "fifo"),
    Case("pax-gnu-sparse",
         marked(file("sparse.bin", records=(("GNU.sparse.major", "1"),
                                            ("GNU.sparse.minor", "0"),
                                            ("GNU.sparse.name", "sparse.bin"),
                                            ("GNU.sparse.realsize", "1048576")))),
         UnsafeMemberError, "CF-EXTRACT-05", "sparse.bin"),
    # ---- CF-EXTRACT-07: duplicates
    Case("duplicate-file-file", marked(file("a"), file("a", b"second")), UnsafeMemberError,
         "CF-EXTRACT-07", "a"),
    Case("duplicate-file-dir", marked(file("a"), directory("a")), UnsafeMemberError,
         "CF-EXTRACT-07", "a"),
    Case("duplicate-dir-file", marked(directory("a"), file("a")), UnsafeMemberError,
         "CF-EXTRACT-07", "a"),
    Case("duplicate-symlink-file", marked(symlink("a", "b"), file("a")), UnsafeMemberError,
         "CF-EXTRACT-07", "a"),
    Case("duplicate-after-normalising", marked(file("a/b"), file("./a//b/")),
         UnsafeMemberError, "CF-EXTRACT-07", "a/b"),
    # ---- CF-EXTRACT-09
    Case("component-256", marked(file("d/" + "c" * 256, header_name="x",
                                      records=(("path", "d/" + "c" * 256),))),
         UnsafeMemberError, "CF-EXTRACT-09", "d/" + "c" * 256),
    # ---- CF-MARK
    Case("marked-file-without-digest", marked(file("a"), file("b", digest=None)),
         CorruptArchiveError, "CF-MARK-04", "b"),
    # ---- CF-INTEG-04: content edited, digest kept
    Case("digest-mismatch", marked(file("a", b"edited bytes!\n", digest=sha(DATA))),
         CorruptArchiveError, "CF-INTEG-04", "a"),
    Case("digest-mismatch-gzip", gz(marked(OK, file("b", b"x" * 5000, digest=sha(b"y" * 5000)))),
         CorruptArchiveError, "CF-INTEG-04", "b"),
    # ---- CF-INTEG-02
    Case("bad-numeric-size", marked(header("a", fields={124: b"00000000001x"}) + bytes(512)),
         CorruptArchiveError, "CF-INTEG-02", None),
    Case("malformed-pax-length", marked(extended(b"99 path=a\n") + file("a")),
         CorruptArchiveError, "CF-INTEG-02", None),
    Case("malformed-pax-no-equals", marked(extended(b"10 pathab\n") + file("a")),
         CorruptArchiveError, "CF-INTEG-02", None),
    Case("huge-pax-mtime", marked(file("a", records=(("mtime", "1" + "0" * 30),))),
         CorruptArchiveError, "CF-INTEG-02", "a"),
    Case("huge-base256-mtime",
         marked(header("a", size=len(DATA), fields={136: b"\x80" + (1 << 80).to_bytes(11, "big")})
                + DATA + pad(len(DATA))),
         CorruptArchiveError, "CF-INTEG-02", "a"),
    Case("negative-size",
         marked(header("a", fields={124: b"\xff" * 12})), CorruptArchiveError, "CF-INTEG-02",
         None),
    # ---- CF-INTEG-01: an extended header with no member after it, whatever it holds (pax
    # keeps only the keys it uses, so one of ignored keys used to pass)
    *(
        Case(f"dangling-{label}", marked(OK, extended_header), CorruptArchiveError,
             "CF-INTEG-01", None)
        for label, extended_header in (
            ("pax-ignored-key", pax(("comment", "x"))), ("pax-used-key", pax(("mtime", "1"))),
            ("pax-empty", extended(b"")), ("gnu-longname", gnu_long("x")),
            ("gnu-longlink", gnu_long("x", b"K")),
        )
    ),
    # ---- CF-INTEG-05
    Case("data-after-end", marked(OK) + b"\0" * 100 + b"hidden payload", CorruptArchiveError,
         "CF-INTEG-05", None),
    Case("garbage-after-gzip", gz(marked(OK)) + b"hidden payload", CorruptArchiveError,
         "CF-INTEG-05", None),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_hostile_archive_is_refused(case: Case, tmp_path: Path) -> None:
    assert_refused(case.data, tmp_path, case.error, case.rule, case.member, limits=case.limits)


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, id=c.id) for c in CASES if c.id in ("dotdot", "symlink-chain-via-later-link",
                                                          "digest-mismatch", "data-after-end")],
)
def test_refusal_leaves_an_existing_empty_target_empty(case: Case, tmp_path: Path) -> None:
    assert_refused(case.data, tmp_path, case.error, case.rule, case.member,
                   existing_target=True)


def test_hostile_names_in_plain_tar_and_gzip_alike(tmp_path: Path) -> None:
    tar = marked(OK, file("../x"))
    for i, data in enumerate((tar, gz(tar), bz2.compress(tar))):
        assert_refused(data, tmp_path / str(i), UnsafeMemberError, "CF-EXTRACT-02", "../x")


# --------------------------------------------------------------------------- what is allowed


def _restore_ok(data: bytes, root: Path, limits: Limits | None = None) -> Path:
    box = Sandbox.make(root)
    before = box.snapshot()
    restore(io.BytesIO(data), box.target, limits=limits or Limits())
    assert box.snapshot() == before
    return box.target


def test_dir_dir_duplicate_is_allowed(tmp_path: Path) -> None:
    target = _restore_ok(marked(directory("d"), file("d/f"), directory("d/")), tmp_path)
    assert (target / "d" / "f").read_bytes() == DATA


def test_dir_dir_duplicate_later_metadata_wins(tmp_path: Path) -> None:
    target = _restore_ok(
        marked(directory("d", 0o700), file("d/f"), directory("d", 0o750)), tmp_path
    )
    assert stat.S_IMODE((target / "d").stat().st_mode) == 0o750


def test_setuid_setgid_sticky_are_cleared(tmp_path: Path) -> None:
    target = _restore_ok(
        marked(
            directory("d", 0o3777),
            file("d/suid", mode=0o4755),
            file("d/sgid", mode=0o2750),
            file("d/all", mode=0o7777),
        ),
        tmp_path,
    )
    modes = {
        p.name: stat.S_IMODE(p.stat().st_mode) for p in [target / "d", *(target / "d").iterdir()]
    }
    assert modes == {"d": 0o777, "suid": 0o755, "sgid": 0o750, "all": 0o777}
    for path in [target / "d", *(target / "d").iterdir()]:
        assert path.stat().st_uid == os.getuid()  # ownership is never restored


def test_links_that_stay_inside_are_restored(tmp_path: Path) -> None:
    target = _restore_ok(
        marked(directory("a"), file("a/f"), symlink("a/self", "."), symlink("up", "a/.."),
               symlink("via", "up/a/f"), hardlink("h", "a/f")),
        tmp_path,
    )
    assert (target / "via").read_bytes() == DATA
    assert os.path.samefile(target / "h", target / "a" / "f")


def test_first_header_corrupt_means_raw_payload(tmp_path: Path) -> None:
    # CF-DETECT-04: an uncompressed object whose first block fails its checksum is no tarball.
    data = bytearray(marked(OK))
    data[1] ^= 0x01
    target = _restore_ok(bytes(data), tmp_path)
    assert (target / "payload").read_bytes() == bytes(data)


# --------------------------------------------------------------------------- bombs and limits


def test_too_many_members(tmp_path: Path) -> None:
    data = gz(marked(*(file(f"f{i:03d}") for i in range(50))))
    err = assert_refused(data, tmp_path, LimitExceededError, "CF-LIMIT-01", "f010",
                         limits=Limits(max_members=10))
    assert "max_members=10" in str(err)


def test_total_size_over_the_cap(tmp_path: Path) -> None:
    data = gz(marked(*(file(f"f{i}", bytes(100)) for i in range(5))))
    err = assert_refused(data, tmp_path, LimitExceededError, "CF-LIMIT-01", "f2",
                         limits=Limits(max_total_size=250))
    assert "max_total_size=250" in str(err)


def test_declared_size_is_checked_before_reading(tmp_path: Path) -> None:
    # 8 GiB - 1 declared, nothing follows: the cap fires, not a truncation error.
    huge = header("huge.bin", fields={124: b"77777777777\0"})
    err = assert_refused(gz(marker() + huge), tmp_path, LimitExceededError, "CF-LIMIT-01",
                         "huge.bin", limits=Limits(max_total_size=1 << 30))
    assert "max_total_size=" in str(err)


def test_name_over_max_name_length(tmp_path: Path) -> None:
    name = "n" * 64
    assert_refused(marked(file(name)), tmp_path, LimitExceededError, "CF-LIMIT-01", name,
                   limits=Limits(max_name_length=32))


_BOMB = bz2.compress(marked(file("zeros.bin", bytes(2 << 20))), 9)
_BOMB_LIMITS = Limits(max_expansion_ratio=50, ratio_grace_bytes=64 << 10)


def test_bzip2_bomb_over_expansion_ratio(tmp_path: Path) -> None:
    assert len(_BOMB) < 1024  # 2 MiB of zeros from a few hundred bytes
    box = Sandbox.make(tmp_path)
    before = box.snapshot()
    with pytest.raises(LimitExceededError) as caught:
        restore(io.BytesIO(_BOMB), box.target, limits=_BOMB_LIMITS)
    assert caught.value.rule == "CF-LIMIT-01"
    assert "max_expansion_ratio=50" in str(caught.value)
    box.assert_clean(before, existing_target=False)


def test_bzip2_bomb_error_names_the_member(tmp_path: Path) -> None:
    assert_refused(_BOMB, tmp_path, LimitExceededError, "CF-LIMIT-01", "zeros.bin",
                   limits=_BOMB_LIMITS)


class _Endless(io.RawIOBase):
    """``head``, then zero bytes up to ``total``; counts what the reader asked for."""

    def __init__(self, head: bytes, total: int) -> None:
        self._head = head
        self._left = total
        self.served = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self._left)
        chunk = (self._head[:n] + bytes(max(0, n - len(self._head))))[:n]
        self._head = self._head[len(chunk):]
        buffer[:n] = chunk
        self._left -= n
        self.served += n
        return n


@pytest.mark.parametrize(
    ("label", "typeflag"), [("pax-local", b"x"), ("pax-global", b"g"), ("gnu-longname", b"L")]
)
def test_huge_extended_header_fails_before_it_is_read(
    label: str, typeflag: bytes, tmp_path: Path
) -> None:
    head = marker() + header("././@PaxHeader", typeflag, size=0, fields={124: b"77777777777\0"})
    source = _Endless(head, 256 << 20)
    box = Sandbox.make(tmp_path)
    before = box.snapshot()
    with pytest.raises(LimitExceededError) as caught:
        restore(io.BufferedReader(source), box.target, limits=Limits())
    assert caught.value.rule == "CF-LIMIT-01"
    assert caught.value.member is None  # the member it would describe was never reached
    assert "max_extended_header=1048576" in str(caught.value)
    # A bounded read-ahead is fine; reading the declared 8 GiB (or our 256 MiB) is not.
    assert source.served <= 32 << 20, f"read {source.served} bytes of a header it must refuse"
    box.assert_clean(before, existing_target=False)


def _decode_threads() -> int:
    return sum(t.name == "checkpoint-decode" and t.is_alive() for t in threading.enumerate())


def test_no_decode_thread_outlives_a_failed_restore(tmp_path: Path) -> None:
    before = _decode_threads()
    head = marker() + header("././@PaxHeader", b"x", size=0, fields={124: b"77777777777\0"})
    source = io.BufferedReader(_Endless(head, 256 << 20))
    with pytest.raises(LimitExceededError):
        restore(source, tmp_path / "target", limits=Limits())
    gc.collect()
    deadline = time.monotonic() + 2
    while _decode_threads() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _decode_threads() == before


# --------------------------------------------------------------------------- truncation


def _sample_tree() -> bytes:
    return marked(
        directory("d"),
        file("d/a.bin", bytes(range(256)) * 9),
        file("d/b.txt", b"tail\n" * 50, records=(("mtime", "1700000000.5"),)),
        symlink("lnk", "d/b.txt"),
        file("c" * 120, header_name="c", records=(("path", "c" * 120),)),
    )


_TAR = _sample_tree()
_GZ = gz(_TAR, 1)


def _first_decodable(data: bytes) -> int:
    """The shortest prefix of a gzip stream that decodes to a whole tar header block."""
    for n in range(10, len(data)):
        out = zlib.decompressobj(wbits=31).decompress(data[:n])
        if len(out) >= BLOCK:
            return n
    raise AssertionError("never decodes a block")


def _cuts(length: int, start: int, count: int = 20) -> list[int]:
    step = (length - 1 - start) / (count - 1)
    return sorted({start + round(i * step) for i in range(count)} | {length - 1})


_TAR_CUTS = [*_cuts(len(_TAR), BLOCK), len(_TAR) - BLOCK, len(_TAR) - BLOCK - 1, 2 * BLOCK]
_GZ_CUTS = [*_cuts(len(_GZ), _first_decodable(_GZ)), len(_GZ) - 4, len(_GZ) - 8]


def _assert_truncation_refused(data: bytes, root: Path) -> None:
    box = Sandbox.make(root)
    before = box.snapshot()
    try:
        restore(io.BytesIO(data), box.target, limits=Limits())
    except CheckpointFormatError as err:
        assert type(err) is CorruptArchiveError, repr(err)
        assert err.rule in ("CF-INTEG-01", "CF-INTEG-03"), str(err)
        assert f"({err.rule})" in str(err)
    else:
        pytest.fail(f"a {len(data)}-byte truncation restored without error")
    box.assert_clean(before, existing_target=False)


@pytest.mark.parametrize("cut", sorted(set(_TAR_CUTS)))
def test_truncated_plain_tar(cut: int, tmp_path: Path) -> None:
    _assert_truncation_refused(_TAR[:cut], tmp_path)


@pytest.mark.parametrize("cut", sorted(set(_GZ_CUTS)))
def test_truncated_gzip(cut: int, tmp_path: Path) -> None:
    _assert_truncation_refused(_GZ[:cut], tmp_path)


def test_truncation_of_a_multi_member_gzip_at_a_member_boundary(tmp_path: Path) -> None:
    members = [gz(_TAR[i : i + 1024]) for i in range(0, len(_TAR), 1024)]
    for keep in range(1, len(members)):
        _assert_truncation_refused(b"".join(members[:keep]), tmp_path / str(keep))


def test_truncation_inside_data_names_the_member(tmp_path: Path) -> None:
    tar = marked(file("big.bin", bytes(4096)))
    cut = tar.index(bytes(4096)) + 1000
    assert_refused(tar[:cut], tmp_path, CorruptArchiveError, "CF-INTEG-01", "big.bin")


# --------------------------------------------------------------------------- bit flips


def test_gzip_crc_flip_is_corrupt(tmp_path: Path) -> None:
    # Large enough that the decoder hands out the first header before it meets the trailer.
    data = bytearray(gz(marked(file("zeros.bin", bytes(5 << 20)))))
    data[-8] ^= 0x01
    # The fault is found while the member's last data is being inflated: it is named.
    assert_refused(bytes(data), tmp_path, CorruptArchiveError, "CF-INTEG-03", "zeros.bin")


def test_gzip_crc_flip_small_archive_is_corrupt(tmp_path: Path) -> None:
    data = bytearray(gz(marked(OK)))
    data[-8] ^= 0x01
    # Decoded in one call: the fault is found before any member is read.
    assert_refused(bytes(data), tmp_path, CorruptArchiveError, "CF-INTEG-03", None)


def test_header_checksum_flip_is_corrupt(tmp_path: Path) -> None:
    tar = bytearray(marked(OK, file("second.txt")))
    at = tar.index(b"second.txt\0")
    tar[at] ^= 0x04  # the name byte: checksum no longer verifies
    assert_refused(bytes(tar), tmp_path, CorruptArchiveError, "CF-INTEG-02", None)


def test_digest_mismatch_after_editing_content(tmp_path: Path) -> None:
    tar = bytearray(marked(file("weights.bin", bytes(range(256)) * 4)))
    at = tar.index(bytes(range(256)))
    tar[at + 700] ^= 0xFF  # the pax digest still describes the original bytes
    assert_refused(bytes(tar), tmp_path, CorruptArchiveError, "CF-INTEG-04", "weights.bin")


# --------------------------------------------------------------------------- leaks found


def _assert_only_format_errors(data: bytes, root: Path) -> None:
    """restore either succeeds or raises a CheckpointFormatError, cleanly."""
    box = Sandbox.make(root)
    before = box.snapshot()
    try:
        restore(io.BytesIO(data), box.target, limits=Limits())
    except CheckpointFormatError:
        box.assert_clean(before, existing_target=False)
    else:
        assert box.snapshot() == before


_LEAKS = {
    "nul-in-pax-path": (
        marked(file("a", records=(("path", "a\0b"),))),
        "BUG: a pax path containing NUL raises ValueError('embedded null byte') from"
        " os.open instead of a CheckpointFormatError, and validate() reports the archive valid",
    ),
    "non-ascii-digit-pax-size": (
        marked(file("a", records=(("size", "\u00b2"),))),
        "BUG: pax size '\u00b2' passes str.isdigit() but int() rejects it: ValueError leaks"
        " from restore() and validate() instead of CF-INTEG-02",
    ),
}


@pytest.mark.parametrize(
    "data",
    [pytest.param(d, id=k) for k, (d, _reason) in _LEAKS.items()],
)
def test_no_foreign_exception_leaks(data: bytes, tmp_path: Path) -> None:
    _assert_only_format_errors(data, tmp_path)


def test_name_near_max_name_length_restores(tmp_path: Path) -> None:
    name = "/".join(["d" * 200] * 20) + "/" + "e" * 60  # 4,080 bytes, components <= 255
    target = _restore_ok(marked(file(name, header_name="x", records=(("path", name),))), tmp_path)
    # The absolute path is over PATH_MAX: read it relative to the target, as the extractor writes.
    fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with open(os.open(name, os.O_RDONLY, dir_fd=fd), "rb") as restored:
            assert restored.read() == DATA
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- fuzz


_FUZZ_TAR = marked(
    directory("d"),
    file("d/a.txt", b"alpha\n" * 3),
    symlink("d/l", "a.txt"),
    hardlink("h", "d/a.txt"),
    file("b.bin", bytes(range(40))),
)
@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    """Mutations of the tar stream past its first block (so that it stays a tarball and the
    mutation reaches the member parser), sent plain or gzipped; or of the gzip bytes."""
    how_sent = draw(st.sampled_from(["plain", "gzip-of-mutated", "mutated-gzip"]))
    data = bytearray(gz(_FUZZ_TAR, 0) if how_sent == "mutated-gzip" else _FUZZ_TAR)
    lowest = 0 if how_sent == "mutated-gzip" else BLOCK
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(lowest, len(data) - 1))
        how = draw(st.sampled_from(["byte", "bit", "digit", "zero", "cut"]))
        if how == "byte":
            data[at] = draw(st.integers(0, 255))
        elif how == "bit":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif how == "digit":  # keeps octal fields and pax lengths plausible
            data[at] = draw(st.sampled_from(b"0178 \0/.x"))
        elif how == "zero":
            n = draw(st.integers(1, 64))
            data[at : at + n] = bytes(len(data[at : at + n]))
        else:
            del data[at:]
            break
    if how_sent == "gzip-of-mutated":
        return gz(bytes(data), 1)
    return bytes(data)


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(data=_mutated())
def test_fuzzed_archives_raise_only_format_errors(data: bytes) -> None:
    with tempfile.TemporaryDirectory(prefix="cf-fuzz-") as scratch:
        _assert_only_format_errors(data, Path(scratch))
    report = validate(io.BytesIO(data), limits=Limits())  # the validator never crashes either
    assert all(v.rule.startswith("CF-") for v in report.violations)
