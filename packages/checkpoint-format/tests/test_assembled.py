"""Assembled objects (spec §9): trees scanned, their union planned, head + segments + end
written as separate pieces and joined byte by byte, then restored, validated and read by
Python's tarfile exactly as one tarball of the union would be."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import random
import shutil
import stat
import struct
import tarfile
import zlib
from pathlib import Path

import pytest
from checkpoint_format import (
    CheckpointFormatError,
    LimitExceededError,
    Limits,
    UnionConflictError,
    WriteRefusedError,
    end_piece,
    padding,
    plan_union,
    restore,
    scan_tree,
    sniff,
    validate,
    write_head,
    write_segment,
    write_tarball,
)
from checkpoint_format.cli import main as cli_main

T0 = 1_700_000_000_123_456_789


def make(root: Path, spec: dict[str, object], *, mtime_ns: int = T0) -> Path:
    """Build ``spec`` (name -> bytes | "dir" | ("link", target) | ("hard", name)) under
    ``root``, every entry at ``mtime_ns``."""
    root.mkdir(parents=True)
    for name, what in spec.items():
        path = root / name
        if what == "dir":
            path.mkdir(parents=True, exist_ok=True)
        elif isinstance(what, bytes):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(what)
        elif what[0] == "link":
            path.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(what[1], path)
        elif what[0] == "hard":
            os.link(root / what[1], path)
    for path in sorted(root.rglob("*"), key=lambda p: -len(p.parts)):
        os.utime(path, ns=(mtime_ns, mtime_ns), follow_symlinks=False)
    return root


def pieces(roots: list[Path | None], *, level: int | str = "auto") -> list[bytes]:
    """The pieces of the assembled object of ``roots``: head, one segment each, end."""
    manifests = [scan_tree(root) if root is not None else None for root in roots]
    plan = plan_union(manifests)
    head = io.BytesIO()
    assert write_head(plan, head, level=level) == len(head.getvalue())
    out = [head.getvalue()]
    for rank, manifest in enumerate(manifests):
        segment = io.BytesIO()
        if manifest is None:
            assert plan.assigned[rank] == ()
            out.append(b"")
            continue
        written = write_segment(
            manifest.root, manifest, plan.assigned[rank], segment, level=level, chunk_size=4096
        )
        assert written == len(segment.getvalue())
        out.append(segment.getvalue())
    out.append(end_piece())
    return out


def members_of(piece: bytes) -> list[bytes]:
    """The gzip members of a piece."""
    found = []
    while piece:
        decompressor = zlib.decompressobj(wbits=31)
        decompressor.decompress(piece)
        assert decompressor.eof
        cut = len(piece) - len(decompressor.unused_data)
        found.append(piece[:cut])
        piece = piece[cut:]
    return found


def tree_of(root: Path, *, mtime_us: bool = False) -> dict[str, tuple]:
    """What a restore must reproduce: kind, content, permission bits, mtime (and, for
    hard links, which names share an inode). ``mtime_us``: mtimes to the microsecond, as
    tarfile keeps them (float seconds)."""
    result: dict[str, tuple] = {}
    inodes: dict[int, str] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        rel = path.relative_to(root).as_posix()
        mtime = round(st.st_mtime_ns, -3) if mtime_us else st.st_mtime_ns
        if stat.S_ISLNK(st.st_mode):
            result[rel] = ("link", os.readlink(path))
        elif stat.S_ISDIR(st.st_mode):
            result[rel] = ("dir", stat.S_IMODE(st.st_mode), mtime)
        else:
            shared = inodes.setdefault(st.st_ino, rel) if st.st_nlink > 1 else None
            result[rel] = ("file", path.read_bytes(), stat.S_IMODE(st.st_mode), mtime, shared)
    return result


def restored(data: bytes, target: Path) -> dict[str, tuple]:
    result = restore(io.BytesIO(data), target)
    assert result.kind == "tarball"
    return tree_of(target) if target.exists() else {}


@pytest.fixture
def three_ranks(tmp_path: Path) -> tuple[list[Path], Path]:
    """Three ranks' trees and the union they make, built by hand."""
    rng = random.Random(18)
    shard = [rng.randbytes(20_000 + 997 * rank) for rank in range(3)]
    common = {"model": "dir", "config.json": b'{"layers": 4}\n'}
    r0 = make(tmp_path / "r0", {**common, "model/shard-0.bin": shard[0], "step": b"1200\n"})
    r1 = make(tmp_path / "r1", {
        **common, "model/shard-1.bin": shard[1], "model/extra": "dir",
        "model/extra/notes.txt": b"rank one\n", "latest": ("link", "model/shard-1.bin"),
    })
    r2 = make(tmp_path / "r2", {
        "model": "dir", "model/shard-2.bin": shard[2],
        "model/shard-2.copy": ("hard", "model/shard-2.bin"),
    })
    union = make(tmp_path / "union", {
        **common, "model/shard-0.bin": shard[0], "step": b"1200\n",
        "model/shard-1.bin": shard[1], "model/extra": "dir",
        "model/extra/notes.txt": b"rank one\n", "latest": ("link", "model/shard-1.bin"),
        "model/shard-2.bin": shard[2], "model/shard-2.copy": ("hard", "model/shard-2.bin"),
    })
    return [r0, r1, r2], union


