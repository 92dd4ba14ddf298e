"""Saves that hostile probes broke (issue 15): deep trees, several threads on one Checkpoint,
in-place rewrites with the mtime put back, special files, a destination inside the source,
empty payloads, odd buffers. Each either saves what was asked or fails at once, saying why,
with the previous object intact and nothing left behind."""

from __future__ import annotations

import contextlib
import os
import pathlib
import socket
import tempfile
import threading

import pytest
from checkpoint_format import remove_tree, restore
from flyte_checkpoint import Checkpoint, CheckpointSaveError
from flyte_checkpoint._fs import walk_tree
from flyte_checkpoint._snapshot import capture
from flyte_checkpoint.integrations._mirror import _fingerprint

SNAPSHOT_PREFIX = ".flyte-checkpoint-snapshot-"
DEPTH = 1_500  # past the recursion limit (1,000), inside PATH_MAX with one-letter names


@pytest.fixture(autouse=True)
def own_tempdir(tmp_path, monkeypatch):
    """Snapshots and workspaces go to this test's own temporary directory, which is removed
    afterwards: pytest's own clean-up of old temporary directories recurses (shutil.rmtree)
    and fails on the deep trees these tests build, and a strict run fails with it."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    yield scratch
    assert remove_tree(tmp_path), f"{tmp_path} could not be removed"


def _deep(root: pathlib.Path, depth: int = DEPTH) -> pathlib.Path:
    """``root/d/d/.../d/leaf.txt``, ``depth`` directories deep, built from descriptors so
    that no path longer than one name is ever passed to the kernel."""
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root, os.O_RDONLY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            below = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = below
        leaf = os.open("leaf.txt", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd)
        os.write(leaf, b"bottom")
        os.close(leaf)
    finally:
        os.close(fd)
    return root


def _snapshots_in(*parents: pathlib.Path) -> list[str]:
    return [p.name for parent in (*parents, pathlib.Path(tempfile.gettempdir()))
            for p in parent.iterdir() if p.name.startswith(SNAPSHOT_PREFIX)]


def _within(seconds: float, work):
    """Run ``work`` on a thread; fail (instead of hanging the suite) if it does not end."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["value"] = work()
        except BaseException as exc:  # handed to the test thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s (it hangs)"
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def _hold_uploads(checkpoint: Checkpoint) -> threading.Event:
    """Background uploads wait for the returned event before they start (a store slow to
    take the first byte)."""
    gate = threading.Event()
    original = checkpoint._save_blocking

    def held(data, cancelled, snapshot=None):
        if snapshot is not None:
            assert gate.wait(60), "the test never released the upload"
        return original(data, cancelled, snapshot)

    checkpoint._save_blocking = held
    return gate


# ---------------------------------------------------------------------- D4: deep trees


def test_remove_tree_takes_trees_deeper_than_path_max(tmp_path):
    root = _deep(tmp_path / "deep", depth=3_000)  # 6,000 characters of path: > PATH_MAX
    os.symlink("/", root / "d" / "root-link")  # never followed
    assert remove_tree(root) is True
    assert not root.exists()
    assert remove_tree(root) is True  # a missing tree is fine


def test_walk_tree_is_pre_order_sorted_and_iterative(tmp_path):
    (tmp_path / "w" / "b" / "c").mkdir(parents=True)
    (tmp_path / "w" / "b" / "c" / "f").write_bytes(b"")
    (tmp_path / "w" / "a").write_bytes(b"")
    os.symlink("b", tmp_path / "w" / "link")
    assert [name for name, _, _ in walk_tree(tmp_path / "w")] == [
        "a", "b", "b/c", "b/c/f", "link"]
    deep = _deep(tmp_path / "deep")
    assert sum(1 for _ in walk_tree(deep)) == DEPTH + 1


def test_close_removes_a_deep_workspace(tmp_path):
    checkpoint = Checkpoint(str(tmp_path / "store" / "ckpt"))
    workspace = checkpoint.path.parent
    _deep(checkpoint.path / "restored")
    checkpoint.close()
    assert not workspace.exists()


def test_a_deep_tree_is_captured_and_its_snapshot_removed(tmp_path):
    source = _deep(tmp_path / "work" / "ckpt")
    snapshot = capture(source)
    try:
        leaf = pathlib.Path(snapshot.source, *(["d"] * DEPTH), "leaf.txt")
        assert leaf.read_bytes() == b"bottom"
    finally:
        snapshot.cleanup()
    assert _snapshots_in(tmp_path / "work") == []


