"""Azure Blob Storage through adlfs's configured client: blocks are staged, and the block
list that makes them the blob is committed only on success."""

from __future__ import annotations

import base64
import secrets
from collections.abc import AsyncIterator
from typing import Any

from ._backend import (
    Backend,
    BackendOptions,
    MiB,
    PartRecord,
    SegmentSink,
    SharedTarget,
    Source,
    Upload,
    check_range,
    joined_range,
    streamed_body,
)
from ._errors import SharedUploadError

__all__ = ["AzureBackend"]

# Our retry policy is the only one: each request gets exactly one attempt from the SDK.
_ONCE = {"retry_total": 0}


class _AzureSource(Source):
    def __init__(self, blob, props) -> None:
        self._blob = blob
        self.size = int(props.size)
        self._etag = props.etag

    async def read_range(self, start: int, end: int) -> bytes:
        return await joined_range(self, start, end)

    async def stream_range(self, start: int, end: int) -> AsyncIterator[bytes]:
        """One GET for ``[start, end)`` pinned by ``If-Match``, yielded as it arrives once
        the answer is known to carry that range.

        The public ``download_blob`` reads its first 32 MiB range whole into memory, then
        fetches 4 MiB ranges one request at a time, and retries on its own; the generated
        operation under it is one request whose body streams.
        """
        from azure.storage.blob._generated.models import ModifiedAccessConditions

        body = await self._blob._client.blob.download(
            range=f"bytes={start}-{end - 1}",
            modified_access_conditions=ModifiedAccessConditions(if_match=self._etag),
            **_ONCE,
        )
        # azure-core pulls the body 4 KiB at a time by default (connection_data_block_size):
        # 262,144 trips through its Python generator per GiB, which capped a load near
        # 200 MB/s of CPU. Whole MiB pieces cost 256 trips.
        if getattr(body, "block_size", MiB) < MiB:
            body.block_size = MiB
        try:
            response = body.response
            check_range(start, end, self.size, response.status_code,
                        response.headers.get("Content-Range"),
                        response.headers.get("Content-Length"))
            async for chunk in body:
                yield chunk
        finally:
            # Drops the connection if the body was not drained (as azure-core itself does).
            body.response.internal_response.close()


class _AzureUpload(Upload):
    def __init__(self, blob) -> None:
        self._blob = blob
        # A per-write prefix keeps two concurrent writers' uncommitted blocks apart.
        self._prefix = secrets.token_hex(8)
        self._blocks: dict[int, str] = {}

    def _block_id(self, number: int) -> str:
        return base64.b64encode(f"{self._prefix}-{number:06d}".encode()).decode()

    async def put_part(self, number: int, data: bytes) -> None:
        block_id = self._block_id(number)
        await self._blob.stage_block(block_id, streamed_body(data), length=len(data), **_ONCE)
        self._blocks[number] = block_id

    async def finish(self, number: int, data: bytes, total: int) -> None:
        from azure.storage.blob import BlobBlock

        if data and number not in self._blocks:
            await self.put_part(number, data)
        blocks = [BlobBlock(block_id=self._blocks[n]) for n in sorted(self._blocks)]
        await self._blob.commit_block_list(blocks, **_ONCE)

    async def put_whole(self, data: bytes) -> None:
        if len(data) > MiB:
            # upload_blob reads a stream back into bytes for a single put, which aiohttp then
            # sends whole; one staged block and a commit stream the body instead.
            await self.finish(0, data, len(data))
            return
        await self._blob.upload_blob(data, overwrite=True, length=len(data), **_ONCE)

    async def abort(self) -> None:
        # Staged blocks never become visible without a commit, and the service discards
        # uncommitted blocks on its own; there is nothing to undo.
        self._blocks.clear()


class _AzureSegment(SegmentSink):
    """Segment ``index``: blocks ``shared-<upload>-<index>-<part>``, 32 characters as the
    block IDs of ordinary writes are (Azure wants one length for every block of a blob; the
    SDK base64-encodes them)."""

    def __init__(self, target: _AzureShared, index: int) -> None:
        self._target = target
        self._index = index
        self.max_parts = AzureBackend.max_parts // target.segments

    async def open(self) -> None:
        await self._target.check_not_committed(f"open segment {self._index}", self._index)

    async def put_part(self, number: int, offset: int, data: bytes) -> str:
        block_id = self._target.block_id(self._index, number)
        await self._target.blob.stage_block(block_id, streamed_body(data), length=len(data),
                                            **_ONCE)
        return block_id


