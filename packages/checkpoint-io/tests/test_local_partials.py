"""What a killed local save leaves, and destinations that name a directory (issue 15).

A local save writes a hidden temp sibling ``.<name>.partial-<hex>`` and renames it into
place. SIGKILL mid-write leaves that file (tens of MB); a later save to the destination
removes it once it has gone unmodified for ten minutes (the tests put its mtime back). A
save still running in another process holds an ``flock`` on its own temp file, and that one
is left alone; so is a recent one that nobody locks (a writer without flock). The children
here are real processes, killed for real; the tests synchronise on a line each child prints
once it is writing, never on a sleep.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from checkpoint_io import File, _localfs
from checkpoint_io._localfs import PARTIAL_IDLE, open_temp_sibling, sweep_partials

MiB = 1024 * 1024

# Streams 1 MiB parts into argv[1]; says "streaming" once its temp file is being written,
# then (with argv[2] == "wait") waits for a line on stdin before finishing the object.
_WRITER = textwrap.dedent("""
    import os, sys
    from checkpoint_io import File
    file = File(path=sys.argv[1]).with_options(part_size=1 << 20)
    chunk = bytes([7]) * (1 << 20)
    with file.open_sync("wb") as f:
        for i in range(10_000 if sys.argv[2] == "forever" else 6):
            f.write(chunk)
            if i == 3:
                print("streaming", flush=True)
                if sys.argv[2] == "wait":
                    sys.stdin.readline()
    print("done", flush=True)
