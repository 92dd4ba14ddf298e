"""flyte.Checkpoint end to end on real storage emulators: S3 (moto), GCS (fake-gcs-server) and
Azure Blob (Azurite), with local paths and memory:// as the baseline.

One behavioural suite, parametrized over every backend: round trips (directories to the
nanosecond, payloads, foreign tarballs, awkward object names), "no checkpoint" (absent or
empty object), the failures that must not read as "no checkpoint" (damaged, hostile, denied),
all-or-nothing saves (refused, cancelled, denied, concurrent), async, and a peak-RSS check on
a 512 MiB checkpoint per remote backend. Objects are planted and read back with each
service's own client (see ``checkpoint_testing.stores``), not through checkpoint-io.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import os
import pathlib
import stat
import subprocess
import sys
import tarfile
import time
import uuid

import pytest
from checkpoint_testing import stores as storage_fixtures
from checkpoint_testing.stores import RSS_PROBE, MiB
from flyte_checkpoint import Checkpoint, CheckpointLoadError, CheckpointSaveError

# The fixtures, made visible to this module (pytest finds fixtures among its attributes).
e2e_emulators = storage_fixtures.e2e_emulators
store = storage_fixtures.store
remote_store = storage_fixtures.remote_store

pytestmark = [pytest.mark.emulator]

# The product target for the extra memory a save or a load may take, whatever the size.
RSS_TARGET = 200 * MiB
BIG_CHECKPOINT = 512 * MiB


# ------------------------------------------------------------------------- helpers


def _tree(root: pathlib.Path) -> pathlib.Path:
    """A small checkpoint directory: nesting, an empty file, an empty directory, a non-ASCII
    name, an executable, a relative symlink, and mtimes with nanosecond digits that a float
    would round away."""
    (root / "weights" / "shards").mkdir(parents=True)
    (root / "weights" / "shards" / "00.bin").write_bytes(os.urandom(700_000))
    (root / "weights" / "shards" / "01.bin").write_bytes(b"\0" * 300_000)
    (root / "weights" / "empty.bin").write_bytes(b"")
    (root / "logs").mkdir()
    (root / "état nommé.json").write_text('{"step": 7}', encoding="utf-8")
    (root / "last.ckpt").write_bytes(b"step-7")
    (root / "resume.sh").write_text("#!/bin/sh\nexit 0\n")
    (root / "resume.sh").chmod(0o755)
    (root / "latest").symlink_to("weights/shards/00.bin")
    base = 1_700_000_000_123_456_789
    for i, path in enumerate(sorted(root.rglob("*"), key=lambda p: -len(p.parts))):
        os.utime(path, ns=(base + i, base + 1_000 * i + 7), follow_symlinks=False)
    return root


def _snapshot(root: pathlib.Path) -> dict[str, tuple]:
    """Every entry under ``root``: kind, contents (file) or target (link), permission bits
    and mtime in nanoseconds."""
    entries = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            kind, content = "link", os.readlink(path)
        elif stat.S_ISDIR(st.st_mode):
            kind, content = "dir", None
        else:
            kind, content = "file", path.read_bytes()
        entries[path.relative_to(root).as_posix()] = (
            kind, content, stat.S_IMODE(st.st_mode), st.st_mtime_ns)
    return entries


def _workspace_entries(cp) -> list[str]:
    """What the Checkpoint's private workspace holds next to ``path``."""
    return sorted(p.name for p in cp.path.parent.iterdir())


