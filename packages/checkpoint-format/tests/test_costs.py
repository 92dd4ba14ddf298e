"""Small objects that must stay cheap (spec CF-LIMIT-02, issue 15).

Each archive is built here, byte by byte. Costs are judged by what can be counted on a noisy
machine: the peak of traced memory (tracemalloc) against the size of the tar stream, and
wall time only as a generous bound (the quadratic versions took tens of seconds).
"""

from __future__ import annotations

import gzip
import io
import os
import stat
import struct
import time
import tracemalloc
import zlib
from pathlib import Path

import pytest
from checkpoint_format import (
    CorruptArchiveError,
    LimitExceededError,
    Limits,
    UnsafeMemberError,
    WriteRefusedError,
    remove_tree,
    restore,
    validate,
    write_tarball,
)
from checkpoint_format.cli import options_from_env
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

BLOCK = 512
END = bytes(2 * BLOCK)
MIB = 1 << 20


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def header(name: str, typeflag: bytes = b"0", size: int = 0, linkname: str = "") -> bytes:
    block = bytearray(BLOCK)
    block[0:100] = name.encode()[:100].ljust(100, b"\0")
    block[100:108] = _octal(0o755 if typeflag == b"5" else 0o644, 8)
    block[108:124] = _octal(0, 8) * 2
    block[124:136] = _octal(size, 12)
    block[136:148] = _octal(1_700_000_000, 12)
    block[148:156] = b" " * 8
    block[156:157] = typeflag
    block[157:257] = linkname.encode()[:100].ljust(100, b"\0")
    block[257:265] = b"ustar\x0000"
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def record(key: str, value: str) -> bytes:
    body = f" {key}={value}\n".encode()
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length = len(str(length)) + len(body)
    return str(length).encode() + body


def pax(*records: tuple[str, str]) -> bytes:
    data = b"".join(record(key, value) for key, value in records)
    return header("././@PaxHeader", b"x", len(data)) + data + bytes(-len(data) % BLOCK)


def member(name: str, typeflag: bytes = b"0", linkname: str = "") -> bytes:
    records = [("path", name)]
    if linkname:
        records.append(("linkpath", linkname))
    return pax(*records) + header("m", typeflag, linkname="")


