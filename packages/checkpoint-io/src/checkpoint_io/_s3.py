"""S3 through s3fs/aiobotocore: multipart uploads completed only on success, aborted on
error; ranged GETs pinned to the ETag seen when the object was opened."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from ._backend import (
    Backend,
    BackendOptions,
    BufferBody,
    MiB,
    Source,
    Upload,
    check_range,
    joined_range,
)

__all__ = ["S3Backend"]


def s3_defaults(options: dict[str, Any]) -> dict[str, Any]:
    """Options for s3fs: our retry policy is the only one, so the client's are turned off."""
    opts = dict(options)
    config = dict(opts.pop("config_kwargs", None) or {})
    config.setdefault("retries", {"max_attempts": 1, "mode": "standard"})
    opts["config_kwargs"] = config
    return opts


class _S3Source(Source):
    def __init__(self, backend: S3Backend, bucket: str, key: str, head: dict) -> None:
        self._b = backend
        self._bucket, self._key = bucket, key
        self.size = int(head["ContentLength"])
        self._etag = head.get("ETag")

    async def read_range(self, start: int, end: int) -> bytes:
        return await joined_range(self, start, end)

    async def stream_range(self, start: int, end: int) -> AsyncIterator[bytes]:
        """One GET for ``[start, end)``, pinned by ``If-Match``; the body is yielded as it
        arrives, once the answer is known to carry that range: each buffer as aiohttp
        received it (``readchunk``: no join into a new ``bytes``, as ``read(n)`` makes)."""
        extra = {"IfMatch": self._etag} if self._etag else {}
        response = await self._b.call(
            "get_object", Bucket=self._bucket, Key=self._key,
            Range=f"bytes={start}-{end - 1}", **extra,
        )
        async with response["Body"] as body:
            check_range(start, end, self.size,
                        response.get("ResponseMetadata", {}).get("HTTPStatusCode"),
                        response.get("ContentRange"), response.get("ContentLength"))
            content = getattr(getattr(body, "raw_stream", None), "content", None)
            if content is None or not hasattr(content, "readchunk"):  # another HTTP client
                while chunk := await body.read(MiB):
                    yield chunk
                return
            while True:
                chunk, _ = await content.readchunk()
                if not chunk:
                    if content.at_eof():
                        return
                    continue  # the end of an HTTP chunk, no data
                yield chunk


class _S3Upload(Upload):
    def __init__(self, backend: S3Backend, bucket: str, key: str) -> None:
        self._b = backend
        self._bucket, self._key = bucket, key
        self._upload_id: str | None = None
        self._etags: dict[int, str] = {}

    async def begin(self) -> None:
        if self._upload_id is None:
            response = await self._b.call(
                "create_multipart_upload", Bucket=self._bucket, Key=self._key
            )
            self._upload_id = response["UploadId"]

    async def put_part(self, number: int, data: bytes | bytearray) -> None:
        # bytes botocore wraps in a BytesIO that shares them; a part (the writer's buffer)
        # goes as views of itself, not copied into one.
        body = data if isinstance(data, bytes) else BufferBody(data)
        response = await self._b.call(
            "upload_part", Bucket=self._bucket, Key=self._key, UploadId=self._upload_id,
            PartNumber=number, Body=body,
        )
        self._etags[number] = response["ETag"]

    async def finish(self, number: int, data: bytes | bytearray, total: int) -> None:
        if data and number not in self._etags:
            await self.put_part(number, data)
        parts = [{"PartNumber": n, "ETag": self._etags[n]} for n in sorted(self._etags)]
        await self._b.call(
            "complete_multipart_upload", Bucket=self._bucket, Key=self._key,
            UploadId=self._upload_id, MultipartUpload={"Parts": parts},
        )
        self._upload_id = None

    async def put_whole(self, data: bytes) -> None:
        await self._b.call("put_object", Bucket=self._bucket, Key=self._key, Body=data)

    async def abort(self) -> None:
        if self._upload_id is not None:
            upload_id, self._upload_id = self._upload_id, None
            await self._b.call(
                "abort_multipart_upload", Bucket=self._bucket, Key=self._key,
                UploadId=upload_id,
            )


class S3Backend(Backend):
    # 5 MiB parts, 8 in flight: a real store gives each connection tens of MB/s, so a save
    # is as fast as the connections it keeps busy (through a proxy shaping each connection
    # to 16 MiB/s, 8 gave 3.9x one PUT where 4 gave 2.4x). Each part in flight is held
    # twice (ours, and the copy aiohttp makes of botocore's BytesIO): about 80 MiB of
    # buffers. Parts grow past the first 1,000 (see StreamWriter._part_size).
    part_size = 5 * MiB
    min_part_size = 5 * MiB
    max_parts = 10_000
    max_part_size = 5 * 1024 * MiB
    concurrency = 8
    # A real store gives each connection tens of MB/s; many ranged GETs at once fill the
    # link (the window held in memory is read_concurrency x read_range).
    read_concurrency = 8
    # Unset widths adapt to the measured rate, up to max_in_flight and the memory budget.
    widen = True

    def __init__(self, storage_options: dict[str, Any],
                 options: BackendOptions | None = None) -> None:
        super().__init__(storage_options, options)
        import s3fs

        from ._loop import io_loop

        self.fs = s3fs.S3FileSystem(
            asynchronous=True, loop=io_loop(), skip_instance_cache=True,
            **s3_defaults(storage_options),
        )
        self.fs.retries = 1  # s3fs's own retry loop would hide faults from our policy

    async def call(self, method: str, **kwargs: Any) -> Any:
        await self.fs.set_session()
        client = await self.fs.get_s3(kwargs.get("Bucket"))
        return await getattr(client, method)(**kwargs)

    def split(self, path: str) -> tuple[str, str]:
        bucket, key, _ = self.fs.split_path(path)
        if not key:
            raise IsADirectoryError(f"{path}: names a bucket, not an object")
        return bucket, key

    async def _head(self, path: str) -> dict:
        bucket, key = self.split(path)
        return await self.call("head_object", Bucket=bucket, Key=key)

    async def size(self, path: str) -> int:
        return int((await self._head(path))["ContentLength"])

    async def open_source(self, path: str) -> Source:
        bucket, key = self.split(path)
        return _S3Source(self, bucket, key, await self._head(path))

    def new_upload(self, path: str) -> Upload:
        return _S3Upload(self, *self.split(path))

    async def close(self) -> None:
        s3 = getattr(self.fs, "_s3", None)
        if s3 is not None:
            await s3.__aexit__(None, None, None)
            self.fs._s3 = None
