"""Fault injection against real emulators: throttling, a server that dies mid-upload, and a
local writer killed with SIGKILL."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from checkpoint_io import File, RetryPolicy, StorageRetryError

FAST = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05, deadline=20, attempt_timeout=10)


def run(coroutine):
    return asyncio.run(coroutine)


def write(file: File, data: bytes) -> None:
    with file.open_sync("wb") as f:
        f.write(data)


def read(file: File) -> bytes:
    with file.open_sync("rb") as f:
        return f.read()


pytestmark = pytest.mark.emulator


class TestThrottling:
    def test_first_requests_throttled_then_succeeds(self, remote_store):
        proxy, options = remote_store.proxy()
        file = remote_store.file("throttled.bin", storage_options=options, retry=FAST)
        data = os.urandom(2 * remote_store.part_size + 5)
        proxy.fail_next(3)  # within the budget of 4 attempts per request
        write(file, data)
        proxy.fail_next(3)
        assert read(file) == data
        proxy.fail_next(2)
        assert file.exists_sync()
        assert proxy.failures_left == 0

    def test_throttling_beyond_budget_raises_one_clear_error(self, remote_store):
        direct = remote_store.file("budget.bin")
        write(direct, b"previous")
        proxy, options = remote_store.proxy()
        file = remote_store.file("budget.bin", storage_options=options, retry=FAST)
        proxy.fail_next(1000)
        started = proxy.requests
        with pytest.raises(StorageRetryError) as info:
            write(file, os.urandom(2 * remote_store.part_size + 5))
        err = info.value
        assert err.uri == file.path and err.attempts == FAST.attempts
        assert err.operation in ("start upload", "upload part 1", "upload part 2")
        assert f"{err.operation} of {file.path} failed after 4 attempts" in str(err)
        assert err.__cause__ is not None
        # Every attempt reached the server; the abort is best effort and may add a few.
        assert proxy.requests - started >= FAST.attempts
        assert read(direct) == b"previous"

        with pytest.raises(StorageRetryError) as info:
            file.exists_sync()
        assert info.value.operation == "exists" and info.value.attempts == 4

    def test_deadline_bounds_the_retries(self, remote_store):
        proxy, options = remote_store.proxy()
        policy = RetryPolicy(attempts=100, base_delay=0.2, max_delay=0.2, deadline=2.0)
        file = remote_store.file("deadline.bin", storage_options=options, retry=policy)
        assert not file.exists_sync()  # warm the client up outside the timed part
        proxy.fail_next(10_000)
        start = time.monotonic()
        with pytest.raises(StorageRetryError) as info:
            file.exists_sync()
        assert time.monotonic() - start < 6
        assert 1 < info.value.attempts < 100

    def test_missing_object_is_not_retried(self, remote_store):
        proxy, options = remote_store.proxy()
        file = remote_store.file("absent.bin", storage_options=options, retry=FAST)
        assert file.exists_sync() is False
        assert proxy.requests == 1
        with pytest.raises(FileNotFoundError):
            read(file)
        assert proxy.requests == 2


class TestServerStoppedMidUpload:
    def test_no_partial_object_previous_intact_clear_error(self, remote_store):
        direct = remote_store.file("dies.bin")
        old = os.urandom(1000)
        write(direct, old)
        proxy, options = remote_store.proxy()
        policy = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.02, deadline=10,
                             attempt_timeout=5)
        file = remote_store.file("dies.bin", storage_options=options, retry=policy)
        proxy.stop_after = 3  # e.g. start upload and two parts, then the server is gone
        chunk = os.urandom(remote_store.part_size)
        with pytest.raises(StorageRetryError) as info, file.open_sync("wb") as f:
            for _ in range(8):
                f.write(chunk)
        err = info.value
        assert err.uri == file.path and err.attempts == 3
        assert isinstance(err.__cause__, Exception)
        assert read(direct) == old


_KILLED_WRITER = textwrap.dedent("""
    import os, sys
    from checkpoint_io import File
    file = File(path=sys.argv[1]).with_options(part_size=1 << 20)
    chunk = os.urandom(1 << 20)
    with file.open_sync("wb") as f:
        for i in range(10_000):
            f.write(chunk)
            if i == 3:
                print("streaming", flush=True)
""")


def test_sigkill_mid_write_leaves_old_local_file(tmp_path):
    target = tmp_path / "ckpt.bin"
    target.write_bytes(b"old checkpoint")
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(target)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "streaming"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert target.read_bytes() == b"old checkpoint"
    assert File(path=str(target)).exists_sync()
    # The only possible leftover is the hidden temp sibling, never the object's own name.
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p != target)
    assert all(name.startswith(".ckpt.bin.partial-") for name in leftovers), leftovers