def traced(function) -> tuple[object, int, float]:
    """What ``function()`` returns or raises, its peak traced memory, and its seconds."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        try:
            result: object = function()
        except Exception as exc:  # the error is the result under test
            result = exc
        return result, tracemalloc.get_traced_memory()[1], time.perf_counter() - started
    finally:
        tracemalloc.stop()


@pytest.fixture(autouse=True)
def _remove_deep_trees(tmp_path: Path):
    """pytest removes old temporary directories with shutil.rmtree, which recurses on
    Python 3.10-3.12: the deep trees made here are removed here."""
    yield
    remove_tree(tmp_path)


def _staging_left(root: Path) -> list[str]:
    return [entry for entry in os.listdir(root) if ".partial-" in entry]


# --------------------------------------------------------------------------- D1: pax headers


def test_many_pax_headers_of_new_keys_hold_one_header_at_most(tmp_path: Path) -> None:
    # 60 headers of 1 MiB each, every one under max_extended_header: 60 MiB if all were kept.
    tar = b"".join(pax((f"X.{i}", "v" * (MIB - 64))) for i in range(60))
    data = gzip.compress(tar + header("f") + END, 1)
    report, peak, _ = traced(lambda: validate(io.BytesIO(data)))
    assert report.valid and [m.name for m in report.members] == ["f"]
    assert peak < 24 * MIB, peak  # the decode queue alone may hold 8 MiB
    result, peak, _ = traced(lambda: restore(io.BytesIO(data), tmp_path / "t"))
    assert result.members == 1 and peak < 24 * MIB, peak


def test_the_last_of_several_pax_headers_applies(tmp_path: Path) -> None:
    tar = pax(("path", "first")) + pax(("X.k", "v")) + pax(("path", "second")) + header("raw")
    restore(io.BytesIO(tar + END), tmp_path / "t")
    assert os.listdir(tmp_path / "t") == ["second"]


# --------------------------------------------------------------------------- D2: deep names


def deep(prefix: str, depth: int, leaf: str = "f") -> str:
    return prefix + "/" + "a/" * depth + leaf


def test_deep_names_cost_memory_proportional_to_their_length() -> None:
    # 64 files 2,040 levels deep, each under its own top directory: 130,000 directories.
    names = [deep(f"d{i}", 2040) for i in range(64)]
    tar = b"".join(member(name) for name in names) + END
    limits = Limits(max_implied_dirs=1 << 20)
    report, peak, seconds = traced(lambda: validate(io.BytesIO(tar), limits=limits))
    assert report.valid and len(report.members) == 64
    # Every parent's full name would be 64 * 2,040 * 2,040 bytes (266 MB).
    assert peak < 40 * MIB, peak
    assert seconds < 20


def test_implied_directories_are_capped(tmp_path: Path) -> None:
    tar = b"".join(member(deep(f"d{i}", 2040)) for i in range(64)) + END
    with pytest.raises(LimitExceededError) as caught:
        restore(io.BytesIO(gzip.compress(tar, 1)), tmp_path / "t")
    assert caught.value.rule == "CF-LIMIT-01" and caught.value.member == deep("d8", 2040)
    assert "max_implied_dirs=16384" in str(caught.value)
    assert "CHECKPOINT_MAX_IMPLIED_DIRS" in str(caught.value)
    assert not (tmp_path / "t").exists() and _staging_left(tmp_path) == []
    implied = options_from_env({"CHECKPOINT_MAX_IMPLIED_DIRS": "5"})["limits"].max_implied_dirs
    assert implied == 5


def _longest_names_tree(depth: int) -> bytes:
    """A directory, a file, a symbolic link and a hard link to the file, each named
    ``a/`` * ``depth`` + two letters; a shallow file between them (so that not every member
    lies in the directory of the one before)."""
    below = "a/" * depth
    return b"".join([
        member(below + "ff"), member("top"), member(below + "dd", b"5"),
        member(below + "hh", b"1", below + "ff"), member(below + "ss", b"2", "ff"),
    ]) + END


def _check_longest_names_tree(target: Path, depth: int) -> None:
    fd = os.open(target, os.O_RDONLY)
    try:
        for _ in range(depth):
            below = os.open("a", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = below
        assert sorted(os.listdir(fd)) == ["dd", "ff", "hh", "ss"]
        assert os.readlink("ss", dir_fd=fd) == "ff"
        assert os.stat("hh", dir_fd=fd).st_ino == os.stat("ff", dir_fd=fd).st_ino
        made = os.stat("dd", dir_fd=fd)  # its mode and time set last, relative to fd too
        assert stat.S_IMODE(made.st_mode) == 0o755 and made.st_mtime_ns == 1_700_000_000 * 10**9
    finally:
        os.close(fd)


def test_names_of_exactly_max_name_length_restore(tmp_path: Path) -> None:
    # 4,096 bytes, what the limit admits: PATH_MAX counts the NUL, so a path relative to
    # the staging directory failed with ENAMETOOLONG, outside the format's errors.
    tar = _longest_names_tree(2047)
    assert len(("a/" * 2047 + "ff").encode()) == Limits().max_name_length == 4096
    result = restore(io.BytesIO(tar), tmp_path / "t")
    assert result.members == 5
    _check_longest_names_tree(tmp_path / "t", 2047)


def test_names_longer_than_path_max_restore_under_a_raised_limit(tmp_path: Path) -> None:
    tar = _longest_names_tree(5000)  # 10,002-byte names, opened a piece at a time
    limits = Limits(max_name_length=12_000, max_implied_dirs=6_000)
    result = restore(io.BytesIO(gzip.compress(tar, 1)), tmp_path / "t", limits=limits)
    assert result.members == 5
    _check_longest_names_tree(tmp_path / "t", 5000)


def test_a_deep_member_restores_below_its_implied_parents(tmp_path: Path) -> None:
    names = [deep("d", 2040), deep("d", 2040, "g"), deep("e", 1000)]
    tar = b"".join(member(name) for name in names) + END
    result = restore(io.BytesIO(tar), tmp_path / "t")
    assert result.members == 3
    fd = os.open(tmp_path / "t" / "d", os.O_RDONLY)
    try:
        for _ in range(2040):
            below = os.open("a", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = below
        assert sorted(os.listdir(fd)) == ["f", "g"]
        assert stat.S_IMODE(os.stat(fd).st_mode) == 0o755  # implicit parents (CF-EXTRACT-10)
    finally:
        os.close(fd)
    remove_tree(tmp_path / "t")
    assert not (tmp_path / "t").exists()


def test_a_member_below_a_deep_file_is_refused() -> None:
    name = deep("d", 1500)
    tar = member(name) + member(name + "/x") + END
    report = validate(io.BytesIO(tar))
    assert [(v.rule, v.member) for v in report.violations] == [("CF-EXTRACT-08", name + "/x")]


# --------------------------------------------------------------------------- D3: links


def many_links(links: int, depth: int) -> bytes:
    """Links going ``depth`` levels down and up again, each through the previous one
    (chains of 30, within the 40-hop bound): every one stays inside."""
    parts = []
    for i in range(links):
        target = "x/" * depth + "../" * depth + (f"l{i - 1}" if i % 30 else ".")
        parts.append(member(f"l{i}", b"2", target))
    return b"".join(parts) + END


def test_many_links_are_judged_in_linear_time(tmp_path: Path) -> None:
    tar = many_links(201, 800)
    report, peak, seconds = traced(lambda: validate(io.BytesIO(tar)))
    assert report.valid, report.violations
    assert seconds < 10 and peak < 16 * MIB  # the quadratic resolution took 36 s
    result = restore(io.BytesIO(gzip.compress(tar, 1)), tmp_path / "t")
    assert result.members == 201


def chain(length: int) -> bytes:
    """``l0 -> .`` and ``l{i} -> l{i-1}``: resolving the last link takes ``length`` hops."""
    return b"".join(
        member(f"l{i}", b"2", f"l{i - 1}" if i else ".") for i in range(length + 1)
    ) + END


def test_forty_hops_resolve_and_forty_one_are_a_loop() -> None:
    assert validate(io.BytesIO(chain(39))).valid  # l39 takes 39 hops, l0 none
    report = validate(io.BytesIO(chain(41)))
    assert [(v.rule, v.member) for v in report.violations] == [("CF-EXTRACT-03", "l41")]
    assert "loop" in report.violations[0].message


def test_hops_through_a_memoised_link_count_every_time() -> None:
    # 'b' takes 20 hops; 'c' passes through it twice: 2 * (1 + 20) = 42 > 40.
    tar = chain(20)[: -len(END)] + member("c", b"2", "l20/../l20") + END
    report = validate(io.BytesIO(tar))
    assert [(v.rule, v.member) for v in report.violations] == [("CF-EXTRACT-03", "c")]


def forward_chain(length: int) -> bytes:
    """``l{i} -> l{i+1}`` and the last to ``.``: each link waits on the next, ``length``
    deep, before any resolves (``chain`` resolves as it goes)."""
    return b"".join(
        member(f"l{i:05d}", b"2", f"l{i + 1:05d}" if i < length - 1 else ".")
        for i in range(length)
    ) + END


def test_a_long_chain_of_links_is_judged_without_recursion(tmp_path: Path) -> None:
    # Was a RecursionError: each link's resolution nested the next one's.
    length = 5000
    tar = forward_chain(length)
    report, peak, seconds = traced(lambda: validate(io.BytesIO(tar)))
    # l{i} takes length - 1 - i hops: the last 41 links (40 hops at most) resolve.
    loops = [f"l{i:05d}" for i in range(length - 41)]
    assert [(v.rule, v.member) for v in report.violations] == [
        ("CF-EXTRACT-03", name) for name in loops
    ]
    assert all("loop" in v.message for v in report.violations)
    assert seconds < 10 and peak < 8 * len(tar)
    with pytest.raises(UnsafeMemberError) as caught:
        restore(io.BytesIO(tar), tmp_path / "t")
    assert (caught.value.rule, caught.value.member) == ("CF-EXTRACT-03", "l00000")
    assert not (tmp_path / "t").exists() and _staging_left(tmp_path) == []


def test_a_long_chain_of_links_is_refused_by_the_writer(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    length = 3000
    for i in range(length):
        os.symlink(f"l{i + 1:05d}" if i < length - 1 else ".", src / f"l{i:05d}")
    with pytest.raises(WriteRefusedError, match=r"'l00000'.*symbolic link loop.*CF-WRITE-05"):
        write_tarball(src, io.BytesIO())
    for i in range(length - 41):  # keep the 41 that resolve, as a reader would
        (src / f"l{i:05d}").unlink()
    write_tarball(src, io.BytesIO())


def _plain_resolution(links: dict[str, str], name: str) -> str:
    """CF-EXTRACT-03 as the spec words it, no memo: every link met is replaced by its
    target, walked again, one hop count for the whole resolution. ``links`` maps names
    to targets; every other name is a plain component (a directory or nothing)."""
    hops = 0

    def walk(start: list[str], target: str) -> list[str] | str:
        nonlocal hops
        path = list(start)
        for part in target.split("/"):
            if part in ("", "."):
                continue
            if part == "..":
                if not path:
                    return "outside"
                path.pop()
                continue
            candidate = "/".join([*path, part])
            if candidate not in links:
                path.append(part)
                continue
            hops += 1
            if hops > 40:
                return "loop"
            found = walk(path, links[candidate])
            if isinstance(found, str):
                return found
            path = found
        return path

    found = walk(name.split("/")[:-1], links[name])
    return found if isinstance(found, str) else "inside"


_LINK_NAMES = [f"l{i}" for i in range(50)] + [f"d/l{i}" for i in range(4)]
_LINK_PARTS = st.sampled_from(["..", ".", "d", "x", "l0", "l1", "l2", *_LINK_NAMES[3:]])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    links=st.lists(
        st.tuples(st.sampled_from(_LINK_NAMES), st.lists(_LINK_PARTS, min_size=1, max_size=4)),
        min_size=1,
        max_size=60,
        unique_by=lambda pair: pair[0],
    ),
    chained=st.integers(0, 49),
)
def test_link_resolution_matches_the_plain_one(links, chained: int) -> None:
    """Random links (many chained ``l{i} -> l{i+1}``, so that walks nest past the hop
    bound) judged by the reader as the plain, unmemoised resolution judges them."""
    targets = {name: "/".join(parts) for name, parts in links}
    for i in range(chained):  # a chain through the first ``chained`` names, where not set
        targets.setdefault(f"l{i}", f"l{i + 1}")
    tar = member("d", b"5") + b"".join(
        member(name, b"2", target) for name, target in targets.items()
    ) + END
    report = validate(io.BytesIO(tar))
    found = {
        v.member: "loop" if "loop" in v.message else "outside" for v in report.violations
    }
    assert all(v.rule == "CF-EXTRACT-03" for v in report.violations)
    expected = {}
    for name in targets:
        kind = _plain_resolution(targets, name)
        if kind != "inside":
            expected[name] = kind
    assert found == expected


def test_a_link_redirected_by_a_later_link_is_refused_after_the_archive(tmp_path: Path) -> None:
    tar = member("l1", b"2", "sub/l2/../..") + member("sub", b"5") + member("sub/l2", b"2", "..")
    with pytest.raises(UnsafeMemberError) as caught:
        restore(io.BytesIO(tar + END), tmp_path / "t")
    assert (caught.value.rule, caught.value.member) == ("CF-EXTRACT-03", "l1")
    assert "points outside the target" in str(caught.value)
    assert not (tmp_path / "t").exists() and _staging_left(tmp_path) == []


# --------------------------------------------------------------------------- D4: depth


def make_deep_tree(root: Path, depth: int, mode: int = 0o755) -> None:
    """``root/a/a/.../a/f``, ``depth`` levels, made through descriptors (os.makedirs
    recurses once per level)."""
    root.mkdir()
    fd = os.open(root, os.O_RDONLY)
    fds = [fd]
    for _ in range(depth):
        os.mkdir("a", dir_fd=fd)
        fd = os.open("a", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        fds.append(fd)
    os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o444, dir_fd=fd))
    for fd in reversed(fds[1:]):
        os.chmod(fd, mode)
    for fd in fds:
        os.close(fd)


def test_remove_tree_removes_a_deep_read_only_tree(tmp_path: Path) -> None:
    make_deep_tree(tmp_path / "deep", 2500, mode=0o555)  # deeper than PATH_MAX allows
    remove_tree(tmp_path / "deep")
    assert os.listdir(tmp_path) == []
    remove_tree(tmp_path / "deep")  # a missing tree is fine
    (tmp_path / "file").write_bytes(b"x")
    remove_tree(tmp_path / "file")
    assert os.listdir(tmp_path) == []


def test_a_deep_tree_refused_at_its_end_leaves_no_staging(tmp_path: Path) -> None:
    parts, name = [], ""
    for _ in range(1500):
        name = f"{name}a/"
        parts.append(member(name, b"5"))
    tar = b"".join(parts) + member(name + "f") + header("/etc/refused") + END
    with pytest.raises(UnsafeMemberError) as caught:
        restore(io.BytesIO(gzip.compress(tar, 1)), tmp_path / "t")
    assert (caught.value.rule, caught.value.member) == ("CF-EXTRACT-01", "/etc/refused")
    assert os.listdir(tmp_path) == []


def test_a_tree_1500_levels_deep_saves_and_restores(tmp_path: Path) -> None:
    make_deep_tree(tmp_path / "src", 1500)
    sink = io.BytesIO()
    stats = write_tarball(tmp_path / "src", sink)
    assert stats.members == 1501
    result = restore(io.BytesIO(sink.getvalue()), tmp_path / "t")
    assert result.members == 1501
    remove_tree(tmp_path / "t")


# --------------------------------------------------------------------------- D13: messages


def _gzip_member(data: bytes, extra: bytes) -> bytes:
    body = zlib.compressobj(1, zlib.DEFLATED, -15)
    deflated = body.compress(data) + body.flush()
    head = b"\x1f\x8b\x08\x04" + bytes(4) + b"\x00\xff" + struct.pack("<H", len(extra)) + extra
    return head + deflated + struct.pack("<II", zlib.crc32(data), len(data))


def _size_record(length: int, inflated: int) -> bytes:
    return b"FK" + struct.pack("<H", 16) + struct.pack("<QQ", length, inflated)


def test_a_repeated_size_record_is_named_as_repeated(tmp_path: Path) -> None:
    tar = header("f") + END
    extra = _size_record(0, 0) * 2
    data = _gzip_member(tar, extra)
    with pytest.raises(CorruptArchiveError) as caught:
        restore(io.BytesIO(data), tmp_path / "t")
    assert caught.value.rule == "CF-INTEG-06"
    assert "appears twice" in str(caught.value) and "LEN" not in str(caught.value)


def test_a_large_record_past_the_end_is_truncation(tmp_path: Path) -> None:
    tar = header("f") + END
    length = len(_gzip_member(tar, _size_record(0, 0)))
    for claimed in (length + 100, 64 * MIB):  # one cut by its record, one streamed
        data = _gzip_member(tar, _size_record(claimed, len(tar)))
        with pytest.raises(CorruptArchiveError) as caught:
            restore(io.BytesIO(data), tmp_path / "t")
        assert caught.value.rule == "CF-INTEG-01", claimed
        assert f"its record says {claimed} bytes" in str(caught.value)
    # A record that is merely wrong, with the object long enough, disagrees (CF-INTEG-06).
    data = _gzip_member(tar, _size_record(length + 1, len(tar)))
    report = validate(io.BytesIO(data + _gzip_member(b"", b"")))
    assert [v.rule for v in report.violations] == ["CF-INTEG-06"]


# --------------------------------------------------------------------------- property


@st.composite
def shapes(draw: st.DrawFn) -> bytes:
    """Random structures of the three costly kinds, mixed: deep names, links through
    links, runs of pax headers."""
    parts = []
    for index in range(draw(st.integers(1, 40))):
        kind = draw(st.sampled_from(["deep", "link", "pax"]))
        if kind == "deep":
            depth = draw(st.integers(1, 2000))
            parts.append(member(deep(f"d{draw(st.integers(0, 5))}", depth, f"f{index}")))
        elif kind == "link":
            down = draw(st.integers(0, 600))
            via = draw(st.integers(0, max(index - 1, 0)))
            target = "x/" * down + "../" * down + f"l{via}"
            parts.append(member(f"l{index}", b"2", target))
        else:
            count = draw(st.integers(1, 30))
            size = draw(st.integers(10, 64 << 10))
            parts.append(b"".join(pax((f"K.{i}", "v" * size)) for i in range(count)))
            parts.append(header(f"p{index}"))
    return b"".join(parts) + END


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tar=shapes())
def test_cost_stays_proportional_to_the_object(tar: bytes) -> None:
    limits = Limits(max_implied_dirs=1 << 20)
    _, peak, seconds = traced(lambda: validate(io.BytesIO(tar), limits=limits))
    # Linear: a few times the tar stream plus a constant (threads, buffers, the report).
    assert peak < 8 * MIB + 4 * len(tar), (peak, len(tar))
    assert seconds < 5 + len(tar) / MIB, (seconds, len(tar))
