"""Writer → reader round trips: random trees come back byte-identical, with mtimes."""

from __future__ import annotations

import gzip
import io
import os
import stat
import tarfile
from pathlib import Path

from checkpoint_format import restore, validate, write_tarball
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

_NAME = st.text(
    alphabet=st.characters(
        blacklist_categories=("Cs", "Cc"), blacklist_characters="/\\\0"
    ),
    min_size=1,
    max_size=24,
).filter(lambda s: s not in (".", "..") and len(s.encode()) <= 200)

_CONTENT = st.one_of(
    st.just(b""),
    st.binary(max_size=4096),
    st.integers(1, 3).map(lambda n: (b"text line %d\n" % n) * 20_000),  # compressible
    st.integers(1, 2).map(lambda n: os.urandom(n * (1 << 20) + 7)),  # incompressible, > a slice
)

_TREE = st.recursive(
    st.one_of(_CONTENT, st.just({})),
    lambda children: st.dictionaries(_NAME, children, max_size=4),
    max_leaves=12,
)


def _materialise(root: Path, tree: dict, clock: list[int]) -> None:
    for name, node in tree.items():
        path = root / name
        if isinstance(node, dict):
            path.mkdir()
            _materialise(path, node, clock)
        else:
            path.write_bytes(node)
        clock[0] += 1_234_567_891
        os.utime(path, ns=(clock[0], clock[0]))


def snapshot(root: Path) -> dict[str, tuple]:
    """Everything the format promises to keep, per relative path."""
    result = {}
    for path in sorted(root.rglob("*")):
        st_ = path.lstat()
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            result[rel] = ("link", os.readlink(path), st_.st_mtime_ns)
        elif path.is_dir():
            result[rel] = ("dir", stat.S_IMODE(st_.st_mode), st_.st_mtime_ns)
        else:
            result[rel] = ("file", path.read_bytes(), stat.S_IMODE(st_.st_mode), st_.st_mtime_ns)
    return result


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(tree=st.dictionaries(_NAME, _TREE, max_size=5))
def test_random_trees_round_trip(tmp_path_factory, tree: dict) -> None:
    src = tmp_path_factory.mktemp("src")
    _materialise(src, tree, [1_600_000_000_123_456_789])
    blob = io.BytesIO()
    write_tarball(src, blob, chunk_size=1 << 20)
    target = tmp_path_factory.mktemp("dst") / "restored"
    result = restore(io.BytesIO(blob.getvalue()), target)
    assert result.kind == "tarball"
    # CF-MARK-01: an empty archive is the end-of-archive marker alone, without the marker.
    assert result.format_version == ("1.1" if tree else None)
    assert snapshot(target) == snapshot(src)
    assert validate(io.BytesIO(blob.getvalue())).valid


def test_links_and_modes_round_trip(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "weights").mkdir(parents=True)
    (src / "weights" / "a.bin").write_bytes(b"A" * 100)
    (src / "latest").symlink_to("weights/a.bin")
    (src / "dangling").symlink_to("weights/not-yet")
    os.link(src / "weights" / "a.bin", src / "hard.bin")
    (src / "ro.txt").write_text("read only")
    os.chmod(src / "ro.txt", 0o444)
    os.chmod(src / "weights", 0o750)
    target = tmp_path / "dst"
    blob = io.BytesIO()
    write_tarball(src, blob)
    restore(io.BytesIO(blob.getvalue()), target)
    assert snapshot(target) == snapshot(src)
    assert os.stat(target / "hard.bin").st_ino == os.stat(target / "weights" / "a.bin").st_ino


def test_output_is_deterministic(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "b.txt").write_bytes(b"b" * 10_000)
    (src / "a.bin").write_bytes(os.urandom(3 << 20))
    os.utime(src / "b.txt", ns=(10**18, 10**18))
    first, second = io.BytesIO(), io.BytesIO()
    write_tarball(src, first, chunk_size=1 << 20)
    write_tarball(src, second, chunk_size=1 << 20, workers=1)
    assert first.getvalue() == second.getvalue()