# --------------------------------------------------------------------------- round trips


def test_three_segments_restore_the_union(three_ranks, tmp_path):
    roots, union = three_ranks
    data = b"".join(pieces(roots))  # CF-ASM-01
    assert restored(data, tmp_path / "out") == tree_of(union)
    report = validate(io.BytesIO(data))
    assert report.valid, report.violations
    assert report.format_version == "1.2"  # CF-ASM-02
    assert report.digests_present == 6
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:  # upstream's reader
        names = tar.getnames()
        tar.extractall(tmp_path / "tarfile", filter="fully_trusted")
    assert names[0] == "model"  # the head's directories first, then rank by rank
    assert len(names) == len(set(names)) == len(tree_of(union))
    assert tree_of(tmp_path / "tarfile", mtime_us=True) == tree_of(union, mtime_us=True)


def test_the_plan_is_deterministic_and_picklable(three_ranks):
    roots, _ = three_ranks
    manifests = [scan_tree(root) for root in roots]
    plan = plan_union(manifests)
    again = plan_union(pickle.loads(pickle.dumps(manifests)))
    assert plan == again == pickle.loads(pickle.dumps(plan))
    assert plan.directories == ("model", "model/extra")
    assert plan.assigned == (
        ("config.json", "model/shard-0.bin", "step"),
        ("latest", "model/extra/notes.txt", "model/shard-1.bin"),
        ("model/shard-2.bin", "model/shard-2.copy"),
    )
    assert plan.shared == (("config.json", (0, 1)),)
    assert plan.members == 10 and not plan.empty


def test_level_zero_pieces_are_reproducible(three_ranks):
    roots, _ = three_ranks
    assert pieces(roots, level=0) == pieces(roots, level=0)  # CF-WRITE-09


def test_identical_entries_are_written_once_by_the_lowest_rank(tmp_path):
    later = T0 + 5_000_000_000
    r0 = make(tmp_path / "r0", {"cfg": b"same\n", "d": "dir"})
    r1 = make(tmp_path / "r1", {"cfg": b"same\n", "d": "dir"}, mtime_ns=later)
    os.chmod(r1 / "d", 0o700)
    plan = plan_union([scan_tree(r0), scan_tree(r1)])
    assert plan.assigned == (("cfg",), ())
    assert plan.directory_entries[0].mode == 0o755  # the lowest rank's metadata
    out = restored(b"".join(pieces([r0, r1])), tmp_path / "out")
    assert out["cfg"][3] == T0 and out["d"] == ("dir", 0o755, T0)


def test_the_same_files_from_a_shared_directory_are_stored_once(tmp_path):
    shared = make(tmp_path / "node-local", {"a": b"x" * 5000, "sub": "dir", "sub/b": b"y"})
    plan = plan_union([scan_tree(shared), scan_tree(shared), scan_tree(shared)])
    assert plan.assigned == (("a", "sub/b"), (), ())
    data = b"".join(pieces([shared, shared, shared]))
    assert restored(data, tmp_path / "out") == tree_of(shared)