def _tarball(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# ------------------------------------------------------------------------- round trips


def test_directory_round_trip_keeps_names_contents_and_mtimes(store, tmp_path) -> None:
    src = _tree(tmp_path / "src")
    with store.checkpoint("attempt-1") as cp:
        cp.save_sync(src)
    assert store.names() == {"attempt-1"}  # no temporary objects left beside it
    with store.checkpoint("attempt-2", "attempt-1") as cp:
        restored = cp.load_sync()
        assert restored == cp.path
        assert _snapshot(restored) == _snapshot(src)


def _payload(kind: str) -> bytes:
    if kind == "tiny":
        return b"ok\n"  # shorter than one tar block
    if kind == "gzip-not-tar":
        # gzip magic but not a tar inside: a raw payload (CF-DETECT-04), e.g. a model.pt.gz
        return gzip.compress(os.urandom(3 * MiB), compresslevel=1)
    return os.urandom(3 * MiB + 17)


@pytest.mark.parametrize("kind", ["bytes", "file", "tiny", "gzip-not-tar"])
def test_payload_round_trip(kind, store, tmp_path) -> None:
    blob = _payload(kind)
    (tmp_path / "model.pt").write_bytes(blob)
    data = tmp_path / "model.pt" if kind == "file" else blob
    with store.checkpoint("attempt-1") as cp:
        cp.save_sync(data)
    assert store.get("attempt-1") == blob  # stored as-is, not wrapped
    with store.checkpoint("attempt-2", "attempt-1") as cp:
        restored = cp.load_sync()
        assert restored == cp.path / "payload"
        assert restored.read_bytes() == blob
        assert sorted(p.name for p in cp.path.iterdir()) == ["payload"]


@pytest.mark.parametrize("mode", ["w:gz", "w"])
def test_tarball_written_by_tarfile_is_restored(mode, store) -> None:
    """What the upstream SDK uploads for a directory: a tarfile-made archive, no marker."""
    files = {"model/weights.bin": os.urandom(2 * MiB), "model/config.json": b"{}",
             "last.ckpt": b"step-3"}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    store.put("attempt-1", buf.getvalue())
    with store.checkpoint("attempt-2", "attempt-1") as cp:
        restored = cp.load_sync()
        assert restored == cp.path
        assert {p.relative_to(restored).as_posix(): p.read_bytes()
                for p in restored.rglob("*") if p.is_file()} == files


def test_async_save_and_load(store, tmp_path) -> None:
    src = _tree(tmp_path / "src")

    async def main() -> dict:
        async with store.checkpoint("attempt-1") as cp:
            await cp.save(src)
        async with store.checkpoint("attempt-2", "attempt-1") as cp:
            restored = await cp.load()
            assert restored == cp.path
            return _snapshot(restored)

    assert asyncio.run(main()) == _snapshot(src)


def test_empty_directory_round_trip(store, tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    with store.checkpoint("attempt-1") as cp:
        cp.save_sync(tmp_path / "empty")
    assert store.get("attempt-1") != b""  # an empty tarball, not "no checkpoint"
    with store.checkpoint("attempt-2", "attempt-1") as cp:
        assert cp.load_sync() == cp.path
        assert not any(cp.path.iterdir())


@pytest.mark.parametrize("name", ["run 1/ätt-2/_flytecheckpoints", "run#1/a%20b+c?d=e/ckpt"])
def test_object_names_with_spaces_and_reserved_characters(name, store, tmp_path) -> None:
    src = _tree(tmp_path / "src")
    with store.checkpoint(name) as cp:
        cp.save_sync(src)
    assert store.names() == {name}
    with store.checkpoint("next", name) as cp:
        assert _snapshot(cp.load_sync()) == _snapshot(src)


def test_concurrent_saves_on_one_instance_publish_one_whole_tree(store, tmp_path) -> None:
    trees = {}
    for name in ("a", "b"):
        root = tmp_path / name
        root.mkdir()
        (root / "data.bin").write_bytes(os.urandom(12 * MiB))
        (root / "who").write_text(name)
        trees[name] = root

    async def main() -> None:
        async with store.checkpoint("ckpt") as cp:
            await asyncio.gather(cp.save(trees["a"]), cp.save(trees["b"]))

    asyncio.run(main())
    assert store.names() == {"ckpt"}
    with store.checkpoint("next", "ckpt") as cp:
        restored = cp.load_sync()
        winner = (restored / "who").read_text()
        assert _snapshot(restored) == _snapshot(trees[winner])


def test_cancelled_async_save_leaves_the_previous_object_intact(store, tmp_path) -> None:
    store.put("ckpt", b"previous")
    src = tmp_path / "next"
    src.mkdir()
    (src / "weights.bin").write_bytes(os.urandom(128 * MiB))
    proxy, options = store.counting_proxy() if store.server else (None, None)

    started = time.monotonic()

    def upload_has_begun() -> bool:
        if proxy is not None:  # checkpoint-io begins an upload after a whole part
            return proxy.requests >= 1
        if store.kind == "local":  # the hidden temp file beside the destination
            return len(store.names()) > 1
        # memory://: nothing to watch; the save (128 MiB through the compressor) takes
        # well over the 0.05 s we let it run
        return time.monotonic() - started > 0.05

    async def main() -> None:
        async with store.checkpoint("ckpt", options=options) as cp:
            task = asyncio.create_task(cp.save(src))
            for _ in range(3000):
                if upload_has_begun() or task.done():
                    break
                await asyncio.sleep(0.01)
            assert not task.done(), "the save finished before it could be cancelled"
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(main())
    kept = store.get("ckpt")
    assert len(kept) == len(b"previous"), f"the object was replaced by {len(kept)} bytes"
    assert kept == b"previous"
    assert store.names() == {"ckpt"}
    assert store.pending_uploads() == []


# ------------------------------------------------------------------------- no checkpoint


def test_missing_object_means_no_checkpoint(store) -> None:
    with store.checkpoint("attempt-2", "attempt-1") as cp:
        assert cp.load_sync() is None
        assert not any(cp.path.iterdir())


def test_a_prefix_of_objects_is_refused_not_taken_for_no_checkpoint(store) -> None:
    """An old flytekit-style checkpoint (a prefix of objects) must not restart training."""
    if store.kind == "local":
        pytest.skip("a local directory fails on open already (covered in the package tests)")
    store.put("attempt-1/model.pt", b"weights")
    store.put("attempt-1/optimizer.pt", b"state")
    with store.checkpoint("attempt-2", "attempt-1") as cp:
        with pytest.raises(CheckpointLoadError, match="is a prefix holding objects"):
            cp.load_sync()
        assert not any(cp.path.iterdir())


def test_zero_byte_object_means_no_checkpoint(store) -> None:
    store.put("attempt-1", b"")
    with store.checkpoint("attempt-2", "attempt-1") as cp:
        assert cp.load_sync() is None
        assert not any(cp.path.iterdir())


# ------------------------------------------------- failures that must not read as "no checkpoint"


def _damage(data: bytes, how: str) -> bytes:
    at = len(data) * 3 // 4  # past several gzip members, so files were already extracted
    if how == "truncated":
        return data[:at]
    return data[:at] + bytes([data[at] ^ 0x40]) + data[at + 1:]


@pytest.mark.parametrize(("how", "expected"), [
    ("truncated", "truncated"),
    ("bit-flipped", "CF-INTEG"),
])
def test_damaged_object_raises_naming_the_uri_and_restores_nothing(
        how, expected, store, tmp_path) -> None:
    src = _tree(tmp_path / "src")
    (src / "weights" / "big.bin").write_bytes(os.urandom(12 * MiB))
    with store.checkpoint("attempt-1") as cp:
        cp.save_sync(src)
    whole = store.get("attempt-1")
    store.put("attempt-1", _damage(whole, how))
    uri = store.uri("attempt-1")
    with store.checkpoint("attempt-2", "attempt-1") as cp:
        with pytest.raises(CheckpointLoadError) as info:
            cp.load_sync()
        assert info.value.uri == uri
        assert f"checkpoint at {uri} cannot be restored" in str(info.value)
        assert expected in str(info.value)
        assert not any(cp.path.iterdir())
        assert _workspace_entries(cp) == ["checkpoint"]  # no staging directory left

        # Nothing of the failure is remembered: once the object is whole, the same
        # instance restores it.
        store.put("attempt-1", whole)
        assert cp.load_sync() == cp.path
        assert _snapshot(cp.path) == _snapshot(src)


def test_hostile_tarball_is_refused_and_writes_nothing_outside(store) -> None:
    marker = f"escape-{uuid.uuid4().hex[:8]}"
    store.put("attempt-1", _tarball([
        ("good.txt", b"fine"),
        (f"../{marker}", b"evil"),
        (f"../../{marker}", b"evil"),
    ]))
    with store.checkpoint("attempt-2", "attempt-1") as cp:
        with pytest.raises(CheckpointLoadError) as info:
            cp.load_sync()
        message = str(info.value)
        assert "CF-EXTRACT-02" in message
        assert f"'../{marker}'" in message
        assert store.uri("attempt-1") in message
        assert not any(cp.path.iterdir())
        assert _workspace_entries(cp) == ["checkpoint"]
        assert not (cp.path.parent / marker).exists()
        assert not (cp.path.parent.parent / marker).exists()


def test_failed_save_leaves_the_previous_object_intact(store, tmp_path) -> None:
    with store.checkpoint("ckpt") as cp:
        cp.save_sync(_tree(tmp_path / "previous"))
    previous = store.get("ckpt")

    # The writer streams members in name order and refuses the FIFO only when it reaches it.
    # 64 MiB of incompressible data ahead of it means at least ~48 MiB (all but the slices
    # still compressing) has gone to the uploader: several S3/Azure parts, a whole 32 MiB
    # GCS resumable chunk, a local temp file. The proxy's request count proves it.
    src = tmp_path / "next"
    src.mkdir()
    (src / "a-weights.bin").write_bytes(os.urandom(64 * MiB))
    os.mkfifo(src / "z-fifo")
    proxy, options = store.counting_proxy() if store.server else (None, None)
    with store.checkpoint("ckpt", options=options) as cp, \
            pytest.raises(CheckpointSaveError) as info:
        cp.save_sync(src)
    message = str(info.value)
    uri = store.uri("ckpt")
    assert f"checkpoint not saved to {uri} (the previous object is unchanged)" in message
    assert "'z-fifo'" in message and "CF-WRITE-05" in message
    if proxy is not None:
        # checkpoint-io begins an upload only once more than a whole part has been written:
        # S3/GCS then start a multipart upload or resumable session and send parts (a part
        # still in flight at the abort may be cut off), then abort; Azure stages blocks.
        assert proxy.requests >= 2, (
            f"{proxy.requests} request(s) reached {store.kind}: the upload never began")

    assert store.get("ckpt") == previous
    assert store.names() == {"ckpt"}
    assert store.pending_uploads() == []
    with store.checkpoint("again", "ckpt") as cp:
        assert _snapshot(cp.load_sync()) == _snapshot(tmp_path / "previous")


def test_permission_denied_raises_instead_of_restarting(store, tmp_path) -> None:
    with store.checkpoint("attempt-1") as cp:
        cp.save_sync(_tree(tmp_path / "src"))
    uri = store.uri("attempt-1")
    options = store.options
    if store.kind == "s3":
        store.deny("s3:GetObject")
    elif store.kind == "azure":
        options = store.sas_options("wl")  # may write and list, may not read
    elif store.kind == "local":
        if os.geteuid() == 0:
            pytest.skip("running as root: file permissions deny root nothing")
        os.chmod(uri, 0)
    else:
        pytest.skip(f"{store.kind}: the emulator has no access control to deny with")

    with Checkpoint(store.uri("attempt-2"), uri, storage_options=options) as cp:
        with pytest.raises(CheckpointLoadError) as info:
            cp.load_sync()
        assert info.value.uri == uri
        message = str(info.value)
        assert f"checkpoint at {uri} could not be read: PermissionError" in message
        assert not any(cp.path.iterdir())


def test_permission_denied_on_save_raises_and_keeps_the_previous_object(store, tmp_path) -> None:
    store.put("ckpt", b"previous")
    options = store.options
    if store.kind == "s3":
        store.deny("s3:PutObject")  # a small tree goes in one PutObject
    elif store.kind == "azure":
        options = store.sas_options("rl")  # may read and list, may not write
    elif store.kind == "local" and os.geteuid() != 0:
        os.chmod(pathlib.Path(store.uri("ckpt")).parent, 0o555)
    else:
        pytest.skip(f"{store.kind}: no access control to deny with"
                    + (" (running as root)" if store.kind == "local" else ""))
    with store.checkpoint("ckpt", options=options) as cp, \
            pytest.raises(CheckpointSaveError) as info:
        cp.save_sync(_tree(tmp_path / "src"))
    uri = store.uri("ckpt")
    assert info.value.uri == uri
    assert f"checkpoint not saved to {uri} (the previous object is unchanged):" \
           " PermissionError" in str(info.value)
    assert store.get("ckpt") == b"previous"


def test_unwritable_destination_raises_checkpoint_save_error(store, tmp_path, request) -> None:
    """A destination that cannot exist (a bucket that does not; a local parent that is a
    file) is a CheckpointSaveError naming it, like any other failed save."""
    if store.kind == "memory":
        pytest.skip("memory://: every destination can be written")
    if store.kind == "local":
        (tmp_path / "not-a-dir").write_bytes(b"")
        uri = str(tmp_path / "not-a-dir" / "ckpt")
    else:
        uri = store.root.replace(store.bucket, f"missing-{store.bucket}") + "/ckpt"
    with Checkpoint(uri, storage_options=store.options) as cp, \
            pytest.raises(CheckpointSaveError) as info:
        cp.save_sync(b"state")
    assert info.value.uri == uri
    assert f"checkpoint not saved to {uri}" in str(info.value)


# --------------------------------------------------- upstream's settings on each data path


@pytest.mark.parametrize("remote_store", ["s3-obstore", "s3-fsspec"], indirect=True)
def test_upstreams_variables_alone_reach_the_store_on_each_data_path(
        remote_store, tmp_path, monkeypatch, caplog) -> None:
    """What a task pod gets (``FLYTE_AWS_*``, no ``storage_options``) reaches the same store
    on both clients; the data path that served it is said, once, on ``checkpoint_io``."""
    import logging

    from checkpoint_io import _registry

    monkeypatch.setenv("FLYTE_AWS_ENDPOINT", remote_store.server.endpoint)
    monkeypatch.setenv("FLYTE_AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("FLYTE_AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setattr(_registry, "_said", set())
    caplog.set_level(logging.INFO, logger="checkpoint_io")
    src = _tree(tmp_path / "src")
    with Checkpoint(remote_store.uri("attempt-1")) as cp:
        cp.save_sync(src)
    with Checkpoint(remote_store.uri("attempt-2"), remote_store.uri("attempt-1")) as cp:
        assert _snapshot(cp.load_sync()) == _snapshot(src)
    said = [r.getMessage() for r in caplog.records if r.name == "checkpoint_io"
            and "data path" in r.getMessage()]
    reason = "data_path='obstore' asks for it" if remote_store.data_path == "obstore" \
        else "data_path='fsspec' asks for it"
    assert said == [f"checkpoint-io data path for s3://: {remote_store.data_path} ({reason})"]


# ------------------------------------------------------------------------- bounded memory


class RssTargetMissed(AssertionError):
    """A save or load grew RSS by the product target or more."""


@pytest.fixture(scope="session")
def big_checkpoint(tmp_path_factory):
    """A directory holding one incompressible 512 MiB file, made once for the run."""
    root = tmp_path_factory.mktemp("big") / "checkpoint"
    root.mkdir()
    path = root / "weights.bin"
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(BIG_CHECKPOINT // (8 * MiB)):
            chunk = os.urandom(8 * MiB)
            digest.update(chunk)
            f.write(chunk)
    yield {"source": str(root), "file_name": path.name, "sha256": digest.hexdigest(),
           "mtime_ns": path.stat().st_mtime_ns}
    path.unlink()  # pytest keeps the last few base temp dirs; not 512 MiB each


def _measure(operation: str, store, big: dict, scratch: pathlib.Path) -> dict:
    args = {"operation": operation, "storage_options": store.options,
            "uri": store.uri("big"), "scratch": str(scratch),
            "source": big["source"], "file_name": big["file_name"]}
    done = subprocess.run(
        [sys.executable, "-c", RSS_PROBE], input=json.dumps(args), capture_output=True,
        text=True, timeout=300, check=False,
        env={**os.environ, "FLYTE_CHECKPOINT_PROGRESS": "off"},
    )
    assert done.returncode == 0, f"{operation} probe failed:\n{done.stderr}"
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "remote_store", ["s3-obstore", "s3-fsspec", "gcs-obstore", "gcs-fsspec", "azure-obstore",
                     "azure-fsspec"],
    indirect=True,
)
def test_peak_memory_of_a_512_mib_round_trip(remote_store, big_checkpoint, tmp_path,
                                             capsys) -> None:
    """Save then load a 512 MiB incompressible checkpoint, each in its own process; neither
    may grow RSS by the product target or more."""
    figures = {op: _measure(op, remote_store, big_checkpoint, tmp_path)
               for op in ("save", "load")}
    with capsys.disabled():
        for op, m in figures.items():
            print(f"\n[{remote_store.kind} {remote_store.data_path}] {op} 512 MiB:"
                  f" {m['seconds']:.1f} s"
                  f" ({BIG_CHECKPOINT / MiB / m['seconds']:.0f} MiB/s), RSS"
                  f" {m['rss_before'] / MiB:.0f} -> peak {m['peak'] / MiB:.0f} MiB,"
                  f" growth {m['growth'] / MiB:.0f} MiB", end="")
    loaded = figures["load"]
    assert loaded["size"] == BIG_CHECKPOINT
    assert loaded["sha256"] == big_checkpoint["sha256"]
    assert loaded["mtime_ns"] == big_checkpoint["mtime_ns"]
    for op in ("load", "save"):
        growth = figures[op]["growth"]
        if growth >= RSS_TARGET:
            raise RssTargetMissed(
                f"{remote_store.kind} ({remote_store.data_path}) {op} of 512 MiB grew RSS by"
                f" {growth / MiB:.0f} MiB"
                f" (target < {RSS_TARGET / MiB:.0f} MiB)")