def test_layout_is_what_the_spec_says(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "b").mkdir(parents=True)
    (src / "b" / "z.txt").write_text("z")
    (src / "a.txt").write_text("a")
    (src / "B.txt").write_text("B")
    blob = io.BytesIO()
    write_tarball(src, blob)
    with tarfile.open(fileobj=io.BytesIO(blob.getvalue()), mode="r:gz") as tar:
        assert tar.pax_headers["FLYTECKPT.version"] == "1.1"  # CF-MARK-01
        members = tar.getmembers()
    assert [m.name for m in members] == ["B.txt", "a.txt", "b", "b/z.txt"]  # CF-WRITE-03/04
    for m in members:
        assert (m.uid, m.gid, m.uname, m.gname) == (0, 0, "", "")  # CF-WRITE-06
        if m.isfile():
            assert len(m.pax_headers["FLYTECKPT.sha256"]) == 64  # CF-MARK-04


def test_incompressible_slices_are_stored_and_text_is_compressed(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "noise.bin").write_bytes(os.urandom(4 << 20))
    (src / "text.txt").write_bytes(b"the same line again\n" * 200_000)
    blob = io.BytesIO()
    stats = write_tarball(src, blob, chunk_size=1 << 20)
    assert stats.compressed_bytes < (4 << 20) + (1 << 20)  # text shrank, noise barely grew
    assert stats.compressed_bytes > 4 << 20
    assert gzip.decompress(blob.getvalue())[:512] != bytes(512)


def test_setuid_bits_are_not_written(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "tool").write_text("#!/bin/sh\n")
    os.chmod(src / "tool", 0o4755)
    blob = io.BytesIO()
    write_tarball(src, blob)
    with tarfile.open(fileobj=io.BytesIO(blob.getvalue())) as tar:
        assert tar.getmember("tool").mode == 0o755


def test_empty_directory_round_trips(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    blob = io.BytesIO()
    write_tarball(src, blob)
    result = restore(io.BytesIO(blob.getvalue()), tmp_path / "dst")
    assert result.kind == "tarball"
    assert list((tmp_path / "dst").iterdir()) == []
    # Readable by tarfile, hence by the upstream SDK, as an empty tarball (CF-MARK-01).
    assert tarfile.is_tarfile(io.BytesIO(blob.getvalue()))
    with tarfile.open(fileobj=io.BytesIO(blob.getvalue())) as tar:
        assert tar.getmembers() == []


def test_modes_are_exact_under_a_default_acl(tmp_path: Path) -> None:
    """A default ACL on the directory masks a new file's mode instead of the umask; the
    restored mode must still be the member's (CF-EXTRACT-10)."""
    import struct

    import pytest

    # user::rwx group::r-x other::--- as the kernel's xattr encoding (setfacl -d -m o::-).
    entries = ((0x01, 7), (0x04, 5), (0x20, 0))
    acl = struct.pack("<I", 2) + b"".join(
        struct.pack("<HHI", tag, perm, 0xFFFFFFFF) for tag, perm in entries
    )
    try:
        os.setxattr(tmp_path, "system.posix_acl_default", acl)
    except OSError as exc:
        pytest.skip(f"no POSIX ACLs here: {exc}")
    source = tmp_path / "src"
    source.mkdir()
    for name, mode in (("public.txt", 0o644), ("script.sh", 0o755)):
        (source / name).write_bytes(b"abc")
        os.chmod(source / name, mode)
    buffer = io.BytesIO()
    write_tarball(source, buffer)
    buffer.seek(0)
    restore(buffer, tmp_path / "target")
    assert stat.S_IMODE(os.stat(tmp_path / "target" / "public.txt").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(tmp_path / "target" / "script.sh").st_mode) == 0o755
