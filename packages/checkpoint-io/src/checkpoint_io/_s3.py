"""S3 through s3fs/aiobotocore: multipart uploads completed only on success, aborted on
error; ranged GETs pinned to the ETag seen when the object was opened."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
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
)
from ._errors import SharedUploadError

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
        arrives (aiohttp hands out what it has, at most 1 MiB at a time), once the answer
        is known to carry that range."""
        extra = {"IfMatch": self._etag} if self._etag else {}
        response = await self._b.call(
            "get_object", Bucket=self._bucket, Key=self._key,
            Range=f"bytes={start}-{end - 1}", **extra,
        )
        async with response["Body"] as body:
            check_range(start, end, self.size,
                        response.get("ResponseMetadata", {}).get("HTTPStatusCode"),
                        response.get("ContentRange"), response.get("ContentLength"))
            while chunk := await body.read(MiB):
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

    async def put_part(self, number: int, data: bytes) -> None:
        response = await self._b.call(
            "upload_part", Bucket=self._bucket, Key=self._key, UploadId=self._upload_id,
            PartNumber=number, Body=data,
        )
        self._etags[number] = response["ETag"]

    async def finish(self, number: int, data: bytes, total: int) -> None:
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


def _no_such_upload(exc: BaseException) -> bool:
    response = getattr(exc, "response", None)
    code = (response.get("Error") or {}).get("Code") if isinstance(response, dict) else None
    return code == "NoSuchUpload"


def _multipart_etag(etags: list[str]) -> str:
    """The ETag S3 gives an object completed from parts with these ETags (their MD5s)."""
    digest = hashlib.md5(b"".join(bytes.fromhex(e.strip('"')) for e in etags),
                         usedforsecurity=False)
    return f'"{digest.hexdigest()}-{len(etags)}"'


class _S3Segment(SegmentSink):
    """Segment ``index`` of ``segments`` owns part numbers ``index * (10000 // segments) + 1``
    onwards, ``10000 // segments`` of them, in the upload every segment shares."""

    def __init__(self, target: _S3Shared, index: int) -> None:
        self._target = target
        self._index = index
        self.max_parts = S3Backend.max_parts // target.segments
        self.first_part = index * self.max_parts + 1
        self.min_part = S3Backend.min_part_size

    async def open(self) -> None:
        # One cheap request, so that a token of an upload committed or aborted meanwhile
        # fails here, before any part is sent.
        await self._target.call("list_parts", f"open segment {self._index}", self._index,
                                MaxParts=1)

    async def put_part(self, number: int, offset: int, data: bytes) -> str:
        response = await self._target.call("upload_part", f"upload part {number} of segment "
                                           f"{self._index}", self._index, PartNumber=number,
                                           Body=data)
        return response["ETag"]


class _S3Shared(SharedTarget):
    """One multipart upload; commit = complete it with every segment's parts in order."""

    max_segments = 10_000
    min_segment = 5 * MiB

    def __init__(self, backend: S3Backend, path: str, segments: int, upload: str,
                 state: dict | None) -> None:
        super().__init__(path, segments, upload, state)
        self._b = backend
        self._bucket, self._key = backend.split(path)
        self._completing = False  # a complete request was sent (a retry may find it done)

    async def call(self, method: str, operation: str, index: int | None = None,
                   **kwargs: Any) -> Any:
        try:
            return await self._b.call(method, Bucket=self._bucket, Key=self._key,
                                      UploadId=self.state["upload_id"], **kwargs)
        except Exception as exc:
            if _no_such_upload(exc):
                raise SharedUploadError(
                    self.path, operation, f"shared upload {self.upload} is no longer open (it "
                    "was committed or aborted, or swept)", index) from exc
            raise

    async def begin(self) -> dict:
        if "upload_id" not in self.state:  # a retry after the answer was lost starts anew
            response = await self._b.call("create_multipart_upload", Bucket=self._bucket,
                                          Key=self._key)
            self.state["upload_id"] = response["UploadId"]
        return self.state

    def segment(self, index: int) -> SegmentSink:
        return _S3Segment(self, index)

    async def commit(self, segments: list[tuple[int, int, list[PartRecord]]]) -> None:
        parts = [part for _, _, records in segments for part in records]
        if not parts:  # every segment empty: an empty object (a multipart upload needs one part)
            await self.call("list_parts", "commit shared upload", MaxParts=1)
            await self._b.call("put_object", Bucket=self._bucket, Key=self._key, Body=b"")
            await self.abort()
            return
        retry = self._completing
        if not retry:
            # S3 answers a repeated complete with success: a token used after its commit
            # must be caught before (ListParts knows a finished upload no more).
            await self.call("list_parts", "commit shared upload", MaxParts=1)
        self._completing = True
        try:
            await self.call("complete_multipart_upload", "commit shared upload",
                            MultipartUpload={"Parts": [{"PartNumber": n, "ETag": etag}
                                                       for n, etag, _ in parts]})
        except SharedUploadError:
            # A retry whose first attempt did complete (its answer lost) finds no upload:
            # the object then carries the ETag of exactly these parts. (A first attempt
            # that finds none is a token used after its commit or abort.)
            if not retry:
                raise
            head = await self._b.call("head_object", Bucket=self._bucket, Key=self._key)
            if head.get("ETag") != _multipart_etag([etag for _, etag, _ in parts]):
                raise

    async def abort(self) -> None:
        with contextlib.suppress(SharedUploadError):  # gone: aborted, committed, or swept
            await self.call("abort_multipart_upload", "abort shared upload")


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

    def shared_target(self, path: str, segments: int, upload: str,
                      state: dict | None) -> SharedTarget:
        return _S3Shared(self, path, segments, upload, state)

    async def sweep_shared(self, path: str, older_than: float) -> list[str]:
        """Abort the multipart uploads of exactly this key started over ``older_than``
        seconds ago (an ``AbortIncompleteMultipartUpload`` lifecycle rule does the same for
        a whole bucket, by days)."""
        bucket, key = self.split(path)
        cutoff = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(
            seconds=older_than)
        removed, marker = [], {}
        while True:
            listing = await self.call("list_multipart_uploads", Bucket=bucket, Prefix=key,
                                      **marker)
            for upload in listing.get("Uploads", []):
                if upload["Key"] == key and upload["Initiated"] <= cutoff:
                    await self.call("abort_multipart_upload", Bucket=bucket, Key=key,
                                    UploadId=upload["UploadId"])
                    removed.append(f"{path} (multipart upload {upload['UploadId']})")
            if not listing.get("IsTruncated"):
                return removed
            marker = {"KeyMarker": listing["NextKeyMarker"],
                      "UploadIdMarker": listing["NextUploadIdMarker"]}

    async def close(self) -> None:
        s3 = getattr(self.fs, "_s3", None)
        if s3 is not None:
            await s3.__aexit__(None, None, None)
            self.fs._s3 = None