def test_hard_links_across_segments_point_backwards(tmp_path):
    """Rank 1's link names a file rank 0 writes (identical content): CF-ASM-04."""
    blob = b"weights" * 1000
    r0 = make(tmp_path / "r0", {"w.bin": blob})
    r1 = make(tmp_path / "r1", {"w.bin": blob, "w.link": ("hard", "w.bin")})
    plan = plan_union([scan_tree(r0), scan_tree(r1)])
    assert plan.assigned == (("w.bin",), ("w.link",))
    out = tmp_path / "out"
    restored(b"".join(pieces([r0, r1])), out)
    assert os.path.samefile(out / "w.bin", out / "w.link")
    assert (out / "w.link").read_bytes() == blob


def test_a_hard_link_and_an_identical_file_are_the_same_entry(tmp_path):
    blob = b"z" * 3000
    r0 = make(tmp_path / "r0", {"a": blob, "b": ("hard", "a")})
    r1 = make(tmp_path / "r1", {"b": blob})
    plan = plan_union([scan_tree(r0), scan_tree(r1)])
    assert plan.assigned == (("a", "b"), ())
    assert plan.shared == (("b", (0, 1)),)


def test_large_files_use_piecewise_digests_and_round_trip(tmp_path):
    rng = random.Random(5)
    big = rng.randbytes((4 << 20) + 12345)  # past one piece: CF-MARK-04's piecewise form
    r0 = make(tmp_path / "r0", {"big.bin": big, "small": b"s"})
    r1 = make(tmp_path / "r1", {"other.bin": rng.randbytes(70_000)})
    manifest = scan_tree(r0, workers=2)
    single = io.BytesIO()
    write_tarball(r0, single)
    with tarfile.open(fileobj=io.BytesIO(single.getvalue())) as tar:
        expected = {m.name: m.pax_headers for m in tar.getmembers()}
    big_entry = manifest.entry("big.bin")
    assert big_entry.digest_key == "FLYTECKPT.sha256-pieces"
    assert expected["big.bin"][big_entry.digest_key] == big_entry.digest
    assert expected["small"]["FLYTECKPT.sha256"] == manifest.entry("small").digest
    data = b"".join(pieces([r0, r1]))
    out = restored(data, tmp_path / "out")
    assert out["big.bin"][1] == big


def test_rank_without_a_tree_and_ranks_with_nothing_of_their_own(tmp_path):
    r0 = make(tmp_path / "r0", {"only": b"rank zero\n"})
    empty = make(tmp_path / "r2", {})
    plan = plan_union([scan_tree(r0), None, scan_tree(empty)])
    assert plan.assigned == (("only",), (), ())
    assert write_segment(empty, scan_tree(empty), (), io.BytesIO()) == 0
    out = restored(b"".join(pieces([r0, None, empty])), tmp_path / "out")
    assert out == tree_of(r0)


def test_empty_union_is_the_end_piece_alone(tmp_path):
    """CF-ASM-05, CF-MARK-01's exception: no head, no marker."""
    a, b = make(tmp_path / "a", {}), make(tmp_path / "b", {})
    plan = plan_union([scan_tree(a), None, scan_tree(b)])
    assert plan.empty and plan.directories == () and plan.members == 0
    assert write_head(plan, io.BytesIO()) == 0
    data = b"".join(pieces([a, None, b]))
    assert data == end_piece()
    assert sniff(io.BytesIO(data))[0].kind == "tarball"
    result = restore(io.BytesIO(data), tmp_path / "out")
    assert result.kind == "tarball" and list((tmp_path / "out").iterdir()) == []
    assert validate(io.BytesIO(data)).valid
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        assert tar.getnames() == []
    assert gzip.decompress(end_piece()) == bytes(1024)


def test_directories_only(tmp_path):
    r0 = make(tmp_path / "r0", {"a": "dir", "a/b": "dir"})
    r1 = make(tmp_path / "r1", {"c": "dir"})
    data = b"".join(pieces([r0, r1]))
    assert restored(data, tmp_path / "out") == {
        "a": ("dir", 0o755, T0), "a/b": ("dir", 0o755, T0), "c": ("dir", 0o755, T0)
    }


