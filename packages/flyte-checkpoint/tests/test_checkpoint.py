"""flyte.Checkpoint on local paths, file:// and memory://: the API, the semantics, the failures."""

from __future__ import annotations

import asyncio
import gc
import gzip
import io
import os
import pathlib
import tarfile
import threading
import time

import flyte
import pytest
from checkpoint_io import SyncInAsyncError
from flyte_checkpoint import Checkpoint, CheckpointLoadError, CheckpointSaveError


def _tree(root: pathlib.Path) -> pathlib.Path:
    (root / "weights").mkdir(parents=True)
    (root / "weights" / "layer0.bin").write_bytes(os.urandom(300_000))
    (root / "weights" / "empty.bin").write_bytes(b"")
    (root / "état nommé.json").write_text('{"step": 7}')
    (root / "logs").mkdir()
    (root / "last.ckpt").write_bytes(b"step-7")
    return root


def _snapshot(root: pathlib.Path) -> dict[str, bytes | None]:
    return {
        p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture(params=["path", "file-uri", "memory"])
def location(request, tmp_path: pathlib.Path):
    """A factory of fresh checkpoint locations on one backend."""
    counter = iter(range(1000))

    def make() -> str:
        n = next(counter)
        if request.param == "path":
            return str(tmp_path / "store" / f"attempt-{n}" / "_flytecheckpoints")
        if request.param == "file-uri":
            return f"file://{tmp_path}/store/attempt-{n}/_flytecheckpoints"
        return f"memory://ckpt-tests/{tmp_path.name}/attempt-{n}/_flytecheckpoints"

    return make


# ------------------------------------------------------------------------- the API


def test_facade_exports_the_api() -> None:
    assert flyte.Checkpoint is Checkpoint
    assert issubclass(flyte.Checkpoint, flyte.BaseCheckpoint)
    assert callable(flyte.latest_checkpoint)
    assert flyte.io.File.__name__ == "File"


def test_an_unsupported_scheme_fails_at_construction(tmp_path) -> None:
    with pytest.raises(ValueError, match="unsupported scheme ftp://"):
        Checkpoint("ftp://host/ckpt")
    with pytest.raises(ValueError, match="unsupported scheme ftp://"):
        Checkpoint(tmp_path / "dest", "ftp://host/prev")


@pytest.mark.parametrize("which", ["dest", "src"])
def test_a_missing_client_library_fails_at_construction(which, tmp_path, monkeypatch) -> None:
    # At task start, naming the extra to install, instead of at the first save an hour later.
    import importlib.util

    from checkpoint_io import MissingBackendError

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gcsfs" else real(name, *a)
    )
    args = ("gs://bucket/ckpt",) if which == "dest" else (tmp_path / "dest", "gs://bucket/prev")
    with pytest.raises(MissingBackendError, match=r"pip install 'flyte-checkpoint\[gcs\]'"):
        Checkpoint(*args)


@pytest.mark.parametrize("blank", [None, "", "   ", '""', "''", ' " " '])
def test_blank_source_means_none(blank, tmp_path) -> None:
    cp = Checkpoint(str(tmp_path / "dest"), blank)
    assert cp.remote_source is None
    assert cp.prev_exists() is False
    assert cp.load_sync() is None


def test_properties_accept_paths(tmp_path) -> None:
    cp = Checkpoint(tmp_path / "dest", tmp_path / "src")
    assert cp.remote_destination == str(tmp_path / "dest")
    assert cp.remote_source == str(tmp_path / "src")
    assert cp.prev_exists()
    assert cp.path.is_dir() and not any(cp.path.iterdir())
    cp.close()


def test_from_env(tmp_path) -> None:
    env = {"FLYTE_CHECKPOINT_PATH": str(tmp_path / "d"), "FLYTE_PREV_CHECKPOINT_PATH": ""}
    cp = Checkpoint.from_env(env)
    assert (cp.remote_destination, cp.remote_source) == (str(tmp_path / "d"), None)
    with pytest.raises(ValueError, match="FLYTE_CHECKPOINT_PATH is not set"):
        Checkpoint.from_env({})


# ------------------------------------------------------------------------- round trips


