"""GCS parallel composite uploads (``File.with_options(gcs_composite=True)``) against
fake-gcs-server: parts as temporary objects in parallel, one atomic compose, nothing left
behind on success or failure."""

from __future__ import annotations

import json
import os
import urllib.request

import pytest
from checkpoint_io import File, RetryPolicy

KiB, MiB = 1024, 1 << 20
FAST = RetryPolicy(attempts=2, base_delay=0.01, max_delay=0.02, deadline=20, attempt_timeout=10)


class _Composite:
    """The GCS store, its files with composite uploads switched on."""

    def __init__(self, store) -> None:
        self.store = store
        self.server, self.bucket = store.server, store.bucket

    def file(self, name: str, **options) -> File:
        return self.store.file(name, **options).with_options(gcs_composite=True)


@pytest.fixture
def gcs(remote_store):
    return _Composite(remote_store)


pytestmark = [pytest.mark.emulator,
              pytest.mark.parametrize("remote_store", ["gcs"], indirect=True)]


def _names(store) -> list[str]:
    url = f"{store.server.endpoint}/storage/v1/b/{store.bucket}/o"
    with urllib.request.urlopen(url, timeout=10) as response:
        return sorted(item["name"] for item in json.load(response).get("items", []))


def _write(file: File, data: bytes, piece: int = 100 * KiB) -> None:
    with file.open_sync("wb") as out:
        for start in range(0, len(data), piece):
            out.write(data[start:start + piece])


@pytest.mark.parametrize("parts", [3, 70])  # 70: composed in rounds of 32 first
def test_parts_are_composed_into_the_object_and_removed(gcs, parts):
    data = os.urandom(parts * 256 * KiB - 1000)
    file = gcs.file("ckpt.bin", part_size=256 * KiB, retry=FAST)
    _write(file, data)
    with file.open_sync("rb") as back:
        assert back.read() == data
    assert _names(gcs) == ["ckpt.bin"]


def test_a_failed_upload_publishes_nothing_and_removes_its_parts(gcs):
    file = gcs.file("ckpt.bin", part_size=256 * KiB, retry=FAST)
    with pytest.raises(OSError, match="the writer failed"), file.open_sync("wb") as out:
        out.write(os.urandom(2 * MiB))  # seven parts sent, the eighth filling
        raise OSError("the writer failed half-way")
    assert _names(gcs) == []


def test_composite_uploads_are_off_by_default(remote_store, monkeypatch):
    """Without the switch: one resumable session, never a visible temporary object."""
    from checkpoint_io import _gcs

    async def refuse(*args):
        raise AssertionError("a composite upload ran without gcs_composite=True")

    monkeypatch.setattr(_gcs._GCSComposeUpload, "put_part", refuse)
    data = os.urandom(3 * MiB + 5)
    file = remote_store.file("ckpt.bin", part_size=256 * KiB, retry=FAST)
    _write(file, data)
    with file.open_sync("rb") as back:
        assert back.read() == data
    assert _names(remote_store) == ["ckpt.bin"]


def test_what_a_killed_process_leaves_is_marked_for_a_lifecycle_rule(gcs, monkeypatch):
    """Parts and compose intermediates all end with PART_SUFFIX, so one bucket lifecycle rule
    (matchesSuffix) sweeps what a process killed before its clean-up left behind."""
    from checkpoint_io._gcs import PART_SUFFIX, _GCSComposeUpload

    async def killed_before_clean_up(self):  # fault injection: the process died here
        pass

    monkeypatch.setattr(_GCSComposeUpload, "_delete_temporaries", killed_before_clean_up)
    data = os.urandom(40 * 256 * KiB)  # 40 parts: one round of intermediates as well
    _write(gcs.file("ckpt.bin", part_size=256 * KiB, retry=FAST), data)
    left = [name for name in _names(gcs) if name != "ckpt.bin"]
    assert len(left) == 40 + 2
    assert all(name.startswith("ckpt.bin.") and name.endswith(PART_SUFFIX) for name in left)
