"""Interoperability with the upstream Flyte SDK (``flyte.Checkpoint``), run in its own venv.

Both directions, on the same trees:

- upstream saves, our ``restore`` reads: same kind and same tree as upstream's own
  ``load_sync`` (spec CF-MARK-03: upstream tarballs are legacy v1);
- our ``write_tarball`` (or raw bytes) is the object, upstream's ``load_sync`` reads it
  (spec §4: readers that do not know our pax records restore the same tree);
- classification parity with ``tarfile.is_tarfile``, and the deviations the spec documents
  (CF-DETECT-04 note) asserted explicitly.

Upstream's tarfile keeps mtimes as float seconds (about 0.2 µs of precision today), so mtimes
are compared within 1 µs. Upstream does not restore symbolic links' own mtimes, so those are
only compared between our restore and the source tree.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import stat
import sys
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
from checkpoint_format import restore, sniff, validate, write_tarball

pytestmark = pytest.mark.interop

MTIME_TOLERANCE_NS = 1_000
MTIME_BASE_NS = 1_700_000_000_123_456_789

# Shared by the snippets below; runs in the upstream interpreter with ``args`` in scope.
_UPSTREAM_LOAD = """
import os, pathlib, tarfile, tempfile
import flyte

# Upstream's temp files beside the test's: one file system, so its workspace can be renamed.
tempfile.tempdir = args["tempdir"]

def load(uri, restored):
    '''Upstream's own load_sync; its workspace is moved to ``restored`` before cleanup.'''
    loader = flyte.Checkpoint(os.path.join(args["tempdir"], "unused-destination"), uri)
    returned = loader.load_sync()
    workspace = loader.path
    how = {None: None, workspace: "path", workspace / "payload": "payload"}.get(
        returned, str(returned)
    )
    os.rename(workspace, restored)
    loader.path  # recreates the workspace, which the SDK deletes when collected
    return how
"""

_UPSTREAM_SAVE_THEN_LOAD = (
    _UPSTREAM_LOAD
    + """
result = {}
for case in args["cases"]:
    if case["bytes_file"]:
        data = pathlib.Path(case["bytes_file"]).read_bytes()
    else:
        data = case["source"]
    flyte.Checkpoint(case["object_uri"]).save_sync(data)
    result[case["name"]] = {
        "is_tarfile": tarfile.is_tarfile(case["object"]),
        "returned": load(case["object_uri"], case["restored"]),
    }
"""
)

_UPSTREAM_LOAD_ONLY = (
    _UPSTREAM_LOAD
    + """
result = {case["name"]: load(case["object_uri"], case["restored"]) for case in args["cases"]}
"""
)


def _upstream_imported() -> bool:
    """Our own `flyte` facade may be loaded (other tests use it); upstream's never may."""
    module = sys.modules.get("flyte")
    if module is None:
        return False
    checkpoint = getattr(module, "Checkpoint", None)
    return getattr(checkpoint, "__module__", "") != "flyte_checkpoint._checkpoint"


@pytest.fixture(autouse=True)
def _upstream_never_imported():
    assert not _upstream_imported(), "the test process must never import the upstream SDK"
    yield
    assert not _upstream_imported(), "the test process must never import the upstream SDK"


# --------------------------------------------------------------------------- trees


