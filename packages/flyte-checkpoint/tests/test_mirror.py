"""The directory mirror behind the framework callbacks: one background upload at a time, the
newest state uploaded after it, and ``flush`` making the newest state the remote checkpoint."""

from __future__ import annotations

import concurrent.futures
import pathlib
from concurrent.futures import Future

import pytest
from checkpoint_format import restore
from flyte_checkpoint import Checkpoint, CheckpointSaveError
from flyte_checkpoint.distributed import DistributedCheckpoint, ThreadGroup
from flyte_checkpoint.integrations._mirror import CollectiveMirror, DirectoryMirror
from flyte_checkpoint.integrations._ranks import Agreement


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
        files = {p.name: p.read_bytes() for p in sorted(data.iterdir())} if data else {}
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


# ---------------------------------------------------------------------- several ranks
# Ranks as threads of this process (the helper's ThreadGroup), so that the collective
# mirror's decisions are tested without torch; the callbacks run it over gloo in
# tests/test_integrations.py.


def _ranks(size: int, work) -> list:
    """Run ``work(rank)`` on ``size`` thread-ranks at once; their results, bounded in time."""
    with concurrent.futures.ThreadPoolExecutor(size) as pool:
        futures = [pool.submit(work, rank) for rank in range(size)]
        return [future.result(timeout=60) for future in futures]


def test_a_collective_save_starts_on_every_rank_only_when_no_rank_has_one_in_flight(tmp_path):
    group, uploads = ThreadGroup(2, timeout=20), [HeldUploads(), HeldUploads()]
    agreements = [Agreement("s3://b/ckpt", 20, group.member(r)) for r in range(2)]
    mirrors = [CollectiveMirror(uploads[r], agreements[r]) for r in range(2)]
    for rank in range(2):
        _write(tmp_path / f"rank{rank}", 1)

    def boundary(rank: int) -> bool:
        return mirrors[rank].offer(tmp_path / f"rank{rank}")

    assert _ranks(2, boundary) == [False, False]  # nothing noted: no collective at all
    for mirror in mirrors:
        mirror.note_save()
    assert _ranks(2, boundary) == [True, True]
    for mirror in mirrors:
        mirror.note_save()
    uploads[0].saves[0][1].set_result(None)  # rank 0's first save ended, rank 1's not yet
    assert _ranks(2, boundary) == [False, False]
    uploads[1].saves[0][1].set_result(None)
    assert _ranks(2, boundary) == [True, True]
    assert [len(u.saves) for u in uploads] == [2, 2] and mirrors[0].saves == 2


def test_a_failed_collective_save_raises_on_every_rank_at_the_same_boundary(tmp_path):
    group, uploads = ThreadGroup(2, timeout=20), [HeldUploads(), HeldUploads()]
    mirrors = [CollectiveMirror(uploads[r], Agreement("s3://b/ckpt", 20, group.member(r)))
               for r in range(2)]

    def save_then_fail(rank: int) -> str:
        mirrors[rank].note_save()
        mirrors[rank].offer(None)  # a rank with nothing to add still takes part
        uploads[rank].saves[0][1].set_exception(
            CheckpointSaveError("rank 1 failed: the store refused a part", "s3://b/ckpt"))
        mirrors[rank].note_save()
        with pytest.raises(CheckpointSaveError, match="rank 1 failed") as raised:
            mirrors[rank].offer(None)
        return str(raised.value)

    assert len(set(_ranks(2, save_then_fail))) == 1


def test_a_rank_that_never_comes_fails_the_agreement_naming_it(tmp_path):
    group = ThreadGroup(2, timeout=1)
    agreement = Agreement("s3://b/ckpt", 1, group.member(0))
    with pytest.raises(CheckpointSaveError, match=r"rank 0 could not agree.*\b1\b") as raised:
        agreement.decide(False)
    assert "s3://b/ckpt" in str(raised.value) and "unchanged" in str(raised.value)


def test_collective_mirror_saves_the_union_of_the_ranks_shards(tmp_path):
    """Through the real collective helper: one object holding every rank's shard files.
    The helper and the agreement each have a group of their own, as on torch (two gloo
    groups): one group's steps from two threads of a rank would pair up across them."""
    group, remote = ThreadGroup(2, timeout=30), tmp_path / "remote.obj"
    agreeing = ThreadGroup(2, timeout=30)

    def train(rank: int) -> int:
        checkpoint = Checkpoint(remote)
        helper = DistributedCheckpoint(checkpoint, group.member(rank))
        mirror = CollectiveMirror(helper, Agreement(str(remote), 30, agreeing.member(rank)))
        shard = tmp_path / f"rank{rank}" / "last.ckpt"
        shard.mkdir(parents=True)
        for step in (1, 2):
            # A new file renamed into place: an in-place rewrite under a background save
            # is refused (tested with the snapshots).
            (shard / "part.tmp").write_bytes(b"rank %d step %d" % (rank, step))
            (shard / "part.tmp").replace(shard / f"__{rank}_0.distcp")
            mirror.note_save()
            mirror.offer(shard.parent)
        mirror.finish(shard.parent)
        helper.close()
        return mirror.saves

    assert sum(_ranks(2, train)) >= 2
    with open(remote, "rb") as stream:
        restore(stream, tmp_path / "restored")
    assert sorted(p.name for p in (tmp_path / "restored" / "last.ckpt").iterdir()) == [
        "__0_0.distcp", "__1_0.distcp"]
    assert (tmp_path / "restored" / "last.ckpt" / "__1_0.distcp").read_bytes() == b"rank 1 step 2"
