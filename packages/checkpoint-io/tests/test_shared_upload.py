"""Shared uploads: segments written by separate processes (multiprocessing, spawn), one
object committed by the parent; on local files and each emulator. A process that raises, a
process SIGKILLed mid-segment, tokens used late, receipts that do not fit, a part retried
through a faulty proxy, and the sweep of what a crash leaves."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import signal
import time
import urllib.request

import pytest
from checkpoint_io import (
    File,
    RetryPolicy,
    SegmentReceipt,
    SharedUpload,
    SharedUploadError,
    sweep_shared_uploads_sync,
)
from checkpoint_testing.segments import segment_data, write_segment, zero_blocks

MiB = 1 << 20
FAST = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.05, deadline=30, attempt_timeout=15)
JOIN_SECONDS = 120  # a spawned interpreter imports the cloud clients: seconds, not minutes
#: Every store that takes shared uploads (the conftest ``store`` fixture, memory left out).
every_store = pytest.mark.parametrize(
    "store", [pytest.param("local", id="local"),
              *(pytest.param(kind, id=kind, marks=pytest.mark.emulator)
                for kind in ("s3", "gcs", "azure"))], indirect=True)


def _file(store, name: str, **options) -> File:
    options.setdefault("retry", FAST)
    return store.file(name, **options)


def _write(file: File, data: bytes) -> None:
    with file.open_sync("wb") as out:
        out.write(data)


def _read(file: File) -> bytes:
    with file.open_sync("rb") as f:
        return f.read()


def names(store) -> list[str]:
    """Everything the store holds (hidden local files and pending uploads too)."""
    if store.kind == "local":
        return sorted(os.listdir(store.root)) if os.path.isdir(store.root) else []
    if store.kind == "s3":
        import boto3

        client = boto3.client("s3", endpoint_url=store.server.endpoint)
        found = [o["Key"] for o in client.list_objects_v2(Bucket=store.bucket).get(
            "Contents", [])]
        found += [f"{u['Key']} (multipart upload)" for u in client.list_multipart_uploads(
            Bucket=store.bucket).get("Uploads", [])]
        return sorted(found)
    if store.kind == "gcs":
        url = f"{store.server.endpoint}/storage/v1/b/{store.bucket}/o"
        with urllib.request.urlopen(url, timeout=10) as response:
            return sorted(item["name"] for item in json.load(response).get("items", []))
    from azure.storage.blob import BlobServiceClient

    with BlobServiceClient.from_connection_string(store.server.connection_string()) as client:
        return sorted(b.name for b in client.get_container_client(store.bucket).list_blobs())


def _run(file: File, token: str, jobs: list[tuple[int, int, int, str]]):
    """Run one spawned process per ``(index, seed, size, mode)``; returns the processes and
    a function that takes the next result (bounded wait)."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=write_segment,
                                 args=(file, token, index, seed, size, mode, results),
                                 name=f"segment-{index}", daemon=True)
                 for index, seed, size, mode in jobs]
    for process in processes:
        process.start()

    def next_result():
        return results.get(timeout=JOIN_SECONDS)

    return processes, next_result


def _finish(processes) -> None:
    for process in processes:
        process.join(JOIN_SECONDS)
        if process.is_alive():
            process.kill()
            process.join(10)
            pytest.fail(f"{process.name} did not end within {JOIN_SECONDS} s")


