"""Every ranged answer is checked against what was asked (``Content-Range``, length).

A server, or a cache in front of it, that answers a ranged GET with another range would
have the bytes of one offset taken for another's: a raw payload restored silently corrupt.
The emulators never lie, so a loopback proxy in front of each one falsifies 206 answers
(:meth:`FaultProxy.misrange_next`: the bytes from further on, honestly labelled). A wrong
answer is retried under the policy; one that stays wrong fails naming the URI, the range
asked and the range served.
"""

from __future__ import annotations

import asyncio
import os
import pickle

import pytest
from checkpoint_io import File, RetryPolicy, StorageError, StorageRetryError
from checkpoint_io._backend import check_range
from checkpoint_io._errors import Fault, RangeMismatch, classify
from checkpoint_io._retry import call_with_retries

MiB = 1024 * 1024
FAST = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.02, deadline=30, attempt_timeout=20)


# --- the check itself --------------------------------------------------------------------


@pytest.mark.parametrize(("start", "end", "status", "content_range", "length"), [
    (0, 100, 206, "bytes 0-99/1000", "100"),
    (900, 1000, 206, "bytes 900-999/1000", 100),
    (10, 20, 206, "bytes 10-19/*", None),
    (0, 1000, 200, None, "1000"),  # the whole object asked: a 200 is the right answer
    (0, 1000, 206, "bytes 0-999/1000", "1000"),
])
def test_answers_that_carry_the_range_asked_pass(start, end, status, content_range, length):
    check_range(start, end, 1000, status, content_range, length)


@pytest.mark.parametrize(("start", "end", "status", "content_range", "length", "served"), [
    (0, 100, 206, "bytes 10-99/1000", "90", "206 bytes 10-99/1000"),
    (0, 100, 206, "bytes 0-199/1000", "200", "206 bytes 0-199/1000"),
    (0, 100, 206, "bytes 0-99/2000", "100", "206 bytes 0-99/2000"),  # another object's
    (0, 100, 206, None, "100", "206 without Content-Range"),
    (0, 100, 206, "bytes 0-99/1000", "50", "206 bytes 0-99/1000, Content-Length 50"),
    (0, 100, 206, "items 0-99/1000", "100", "206 items 0-99/1000"),
])
def test_answers_with_another_range_raise_naming_both(start, end, status, content_range,
                                                      length, served):
    with pytest.raises(RangeMismatch) as info:
        check_range(start, end, 1000, status, content_range, length)
    err = info.value
    assert err.asked == f"bytes {start}-{end - 1}/1000"
    assert err.served == served
    assert str(err) == f"asked for {err.asked}, the server answered with {served}"
    assert classify(err) is Fault.TRANSIENT  # worth a new request


@pytest.mark.parametrize("length", ["12x", "1e3", " ", object()])
def test_a_malformed_content_length_is_a_range_mismatch(length):
    with pytest.raises(RangeMismatch) as info:
        check_range(0, 100, 1000, 206, "bytes 0-99/1000", length)
    assert info.value.served == f"206 with a malformed Content-Length {length!r}"
    assert classify(info.value) is Fault.TRANSIENT


@pytest.mark.parametrize(("start", "end"), [(100, 200), (0, 999)])
def test_a_server_that_ignores_range_fails_at_once(start, end):
    """A 200 with the whole object, for part of it: HTTP lets a server ignore Range, and one
    that does (or a proxy before it) answers every retry alike. One request, then a
    StorageError naming the URI, the range asked and what came back."""
    calls = []

    async def request():
        calls.append(1)
        check_range(start, end, 1000, 200, None, "1000")

    with pytest.raises(StorageError) as info:
        asyncio.run(call_with_retries(FAST, "s3://b/k", "read", request))
    err = info.value
    assert calls == [1] and not isinstance(err, StorageRetryError)
    assert (err.uri, err.operation) == ("s3://b/k", "read")
    assert str(err) == (f"read of s3://b/k failed: asked for bytes {start}-{end - 1}/1000,"
                        " the server answered with 200 without Content-Range (the whole"
                        " object): it ignores Range requests")
    cause = err.__cause__
    assert isinstance(cause, RangeMismatch) and cause.ignored
    assert pickle.loads(pickle.dumps(cause)).ignored
    copy = pickle.loads(pickle.dumps(err))
    assert (str(copy), copy.uri) == (str(err), err.uri)