def test_files_only_leaves_a_head_of_the_marker_alone(tmp_path):
    r0 = make(tmp_path / "r0", {"x": b"1"})
    r1 = make(tmp_path / "r1", {"y": b"2"})
    head, *_ = pieces([r0, r1])
    assert gzip.decompress(head)[156:157] == b"g" and len(gzip.decompress(head)) == 1024
    out = restored(b"".join(pieces([r0, r1])), tmp_path / "out")
    assert set(out) == {"x", "y"}


# --------------------------------------------------------------------------- padding


@pytest.mark.parametrize("n", [0, 26, 27, 1000, 65_557, 65_558, 131_114, 131_115, 5 << 20])
def test_padding_is_exactly_n_bytes_that_inflate_to_nothing(n):
    data = padding(n)
    assert len(data) == n
    members = members_of(data)
    assert len(members) == -(-n // 65_557)
    for member in members:
        assert member[:4] == b"\x1f\x8b\x08\x04"  # FEXTRA
        xlen, si, length = struct.unpack_from("<H2sH", member, 10)
        assert si == b"FP" and xlen == 4 + length  # the padding record alone (CF-ASM-06)
        assert zlib.decompress(member, wbits=31) == b""
    assert gzip.decompress(data + gzip.compress(b"after")) == b"after"


@pytest.mark.parametrize("n", [1, 25])
def test_padding_below_the_minimum_is_the_minimum(n):
    assert len(padding(n)) == 26


@pytest.mark.parametrize("bad", [-1, 1.5, True, "8"])
def test_padding_refuses_what_is_not_a_size(bad):
    with pytest.raises(ValueError, match="padding size"):
        padding(bad)


def test_padding_between_any_two_members_changes_nothing(three_ranks, tmp_path):
    """Padding of many sizes between every pair of gzip members (never before the first,
    never after the end piece): the same tree, to our reader, tarfile and gzip."""
    roots, union = three_ranks
    parts = pieces(roots)
    members = [m for part in parts for m in members_of(part)]
    assert len(members) > 6
    rng = random.Random(3)
    padded = [members[0]]
    for member in members[1:]:
        padded.append(padding(rng.choice([26, 100, 4096, 65_557, 70_000])))
        padded.append(member)
    data = b"".join(padded)
    assert restored(data, tmp_path / "out") == tree_of(union)
    assert validate(io.BytesIO(data)).valid
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        tar.extractall(tmp_path / "tarfile", filter="fully_trusted")
    assert tree_of(tmp_path / "tarfile", mtime_us=True) == tree_of(union, mtime_us=True)
    # Single-threaded too (the reader's streaming path):
    restore(io.BytesIO(data), tmp_path / "one-thread", decode_threads=1)
    assert tree_of(tmp_path / "one-thread") == tree_of(union)


def test_pieces_padded_to_a_minimum_part_size(three_ranks, tmp_path):
    """What a multipart upload does: every piece but the last at least 5 MiB."""
    roots, union = three_ranks
    parts = pieces(roots)
    minimum = 5 << 20
    body = [part + padding(minimum - len(part)) for part in parts[:-1]]
    assert all(len(part) == minimum for part in body)
    data = b"".join([*body, parts[-1]])
    assert restored(data, tmp_path / "out") == tree_of(union)


def test_a_segment_of_padding_alone(three_ranks, tmp_path):
    roots, union = three_ranks
    head, *segments, end = pieces(roots)
    data = b"".join([head, segments[0], padding(300), segments[1], segments[2], end])
    assert restored(data, tmp_path / "out") == tree_of(union)


# --------------------------------------------------------------------------- conflicts


def _conflict(tmp_path: Path, first: dict, second: dict) -> UnionConflictError:
    a = make(tmp_path / "a", first)
    b = make(tmp_path / "b", second)
    with pytest.raises(UnionConflictError) as caught:
        plan_union([scan_tree(a), None, scan_tree(b)])
    error = caught.value
    assert error.rule == "CF-ASM-07" and isinstance(error, CheckpointFormatError)
    assert error.member == error.path and f"member {error.path!r}" in str(error)
    assert "(CF-ASM-07)" in str(error)
    again = pickle.loads(pickle.dumps(error))
    assert (again.path, again.ranks, again.reason, str(again)) == (
        error.path, error.ranks, error.reason, str(error)
    )
    return error


def test_conflict_different_contents(tmp_path):
    error = _conflict(tmp_path, {"w": b"aaaa"}, {"w": b"bbbb"})
    assert (error.path, error.ranks) == ("w", (0, 2))
    assert "rank 0 and rank 2" in error.reason and "SHA-256 digests differ" in error.reason


def test_conflict_different_sizes(tmp_path):
    error = _conflict(tmp_path, {"w": b"a"}, {"w": b"aa"})
    assert "files of 1 and 2 bytes" in error.reason


def test_conflict_different_modes(tmp_path):
    a = make(tmp_path / "a", {"run.sh": b"echo\n"})
    b = make(tmp_path / "b", {"run.sh": b"echo\n"})
    os.chmod(b / "run.sh", 0o755)
    with pytest.raises(UnionConflictError, match="modes 644 and 755"):
        plan_union([scan_tree(a), scan_tree(b)])


def test_conflict_file_and_directory(tmp_path):
    error = _conflict(tmp_path, {"x": b"file"}, {"x": "dir", "x/y": b"below"})
    assert error.path == "x" and "a file and a directory" in error.reason


def test_conflict_symlink_targets(tmp_path):
    error = _conflict(tmp_path, {"l": ("link", "a")}, {"l": ("link", "b")})
    assert "symbolic links to 'a' and to 'b'" in error.reason


def test_conflict_symlink_and_file(tmp_path):
    error = _conflict(tmp_path, {"l": ("link", "a")}, {"l": b"a"})
    assert "a symbolic link and a file" in error.reason


def test_conflict_links_that_escape_once_joined(tmp_path):
    """Each tree alone is fine (CF-WRITE-05); joined, rank 0's link passes through rank
    2's link and leaves the root (CF-EXTRACT-03)."""
    error = _conflict(
        tmp_path, {"a": ("link", "sub/up/../x")}, {"sub": "dir", "sub/up": ("link", "..")}
    )
    assert error.path == "a" and error.ranks == (0,)
    assert "points outside the target" in error.reason and "joined" in error.reason


def test_a_name_listed_twice_by_one_manifest_is_refused(tmp_path):
    manifest = scan_tree(make(tmp_path / "a", {"x": b"1"}))
    doubled = type(manifest)(manifest.root, manifest.entries * 2)
    with pytest.raises(UnionConflictError, match="lists the name twice"):
        plan_union([doubled])


# --------------------------------------------------------------------------- scan refusals


def test_scan_refuses_special_files_and_escaping_links(tmp_path):
    fifo = make(tmp_path / "fifo", {})
    os.mkfifo(fifo / "pipe")
    with pytest.raises(WriteRefusedError, match="a FIFO") as caught:
        scan_tree(fifo)
    assert (caught.value.rule, caught.value.member) == ("CF-WRITE-05", "pipe")
    escaping = make(tmp_path / "esc", {"out": ("link", "../../etc/passwd")})
    with pytest.raises(WriteRefusedError, match="outside") as caught:
        scan_tree(escaping)
    assert caught.value.rule == "CF-WRITE-05"
    with pytest.raises(NotADirectoryError):
        scan_tree(tmp_path / "missing")


def test_scan_refuses_what_readers_under_the_limits_would(tmp_path):
    root = make(tmp_path / "t", {"a": b"1234", "b": b"5678", "c": "dir"})
    with pytest.raises(LimitExceededError, match="max_members=2") as caught:
        scan_tree(root, limits=Limits(max_members=2))
    assert (caught.value.rule, caught.value.member) == ("CF-LIMIT-01", "c")
    with pytest.raises(LimitExceededError, match="max_total_size=6"):
        scan_tree(root, limits=Limits(max_total_size=6))
    assert len(scan_tree(root, limits=Limits()).entries) == 3


# --------------------------------------------------------------------------- CF-ASM-08


def _scanned(tmp_path: Path, spec: dict) -> tuple[Path, object]:
    root = make(tmp_path / "t", spec)
    return root, scan_tree(root)


def _segment_fails(root, manifest, rule: str, member: str, match: str) -> None:
    with pytest.raises(WriteRefusedError, match=match) as caught:
        write_segment(root, manifest, [e.name for e in manifest.entries if e.kind != "dir"],
                      io.BytesIO())
    assert (caught.value.rule, caught.value.member) == (rule, member)


def test_segment_refuses_a_file_that_grew_since_the_scan(tmp_path):
    root, manifest = _scanned(tmp_path, {"f": b"12345"})
    (root / "f").write_bytes(b"123456")
    _segment_fails(root, manifest, "CF-WRITE-07", "f", "size or modification time")


def test_segment_refuses_an_in_place_rewrite_with_the_mtime_put_back(tmp_path):
    root, manifest = _scanned(tmp_path, {"f": b"12345"})
    with open(root / "f", "r+b") as handle:
        handle.write(b"X")
    os.utime(root / "f", ns=(T0, T0))
    _segment_fails(root, manifest, "CF-WRITE-07", "f", "change time moved")


def test_segment_refuses_a_replaced_or_removed_file(tmp_path):
    root, manifest = _scanned(tmp_path, {"f": b"12345"})
    (root / "g").write_bytes(b"12345")
    os.utime(root / "g", ns=(T0, T0))
    os.replace(root / "g", root / "f")
    _segment_fails(root, manifest, "CF-WRITE-07", "f", "replaced by another file")
    (root / "f").unlink()
    _segment_fails(root, manifest, "CF-WRITE-07", "f", "removed")


def test_segment_refuses_a_retargeted_symlink(tmp_path):
    root, manifest = _scanned(tmp_path, {"l": ("link", "a")})
    (root / "l").unlink()
    os.symlink("b", root / "l")
    _segment_fails(root, manifest, "CF-ASM-08", "l", "target changed from 'a' to 'b'")


def test_segment_accepts_a_link_added_since_the_scan(tmp_path):
    """A snapshot hard-linking the files raises the link count and moves the change time:
    the bytes are the same (as CF-WRITE-07's writer accepts)."""
    root, manifest = _scanned(tmp_path, {"f": b"12345"})
    os.link(root / "f", tmp_path / "snapshot-of-f")
    assert write_segment(root, manifest, ["f"], io.BytesIO()) > 0


def test_segment_refuses_names_it_cannot_write(tmp_path):
    root, manifest = _scanned(tmp_path, {"d": "dir", "d/f": b"1"})
    with pytest.raises(ValueError, match="not in the manifest"):
        write_segment(root, manifest, ["nope"], io.BytesIO())
    with pytest.raises(ValueError, match="belong in the head"):
        write_segment(root, manifest, ["d"], io.BytesIO())


# --------------------------------------------------------------------------- inspect, tools


def test_inspect_and_validate_an_assembled_object(three_ranks, tmp_path, capsys):
    roots, _union = three_ranks
    obj = tmp_path / "object.tar.gz"
    head, *rest = pieces(roots)
    obj.write_bytes(head + padding(5000) + b"".join(rest))
    assert cli_main(["validate", str(obj)]) == 0
    capsys.readouterr()
    assert cli_main(["inspect", str(obj)]) == 0
    text = capsys.readouterr().out
    assert "1.2" in text and "model/extra/notes.txt" in text


def test_gnu_tar_and_gzip_read_an_assembled_object(three_ranks, tmp_path):
    import subprocess

    tar_tool, gzip_tool = shutil.which("tar"), shutil.which("gzip")
    if tar_tool is None or gzip_tool is None:
        pytest.skip("GNU tar and gzip are not on PATH")
    roots, union = three_ranks
    members = [m for part in pieces(roots) for m in members_of(part)]
    data = members[0] + b"".join(padding(40_000) + m for m in members[1:])
    obj = tmp_path / "object.tar.gz"
    obj.write_bytes(data)
    subprocess.run([gzip_tool, "-t", str(obj)], check=True, timeout=60)
    out = tmp_path / "gnu"
    out.mkdir()
    # GNU tar sets a directory's time when the archive moves past it, unless told to wait:
    # the head lists every directory before any file (spec CF-ASM-06's note).
    subprocess.run([tar_tool, "-xzf", str(obj), "-C", str(out), "--warning=no-unknown-keyword",
                    "--delay-directory-restore"], check=True, timeout=60)
    assert tree_of(out) == tree_of(union)
