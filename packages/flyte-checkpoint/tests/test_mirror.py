"""The directory mirror behind the framework callbacks: one background upload at a time, the
newest state uploaded after it, and ``flush`` making the newest state the remote checkpoint."""

from __future__ import annotations

import pathlib
from concurrent.futures import Future

import pytest
from checkpoint_format import restore
from flyte_checkpoint import Checkpoint, CheckpointSaveError
from flyte_checkpoint.integrations._mirror import DirectoryMirror


class HeldUploads:
    """A checkpoint whose background saves stay in flight until the test ends them (only the
    mirror's scheduling is under test here; the uploads themselves are tested elsewhere)."""

    def __init__(self) -> None:
        self.saves: list[tuple[dict[str, bytes], Future[None]]] = []
        self.hold = True

    def save_sync(self, data: pathlib.Path, *, wait: bool = True) -> Future[None]:
        assert wait is False
        future: Future[None] = Future()
        if not self.hold:
            future.set_result(None)
        files = {p.name: p.read_bytes() for p in sorted(data.iterdir())}
        self.saves.append((files, future))
        return future


def _write(directory: pathlib.Path, step: int) -> None:
    """Write a new file and rename it into place, as the frameworks do."""
    directory.mkdir(exist_ok=True)
    (directory / "model.bin.tmp").write_bytes(b"step %d" % step)
    (directory / "model.bin.tmp").replace(directory / "model.bin")


def test_newer_states_wait_for_the_upload_in_flight(tmp_path):
    uploads, work = HeldUploads(), tmp_path / "ckpt"
    mirror = DirectoryMirror(uploads)
    _write(work, 1)
    assert mirror.offer(work) is True
    _write(work, 22)
    assert mirror.offer(work) is False  # the first is still in flight
    uploads.saves[0][1].set_result(None)
    assert mirror.offer(work) is True
    assert [files["model.bin"] for files, _ in uploads.saves] == [b"step 1", b"step 22"]


def test_flush_uploads_the_state_that_was_waiting_and_waits_for_it(tmp_path):
    uploads, work = HeldUploads(), tmp_path / "ckpt"
    mirror = DirectoryMirror(uploads)
    _write(work, 1)
    mirror.offer(work)
    _write(work, 22)
    mirror.offer(work)
    uploads.saves[0][1].set_result(None)
    uploads.hold = False
    mirror.flush()
    assert len(uploads.saves) == 2 and uploads.saves[1][0]["model.bin"] == b"step 22"
    assert all(future.done() for _, future in uploads.saves)
    mirror.flush()  # nothing changed since: no upload
    assert len(uploads.saves) == 2 and mirror.saves == 2


def test_flush_before_any_offer_does_nothing():
    uploads = HeldUploads()
    mirror = DirectoryMirror(uploads)
    mirror.flush()
    assert uploads.saves == [] and mirror.saves == 0


def test_flush_raises_the_failed_upload(tmp_path):
    uploads, work = HeldUploads(), tmp_path / "ckpt"
    mirror = DirectoryMirror(uploads)
    _write(work, 1)
    mirror.offer(work)
    uploads.saves[0][1].set_exception(CheckpointSaveError("the store refused the upload", "s3://b/ckpt"))
    with pytest.raises(CheckpointSaveError, match="refused"):
        mirror.flush()


def test_flush_publishes_the_newest_state(tmp_path):
    remote, work = tmp_path / "remote" / "ckpt.tar.gz", tmp_path / "ckpt"
    remote.parent.mkdir()
    checkpoint = Checkpoint(str(remote), None)
    mirror = DirectoryMirror(checkpoint)
    for step in range(1, 6):
        _write(work, step)
        mirror.note_save()  # as the callbacks do when the framework saves
        mirror.offer(work)
    mirror.flush()
    with open(remote, "rb") as stream:
        restore(stream, tmp_path / "restored")
    assert (tmp_path / "restored" / "model.bin").read_bytes() == b"step 5"
    checkpoint.close()


def test_a_noted_save_is_uploaded_even_when_the_fingerprint_looks_the_same(tmp_path,
                                                                          monkeypatch):
    """A replaced file can match the old one in every field (a reused inode number, a time
    stamped in the same clock tick): a save the framework reported is uploaded anyway."""
    uploads, work = HeldUploads(), tmp_path / "ckpt"
    uploads.hold = False
    mirror = DirectoryMirror(uploads)
    _write(work, 1)
    monkeypatch.setattr("flyte_checkpoint.integrations._mirror._fingerprint",
                        lambda directory: (("model.bin", 6, 1, 7),))  # a look-alike
    assert mirror.offer(work) is True
    _write(work, 2)
    assert mirror.offer(work) is False  # nothing says it changed
    mirror.note_save()
    assert mirror.offer(work) is True
    assert mirror.offer(work) is False  # the note is spent
    assert [files["model.bin"] for files, _ in uploads.saves] == [b"step 1", b"step 2"]