def build_tree(root: Path, *, large: bool = False) -> Path:
    """A tree with every shape a checkpoint holds; ``large`` adds 18 MiB (random + text)."""
    rnd = random.Random(20261127)
    files: dict[str, tuple[bytes, int]] = {
        "model/weights.bin": (rnd.randbytes(3 << 20), 0o644),
        "model/config.json": (b'{"layers": 12, "dtype": "bf16"}\n', 0o644),
        "données d'été/naïve file ✓.txt": ("ünïcödé contents\n".encode(), 0o644),
        "日本語 ディレクトリ/チェックポイント 1.txt": ("ステップ 100\n".encode(), 0o640),
        "nested/a/b/c/deep.txt": (b"deep\n", 0o644),
        "empty.txt": (b"", 0o644),
        "nested/a/empty file with spaces": (b"", 0o600),
        "run.sh": (b"#!/bin/sh\necho resume\n", 0o755),
        "long/" + "segment-" * 16 + "/" + "a name past the 100-byte ustar field " * 3: (
            b"long name\n",
            0o644,
        ),
    }
    if large:
        text = "".join(f"step {i:07d} loss {1 / (i + 1):.9f} lr 3e-4 ok\n" for i in range(150_000))
        files["large/random-12MiB.bin"] = (rnd.randbytes(12 << 20), 0o644)
        files["large/train-log.txt"] = ((text * 4).encode()[: 6 << 20], 0o644)
    for name, (data, mode) in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(mode)
    for name in ("empty-dir", "nested/a/b/empty leaf dir"):
        (root / name).mkdir(parents=True)
    os.link(root / "model/config.json", root / "model/config-hardlink.json")
    os.symlink("model/weights.bin", root / "latest")
    os.symlink("../../model", root / "nested/a/model-dir-link")
    os.symlink("not-written-yet.ckpt", root / "dangling link")
    _stamp_mtimes(root)
    return root


def _stamp_mtimes(root: Path) -> None:
    """Distinct nanosecond mtimes on every entry, one of them a whole second.

    Bottom-up, so a directory is stamped after everything inside it.
    """
    paths = []
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        paths += [os.path.join(dirpath, name) for name in sorted(filenames + dirnames)]
    for index, path in enumerate(paths):
        mtime = MTIME_BASE_NS + index * 1_000_003_071
        if index == 3:
            mtime -= mtime % 1_000_000_000
        os.utime(path, ns=(mtime, mtime), follow_symlinks=False)