""")


def _writer(target, mode: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(target), mode],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "streaming"
    return proc


def _partials(directory, name: str) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(f".{name}.partial-"))


def _age(path, seconds: float = PARTIAL_IDLE + 60) -> None:
    """Make ``path`` look unmodified for ``seconds``."""
    then = os.stat(path).st_mtime - seconds
    os.utime(path, (then, then))


def _save(path, data: bytes) -> None:
    with File(path=str(path)).with_options(part_size=MiB).open_sync("wb") as f:
        f.write(data)


def test_next_save_removes_what_a_killed_save_left(tmp_path):
    target = tmp_path / "ckpt.bin"
    target.write_bytes(b"old checkpoint")
    proc = _writer(target, "forever")
    try:
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
        proc.stdin.close()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    left = _partials(tmp_path, "ckpt.bin")
    assert len(left) == 1 and (tmp_path / left[0]).stat().st_size >= MiB
    assert target.read_bytes() == b"old checkpoint"

    _save(target, b"recent")  # dead, but written a moment ago: not provably dead yet
    assert _partials(tmp_path, "ckpt.bin") == left
    _age(tmp_path / left[0])
    _save(target, b"new checkpoint")  # small: one write, the usual path
    assert target.read_bytes() == b"new checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.bin"]


def test_a_live_save_in_another_process_keeps_its_temp_file(tmp_path):
    target = tmp_path / "ckpt.bin"
    proc = _writer(target, "wait")  # paused mid-object, its temp file open and locked
    try:
        live = _partials(tmp_path, "ckpt.bin")
        assert len(live) == 1
        _save(target, os.urandom(3 * MiB))  # another save to the same destination
        assert _partials(tmp_path, "ckpt.bin") == live  # untouched
        proc.stdin.write("go on\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "done"
    finally:
        proc.stdin.close()
        proc.wait(60)
        proc.stdout.close()
    assert proc.returncode == 0
    assert target.read_bytes() == bytes([7]) * 6 * MiB  # the later publish wins, whole
    assert _partials(tmp_path, "ckpt.bin") == []


def test_a_live_save_in_this_process_keeps_its_temp_file(tmp_path):
    target = tmp_path / "ckpt.bin"
    with File(path=str(target)).with_options(part_size=MiB).open_sync("wb") as f:
        f.write(os.urandom(2 * MiB + 1))  # a part sent: the temp file exists
        live = _partials(tmp_path, "ckpt.bin")
        assert len(live) == 1
        assert sweep_partials(str(target)) == []
        _save(target, b"other")
        assert _partials(tmp_path, "ckpt.bin") == live
    assert target.stat().st_size == 2 * MiB + 1
    assert _partials(tmp_path, "ckpt.bin") == []


def test_the_sweep_touches_only_unlocked_temp_files_of_that_destination(tmp_path):
    target = tmp_path / "ckpt.bin"
    keep = [
        ".ckpt.bin.partial-not-hex-at-all",  # not a name we make
        ".ckpt.bin.partial-0123456789abcdef",  # too long
        ".other.bin.partial-0123456789ab",  # another destination's
        "ckpt.bin.partial-0123456789ab",  # not hidden
    ]
    for name in keep:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "elsewhere").write_bytes(b"precious")
    (tmp_path / ".ckpt.bin.partial-aaaaaaaaaaaa").symlink_to(tmp_path / "elsewhere")
    (tmp_path / ".ckpt.bin.partial-bbbbbbbbbbbb").mkdir()
    (tmp_path / ".ckpt.bin.partial-cccccccccccc").write_bytes(b"left by a killed save")
    temp, fd = open_temp_sibling(str(target))  # a live writer's, locked
    for name in (*keep, ".ckpt.bin.partial-cccccccccccc", os.path.basename(temp)):
        _age(tmp_path / name)
    try:
        assert sweep_partials(str(target)) == [".ckpt.bin.partial-cccccccccccc"]
        assert os.path.exists(temp)
    finally:
        os.close(fd)
    assert (tmp_path / "elsewhere").read_bytes() == b"precious"
    assert sorted(_partials(tmp_path, "ckpt.bin")) == sorted([
        os.path.basename(temp), ".ckpt.bin.partial-0123456789abcdef",
        ".ckpt.bin.partial-aaaaaaaaaaaa", ".ckpt.bin.partial-bbbbbbbbbbbb",
        ".ckpt.bin.partial-not-hex-at-all"])
    for name in keep:
        assert (tmp_path / name).exists()
    # Once its writer is gone (descriptor closed: the process died), it goes too.
    assert sweep_partials(str(target)) == [os.path.basename(temp)]


def test_an_unlocked_temp_file_being_written_is_not_swept(tmp_path):
    """A writer that took no lock (an older checkpoint-io on a shared volume, a client
    whose mount has no flock): its file is free to lock, but written recently."""
    target = tmp_path / "ckpt.bin"
    unlocked = tmp_path / ".ckpt.bin.partial-dddddddddddd"
    unlocked.write_bytes(b"being written")
    _age(unlocked, PARTIAL_IDLE - 60)  # nine minutes since its last write
    assert sweep_partials(str(target)) == []
    _save(target, b"a save beside it")
    assert unlocked.read_bytes() == b"being written"
    _age(unlocked, 120)  # eleven: its writer is gone
    assert sweep_partials(str(target)) == [unlocked.name]


def _no_flock(monkeypatch, code: int) -> list[int]:
    """flock() failing as on a file system without it (a fault this one cannot make)."""
    calls = []

    def flock(fd, operation):
        calls.append(operation)
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(_localfs.fcntl, "flock", flock)
    return calls


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS])
def test_local_saves_and_downloads_work_without_flock(tmp_path, monkeypatch, code):
    target = tmp_path / "ckpt.bin"
    data = os.urandom(3 * MiB + 5)
    left = tmp_path / ".ckpt.bin.partial-eeeeeeeeeeee"  # dead long ago, unlockable here
    left.write_bytes(b"old")
    _age(left)
    calls = _no_flock(monkeypatch, code)
    _save(target, data)
    assert target.read_bytes() == data and calls
    copy = tmp_path / "copy.bin"
    assert File(path=str(target)).download_sync(str(copy)) == str(copy)
    assert copy.read_bytes() == data
    # Not provably dead without a lock: kept, and nothing else beside the objects.
    assert sorted(p.name for p in tmp_path.iterdir()) == [left.name, "ckpt.bin", "copy.bin"]


def test_other_flock_errors_still_fail_the_save(tmp_path, monkeypatch):
    target = tmp_path / "ckpt.bin"
    _no_flock(monkeypatch, errno.EBADF)
    with pytest.raises(OSError, match="Bad file descriptor"):
        _save(target, b"x")
    assert list(tmp_path.iterdir()) == []


def test_a_temp_file_swept_before_it_was_locked_is_replaced_by_a_new_one(tmp_path,
                                                                        monkeypatch):
    """The instant between creating a temp file and locking it: a sweep that takes it
    then removes it; the writer notices the name is no longer its file, and makes another.
    (A new file looks recent to a sweep; here it is made to look idle, as a clock stepped
    forward would.)"""
    import fcntl

    from checkpoint_io import _localfs

    real_flock = fcntl.flock
    raced = []

    def flock_after_a_sweep(fd, operation):
        if not raced:  # another save's sweep gets there first, once
            raced.append(None)
            for path in tmp_path.iterdir():
                _age(path)
            raced[0] = sweep_partials(str(tmp_path / "ckpt.bin"))
        return real_flock(fd, operation)

    monkeypatch.setattr(_localfs.fcntl, "flock", flock_after_a_sweep)
    temp, fd = open_temp_sibling(str(tmp_path / "ckpt.bin"))
    try:
        assert len(raced[0]) == 1 and raced[0][0] != os.path.basename(temp)
        assert _partials(tmp_path, "ckpt.bin") == [os.path.basename(temp)]
    finally:
        os.close(fd)


# --------------------------------------------------------- destinations naming directories


def test_a_local_destination_ending_in_slash_is_refused(tmp_path):
    uri = f"{tmp_path}/ckpt/"
    with pytest.raises(IsADirectoryError) as info, File(path=uri).open_sync("wb") as f:
        f.write(b"data")
    assert info.value.errno == errno.EISDIR and info.value.filename == uri
    assert uri in str(info.value) and "ends in '/'" in str(info.value)
    assert list(tmp_path.iterdir()) == []  # no file "ckpt" beside the directory meant


def test_a_local_destination_that_is_a_directory_is_refused_before_any_write(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "inside").write_bytes(b"kept")
    uri = str(tmp_path / "ckpt")
    with pytest.raises(IsADirectoryError) as info, File(path=uri).open_sync("wb") as f:
        f.write(b"data")
    assert info.value.filename == uri and uri in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert (tmp_path / "ckpt" / "inside").read_bytes() == b"kept"


def test_a_uri_ending_in_slash_is_refused_on_every_store(store):
    uri = store.uri("run-1/")
    file = File(path=uri)
    refused = pytest.raises(IsADirectoryError, match="ends in '/'")
    with refused as info, file.open_sync("wb") as f:
        f.write(b"data")
    assert info.value.filename == uri
    for operation in (lambda: file.open_sync("rb").__enter__(), file.exists_sync,
                      file.download_sync):
        with pytest.raises(IsADirectoryError) as info:
            operation()
        assert info.value.filename == uri
    assert not File(path=store.uri("run-1")).exists_sync()  # nothing written anywhere