def _sizes(store, upload: SharedUpload) -> list[int]:
    """Four segments: several parts, fewer bytes than a segment must hold (padded where the
    store has a minimum), empty, and a short last one."""
    part = store.part_size
    return [2 * part + part // 2 + 7, 100_000, 0, part + 3]


@every_store
def test_segments_written_by_processes_become_one_object(store):
    file = _file(store, "ckpt.bin")
    _write(file, b"previous")
    upload = SharedUpload.begin_sync(file, segments=4)
    sizes = _sizes(store, upload)
    processes, next_result = _run(file, upload.token,
                                  [(i, 100 + i, size, "ok") for i, size in enumerate(sizes)])
    try:
        results = sorted(next_result() for _ in processes)
    finally:
        _finish(processes)
    assert [status for _, status, _ in results] == ["ok"] * 4, results
    receipts = [SegmentReceipt.from_json(text) for _, _, text in results]
    assert _read(file) == b"previous"  # nothing visible before the commit
    upload.commit_sync(list(reversed(receipts)))  # any order: pieces go in index order

    expected = b"".join(segment_data(100 + i, size) + bytes(r.padding)
                        for i, (size, r) in enumerate(zip(sizes, receipts, strict=True)))
    assert _read(file) == expected
    padded = [r.padding > 0 for r in receipts]
    assert padded == [False, upload.min_segment > 1, False, False]
    if upload.min_segment > 1:
        assert receipts[1].size >= upload.min_segment
        assert receipts[1].padding == len(zero_blocks(upload.min_segment - sizes[1]))
    assert receipts[2].size == 0 and receipts[2].parts == ()
    assert names(store) == ["ckpt.bin"]


@every_store
def test_a_process_that_raises_then_abort_leaves_the_previous_object(store):
    file = _file(store, "ckpt.bin")
    _write(file, b"previous")
    upload = SharedUpload.begin_sync(file, segments=2)
    size = 2 * store.part_size + 11
    processes, next_result = _run(file, upload.token, [(0, 1, size, "ok"),
                                                       (1, 2, size, "raise")])
    try:
        results = dict((index, (status, text)) for index, status, text in
                       (next_result() for _ in processes))
    finally:
        _finish(processes)
    assert results[0][0] == "ok"
    assert results[1][0] == "error" and "the training step failed" in results[1][1]
    upload.abort_sync()
    upload.abort_sync()  # idempotent
    assert _read(file) == b"previous"
    assert names(store) == ["ckpt.bin"]


@every_store
def test_a_process_killed_mid_segment(store):
    file = _file(store, "ckpt.bin")
    _write(file, b"previous")
    upload = SharedUpload.begin_sync(file, segments=2)
    size = 3 * store.part_size
    processes, next_result = _run(file, upload.token, [(0, 1, size, "ok"),
                                                       (1, 2, size, "hang")])
    try:
        results = {}
        while len(results) < 2:
            index, status, text = next_result()
            results[index] = (status, text)
            if status == "sent":
                os.kill(processes[1].pid, signal.SIGKILL)
    finally:
        _finish(processes)
    assert results[0][0] == "ok" and results[1][0] == "sent"
    assert processes[1].exitcode == -signal.SIGKILL
    receipt = SegmentReceipt.from_json(results[0][1])
    with pytest.raises(SharedUploadError, match=r"no receipt for segment 1: every segment"
                       ) as info:
        upload.commit_sync([receipt])
    assert info.value.index == 1
    assert _read(file) == b"previous"
    upload.abort_sync()
    assert _read(file) == b"previous"
    assert names(store) == ["ckpt.bin"]


@every_store
def test_a_token_used_after_commit_or_abort_fails_clearly(store):
    file = _file(store, "ckpt.bin")
    done = SharedUpload.begin_sync(file, segments=1)
    with done.open_segment_sync(0) as segment:
        segment.write(b"one")
    done.commit_sync([segment.receipt])
    with pytest.raises(SharedUploadError, match="was committed already"):
        done.commit_sync([segment.receipt])
    with pytest.raises(SharedUploadError, match="is no longer open") as info:
        SharedUpload.join(file, done.token).open_segment_sync(0)
    assert info.value.index == 0 and file.path in str(info.value)
    with pytest.raises(SharedUploadError, match="is no longer open"):
        SharedUpload.join(file, done.token).commit_sync([segment.receipt])
    assert _read(file) == b"one"

    dropped = SharedUpload.begin_sync(file, segments=1)
    dropped.abort_sync()
    with pytest.raises(SharedUploadError, match="was aborted already"):
        dropped.open_segment_sync(0)
    if store.kind != "azure":  # Azure keeps no trace of an abort (see the README)
        with pytest.raises(SharedUploadError, match="is no longer open"):
            SharedUpload.join(file, dropped.token).open_segment_sync(0)
    assert _read(file) == b"one"
    assert names(store) == ["ckpt.bin"]


@pytest.mark.parametrize("remote_store", ["s3", "gcs", "azure"], indirect=True)
@pytest.mark.emulator
def test_a_part_that_fails_is_retried(remote_store):
    direct = _file(remote_store, "ckpt.bin")
    upload = SharedUpload.begin_sync(direct, segments=2)
    proxy, options = remote_store.proxy()
    proxied = _file(remote_store, "ckpt.bin", storage_options=options)
    joined = SharedUpload.join(proxied, upload.token)
    data = [segment_data(i, 2 * remote_store.part_size + 5) for i in range(2)]
    receipts = []
    for index, piece in enumerate(data):
        with joined.open_segment_sync(index) as segment:
            proxy.fail_next(1)  # the first part's first attempt
            segment.write(piece)
        receipts.append(segment.receipt)
    assert proxy.failures_left == 0
    proxy.fail_next(1)
    joined.commit_sync(receipts)
    assert _read(direct) == b"".join(data)
    assert names(remote_store) == ["ckpt.bin"]


class TestReceipts:
    """What the commit refuses, on local files (the checks are the store's common part)."""

    @pytest.fixture
    def upload(self, tmp_path):
        file = File(path=str(tmp_path / "ckpt.bin"))
        _write(file, b"previous")
        upload = SharedUpload.begin_sync(file, segments=3)
        receipts = []
        for index in range(3):
            with upload.open_segment_sync(index) as segment:
                segment.write(bytes([index]) * 10)
            receipts.append(segment.receipt)
        yield upload, receipts
        upload.abort_sync()
        assert _read(file) in (b"previous", bytes(10) + b"\1" * 10 + b"\2" * 10)

    def test_missing_duplicate_foreign_and_out_of_range_receipts(self, upload, tmp_path):
        upload, receipts = upload
        other = SharedUpload.begin_sync(upload.file, segments=3)
        with other.open_segment_sync(1) as segment:
            segment.write(b"x")
        cases = [
            (receipts[:1] + receipts[2:], "no receipt for segment 1: ", 1),
            ([], "no receipt for segments 0, 1, 2: ", 0),
            ([*receipts, receipts[1]], "two receipts for segment 1$", 1),
            ([receipts[0], segment.receipt, receipts[2]],
             f"the receipt of segment 1 belongs to another shared upload "
             f"\\({other.upload}; this one is {upload.upload}\\)", 1),
            ([*receipts, SegmentReceipt(upload.upload, 7, 0)],
             "a receipt names segment 7; this upload has segments 0-2", 7),
        ]
        for given, message, index in cases:
            with pytest.raises(SharedUploadError, match=message) as info:
                upload.commit_sync(given)
            assert info.value.index == index
            assert str(info.value).startswith(f"commit shared upload of {upload.file.path}: ")
        assert _read(upload.file) == b"previous"
        other.abort_sync()
        upload.commit_sync(receipts)  # still open after refusals
        assert _read(upload.file) == bytes(10) + b"\1" * 10 + b"\2" * 10
        assert sorted(os.listdir(tmp_path)) == ["ckpt.bin"]

    def test_receipts_travel_as_json_and_pickles(self, upload):
        import pickle

        _, receipts = upload
        for receipt in receipts:
            assert SegmentReceipt.from_json(receipt.to_json()) == receipt
            assert pickle.loads(pickle.dumps(receipt)) == receipt
        for text in ("{", "[]", '{"upload": 1, "index": 0, "size": 0}',
                     '{"upload": "u", "index": -1, "size": 0}'):
            with pytest.raises(ValueError, match="not a segment receipt"):
                SegmentReceipt.from_json(text)


class TestTokens:
    def test_join_refuses_what_is_not_this_uploads_token(self, tmp_path):
        file = File(path=str(tmp_path / "a.bin"))
        upload = SharedUpload.begin_sync(file, segments=2)
        other = File(path=str(tmp_path / "b.bin"))
        token = json.loads(upload.token)
        cases = [
            ("not json", "the token is not JSON"),
            ('{"kind": "x"}', "the token is not a shared-upload token"),
            (json.dumps({**token, "version": 9}), "token version 9; this checkpoint-io reads "
                                                  "version 1"),
            (json.dumps({**token, "segments": "2"}), "the token lacks segments"),
        ]
        for text, message in cases:
            with pytest.raises(SharedUploadError, match=message):
                SharedUpload.join(file, text)
        with pytest.raises(SharedUploadError, match=f"the token is for '{file.path}', not "
                                                    "this object"):
            SharedUpload.join(other, upload.token)
        joined = SharedUpload.join(file, upload.token)
        assert (joined.upload, joined.segments, joined.min_segment) == (
            upload.upload, 2, upload.min_segment)
        with pytest.raises(SharedUploadError, match=r"no segment 2: this upload has "
                                                    r"segments 0-1"):
            joined.open_segment_sync(2)
        upload.abort_sync()
        assert os.listdir(tmp_path) == []

    @pytest.mark.parametrize("segments", [0, -1, 1.5, True, 70_000])
    def test_bad_segment_counts(self, tmp_path, segments):
        with pytest.raises(ValueError, match="segments"):
            SharedUpload.begin_sync(File(path=str(tmp_path / "a.bin")), segments=segments)
        assert os.listdir(tmp_path) == []

    def test_a_segment_written_twice_at_once_is_refused(self, tmp_path):
        file = File(path=str(tmp_path / "a.bin"))
        upload = SharedUpload.begin_sync(file, segments=1)
        with upload.open_segment_sync(0) as first:
            with pytest.raises(SharedUploadError, match="segment 0 is being written by "
                                                        "another writer"):
                upload.open_segment_sync(0)
            first.write(b"x")
        upload.commit_sync([first.receipt])
        assert _read(file) == b"x"


@pytest.mark.emulator
@pytest.mark.parametrize("remote_store", ["s3"], indirect=True)
class TestS3:
    def test_small_segments_need_a_pad_and_parts_keep_their_ranges(self, remote_store):
        file = _file(remote_store, "ckpt.bin")
        upload = SharedUpload.begin_sync(file, segments=3)
        assert upload.min_segment == 5 * MiB
        segment = upload.open_segment_sync(0)
        segment.write(b"0123456789")
        with pytest.raises(SharedUploadError, match=r"segment 0 holds 10 bytes; every segment "
                           r"but the last must hold at least 5242880 bytes on this store, or "
                           r"none \(give open_segment a pad callable\)"):
            segment.close()
        data = segment_data(5, 12 * MiB + 1)  # 5 MiB parts: 5, then 7 (the short tail joined)
        with upload.open_segment_sync(0) as segment:
            segment.write(data)
        assert [(n, size) for n, _, size in segment.receipt.parts] == [(1, 5 * MiB),
                                                                       (2, 7 * MiB + 1)]
        receipts = [segment.receipt]
        with upload.open_segment_sync(1, pad=zero_blocks) as segment:
            segment.write(b"tiny")
        assert segment.receipt.parts[0][0] == 3334  # segment 1's range starts there
        receipts.append(segment.receipt)
        with upload.open_segment_sync(2) as segment:
            segment.write(b"end")
        receipts.append(segment.receipt)
        upload.commit_sync(receipts)
        assert _read(file) == data + b"tiny" + zero_blocks(5 * MiB - 4) + b"end"

    def test_sweep_aborts_uploads_a_crash_left(self, remote_store):
        file = _file(remote_store, "ckpt.bin")
        left = SharedUpload.begin_sync(file, segments=2)
        with left.open_segment_sync(1) as segment:
            segment.write(b"orphan")
        assert names(remote_store) == ["ckpt.bin (multipart upload)"]
        # (moto says every upload was initiated in 2010, so an age above zero cannot be
        # told from zero here.)
        other = _file(remote_store, "other.bin")
        kept = SharedUpload.begin_sync(other, segments=1)
        removed = sweep_shared_uploads_sync(file, older_than=0)
        assert removed == [f"{file.path} (multipart upload {left._state['upload_id']})"]
        assert names(remote_store) == ["other.bin (multipart upload)"]  # another key's: kept
        with pytest.raises(SharedUploadError, match="is no longer open"):
            left.commit_sync([SegmentReceipt(left.upload, 0, 0), segment.receipt])
        kept.abort_sync()


def test_local_sweep_removes_part_files_no_process_holds(tmp_path):
    file = File(path=str(tmp_path / "ckpt.bin"))
    upload = SharedUpload.begin_sync(file, segments=2)
    with upload.open_segment_sync(0) as segment:
        segment.write(b"kept until the commit")
    assert len(os.listdir(tmp_path)) == 2  # the marker and the part file
    assert sweep_shared_uploads_sync(file, older_than=3600) == []
    # The marker is held by this process (a live upload); the closed part file is not.
    time.sleep(0.05)  # unmodified for longer than older_than=0, on a coarse clock too
    assert sweep_shared_uploads_sync(file, older_than=0) == [
        f".ckpt.bin.partial-{upload.upload}0000"]
    with pytest.raises(SharedUploadError, match="the part file of segment 0 is gone"):
        upload.commit_sync([segment.receipt, SegmentReceipt(upload.upload, 1, 0)])
    upload.abort_sync()
    assert os.listdir(tmp_path) == []


@pytest.mark.emulator
@pytest.mark.parametrize("remote_store", ["gcs"], indirect=True)
class TestGCS:
    def test_compose_pins_the_generations_the_segments_wrote(self, remote_store):
        file = _file(remote_store, "ckpt.bin")
        _write(file, b"previous")
        upload = SharedUpload.begin_sync(file, segments=1)
        with upload.open_segment_sync(0) as segment:
            segment.write(b"new")
        number, generation, size = segment.receipt.parts[0]
        stale = dataclasses.replace(segment.receipt, parts=((number, str(int(generation) + 1),
                                                             size),))
        with pytest.raises(SharedUploadError, match=f"part {number} of segment 0 is not what "
                           f"its receipt says \\(generation {int(generation) + 1} of 3 bytes\\): "
                           f"generation {generation} of 3 bytes"):
            upload.commit_sync([stale])
        assert _read(file) == b"previous"
        assert names(remote_store) == ["ckpt.bin"]  # the failed commit aborted the upload

    def test_many_parts_compose_in_rounds_and_the_sweep_removes_leftovers(self, remote_store):
        file = _file(remote_store, "ckpt.bin", part_size=256 * 1024)
        upload = SharedUpload.begin_sync(file, segments=3)
        data = [segment_data(i, 12 * 256 * 1024 + i) for i in range(3)]  # 39 parts: 2 rounds
        receipts = []
        for index, piece in enumerate(data):
            with upload.open_segment_sync(index) as segment:
                segment.write(piece)
            receipts.append(segment.receipt)
        upload.commit_sync(receipts)
        assert _read(file) == b"".join(data)
        assert names(remote_store) == ["ckpt.bin"]

        left = SharedUpload.begin_sync(file, segments=2)
        with left.open_segment_sync(0) as segment:
            segment.write(b"orphan")
        assert len(names(remote_store)) == 3  # the object, the marker, one part
        assert sweep_shared_uploads_sync(file, older_than=3600) == []
        assert len(sweep_shared_uploads_sync(file, older_than=0)) == 2
        assert names(remote_store) == ["ckpt.bin"]


@pytest.mark.emulator
@pytest.mark.parametrize("remote_store", ["azure"], indirect=True)
def test_azure_commit_checks_every_block_is_staged(remote_store):
    """(Azure discards uncommitted blocks when anything commits the blob; Azurite keeps
    them, so a missing block is made here by a receipt that names one never staged.)"""
    file = _file(remote_store, "ckpt.bin")
    _write(file, b"previous")
    upload = SharedUpload.begin_sync(file, segments=1)
    with upload.open_segment_sync(0) as segment:
        segment.write(b"staged")
    number, block_id, _ = segment.receipt.parts[0]
    cases = [
        (((number, block_id, 7),), rf"block {block_id} \(part 1 of segment 0, 7 bytes\) is not "
                                   r"staged as such \(6 bytes\)"),
        (((number, block_id[:-1] + "9", 6),), r"is not staged: expired, or discarded by "
                                              r"another write to the blob"),
    ]
    for parts, message in cases:
        again = SharedUpload.join(file, upload.token)
        wrong = dataclasses.replace(segment.receipt, parts=parts, size=parts[0][2])
        with pytest.raises(SharedUploadError, match=message) as info:
            again.commit_sync([wrong])
        assert info.value.index == 0
    assert _read(file) == b"previous"
    SharedUpload.join(file, upload.token).commit_sync([segment.receipt])
    assert _read(file) == b"staged"


@every_store
def test_every_segment_empty_is_an_empty_object(store):
    file = _file(store, "ckpt.bin")
    _write(file, b"previous")
    upload = SharedUpload.begin_sync(file, segments=2)
    receipts = []
    for index in range(2):
        with upload.open_segment_sync(index) as segment:
            pass
        receipts.append(segment.receipt)
    upload.commit_sync(receipts)
    assert _read(file) == b""
    assert names(store) == ["ckpt.bin"]