def test_directory_round_trip(location, tmp_path) -> None:
    src = _tree(tmp_path / "src")
    first = location()
    with Checkpoint(first) as cp:
        assert cp.load_sync() is None
        cp.save_sync(src)
    with Checkpoint(location(), first) as cp:
        restored = cp.load_sync()
        assert restored == cp.path
        assert _snapshot(restored) == _snapshot(src)
        assert flyte.latest_checkpoint(restored) == restored / "last.ckpt"
        assert os.stat(restored / "last.ckpt").st_mtime_ns == os.stat(src / "last.ckpt").st_mtime_ns


@pytest.mark.parametrize("kind", ["bytes", "bytearray", "memoryview", "file", "str-path"])
def test_payload_round_trip(kind, location, tmp_path) -> None:
    blob = os.urandom(100_000)
    (tmp_path / "model.pt").write_bytes(blob)
    data = {
        "bytes": blob,
        "bytearray": bytearray(blob),
        "memoryview": memoryview(blob),
        "file": tmp_path / "model.pt",
        "str-path": str(tmp_path / "model.pt"),
    }[kind]
    first = location()
    Checkpoint(first).save_sync(data)
    with Checkpoint(location(), first) as cp:
        restored = cp.load_sync()
        assert restored == cp.path / "payload"
        assert restored.read_bytes() == blob