def snapshot(root: Path) -> dict[str, dict]:
    """Every entry below ``root``: type, contents, mode, link target, hard-link peers, mtime."""
    entries: dict[str, dict] = {}
    inodes: dict[tuple[int, int], list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            st = os.lstat(path)
            entry: dict = {"mtime_ns": st.st_mtime_ns}
            if stat.S_ISLNK(st.st_mode):
                entry.update(type="symlink", target=os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                entry.update(type="dir", mode=oct(stat.S_IMODE(st.st_mode)))
            elif stat.S_ISREG(st.st_mode):
                data = Path(path).read_bytes()
                entry.update(
                    type="file",
                    mode=oct(stat.S_IMODE(st.st_mode)),
                    size=len(data),
                    sha256=hashlib.sha256(data).hexdigest(),
                )
                inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
            else:
                entry.update(type=f"unexpected mode {st.st_mode:o}")
            entries[rel] = entry
    for names in inodes.values():
        for name in names:
            entries[name]["hardlinked_with"] = sorted(set(names) - {name})
    return entries


def assert_same_tree(actual: Path, expected: Path, *, symlink_mtimes: bool) -> None:
    got, want = snapshot(actual), snapshot(expected)

    def shape(tree: dict[str, dict]) -> dict[str, dict]:
        return {name: {k: v for k, v in e.items() if k != "mtime_ns"} for name, e in tree.items()}

    assert shape(got) == shape(want)
    off = {
        name: (got[name]["mtime_ns"], entry["mtime_ns"])
        for name, entry in want.items()
        if (entry["type"] != "symlink" or symlink_mtimes)
        and abs(got[name]["mtime_ns"] - entry["mtime_ns"]) > MTIME_TOLERANCE_NS
    }
    assert not off, f"mtimes (actual, expected) differ by more than 1 µs: {off}"


def gzip_members(data: bytes) -> list[int]:
    """BTYPE of the first deflate block of each gzip member (0 stored, 1 fixed, 2 dynamic)."""
    btypes = []
    while data:
        # CF-WRITE-11: FEXTRA alone, holding the member-size record (XLEN 20, subfield FK).
        assert data[:4] == b"\x1f\x8b\x08\x04", "our writer sets FEXTRA and nothing else"
        assert data[10:16] == b"\x14\x00FK\x10\x00", "the extra field is the size record"
        length = int.from_bytes(data[16:24], "little")
        btypes.append((data[32] >> 1) & 0b11)
        member = zlib.decompressobj(wbits=31)
        member.decompress(data)
        assert member.eof, "truncated gzip member"
        assert len(data) - len(member.unused_data) == length, "the record gives its length"
        data = member.unused_data
    return btypes


def _uri(path: Path, index: int) -> str:
    """Alternate plain paths and file:// URIs: upstream accepts both."""
    return path.as_uri() if index % 2 else str(path)


# --------------------------------------------------------------------------- upstream saves


@dataclass(frozen=True)
class Saved:
    source: Path | None
    payload: bytes | None
    object: Path
    upstream_restored: Path
    is_tarfile: bool
    returned: str | None


def _small_tarball(root: Path) -> Path:
    tree = root / "tarball-tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub/x.txt").write_bytes(b"inside a .tar.gz saved as a file\n")
    archive = root / "archive.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree / "sub", arcname="sub")
    return archive


def _upstream_saves(upstream_python, root: Path) -> dict[str, Saved]:
    (root / "upstream-tmp").mkdir()
    (root / "empty-dir").mkdir()
    single = root / "optimizer state.pt"
    single.write_bytes(random.Random(7).randbytes(100 << 10))
    sources: dict[str, Path | bytes] = {
        "dir": build_tree(root / "tree"),
        "empty-dir": root / "empty-dir",
        "file": single,
        "bytes": random.Random(8).randbytes(64 << 10),
        "tarball-file": _small_tarball(root),
        "zero-prefix-bytes": bytes(512) + b"tensor data after a zero block" * 64,
        "gzip-of-zeros-bytes": gzip.compress(bytes(1 << 20)),
    }
    cases = []
    for index, (name, source) in enumerate(sources.items()):
        bytes_file = None
        if isinstance(source, bytes):
            bytes_file = root / f"{name}.input"
            bytes_file.write_bytes(source)
        obj = root / "objects" / name
        cases.append(
            {
                "name": name,
                "source": None if bytes_file else str(source),
                "bytes_file": str(bytes_file) if bytes_file else None,
                "object": str(obj),
                "object_uri": _uri(obj, index),
                "restored": str(root / "upstream-restored" / name),
            }
        )
    (root / "upstream-restored").mkdir()
    found = upstream_python.run(
        _UPSTREAM_SAVE_THEN_LOAD, cases=cases, tempdir=str(root / "upstream-tmp")
    )
    return {
        case["name"]: Saved(
            source=None if case["bytes_file"] else Path(case["source"]),
            payload=sources[case["name"]] if case["bytes_file"] else None,  # type: ignore[arg-type]
            object=Path(case["object"]),
            upstream_restored=Path(case["restored"]),
            is_tarfile=found[case["name"]]["is_tarfile"],
            returned=found[case["name"]]["returned"],
        )
        for case in cases
    }


@pytest.fixture(scope="module")
def upstream_saved(upstream_python, tmp_path_factory) -> dict[str, Saved]:
    return _upstream_saves(upstream_python, tmp_path_factory.mktemp("upstream-saves"))


def _our_restore(obj: Path, target: Path):
    with obj.open("rb") as stream:
        return restore(stream, target)


def _our_kind(obj: Path) -> str:
    with obj.open("rb") as stream:
        detection, _ = sniff(stream)
    return detection.kind


UPSTREAM_KIND = {"path": "tarball", "payload": "raw"}


@pytest.mark.parametrize("case", ["dir", "empty-dir", "tarball-file"])
def test_upstream_tarball_restores_like_upstream_load(upstream_saved, case, tmp_path):
    saved = upstream_saved[case]
    assert saved.returned == "path"

    ours = _our_restore(saved.object, tmp_path / "ours")

    assert (ours.kind, ours.path, ours.format_version) == ("tarball", tmp_path / "ours", None)
    assert_same_tree(ours.path, saved.upstream_restored, symlink_mtimes=False)
    assert ours.members == len(snapshot(saved.upstream_restored))


def test_upstream_tarball_restores_the_source_tree(upstream_saved, tmp_path):
    """Beyond parity: we also keep what upstream loses on load (symbolic links' mtimes)."""
    saved = upstream_saved["dir"]
    ours = _our_restore(saved.object, tmp_path / "ours")
    assert saved.source is not None
    assert_same_tree(ours.path, saved.source, symlink_mtimes=True)


@pytest.mark.parametrize("case", ["file", "bytes"])
def test_upstream_raw_payload_restores_like_upstream_load(upstream_saved, case, tmp_path):
    saved = upstream_saved[case]
    assert saved.returned == "payload"

    ours = _our_restore(saved.object, tmp_path / "ours")

    assert (ours.kind, ours.path) == ("raw", tmp_path / "ours" / "payload")
    assert os.listdir(tmp_path / "ours") == os.listdir(saved.upstream_restored) == ["payload"]
    expected = saved.payload if saved.payload is not None else saved.source.read_bytes()
    assert ours.path.read_bytes() == (saved.upstream_restored / "payload").read_bytes() == expected
    assert ours.bytes == len(expected)


@pytest.mark.parametrize("case", ["dir", "empty-dir", "file", "bytes", "tarball-file"])
def test_sniff_agrees_with_upstream_is_tarfile(upstream_saved, case):
    saved = upstream_saved[case]
    assert _our_kind(saved.object) == ("tarball" if saved.is_tarfile else "raw")
    assert UPSTREAM_KIND[saved.returned] == ("tarball" if saved.is_tarfile else "raw")


def test_zero_prefix_payload_deviation_is_as_documented(upstream_saved, tmp_path):
    """CF-DETECT-04 note: upstream reads a payload starting with 512 zero bytes as an empty
    tarball and restores nothing; v1 classifies it as raw and keeps every byte."""
    saved = upstream_saved["zero-prefix-bytes"]
    assert saved.is_tarfile is True
    assert saved.returned == "path"
    assert os.listdir(saved.upstream_restored) == []  # upstream lost the payload

    assert _our_kind(saved.object) == "raw"
    ours = _our_restore(saved.object, tmp_path / "ours")
    assert ours.kind == "raw"
    assert ours.path.read_bytes() == saved.payload


def test_gzip_of_zeros_payload_deviation_is_as_documented(upstream_saved, tmp_path):
    """CF-DETECT-04 note: any gzip of zeros is an empty tarball upstream; v1 bounds that case
    to one 10 KiB record, so a megabyte of gzipped zeros stays a payload."""
    saved = upstream_saved["gzip-of-zeros-bytes"]
    assert (saved.is_tarfile, saved.returned) == (True, "path")
    assert os.listdir(saved.upstream_restored) == []

    ours = _our_restore(saved.object, tmp_path / "ours")
    assert ours.kind == "raw"
    assert ours.path.read_bytes() == saved.payload


@pytest.mark.parametrize("case", ["dir", "empty-dir"])
def test_upstream_tarball_validates_as_legacy_v1(upstream_saved, case):
    saved = upstream_saved[case]
    with saved.object.open("rb") as stream:
        report = validate(stream)

    assert report.violations == []
    assert report.valid
    assert (report.detection.kind, report.detection.compression) == ("tarball", "gzip")
    assert report.format_version is None
    assert report.to_dict()["legacy"] is True
    assert report.digests_present == 0
    assert report.size == saved.object.stat().st_size
    assert {m.name for m in report.members} == set(snapshot(saved.upstream_restored))


def test_upstream_tarball_with_tiny_fractional_mtime_restores(upstream_python, tmp_path):
    """Regression for b380d75: tarfile writes str(float) pax mtimes, '5e-05' for this file,
    which the reader used to refuse as corrupt (CF-MARK-05 now admits an exponent)."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "epoch.txt").write_bytes(b"restored from an image with clamped mtimes\n")
    os.utime(tree / "epoch.txt", ns=(50_000, 50_000))  # 5e-05 s after the epoch
    (tmp_path / "upstream-tmp").mkdir()
    obj = tmp_path / "object"
    case = {
        "name": "dir",
        "source": str(tree),
        "bytes_file": None,
        "object": str(obj),
        "object_uri": str(obj),
        "restored": str(tmp_path / "upstream-restored"),
    }
    found = upstream_python.run(
        _UPSTREAM_SAVE_THEN_LOAD, cases=[case], tempdir=str(tmp_path / "upstream-tmp")
    )
    assert found["dir"]["returned"] == "path"
    assert_same_tree(tmp_path / "upstream-restored", tree, symlink_mtimes=False)

    ours = _our_restore(obj, tmp_path / "ours")

    assert_same_tree(ours.path, tree, symlink_mtimes=True)


# --------------------------------------------------------------------------- upstream loads


@dataclass(frozen=True)
class Loaded:
    source: Path | bytes
    object: Path
    upstream_restored: Path
    returned: str | None


@pytest.fixture(scope="module")
def upstream_loaded(upstream_python, tmp_path_factory) -> dict[str, Loaded]:
    root = tmp_path_factory.mktemp("ours-for-upstream")
    (root / "objects").mkdir()
    (root / "upstream-restored").mkdir()
    (root / "upstream-tmp").mkdir()
    (root / "empty-dir").mkdir()
    sources: dict[str, Path | bytes] = {
        "tree": build_tree(root / "tree"),
        "large-tree": build_tree(root / "large-tree", large=True),
        "empty-dir": root / "empty-dir",
        "raw": random.Random(9).randbytes(200 << 10),
        "raw-text": b"not a tar, just text\n" * 100,
    }
    cases = []
    for index, (name, source) in enumerate(sources.items()):
        obj = root / "objects" / name
        if isinstance(source, bytes):
            obj.write_bytes(source)  # CF-WRITE-10: a raw payload is stored as-is
        else:
            with obj.open("wb") as sink:
                write_tarball(source, sink)
        cases.append(
            {
                "name": name,
                "object_uri": _uri(obj, index),
                "restored": str(root / "upstream-restored" / name),
            }
        )
    returned = upstream_python.run(
        _UPSTREAM_LOAD_ONLY, cases=cases, tempdir=str(root / "upstream-tmp")
    )
    return {
        name: Loaded(
            source, root / "objects" / name, root / "upstream-restored" / name, returned[name]
        )
        for name, source in sources.items()
    }


@pytest.mark.parametrize("case", ["tree", "large-tree", "empty-dir"])
def test_upstream_loads_our_tarball(upstream_loaded, case):
    """For the empty directory: regression for b380d75 (a marker followed directly by the
    end-of-archive blocks made tarfile, and so upstream, read our tarball as a payload)."""
    loaded = upstream_loaded[case]
    assert loaded.returned == "path"
    assert isinstance(loaded.source, Path)
    assert_same_tree(loaded.upstream_restored, loaded.source, symlink_mtimes=False)


def test_large_tree_is_multi_member_with_stored_and_deflated_slices(upstream_loaded):
    """The tarball upstream just restored really used what CF-WRITE-01 allows."""
    btypes = gzip_members(upstream_loaded["large-tree"].object.read_bytes())
    assert len(btypes) > 1
    assert 0 in btypes, "the random file's slices should be stored"
    assert {1, 2} & set(btypes), "the text file's slices should be deflated"


@pytest.mark.parametrize("case", ["raw", "raw-text"])
def test_upstream_loads_our_raw_payload(upstream_loaded, case):
    loaded = upstream_loaded[case]
    assert loaded.returned == "payload"
    assert os.listdir(loaded.upstream_restored) == ["payload"]
    assert (loaded.upstream_restored / "payload").read_bytes() == loaded.source


def test_our_tarballs_are_what_our_reader_and_validator_expect(upstream_loaded):
    """The same objects, read back by us: marked v1, valid, one digest per regular file."""
    for name in ("tree", "large-tree"):
        with upstream_loaded[name].object.open("rb") as stream:
            report = validate(stream)
        assert (report.valid, report.format_version) == (True, "1.1"), report.violations
        regular = [m for m in report.members if m.type == "file"]
        assert report.digests_present == len(regular) > 0


def test_raw_payload_is_not_a_tar_to_either_side(upstream_loaded):
    for name in ("raw", "raw-text"):
        with io.BytesIO(upstream_loaded[name].object.read_bytes()) as stream:
            assert sniff(stream)[0].kind == "raw"


# --------------------------------------------------------------------------- assembled objects

_VECTORS = Path(__file__).resolve().parents[1] / "spec" / "vectors"
_ASSEMBLED = [
    vector
    for vector in json.loads((_VECTORS / "vectors.json").read_text(encoding="utf-8"))
    if vector["file"].startswith("asm/") and "error" not in vector["expect"]
]


@pytest.fixture(scope="module")
def upstream_loaded_assembled(upstream_python, tmp_path_factory) -> dict[str, tuple[str, Path]]:
    """Upstream's ``load_sync`` on every assembled vector (spec §9), one interpreter run."""
    root = tmp_path_factory.mktemp("assembled-for-upstream")
    (root / "upstream-restored").mkdir()
    (root / "upstream-tmp").mkdir()
    cases = []
    for index, vector in enumerate(_ASSEMBLED):
        name = vector["file"].replace("/", "-")
        obj = root / "objects" / name
        obj.parent.mkdir(exist_ok=True)
        obj.write_bytes((_VECTORS / vector["file"]).read_bytes())
        cases.append({"name": name, "object_uri": _uri(obj, index),
                      "restored": str(root / "upstream-restored" / name)})
    returned = upstream_python.run(
        _UPSTREAM_LOAD_ONLY, cases=cases, tempdir=str(root / "upstream-tmp")
    )
    return {
        vector["file"]: (returned[case["name"]], Path(case["restored"]))
        for vector, case in zip(_ASSEMBLED, cases, strict=True)
    }


def test_every_assembled_vector_is_listed():
    assert len(_ASSEMBLED) >= 8  # guards the filter against a renamed area


@pytest.mark.parametrize("vector", _ASSEMBLED, ids=[v["file"] for v in _ASSEMBLED])
def test_upstream_loads_every_assembled_vector(upstream_loaded_assembled, vector):
    """Upstream's helper (tarfile on gzip) restores an object assembled from several ranks'
    pieces, padding members included, to exactly the tree the spec's index lists, as our
    reader does (tests/test_spec_vectors.py)."""
    returned, restored = upstream_loaded_assembled[vector["file"]]
    assert returned == "path"
    expected = {member["name"]: member for member in vector["expect"]["members"]}
    found = {
        path.relative_to(restored).as_posix(): path for path in sorted(restored.rglob("*"))
    }
    assert sorted(found) == sorted(expected)
    for name, member in expected.items():
        path, st = found[name], found[name].lstat()
        if member["type"] == "dir":
            assert stat.S_ISDIR(st.st_mode), name
        elif member["type"] == "symlink":
            assert os.readlink(path) == member["linkname"], name
        else:
            assert stat.S_ISREG(st.st_mode), name
            assert hashlib.sha256(path.read_bytes()).hexdigest() == member["sha256"], name
        if member["type"] == "hardlink":
            assert os.path.samefile(path, restored / member["linkname"]), name
        if "mode" in member:
            assert stat.S_IMODE(st.st_mode) == member["mode"], name
        if "mtime_ns" in member and member["type"] != "symlink":
            assert abs(st.st_mtime_ns - member["mtime_ns"]) <= MTIME_TOLERANCE_NS, name