def test_a_deep_background_save_leaves_no_snapshot_and_later_saves_work(tmp_path):
    """Whatever the writer makes of the deep tree, the snapshot goes, and the next
    background save in the same temporary directory succeeds."""
    source = _deep(tmp_path / "work" / "ckpt")
    dest = tmp_path / "store" / "ckpt"
    with Checkpoint(str(dest)) as checkpoint:
        future = checkpoint.save_sync(source, wait=False)
        with contextlib.suppress(CheckpointSaveError):
            future.result(timeout=120)
        assert _snapshots_in(tmp_path / "work") == []
        with contextlib.suppress(CheckpointSaveError):
            checkpoint.save_sync(b"raised once")  # a failure above surfaces here
        checkpoint.save_sync(b"after", wait=False).result(timeout=60)
    assert dest.read_bytes() == b"after"


def test_a_deep_snapshot_left_by_a_killed_process_does_not_break_later_saves(tmp_path):
    # What a process killed mid-capture leaves: a snapshot directory whose lock is free.
    stale = pathlib.Path(tempfile.gettempdir()) / f"{SNAPSHOT_PREFIX}1-dead"
    _deep(stale / "ckpt")
    (stale / ".lock").write_bytes(b"")
    source = tmp_path / "work" / "model.bin"
    source.parent.mkdir()
    source.write_bytes(b"weights")
    dest = tmp_path / "store" / "ckpt"
    with Checkpoint(str(dest)) as checkpoint:
        checkpoint.save_sync(source, wait=False).result(timeout=60)
    assert dest.read_bytes() == b"weights"
    assert not stale.exists()


def test_the_mirror_fingerprints_a_deep_tree(tmp_path):
    deep = _deep(tmp_path / "deep")
    (entry,) = _fingerprint(deep)
    assert entry[0].endswith("leaf.txt") and entry[1] == len(b"bottom")
    assert _fingerprint(tmp_path / "absent") == ()


def test_a_deep_tree_round_trips(tmp_path):
    source = _deep(tmp_path / "work" / "ckpt")
    dest = tmp_path / "store" / "ckpt"
    with Checkpoint(str(dest)) as checkpoint:
        checkpoint.save_sync(source)
    with Checkpoint(str(tmp_path / "store" / "next"), str(dest)) as checkpoint:
        restored = checkpoint.load_sync()
        leaf = pathlib.Path(restored, *(["d"] * DEPTH), "leaf.txt")
        assert leaf.read_bytes() == b"bottom"
        workspace = checkpoint.path.parent
    assert not workspace.exists()


# ---------------------------------------------------------------------- D7: threads


