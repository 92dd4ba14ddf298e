"""Background saves: ``save_sync(data, wait=False)`` and ``await save(data, wait=False)``.

The published object holds exactly what the source held when the call returned (files
deleted, replaced or buffers mutated afterwards included), or the save fails loudly; failures
surface from the future, the next save and close(); saves stay ordered; exit waits.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
from concurrent.futures import Future

import pytest
from checkpoint_format import restore
from flyte_checkpoint import Checkpoint, CheckpointSaveError

SNAPSHOT_PREFIX = ".flyte-checkpoint-snapshot-"


@pytest.fixture(autouse=True)
def own_tempdir(tmp_path, monkeypatch):
    """Snapshots go to the temporary directory when it is on the source's file system (as
    here): one of each test's own, so that leftovers can be checked."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    return scratch


@pytest.fixture
def release_once_logged(caplog):
    """``arm(gate, text)``: release held uploads when the helper logs ``text``, i.e. once the
    caller is waiting for the upload in flight. (A timer could fire, and the upload end,
    before a slow caller gets there: then nothing waits and nothing is logged.)"""
    logger = logging.getLogger("flyte_checkpoint")
    caplog.set_level(logging.INFO, logger="flyte_checkpoint")  # the line must be emitted
    armed: list[logging.Handler] = []

    def arm(gate, text: str) -> None:
        class Release(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if text in record.getMessage():
                    gate.set()

        armed.append(Release())
        logger.addHandler(armed[-1])

    yield arm
    for handler in armed:
        logger.removeHandler(handler)


def _tree(root: pathlib.Path, tag: bytes) -> pathlib.Path:
    (root / "shards").mkdir(parents=True, exist_ok=True)
    (root / "shards" / "0.bin").write_bytes(tag * 100_000)
    (root / "meta.json").write_bytes(b'{"tag": "' + tag + b'"}')
    os.symlink("shards/0.bin", root / "latest")
    return root


def _contents(root: pathlib.Path) -> dict[str, bytes | str]:
    return {p.relative_to(root).as_posix(): (os.readlink(p) if p.is_symlink() else
                                             p.read_bytes() if p.is_file() else "dir")
            for p in sorted(root.rglob("*"))}


def _restored(tmp_path: pathlib.Path, uri: str) -> dict[str, bytes | str]:
    target = tmp_path / f"restored-{len(list(tmp_path.glob('restored-*')))}"
    with open(uri, "rb") as stream:
        restore(stream, target)
    return _contents(target)


def _no_snapshots_left(*parents: pathlib.Path) -> None:
    import tempfile

    for parent in (*parents, pathlib.Path(tempfile.gettempdir())):
        left = [p.name for p in parent.iterdir() if p.name.startswith(SNAPSHOT_PREFIX)]
        assert left == [], f"snapshot directories left in {parent}: {left}"


def test_returns_a_future_and_publishes_what_was_there_at_the_call(tmp_path):
    source = _tree(tmp_path / "work" / "ckpt", b"A")
    expected = _contents(source)
    dest = str(tmp_path / "store" / "ckpt")
    with Checkpoint(dest) as checkpoint:
        future = checkpoint.save_sync(source, wait=False)
        assert isinstance(future, Future)
        # What training loops do right after: rotate (delete), replace atomically, add.
        (source / "meta.json").unlink()
        replacement = source / "shards" / "0.bin.tmp"
        replacement.write_bytes(b"B" * 5)
        os.replace(replacement, source / "shards" / "0.bin")
        (source / "new.bin").write_bytes(b"later")
        assert future.result(timeout=60) is None
    assert _restored(tmp_path, dest) == expected
    _no_snapshots_left(tmp_path / "work")


@pytest.mark.parametrize("kind", ["bytearray", "memoryview", "bytes"])
def test_buffers_are_captured_at_the_call(tmp_path, kind):
    data = bytearray(b"x" * 1_000_000)
    payload = {"bytearray": data, "memoryview": memoryview(data), "bytes": bytes(data)}[kind]
    dest = tmp_path / "store" / "ckpt"
    with Checkpoint(str(dest)) as checkpoint:
        future = checkpoint.save_sync(payload, wait=False)
        data[:4] = b"MUT!"
        future.result(timeout=60)
    assert dest.read_bytes() == b"x" * 1_000_000


def test_a_single_file_is_captured_too(tmp_path):
    source = tmp_path / "work" / "model.pt"
    source.parent.mkdir()
    source.write_bytes(b"weights-1" * 1000)
    dest = tmp_path / "store" / "ckpt"
    with Checkpoint(str(dest)) as checkpoint:
        future = checkpoint.save_sync(str(source), wait=False)
        source.unlink()
        future.result(timeout=60)
    assert dest.read_bytes() == b"weights-1" * 1000
    _no_snapshots_left(tmp_path / "work")


def test_writing_in_place_fails_loudly_and_keeps_the_previous_object(tmp_path, caplog):
    source = _tree(tmp_path / "work" / "ckpt", b"A")
    dest = tmp_path / "store" / "ckpt"
    checkpoint = Checkpoint(str(dest))
    checkpoint.save_sync(source)
    previous = dest.read_bytes()
    # Hold the upload until the file has been rewritten in place, as a loop doing
    # torch.save(state, same_path) right after the call would.
    gate = _hold_uploads(checkpoint)
    future = checkpoint.save_sync(source, wait=False)
    with open(source / "shards" / "0.bin", "r+b") as handle:  # same inode, same size
        handle.write(b"Z")
    gate.set()
    with caplog.at_level(logging.ERROR, logger="flyte_checkpoint"), \
            pytest.raises(CheckpointSaveError) as raised:
        future.result(timeout=60)
    message = str(raised.value)
    assert str(dest) in message and "shards/0.bin was written in place" in message
    assert "background save failed" in caplog.text
    assert dest.read_bytes() == previous
    # The next save raises it (and does not start), then saves go on.
    with pytest.raises(CheckpointSaveError, match=r"a new save was not started"):
        checkpoint.save_sync(b"next")
    checkpoint.save_sync(b"next")
    checkpoint.close()
    assert dest.read_bytes() == b"next"
    _no_snapshots_left(tmp_path / "work")


def test_close_raises_a_failure_nothing_raised_yet(tmp_path):
    source = _tree(tmp_path / "work" / "ckpt", b"A")
    checkpoint = Checkpoint(str(tmp_path / "store" / "ckpt"))
    gate = _hold_uploads(checkpoint)
    future = checkpoint.save_sync(source, wait=False)
    (source / "meta.json").write_bytes(b"{}")  # in place: size changes
    gate.set()
    with pytest.raises(CheckpointSaveError, match=r"meta\.json was written in place"):
        checkpoint.close()
    assert future.exception(timeout=0) is not None
    checkpoint.close()  # raised once


def test_saves_stay_ordered_one_in_flight(tmp_path, caplog, release_once_logged):
    dest = tmp_path / "store" / "ckpt"
    checkpoint = Checkpoint(str(dest))
    gate = _hold_uploads(checkpoint)
    first = checkpoint.save_sync(b"first", wait=False)
    release_once_logged(gate, "a new save waits for the background save")
    with caplog.at_level(logging.INFO, logger="flyte_checkpoint"):
        second = checkpoint.save_sync(b"second", wait=False)  # waits for the first
    assert first.done()
    assert "a new save waits for the background save" in caplog.text
    second.result(timeout=60)
    checkpoint.close()
    assert dest.read_bytes() == b"second"


def test_a_blocking_save_waits_for_the_background_one(tmp_path, caplog,
                                                      release_once_logged):
    dest = tmp_path / "store" / "ckpt"
    with Checkpoint(str(dest)) as checkpoint:
        gate = _hold_uploads(checkpoint)
        background = checkpoint.save_sync(b"background", wait=False)
        release_once_logged(gate, "a new save waits for the background save")
        checkpoint.save_sync(b"blocking")  # releases the upload once it waits for it
        assert background.done()
        assert "a new save waits for the background save" in caplog.text
    assert dest.read_bytes() == b"blocking"


def test_close_and_context_exit_wait_and_say_so(tmp_path, caplog, release_once_logged):
    dest = tmp_path / "store" / "ckpt"
    with caplog.at_level(logging.INFO, logger="flyte_checkpoint"):
        with Checkpoint(str(dest)) as checkpoint:
            gate = _hold_uploads(checkpoint)
            future = checkpoint.save_sync(b"payload", wait=False)
            release_once_logged(gate, "close() waits for the background save to")
        assert future.done() and dest.read_bytes() == b"payload"
    assert "close() waits for the background save to" in caplog.text


def test_async_save_returns_an_awaitable_once_captured(tmp_path):
    source = _tree(tmp_path / "work" / "ckpt", b"A")
    expected = _contents(source)
    dest = str(tmp_path / "store" / "ckpt")

    async def main() -> None:
        async with Checkpoint(dest) as checkpoint:
            done = await checkpoint.save(source, wait=False)
            assert isinstance(done, asyncio.Future)
            (source / "meta.json").unlink()
            assert await done is None
            assert _restored(tmp_path, dest) == expected
            assert await checkpoint.save(b"then the default: returns once saved") is None
            assert pathlib.Path(dest).read_bytes() == b"then the default: returns once saved"

    asyncio.run(main())


def test_interpreter_exit_waits_for_the_upload(tmp_path):
    """A script that returns right after a background save still publishes it."""
    source = _tree(tmp_path / "work" / "ckpt", b"A")
    dest = tmp_path / "store" / "ckpt"
    script = textwrap.dedent(f"""
        import logging, shutil, sys
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        from flyte_checkpoint import Checkpoint
        Checkpoint({str(dest)!r}).save_sync({str(source)!r}, wait=False)
        shutil.rmtree({str(source)!r})  # the loop cleans up and returns at once
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=False,
                          env={**os.environ, "TMPDIR": str(tmp_path / "tmp")})
    assert done.returncode == 0, done.stderr
    assert "waiting at exit for the background save to" in done.stderr
    assert _restored(tmp_path, str(dest))["meta.json"] == b'{"tag": "A"}'
    _no_snapshots_left(tmp_path / "work")


def test_sigkill_during_a_background_upload_keeps_the_previous_object(tmp_path):
    source = _tree(tmp_path / "work" / "ckpt", b"A")
    (source / "big.bin").write_bytes(os.urandom(4 << 20))
    dest = tmp_path / "store" / "ckpt"
    Checkpoint(str(dest)).save_sync(b"previous")
    # A slow disk (fault injection): every chunk of the upload takes 50 ms.
    script = textwrap.dedent(f"""
        import sys, time
        from flyte_checkpoint import _checkpoint, _pipeline
        write = _pipeline.WriteSink.write
        def slow(self, data):
            print("uploading", flush=True)
            time.sleep(0.05)
            return write(self, data)
        _pipeline.WriteSink.write = slow
        _checkpoint.Checkpoint({str(dest)!r}).save_sync({str(source)!r}, wait=False)
        time.sleep(600)
    """)
    with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                          text=True, env={**os.environ, "TMPDIR": str(tmp_path / "tmp")}) as child:
        assert child.stdout.readline() == "uploading\n"
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    assert dest.read_bytes() == b"previous"
    stale = [p for p in (tmp_path / "tmp").iterdir() if p.name.startswith(SNAPSHOT_PREFIX)]
    assert len(stale) == 1, "the killed process's snapshot is there, to be removed later"
    # The next capture beside the same source removes it.
    with Checkpoint(str(dest)) as checkpoint:
        checkpoint.save_sync(source, wait=False).result(timeout=60)
    _no_snapshots_left(tmp_path / "work")
    assert _restored(tmp_path, str(dest))["big.bin"] == (source / "big.bin").read_bytes()


def test_relative_paths_and_the_working_directory(tmp_path, monkeypatch):
    source = _tree(tmp_path / "work" / "ckpt", b"A")
    expected = _contents(source)
    dest = str(tmp_path / "store" / "ckpt")
    monkeypatch.chdir(source)
    with Checkpoint(dest) as checkpoint:
        checkpoint.save_sync(".", wait=False).result(timeout=60)
        assert _restored(tmp_path, dest) == expected
        monkeypatch.chdir(source / "shards")
        checkpoint.save_sync("..", wait=False).result(timeout=60)
        assert _restored(tmp_path, dest) == expected
    _no_snapshots_left(tmp_path / "work")


def test_a_snapshot_is_never_part_of_another_save(tmp_path):
    """A snapshot beside a source (where the temporary directory is elsewhere) must not end
    up in a later save of the parent directory."""
    parent = tmp_path / "run"
    _tree(parent / "ckpt", b"A")
    (parent / f"{SNAPSHOT_PREFIX}123-abc" / "ckpt").mkdir(parents=True)  # another save's
    dest = str(tmp_path / "store" / "ckpt")
    with Checkpoint(dest) as checkpoint:
        checkpoint.save_sync(parent, wait=False).result(timeout=60)
    assert not any(SNAPSHOT_PREFIX in name for name in _restored(tmp_path, dest))


def test_data_that_cannot_be_frozen_fails_with_the_uri(tmp_path):
    source = _tree(tmp_path / "work" / "ckpt", b"A")
    os.mkfifo(source / "pipe")
    dest = str(tmp_path / "store" / "ckpt")
    with Checkpoint(dest) as checkpoint, pytest.raises(CheckpointSaveError) as raised:
        checkpoint.save_sync(source, wait=False)
    assert dest in str(raised.value) and "could not be frozen" in str(raised.value)
    assert "pipe" in str(raised.value)
    _no_snapshots_left(tmp_path / "work")


def test_the_snapshot_is_gone_when_the_future_completes(tmp_path):
    import tempfile

    source = _tree(tmp_path / "work" / "ckpt", b"A")
    with Checkpoint(str(tmp_path / "store" / "ckpt")) as checkpoint:
        checkpoint.save_sync(source, wait=False).result(timeout=60)
        assert not [p for p in pathlib.Path(tempfile.gettempdir()).iterdir()
                    if p.name.startswith(SNAPSHOT_PREFIX)]


def test_a_done_callback_may_save_again(tmp_path):
    dest = tmp_path / "store" / "ckpt"
    checkpoint = Checkpoint(str(dest))
    gate = _hold_uploads(checkpoint)
    chained: list[Future] = []
    first = checkpoint.save_sync(b"first", wait=False)
    first.add_done_callback(lambda _: chained.append(checkpoint.save_sync(b"second", wait=False)))
    gate.set()
    first.result(timeout=60)
    import time

    deadline = time.monotonic() + 30
    while not chained and time.monotonic() < deadline:
        time.sleep(0.01)
    chained[0].result(timeout=60)
    checkpoint.close()
    assert dest.read_bytes() == b"second"


# ---------------------------------------------------------------------- helpers


def _hold_uploads(checkpoint: Checkpoint):
    """Make this checkpoint's uploads wait for the returned event before they start
    (fault injection: a store that is slow to accept the first byte)."""
    import threading

    gate = threading.Event()
    original = checkpoint._save_blocking

    def held(data, cancelled, snapshot=None):
        if snapshot is not None:
            assert gate.wait(60), "the test never released the upload"
        return original(data, cancelled, snapshot)

    checkpoint._save_blocking = held
    return gate


def test_the_upload_gives_way_to_the_training_loop(tmp_path):
    """Upload threads run at a higher niceness, so under CPU contention the loop goes first."""
    import threading

    checkpoint = Checkpoint(str(tmp_path / "store" / "ckpt"))
    seen = []
    original = checkpoint._save_blocking

    def recording(data, cancelled, snapshot=None):
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return original(data, cancelled, snapshot)

    checkpoint._save_blocking = recording
    checkpoint.save_sync(b"x", wait=False).result(timeout=60)
    checkpoint.save_sync(b"y")
    checkpoint.close()
    own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert seen == [max(own, 10), own]


def test_a_sweep_between_making_a_snapshot_and_locking_it_leaves_it_alone(tmp_path,
                                                                          monkeypatch):
    """Another process's capture sweeps the same temporary directory for killed processes'
    snapshots. One that ran after this capture made its lock file and before it took the
    lock removed the live snapshot (4 ranks of a DCP save capturing at once did): the lock
    is taken before the file gets the name sweeps look at."""
    from flyte_checkpoint import _snapshot

    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir(exist_ok=True)
    monkeypatch.setattr(_snapshot.tempfile, "tempdir", None)  # TMPDIR read anew
    source = _tree(tmp_path / "work" / "ckpt", b"A")
    flock = _snapshot.fcntl.flock
    swept = []

    def sweep_first(fd: int, operation: int) -> None:
        if not swept:  # the other process's sweep, at the worst moment
            swept.append(True)
            _snapshot._remove_stale(tmp_path / "tmp")
        flock(fd, operation)

    monkeypatch.setattr(_snapshot.fcntl, "flock", sweep_first)
    dest = str(tmp_path / "store" / "ckpt")
    with Checkpoint(dest) as checkpoint:
        checkpoint.save_sync(source, wait=False).result(timeout=60)
    assert swept and _restored(tmp_path, dest) == _contents(source)