# --- against the emulators, through a proxy that lies ------------------------------------


def put(file: File, data: bytes) -> None:
    with file.open_sync("wb") as f:
        f.write(data)


def read(file: File, n: int = MiB) -> bytes:
    parts = []
    with file.open_sync("rb") as f:
        while chunk := f.read(n):
            parts.append(chunk)
    return b"".join(parts)


def ranged_gets(proxy) -> list[str]:
    return [r for r in proxy.gets if r]


# One long GET (a small object), and ranged GETs in parallel (an object of several ranges).
READS = [pytest.param(3 * MiB + 17, 1, id="one-get"),
         pytest.param(20 * MiB + 5, 4, id="parallel-ranges")]


@pytest.mark.emulator
class TestLyingServer:
    @pytest.mark.parametrize(("size", "width"), READS)
    def test_wrong_range_once_is_retried_and_the_read_is_exact(self, remote_store, size,
                                                               width):
        data = os.urandom(size)
        put(remote_store.file("lied.bin"), data)
        proxy, options = remote_store.proxy()
        file = remote_store.file("lied.bin", storage_options=options, retry=FAST,
                                 read_concurrency=width)
        proxy.misrange_next(1, skip=4096)
        assert read(file) == data
        assert proxy.misranged == 1
        # The falsified answer was dropped and asked again, from the same first byte.
        gets = ranged_gets(proxy)
        assert len(gets) == len(set(gets)) + 1

    @pytest.mark.parametrize(("size", "width"), READS)
    def test_persistently_wrong_range_fails_naming_uri_asked_and_served(self, remote_store,
                                                                        size, width):
        data = os.urandom(size)
        put(remote_store.file("liar.bin"), data)
        proxy, options = remote_store.proxy()
        file = remote_store.file("liar.bin", storage_options=options, retry=FAST,
                                 read_concurrency=width)
        proxy.misrange_next(1000, skip=4096)
        got = []
        with pytest.raises(StorageRetryError) as info, file.open_sync("rb") as f:
            while chunk := f.read(MiB):
                got.append(chunk)
        assert got == []  # not one byte of a falsified answer was handed out
        err = info.value
        assert err.uri == file.path and err.attempts == FAST.attempts
        cause = err.__cause__
        assert isinstance(cause, RangeMismatch)
        first, last = cause.asked.removeprefix("bytes ").split("/")[0].split("-")
        assert int(first) == 0 and int(last) == (size - 1 if width == 1 else 8 * MiB - 1)
        assert cause.served.startswith(f"206 bytes {int(first) + 4096}-{last}/{size}")
        message = str(err)
        assert file.path in message and cause.asked in message and cause.served in message

    def test_download_checks_its_ranges_too(self, remote_store, tmp_path):
        data = os.urandom(3 * MiB + 1)
        put(remote_store.file("fetched.bin"), data)
        proxy, options = remote_store.proxy()
        file = remote_store.file("fetched.bin", storage_options=options, retry=FAST)
        proxy.misrange_next(1, skip=100)
        target = tmp_path / "once.bin"
        assert file.download_sync(str(target)) == str(target)
        assert target.read_bytes() == data and proxy.misranged == 1

        proxy.misrange_next(1000, skip=100)
        with pytest.raises(StorageRetryError) as info:
            file.download_sync(str(tmp_path / "never.bin"))
        assert isinstance(info.value.__cause__, RangeMismatch)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["once.bin"]  # no temp left