def test_a_saved_tar_file_is_restored_as_a_tarball(tmp_path) -> None:
    """As upstream does: a .tar.gz saved as a file is indistinguishable from a directory save."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("inside.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    dest = str(tmp_path / "obj")
    Checkpoint(dest).save_sync(buf.getvalue())
    restored = Checkpoint(str(tmp_path / "next"), dest).load_sync()
    assert (restored / "inside.txt").read_bytes() == b"hi"


def test_second_load_returns_the_first_result_without_downloading(tmp_path) -> None:
    src = _tree(tmp_path / "src")
    dest = str(tmp_path / "obj")
    Checkpoint(dest).save_sync(src)
    cp = Checkpoint(str(tmp_path / "next"), dest)
    first = cp.load_sync()
    os.unlink(dest)  # a second download would now find nothing
    assert cp.load_sync() == first
    assert _snapshot(first) == _snapshot(src)


def test_saving_a_missing_path_raises(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Checkpoint(str(tmp_path / "obj")).save_sync(tmp_path / "nope")
    with pytest.raises(TypeError, match=r"pathlib.Path, a str path or bytes"):
        Checkpoint(str(tmp_path / "obj")).save_sync(12)  # type: ignore[arg-type]


def test_overwrite_replaces_the_whole_object(tmp_path) -> None:
    dest = str(tmp_path / "obj")
    cp = Checkpoint(dest)
    cp.save_sync(_tree(tmp_path / "src"))
    cp.save_sync(b"smaller")
    assert pathlib.Path(dest).read_bytes() == b"smaller"


# ------------------------------------------------------------------------- no checkpoint vs failure


def test_missing_and_empty_objects_mean_no_checkpoint(tmp_path) -> None:
    assert Checkpoint(str(tmp_path / "d"), str(tmp_path / "absent")).load_sync() is None
    (tmp_path / "empty").write_bytes(b"")
    assert Checkpoint(str(tmp_path / "d"), str(tmp_path / "empty")).load_sync() is None


def test_unreadable_source_raises_instead_of_restarting(tmp_path) -> None:
    (tmp_path / "a-directory").mkdir()
    cp = Checkpoint(str(tmp_path / "d"), str(tmp_path / "a-directory"))
    with pytest.raises(CheckpointLoadError, match="could not be read") as info:
        cp.load_sync()
    assert info.value.uri == str(tmp_path / "a-directory")
    assert not any(cp.path.iterdir())


def test_truncated_checkpoint_raises_and_restores_nothing(tmp_path) -> None:
    dest = tmp_path / "obj"
    Checkpoint(str(dest)).save_sync(_tree(tmp_path / "src"))
    data = dest.read_bytes()
    dest.write_bytes(data[: len(data) // 2])
    cp = Checkpoint(str(tmp_path / "d"), str(dest))
    with pytest.raises(CheckpointLoadError, match=r"cannot be restored: .*truncated.*CF-INTEG-01"):
        cp.load_sync()
    assert not any(cp.path.iterdir())
    assert sorted(p.name for p in cp.path.parent.iterdir()) == ["checkpoint"]  # no staging left


def test_hostile_archive_cannot_escape(tmp_path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in ("good.txt", "../../escaped.txt"):
            info = tarfile.TarInfo(name)
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))
    (tmp_path / "obj").write_bytes(buf.getvalue())
    cp = Checkpoint(str(tmp_path / "d"), str(tmp_path / "obj"))
    with pytest.raises(CheckpointLoadError,
                       match=r"member '\.\./\.\./escaped\.txt'.*CF-EXTRACT-02") as info:
        cp.load_sync()
    assert info.value.rule == "CF-EXTRACT-02"  # the rule is an attribute, not only text
    assert not any(cp.path.iterdir())
    assert not (cp.path.parent.parent / "escaped.txt").exists()


def test_errors_carry_their_rule_and_survive_pickling(tmp_path) -> None:
    """``rule`` names the spec rule the data broke, and is None where the data broke none."""
    import pickle

    cp = Checkpoint(str(tmp_path / "obj"))
    with pytest.raises(CheckpointSaveError) as empty:
        cp.save_sync(b"")
    assert empty.value.rule == "CF-WRITE-12"
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(CheckpointSaveError) as special:
        cp.save_sync(tmp_path / "fifo")
    assert special.value.rule == "CF-WRITE-05"
    (tmp_path / "prev").mkdir()  # a directory where the object should be: no rule broken
    with pytest.raises(CheckpointLoadError) as unreadable:
        Checkpoint(str(tmp_path / "d"), str(tmp_path / "prev")).load_sync()
    assert unreadable.value.rule is None
    for error in (empty.value, special.value, unreadable.value):
        copy = pickle.loads(pickle.dumps(error))
        assert (type(copy), str(copy), copy.uri, copy.rule) == (
            type(error), str(error), error.uri, error.rule)


def test_load_clears_stale_files_in_path(tmp_path) -> None:
    dest = str(tmp_path / "obj")
    Checkpoint(dest).save_sync(b"payload")
    cp = Checkpoint(str(tmp_path / "d"), dest)
    (cp.path / "stale.txt").write_text("from before")
    assert cp.load_sync() == cp.path / "payload"
    assert sorted(p.name for p in cp.path.iterdir()) == ["payload"]


def test_failed_save_keeps_the_previous_object(tmp_path) -> None:
    dest = tmp_path / "obj"
    Checkpoint(str(dest)).save_sync(b"previous")
    src = _tree(tmp_path / "src")
    os.mkfifo(src / "a-fifo")
    with pytest.raises(CheckpointSaveError,
                       match=r"previous object is unchanged.*'a-fifo'.*CF-WRITE-05"):
        Checkpoint(str(dest)).save_sync(src)
    assert dest.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".obj")) == []


# ------------------------------------------------------------------------- lifetime


def test_returned_path_outlives_the_checkpoint_object(tmp_path) -> None:
    dest = str(tmp_path / "obj")
    Checkpoint(dest).save_sync(_tree(tmp_path / "src"))
    path = Checkpoint(str(tmp_path / "d"), dest).load_sync()
    gc.collect()
    assert (path / "last.ckpt").read_bytes() == b"step-7"


def test_close_removes_the_workspace(tmp_path) -> None:
    dest = str(tmp_path / "obj")
    Checkpoint(dest).save_sync(b"x")
    with Checkpoint(str(tmp_path / "d"), dest) as cp:
        path = cp.load_sync()
        assert path.exists()
    assert not path.exists()


# ------------------------------------------------------------------------- async


def test_async_round_trip_and_the_loop_keeps_running(tmp_path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(os.urandom(48 << 20))

    async def main() -> int:
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.005)

        task = asyncio.create_task(ticker())
        await Checkpoint(str(tmp_path / "obj")).save(src)
        restored = await Checkpoint(str(tmp_path / "d"), str(tmp_path / "obj")).load()
        stop.set()
        await task
        assert (restored / "big.bin").read_bytes() == (src / "big.bin").read_bytes()
        return ticks

    assert asyncio.run(main()) >= 5


def test_sync_methods_refuse_to_run_inside_a_loop(tmp_path) -> None:
    async def main() -> None:
        with pytest.raises(SyncInAsyncError, match=r"await checkpoint.save"):
            Checkpoint(str(tmp_path / "obj")).save_sync(b"x")
        with pytest.raises(SyncInAsyncError, match=r"await checkpoint.load"):
            Checkpoint(str(tmp_path / "obj"), str(tmp_path / "x")).load_sync()

    asyncio.run(main())


def _previous_and_a_large_tree(tmp_path) -> tuple[pathlib.Path, pathlib.Path]:
    """A destination holding b"previous", and a tree big enough to cancel mid-save."""
    dest = tmp_path / "obj"
    Checkpoint(str(dest)).save_sync(b"previous")
    src = tmp_path / "src"
    src.mkdir()
    for i in range(8):
        (src / f"shard{i}.bin").write_bytes(os.urandom(16 << 20))
    return dest, src


def _writing_beside(target: pathlib.Path) -> bool:
    """Whether a hidden temporary sibling of ``target`` holds bytes: its writer has started."""
    for path in target.parent.iterdir():
        try:
            if path.name.startswith(".") and path.is_file() and path.stat().st_size > 0:
                return True
        except FileNotFoundError:  # renamed or removed while we looked
            continue
    return False


async def _until_the_save_writes(dest: pathlib.Path, task: asyncio.Task) -> None:
    """Return once the save in ``task`` has written bytes into its hidden temporary sibling
    of ``dest`` (so a cancel lands mid-write), polling instead of guessing with a sleep."""
    deadline = time.monotonic() + 60
    while not _writing_beside(dest):
        assert not task.done(), "the save ended before it was seen writing"
        assert time.monotonic() < deadline, "the save never started writing"
        await asyncio.sleep(0.002)


def test_cancelled_save_keeps_the_previous_object(tmp_path) -> None:
    dest, src = _previous_and_a_large_tree(tmp_path)

    async def main() -> None:
        task = asyncio.create_task(Checkpoint(str(dest)).save(src))
        await _until_the_save_writes(dest, task)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert dest.read_bytes() == b"previous"


def test_concurrent_saves_are_serialised_and_one_wins_whole(tmp_path) -> None:
    dest = str(tmp_path / "obj")
    trees = []
    for name in ("a", "b"):
        root = tmp_path / name
        root.mkdir()
        (root / "data.bin").write_bytes(os.urandom(20 << 20))
        (root / "who").write_text(name)
        trees.append(root)
    cp = Checkpoint(dest)

    async def main() -> None:
        await asyncio.gather(cp.save(trees[0]), cp.save(trees[1]))

    asyncio.run(main())
    restored = Checkpoint(str(tmp_path / "d"), dest).load_sync()
    winner = (restored / "who").read_text()
    assert _snapshot(restored) == _snapshot(tmp_path / winner)


def test_threads_saving_at_once_never_tear_the_object(tmp_path) -> None:
    dest = str(tmp_path / "obj")
    cp = Checkpoint(dest)
    blobs = [bytes([i]) * (3 << 20) for i in range(4)]
    threads = [threading.Thread(target=cp.save_sync, args=(blob,)) for blob in blobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert pathlib.Path(dest).read_bytes() in blobs


def test_empty_directory_checkpoint(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    Checkpoint(str(tmp_path / "obj")).save_sync(tmp_path / "empty")
    restored = Checkpoint(str(tmp_path / "d"), str(tmp_path / "obj")).load_sync()
    assert restored is not None and not any(restored.iterdir())


def test_upstream_empty_directory_object_is_an_empty_tarball(tmp_path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz"):
        pass
    (tmp_path / "obj").write_bytes(buf.getvalue())
    cp = Checkpoint(str(tmp_path / "d"), str(tmp_path / "obj"))
    assert cp.load_sync() == cp.path
    assert gzip.decompress(buf.getvalue()) == bytes(10240)


def test_one_log_line_per_save_and_load(tmp_path, caplog) -> None:
    caplog.set_level("INFO", logger="flyte_checkpoint")
    src = _tree(tmp_path / "src")
    dest = str(tmp_path / "obj")
    Checkpoint(dest).save_sync(src)
    Checkpoint(str(tmp_path / "d"), dest).load_sync()
    lines = [r.getMessage() for r in caplog.records if r.name == "flyte_checkpoint"]
    assert len(lines) == 2
    assert lines[0].startswith("checkpoint save: directory as tarball (6 members), 300.0 KB")
    assert " MB/s) to " in lines[0] and lines[0].endswith(dest)
    assert lines[1].startswith("checkpoint load: tarball (gzip, 6 members), 300.0 KB restored in")


def test_a_prefix_of_objects_is_not_mistaken_for_no_checkpoint(tmp_path) -> None:
    """Old flytekit checkpoints were prefixes holding many objects: refusing them loudly
    beats restarting training from step 0."""
    root = f"memory://ckpt-tests/{tmp_path.name}/old-style"
    Checkpoint(f"{root}/model.pt").save_sync(b"weights")
    with pytest.raises(CheckpointLoadError, match=r"is a prefix holding objects .*model\.pt"):
        Checkpoint(str(tmp_path / "d"), root).load_sync()
    assert Checkpoint(str(tmp_path / "d"), f"{root}-absent").load_sync() is None


def test_path_is_one_directory_whichever_thread_asks_first(tmp_path) -> None:
    cp = Checkpoint(str(tmp_path / "d"))
    seen: set[pathlib.Path] = set()
    barrier = threading.Barrier(8)

    def ask() -> None:
        barrier.wait()
        seen.add(cp.path)

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 1
    cp.close()


def test_close_removes_read_only_restored_directories(tmp_path) -> None:
    src = tmp_path / "src"
    (src / "ro").mkdir(parents=True)
    (src / "ro" / "w.bin").write_bytes(b"w")
    os.chmod(src / "ro", 0o555)
    dest = str(tmp_path / "obj")
    Checkpoint(dest).save_sync(src)
    cp = Checkpoint(str(tmp_path / "d"), dest)
    restored = cp.load_sync()
    assert os.stat(restored / "ro").st_mode & 0o777 == 0o555
    workspace = restored.parent
    cp.close()
    assert not workspace.exists()


def test_a_second_cancel_still_waits_for_the_abort(tmp_path) -> None:
    dest, src = _previous_and_a_large_tree(tmp_path)

    async def main() -> None:
        task = asyncio.create_task(Checkpoint(str(dest)).save(src))
        await _until_the_save_writes(dest, task)
        task.cancel()
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        pipeline = ("checkpoint-gzip", "checkpoint-emit", "checkpoint-decode", "checkpoint-verify")
        workers = [t.name for t in threading.enumerate() if t.name.startswith(pipeline)]
        assert workers == []  # the pipeline had finished aborting before the caller went on

    asyncio.run(main())
    assert dest.read_bytes() == b"previous"


def test_every_save_tells_storage_about_how_much_it_uploads(tmp_path, monkeypatch):
    """The hint sizes parts where they cannot grow (obstore's uploads): a directory's
    regular files (symlinks not followed), a file's or the bytes' size."""
    from checkpoint_io import _stream

    hints = []
    real = _stream.Transfer.__init__

    def spy(self, *args, **kwargs):
        real(self, *args, **kwargs)
        hints.append(self.size_hint)

    monkeypatch.setattr(_stream.Transfer, "__init__", spy)
    src = tmp_path / "src"
    (src / "nested").mkdir(parents=True)
    (src / "model.bin").write_bytes(b"m" * 3000)
    (src / "nested" / "opt.bin").write_bytes(b"o" * 5000)
    (src / "link").symlink_to("model.bin")
    (src / "to-dir").symlink_to("nested")
    with Checkpoint(str(tmp_path / "dest")) as cp:
        cp.save_sync(src)
        cp.save_sync(src / "model.bin")
        cp.save_sync(b"x" * 77)
    assert hints == [8000, 3000, 77]