class _AzureShared(SharedTarget):
    """Blocks of one blob staged by every segment, committed by one ``Put Block List`` in
    index order. Uncommitted blocks are invisible, and the service discards them (after a
    week, or when anything commits that blob): an abort has nothing to remove."""

    max_segments = 50_000

    def __init__(self, backend: AzureBackend, path: str, segments: int, upload: str,
                 state: dict | None) -> None:
        super().__init__(path, segments, upload, state)
        self.blob = backend.blob(path)
        self._prefix = f"shared-{upload}-"
        self._completing = False  # a commit request was sent (a retry may find it done)

    def block_id(self, index: int, number: int) -> str:
        return f"{self._prefix}{index:06d}-{number:09d}"

    async def _blocks(self, kind: str) -> tuple[list, list]:
        try:
            return await self.blob.get_block_list(kind, **_ONCE)
        except Exception as exc:
            if getattr(exc, "error_code", None) == "BlobNotFound" \
                    or getattr(exc, "status_code", None) == 404:
                return [], []
            raise

    async def check_not_committed(self, operation: str, index: int | None = None) -> None:
        committed, _ = await self._blocks("committed")
        if any(str(block.id).startswith(self._prefix) for block in committed):
            raise SharedUploadError(self.path, operation, f"shared upload {self.upload} is no "
                                    "longer open (it was committed)", index)

    def segment(self, index: int) -> SegmentSink:
        return _AzureSegment(self, index)

    async def commit(self, segments: list[tuple[int, int, list[PartRecord]]]) -> None:
        from azure.storage.blob import BlobBlock

        retry, self._completing = self._completing, True
        wanted = [(index, number, block_id, size) for index, _, parts in segments
                  for number, block_id, size in parts]
        if not retry:
            committed, staged = await self._blocks("all")
            if any(str(block.id).startswith(self._prefix) for block in committed):
                raise SharedUploadError(self.path, "commit shared upload", f"shared upload "
                                        f"{self.upload} is no longer open (it was committed)")
            sizes = {str(block.id): block.size for block in staged}
            for index, number, block_id, size in wanted:
                if sizes.get(block_id) != size:
                    raise SharedUploadError(
                        self.path, "commit shared upload", f"block {block_id} (part {number} of "
                        f"segment {index}, {size} bytes) is not staged"
                        + ("" if block_id not in sizes else f" as such ({sizes[block_id]} bytes)")
                        + ": expired, or discarded by another write to the blob", index)
        await self.blob.commit_block_list([BlobBlock(block_id=block_id)
                                           for _, _, block_id, _ in wanted], **_ONCE)

    async def abort(self) -> None:
        # Staged blocks never become visible without a commit, and the service discards
        # them on its own; there is nothing to undo.
        return None


class AzureBackend(Backend):
    # 4 MiB blocks, 8 in flight (the reasons are S3's, see there): 8 MiB blocks took a save
    # to 268 MiB of peak RSS. Blocks grow past the first 5,000.
    part_size = 4 * MiB
    max_parts = 50_000
    concurrency = 8
    # A real store gives each connection tens of MB/s; many ranged GETs at once fill the
    # link (the window held in memory is read_concurrency x read_range).
    read_concurrency = 8

    def __init__(self, storage_options: dict[str, Any],
                 options: BackendOptions | None = None) -> None:
        super().__init__(storage_options, options)
        from adlfs import AzureBlobFileSystem

        from ._loop import io_loop

        # adlfs always builds aio clients; binding it to our loop (rather than passing
        # asynchronous=True, which leaves it loop-less) lets its exit-time finalizer close
        # the client instead of failing with "Loop is not running".
        self.fs = AzureBlobFileSystem(
            asynchronous=False, loop=io_loop(), skip_instance_cache=True, **storage_options
        )

    def blob(self, path: str):
        container, key, _ = self.fs.split_path(path)
        if not container or not key:
            raise IsADirectoryError(f"{path}: names a container, not a blob")
        return self.fs.service_client.get_blob_client(container, key)

    async def size(self, path: str) -> int:
        return int((await self.blob(path).get_blob_properties(**_ONCE)).size)

    async def open_source(self, path: str) -> Source:
        blob = self.blob(path)
        return _AzureSource(blob, await blob.get_blob_properties(**_ONCE))

    def new_upload(self, path: str) -> Upload:
        return _AzureUpload(self.blob(path))

    def shared_target(self, path: str, segments: int, upload: str,
                      state: dict | None) -> SharedTarget:
        return _AzureShared(self, path, segments, upload, state)

    async def close(self) -> None:
        client = getattr(self.fs, "service_client", None)
        if client is not None:
            await client.close()