class _Recording(Checkpoint):
    """Records each object's bytes at the moment it is published (still under the save
    lock, so the list is the order of publication)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.published: list[bytes] = []

    def _file(self, uri):
        file, published = super()._file(uri), self.published

        class Recorded:
            def with_options(self, **options):
                nonlocal file
                file = file.with_options(**options)
                return self

            @contextlib.contextmanager
            def open_sync(self, mode):
                with file.open_sync(mode) as remote:
                    yield remote
                if "w" in mode:
                    published.append(pathlib.Path(uri).read_bytes())

        return Recorded()


def test_many_threads_saving_through_one_checkpoint_lose_nothing_and_stay_ordered(tmp_path):
    threads, saves = 6, 20
    dest = tmp_path / "store" / "ckpt"
    checkpoint = _Recording(str(dest))
    start = threading.Barrier(threads)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        start.wait()
        futures = []
        try:
            for i in range(saves):
                payload = f"{t}:{i:03d}".encode()
                if i % 3 == 0:
                    checkpoint.save_sync(payload)
                else:
                    futures.append(checkpoint.save_sync(payload, wait=False))
            for future in futures:
                future.result(timeout=120)
        except BaseException as exc:  # checked below
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(180)
    checkpoint.close()
    assert errors == []
    expected = sorted(f"{t}:{i:03d}".encode() for t in range(threads) for i in range(saves))
    assert sorted(checkpoint.published) == expected  # every save published, once
    for t in range(threads):  # each thread's saves in the order it made them
        mine = [p for p in checkpoint.published if p.startswith(f"{t}:".encode())]
        assert mine == sorted(mine)
    assert dest.read_bytes() == checkpoint.published[-1]


# ---------------------------------------------------------------------- D8: torn files


@pytest.mark.parametrize("what", ["a file in a tree", "a single file"])
def test_an_in_place_rewrite_with_the_mtime_put_back_fails_the_save(tmp_path, what):
    """rsync --inplace -t: same inode, same size, the old mtime restored."""
    work = tmp_path / "work"
    (work / "ckpt").mkdir(parents=True)
    weights = work / "ckpt" / "weights.bin"
    weights.write_bytes(b"A" * 300_000)
    source = work / "ckpt" if what == "a file in a tree" else weights
    dest = tmp_path / "store" / "ckpt"
    checkpoint = Checkpoint(str(dest))
    checkpoint.save_sync(source)
    previous = dest.read_bytes()
    gate = _hold_uploads(checkpoint)
    future = checkpoint.save_sync(source, wait=False)
    before = os.stat(weights)
    with open(weights, "r+b") as handle:  # right after the call: in the capture's tick
        handle.write(b"B" * 300_000)
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(weights)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    gate.set()
    with pytest.raises(CheckpointSaveError) as raised:
        future.result(timeout=60)
    message = str(raised.value)
    assert str(dest) in message and "weights.bin was written in place" in message
    assert "change time" in message
    assert dest.read_bytes() == previous
    with contextlib.suppress(CheckpointSaveError):
        checkpoint.close()
    assert _snapshots_in(work) == []


def test_rotation_during_the_upload_is_not_taken_for_a_rewrite(tmp_path):
    """Deleting or atomically replacing a captured file moves its change time too (the
    link count changes): the save goes through."""
    source = tmp_path / "work" / "ckpt"
    source.mkdir(parents=True)
    (source / "old.bin").write_bytes(b"old" * 1000)
    (source / "last.bin").write_bytes(b"last" * 1000)
    dest = tmp_path / "store" / "ckpt"
    with Checkpoint(str(dest)) as checkpoint:
        gate = _hold_uploads(checkpoint)
        future = checkpoint.save_sync(source, wait=False)
        (source / "old.bin").unlink()
        (source / "new.tmp").write_bytes(b"new")
        os.replace(source / "new.tmp", source / "last.bin")
        gate.set()
        future.result(timeout=60)
    target = tmp_path / "restored"
    with open(dest, "rb") as stream:
        restore(stream, target)
    assert (target / "old.bin").read_bytes() == b"old" * 1000
    assert (target / "last.bin").read_bytes() == b"last" * 1000


# ---------------------------------------------------------------------- D9: special files


@pytest.fixture
def specials(tmp_path, monkeypatch):
    os.mkfifo(tmp_path / "fifo")
    monkeypatch.chdir(tmp_path)  # a short name for the socket (AF_UNIX: 108 bytes)
    server = socket.socket(socket.AF_UNIX)
    server.bind("sock")
    os.symlink(tmp_path / "fifo", tmp_path / "fifo-link")
    with server:
        yield {"a FIFO": tmp_path / "fifo", "a socket": tmp_path / "sock",
               "a character device": pathlib.Path("/dev/null"),
               "a FIFO (through a symlink)": tmp_path / "fifo-link"}


@pytest.mark.parametrize("wait", [True, False])
def test_special_files_as_data_are_refused_at_the_call(tmp_path, specials, wait):
    dest = tmp_path / "store" / "ckpt"
    specials["a character device (endless)"] = pathlib.Path("/dev/zero")
    with Checkpoint(str(dest)) as checkpoint:
        for kind, path in specials.items():
            with pytest.raises(CheckpointSaveError) as raised:
                _within(10, lambda path=path: checkpoint.save_sync(path, wait=wait))
            message = str(raised.value)
            assert str(path) in message and kind.split(" (")[0] in message, message
            assert "CF-WRITE-05" in message and str(dest) in message
    assert not dest.exists()
    assert _snapshots_in(tmp_path) == []


@pytest.mark.parametrize("wait", [True, False])
def test_a_fifo_inside_a_saved_directory_is_refused_without_hanging(tmp_path, wait):
    source = tmp_path / "work" / "ckpt"
    source.mkdir(parents=True)
    (source / "a.bin").write_bytes(b"a")
    os.mkfifo(source / "pipe")
    dest = tmp_path / "store" / "ckpt"
    with Checkpoint(str(dest)) as checkpoint:
        def save():
            result = checkpoint.save_sync(source, wait=wait)
            return result.result(timeout=30) if result is not None else None
        with pytest.raises(CheckpointSaveError) as raised:
            _within(20, save)
    message = str(raised.value)
    assert "pipe" in message and "CF-WRITE-05" in message and str(dest) in message
    assert not dest.exists()
    assert _snapshots_in(tmp_path / "work") == []


# ---------------------------------------------------------------------- D11: dest in source


@pytest.mark.parametrize("wait", [True, False])
@pytest.mark.parametrize("spelling", ["path", "file URI", "through a symlink"])
def test_a_destination_inside_the_saved_directory_is_refused(tmp_path, wait, spelling):
    source = tmp_path / "work"
    source.mkdir()
    (source / "model.bin").write_bytes(b"m" * 1000)
    os.symlink(source, tmp_path / "alias")
    dest = {"path": str(source / "ckpts" / "obj"),
            "file URI": f"file://{source}/ckpts/obj",
            "through a symlink": str(tmp_path / "alias" / "obj")}[spelling]
    with Checkpoint(dest) as checkpoint, pytest.raises(CheckpointSaveError) as raised:
        checkpoint.save_sync(source, wait=wait)
    message = str(raised.value)
    assert dest in message and "inside the directory being saved" in message
    assert sorted(p.name for p in source.iterdir()) == ["model.bin"]
    with Checkpoint(dest) as checkpoint:  # a file of that directory is fine
        checkpoint.save_sync(source / "model.bin")
    assert pathlib.Path(dest.removeprefix("file://")).read_bytes() == b"m" * 1000


# ---------------------------------------------------------------------- D12: empty payloads


@pytest.mark.parametrize("wait", [True, False])
@pytest.mark.parametrize("kind", ["bytes", "bytearray", "memoryview", "empty file"])
def test_an_empty_payload_is_refused_and_the_previous_checkpoint_kept(tmp_path, wait, kind):
    empty_file = tmp_path / "empty.bin"
    empty_file.write_bytes(b"")
    data = {"bytes": b"", "bytearray": bytearray(), "memoryview": memoryview(b""),
            "empty file": empty_file}[kind]
    dest = tmp_path / "store" / "ckpt"
    with Checkpoint(str(dest)) as checkpoint:
        checkpoint.save_sync(b"previous")
        with pytest.raises(CheckpointSaveError) as raised:
            checkpoint.save_sync(data, wait=wait)
    message = str(raised.value)
    assert "CF-WRITE-12" in message and "CF-OBJ-03" in message
    assert "'no checkpoint'" in message and "previous checkpoint is kept" in message
    assert dest.read_bytes() == b"previous"


def test_a_file_emptied_before_a_background_upload_reads_it_is_refused(tmp_path):
    source = tmp_path / "model.bin"
    source.write_bytes(b"weights")
    dest = tmp_path / "store" / "ckpt"
    checkpoint = Checkpoint(str(dest))
    checkpoint.save_sync(b"previous")
    gate = _hold_uploads(checkpoint)
    future = checkpoint.save_sync(source, wait=False)
    os.truncate(source, 0)  # in place: the snapshot's hard link sees it
    gate.set()
    with pytest.raises(CheckpointSaveError, match=r"empty.*CF-WRITE-12"):
        future.result(timeout=60)
    assert dest.read_bytes() == b"previous"
    with contextlib.suppress(CheckpointSaveError):
        checkpoint.close()


def test_an_empty_directory_is_still_saved_as_a_tarball(tmp_path):
    (tmp_path / "empty").mkdir()
    dest = tmp_path / "store" / "ckpt"
    with Checkpoint(str(dest)) as checkpoint:
        checkpoint.save_sync(tmp_path / "empty")
    assert dest.stat().st_size > 0


# ---------------------------------------------------------------------- D13: messages


def test_close_after_a_background_failure_says_close_ran(tmp_path):
    source = tmp_path / "model.bin"
    source.write_bytes(b"A" * 1000)
    checkpoint = Checkpoint(str(tmp_path / "store" / "ckpt"))
    workspace = checkpoint.path.parent
    gate = _hold_uploads(checkpoint)
    checkpoint.save_sync(source, wait=False)
    source.write_bytes(b"B" * 10)  # in place: size changes
    gate.set()
    with pytest.raises(CheckpointSaveError) as raised:
        checkpoint.close()
    message = str(raised.value)
    assert "model.bin was written in place" in message
    assert "raised by close(), which waited for it and then closed" in message
    assert "not started" not in message
    assert not workspace.exists()


@pytest.mark.parametrize("wait", [True, False])
def test_a_non_contiguous_memoryview_is_saved_as_its_bytes(tmp_path, wait):
    data = bytearray(b"a-b-c-d-e-")
    view = memoryview(data)[::2]
    assert not view.contiguous
    dest = tmp_path / "store" / "ckpt"
    with Checkpoint(str(dest)) as checkpoint:
        future = checkpoint.save_sync(view, wait=wait)
        data[0:1] = b"Z"  # after the call: not in the object
        if future is not None:
            future.result(timeout=60)
    assert dest.read_bytes() == b"abcde"
