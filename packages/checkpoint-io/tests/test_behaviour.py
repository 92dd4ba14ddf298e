"""The behavioural suite, written once and run against every backend (see ``store``)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from checkpoint_io import File

pytestmark = pytest.mark.filterwarnings("error")


def run(coroutine):
    return asyncio.run(coroutine)


def payload(size: int, seed: int = 0) -> bytes:
    return (seed.to_bytes(2, "big") + os.urandom(61)) * (size // 63) + os.urandom(size % 63)


async def write_in_chunks(file: File, data: bytes, chunk: int = 100_003) -> None:
    async with file.open("wb") as f:
        for start in range(0, len(data), chunk):
            assert await f.write(data[start:start + chunk]) == len(data[start:start + chunk])


async def read_all(file: File, chunk: int = 65_537) -> bytes:
    parts = []
    async with file.open("rb") as f:
        while piece := await f.read(chunk):
            assert len(piece) <= chunk
            parts.append(piece)
        assert await f.read(chunk) == b""
    return b"".join(parts)


def _sizes(part: int) -> list[int]:
    return [0, 1, 4097, part - 1, part, part + 1, 2 * part + 12_345]


class TestRoundTrip:
    @pytest.mark.parametrize("which", range(7), ids=lambda i: f"size{i}")
    def test_streamed_round_trip(self, store, which):
        size = _sizes(store.part_size)[which]
        data = payload(size)
        file = store.file(f"dir/obj-{size}.bin")
        run(write_in_chunks(file, data))
        assert run(read_all(file)) == data
        assert run(file.exists())

    def test_sync_twins_round_trip(self, store):
        data = payload(store.part_size + 10)
        file = store.file("sync.bin")
        with file.open_sync("wb") as f:
            f.write(data[:7])
            f.write(memoryview(data)[7:])
        assert file.exists_sync()
        with file.open_sync("rb") as f:
            assert f.read(7) == data[:7]
            assert f.tell() == 7
            assert f.read() == data[7:]
            assert f.read() == b""

    def test_write_accepts_bytes_bytearray_memoryview(self, store):
        file = store.file("types.bin")

        async def go():
            async with file.open("wb") as f:
                await f.write(b"ab")
                await f.write(bytearray(b"cd"))
                await f.write(memoryview(b"xefx")[1:3])
            async with file.open("rb") as f:
                return await f.read()

        assert run(go()) == b"abcdef"

    def test_read_sizes_are_bounded_and_end_with_empty(self, store):
        data = payload(3 * store.part_size // 2)
        file = store.file("reads.bin")
        run(write_in_chunks(file, data))

        async def go():
            async with file.open("rb") as f:
                assert f.size == len(data)
                first = await f.read(10)
                whole_rest = await f.read(-1)
                return first, whole_rest, await f.read(5)

        first, rest, end = run(go())
        assert first == data[:10] and rest == data[10:] and end == b""

    def test_overwrite_replaces_content(self, store):
        file = store.file("over.bin")
        run(write_in_chunks(file, payload(store.part_size * 2, seed=1)))
        new = payload(1000, seed=2)
        run(write_in_chunks(file, new))
        assert run(read_all(file)) == new


class TestMissing:
    def test_exists_is_false(self, store):
        assert run(store.file("missing.bin").exists()) is False
        assert store.file("missing.bin").exists_sync() is False

    def test_open_for_read_raises_file_not_found_naming_uri(self, store):
        file = store.file("missing.bin")

        async def go():
            async with file.open("rb"):
                pass

        with pytest.raises(FileNotFoundError) as info:
            run(go())
        assert info.value.filename == file.path
        assert file.path in str(info.value)

    def test_download_raises_file_not_found(self, store, tmp_path):
        with pytest.raises(FileNotFoundError):
            store.file("missing.bin").download_sync(tmp_path / "out.bin")
        assert list(tmp_path.glob("*out.bin*")) == []


class TestNoTornObjects:
    @pytest.mark.parametrize("parts", [0, 3], ids=["small", "multipart"])
    def test_exception_in_block_keeps_previous_object(self, store, parts):
        file = store.file("keep.bin")
        old = payload(1234, seed=3)
        run(write_in_chunks(file, old))

        async def go():
            async with file.open("wb") as f:
                await f.write(payload(parts * store.part_size + 99, seed=4))
                raise RuntimeError("producer failed")

        with pytest.raises(RuntimeError, match="producer failed"):
            run(go())
        assert run(read_all(file)) == old

    def test_exception_leaves_no_object_when_none_existed(self, store):
        file = store.file("never.bin")

        async def go():
            async with file.open("wb") as f:
                await f.write(payload(2 * store.part_size + 1))
                raise RuntimeError("producer failed")

        with pytest.raises(RuntimeError):
            run(go())
        assert not run(file.exists())

    def test_cancelled_writer_keeps_previous_object(self, store):
        file = store.file("cancel.bin")
        old = payload(777, seed=5)
        run(write_in_chunks(file, old))
        started = asyncio.Event

        async def go():
            ready = started()

            async def writer():
                async with file.open("wb") as f:
                    while True:
                        await f.write(payload(store.part_size // 2))
                        ready.set()

            task = asyncio.ensure_future(writer())
            await ready.wait()
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        run(go())
        assert run(read_all(file)) == old

    def test_sync_exception_keeps_previous_object(self, store):
        file = store.file("sync-keep.bin")
        with file.open_sync("wb") as f:
            f.write(b"old")
        with pytest.raises(ValueError), file.open_sync("wb") as f:
            f.write(payload(store.part_size * 2 + 5))
            raise ValueError("stop")
        with file.open_sync("rb") as f:
            assert f.read() == b"old"

    def test_write_after_close_is_refused(self, store):
        file = store.file("closed.bin")

        async def go():
            async with file.open("wb") as f:
                await f.write(b"x")
            await f.write(b"y")

        with pytest.raises(ValueError, match="already committed"):
            run(go())


class TestTransfers:
    def test_download_to_given_path_and_directory_and_temp(self, store, tmp_path):
        tmp_path = tmp_path / "downloads"
        tmp_path.mkdir()
        data = payload(2 * store.part_size + 3)
        file = store.file("down/load.bin")
        run(write_in_chunks(file, data))

        target = tmp_path / "a" / "copy.bin"
        assert run(file.download(target)) == str(target)
        assert target.read_bytes() == data

        into_dir = file.download_sync(tmp_path)
        assert into_dir == str(tmp_path / "load.bin")

        temp = file.download_sync()
        assert os.path.basename(temp) == "load.bin"
        assert Path(temp).read_bytes() == data
        # Nothing but the finished files: no partial leftovers beside them.
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "load.bin"]
        assert [p.name for p in (tmp_path / "a").iterdir()] == ["copy.bin"]

    def test_download_empty_object(self, store, tmp_path):
        file = store.file("empty.bin")
        run(write_in_chunks(file, b""))
        assert Path(file.download_sync(tmp_path / "e")).read_bytes() == b""

    def test_from_local_uploads_and_refers(self, store, tmp_path):
        data = payload(2 * store.part_size + 17)
        local = tmp_path / "model.bin"
        local.write_bytes(data)
        uploaded = run(File.from_local(local, store.uri("up/"), part_size=store.part_size))
        assert uploaded.path == store.uri("up/model.bin")
        assert uploaded.name == "model.bin"
        assert run(read_all(uploaded)) == data
        again = File.from_local_sync(str(local), store.uri("up/again.bin"))
        assert again.exists_sync()

    def test_reader_sees_one_version_while_object_is_replaced(self, store):
        file = store.file("pinned.bin")
        old = payload(3 * store.part_size, seed=6)
        run(write_in_chunks(file, old))

        async def go():
            async with file.open("rb") as f:
                head = await f.read(10)
                await write_in_chunks(file, payload(3 * store.part_size, seed=7))
                try:
                    rest = await f.read()
                except OSError:
                    return None  # refusing to mix versions is fine too
                return head + rest

        got = run(go())
        assert got is None or got == old


_CLIENT_PROCESS = r"""
import sys
from checkpoint_io import File
file = File(path=sys.argv[1])
with file.open_sync("wb") as f:
    f.write(b"x" * 1000)
with file.open_sync("rb") as f:
    assert f.read() == b"x" * 1000
print("done")
"""


def test_a_process_using_a_remote_store_exits_without_unclosed_session_warnings(remote_store):
    # Client sessions are closed at exit, while the I/O loop still runs; aiohttp used to
    # print "Unclosed client session" at the end of every such process.
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", _CLIENT_PROCESS, remote_store.uri("exit.bin")],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "done"
    assert "Unclosed" not in proc.stderr, proc.stderr
