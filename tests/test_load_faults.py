"""Loads that the store breaks, through flyte.Checkpoint on the real emulators (issue 15).

- A server that answers a ranged GET with another range: retried, and a raw payload is
  restored exact; one that keeps doing it fails the load, restoring nothing.
- A store that dies mid-load, or an object replaced mid-load: one clean error naming the
  URI and the member being restored, the storage error kept as it was (its cause chained),
  never a ``TypeError`` from re-wrapping it, never a doubled message.

The lies and the deaths come from a loopback proxy in front of each emulator (see
``checkpoint_testing.emulators.FaultProxy``).
"""

from __future__ import annotations

import errno
import io
import os

import pytest
from checkpoint_format import restore, write_tarball
from checkpoint_io import ObjectChangedError, StorageRetryError
from checkpoint_io._errors import RangeMismatch
from checkpoint_testing import stores as storage_fixtures
from checkpoint_testing.stores import MiB
from flyte_checkpoint import CheckpointLoadError

e2e_emulators = storage_fixtures.e2e_emulators
remote_store = storage_fixtures.remote_store

BIG = "model.bin"  # the one large member: where a load cut short is cut


def _chain(exc: BaseException) -> list[BaseException]:
    seen = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def _tarball_checkpoint(store, tmp_path, name: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text('{"step": 3}')
    # 16 MiB: four gzip members of its data, so that a read cut at 6 MiB is cut inside
    # it (the restorer is writing it), not between two members.
    (src / BIG).write_bytes(os.urandom(16 * MiB))
    with store.checkpoint(name) as cp:
        cp.save_sync(src)


def _assert_nothing_restored(cp) -> None:
    assert not any(cp.path.iterdir())
    assert sorted(p.name for p in cp.path.parent.iterdir()) == ["checkpoint"]


# --------------------------------------------------------------------- wrong ranges (D5)


@pytest.mark.emulator
def test_wrong_range_is_retried_and_a_raw_payload_restored_exact(remote_store) -> None:
    payload = os.urandom(3 * MiB + 11)  # no tar, no digest: only the range check guards it
    remote_store.put("attempt-1", payload)
    proxy, options = remote_store.counting_proxy()
    proxy.misrange_next(1, skip=64 * 1024)
    with remote_store.checkpoint("attempt-2", "attempt-1", options=options) as cp:
        restored = cp.load_sync()
        assert restored.read_bytes() == payload
    assert proxy.misranged == 1


@pytest.mark.emulator
def test_persistently_wrong_range_fails_the_load_and_restores_nothing(remote_store) -> None:
    remote_store.put("attempt-1", os.urandom(3 * MiB + 11))
    proxy, options = remote_store.counting_proxy()
    proxy.misrange_next(10_000, skip=64 * 1024)
    uri = remote_store.uri("attempt-1")
    with remote_store.checkpoint("attempt-2", "attempt-1", options=options) as cp:
        with pytest.raises(CheckpointLoadError) as info:
            cp.load_sync()
        message = str(info.value)
        assert info.value.uri == uri
        assert f"checkpoint at {uri} could not be read: StorageRetryError" in message
        chain = _chain(info.value)
        mismatch = next(e for e in chain if isinstance(e, RangeMismatch))
        assert mismatch.asked in message and mismatch.served in message
        _assert_nothing_restored(cp)


# ---------------------------------------------------------- errors wrapped faithfully (D6)


@pytest.mark.emulator
def test_store_dying_mid_load_names_uri_and_member_and_keeps_the_cause(
        remote_store, tmp_path, monkeypatch) -> None:
    _tarball_checkpoint(remote_store, tmp_path, "attempt-1")
    # One GET for the whole object, so that the one cut below is sure to fall on it.
    monkeypatch.setenv("CHECKPOINT_IO_READ_CONCURRENCY", "1")
    proxy, options = remote_store.counting_proxy()
    # Half way through the large member the connection drops and the server is gone.
    proxy.cut_next_bodies(1, after=6 * MiB, on_cut=proxy.stop)
    uri = remote_store.uri("attempt-1")
    with remote_store.checkpoint("attempt-2", "attempt-1", options=options) as cp:
        with pytest.raises(CheckpointLoadError) as info:
            cp.load_sync()
        message = str(info.value)
        assert f"checkpoint at {uri} could not be read: StorageRetryError" in message
        assert f"(while restoring member '{BIG}')" in message
        retry = info.value.__cause__
        assert isinstance(retry, StorageRetryError) and retry.uri == uri
        assert retry.__cause__ is not None  # the backend's own error, chained
        assert not any(isinstance(e, TypeError) for e in _chain(info.value))
        _assert_nothing_restored(cp)


@pytest.mark.emulator
def test_object_replaced_mid_load_gives_one_clean_message(remote_store, tmp_path,
                                                         monkeypatch) -> None:
    _tarball_checkpoint(remote_store, tmp_path, "attempt-1")
    monkeypatch.setenv("CHECKPOINT_IO_READ_CONCURRENCY", "1")  # one GET: the one cut
    proxy, options = remote_store.counting_proxy()
    replacement = os.urandom(1000)
    proxy.cut_next_bodies(1, after=6 * MiB,
                          on_cut=lambda: remote_store.put("attempt-1", replacement))
    uri = remote_store.uri("attempt-1")
    with remote_store.checkpoint("attempt-2", "attempt-1", options=options) as cp:
        with pytest.raises(CheckpointLoadError) as info:
            cp.load_sync()
        message = str(info.value)
        changed = info.value.__cause__
        assert isinstance(changed, ObjectChangedError)
        assert changed.uri == uri and changed.errno == errno.ESTALE
        assert str(changed).startswith("read bytes ") and f" of {uri}: " in str(changed)
        assert message.count("the object was replaced or deleted while being read") == 1
        assert f" of {errno.ESTALE}" not in message
        assert f"(while restoring member '{BIG}')" in message
        _assert_nothing_restored(cp)


# ----------------------------------------------- the restorer alone (no store, no network)


class _StoreError(OSError):
    """An OSError whose constructor takes other arguments, as storage errors' do."""

    def __init__(self, uri: str, attempts: int) -> None:
        super().__init__(errno.EIO, f"read of {uri} failed after {attempts} attempts")
        self.uri = uri


class _DyingStream(io.RawIOBase):
    """A tarball that raises ``error`` once ``after`` bytes have been read."""

    def __init__(self, data: bytes, after: int, error: BaseException) -> None:
        self._data, self._after, self._error, self._pos = data, after, error, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._pos >= self._after:
            raise self._error
        n = min(len(buffer), self._after - self._pos)
        buffer[:n] = self._data[self._pos:self._pos + n]
        self._pos += n
        return n


def _tarball_bytes(tmp_path) -> bytes:
    src = tmp_path / "src"
    src.mkdir()
    (src / BIG).write_bytes(os.urandom(12 * MiB))
    out = io.BytesIO()
    write_tarball(src, out)
    return out.getvalue()


def test_a_storage_error_mid_member_is_raised_as_it_is_with_the_member_noted(tmp_path):
    cause = ConnectionResetError("peer reset")
    error = _StoreError("s3://b/k", 3)
    error.__cause__ = cause
    stream = _DyingStream(_tarball_bytes(tmp_path), 6 * MiB, error)
    with pytest.raises(_StoreError) as info:
        restore(stream, tmp_path / "target")
    assert info.value is error  # not rebuilt: its constructor takes other arguments
    assert str(error) == "[Errno 5] read of s3://b/k failed after 3 attempts"
    assert error.__cause__ is cause
    assert error.__notes__ == [f"while restoring member '{BIG}'"]
    assert not (tmp_path / "target").exists()


def test_a_local_write_error_names_the_member_and_chains_the_original(tmp_path, monkeypatch):
    from checkpoint_format import _extract

    def full(member, chunks, *where):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_extract, "_write_file", full)
    with pytest.raises(OSError) as info:
        restore(io.BytesIO(_tarball_bytes(tmp_path)), tmp_path / "target")
    err = info.value
    assert type(err) is OSError and err.errno == errno.ENOSPC
    assert str(err) == f"[Errno 28] No space left on device (while restoring member '{BIG}')"
    assert isinstance(err.__cause__, OSError) and err.__cause__ is not err
