"""Google Cloud Storage through gcsfs's session and auth: parallel composite uploads (parts
as temporary objects, composed into the object in one atomic request) or a resumable
session finalised only by the last chunk; ranged reads pinned to one generation."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

from ._backend import (
    Backend,
    BackendOptions,
    MiB,
    Source,
    Upload,
    check_range,
    joined_range,
    streamed_body,
)
from ._errors import VersionMismatch

__all__ = ["GCSBackend"]

_CONTENT_TYPE = "application/octet-stream"
_COMPOSE_SOURCES = 32  # the most source objects one compose request takes
log = logging.getLogger("checkpoint_io")




class _GCSSource(Source):
    def __init__(self, backend: GCSBackend, bucket: str, key: str, meta: dict) -> None:
        self._b = backend
        self._bucket, self._key = bucket, key
        self.size = int(meta.get("size", 0))
        self._generation = meta.get("generation")

    async def read_range(self, start: int, end: int) -> bytes:
        return await joined_range(self, start, end)

    async def stream_range(self, start: int, end: int) -> AsyncIterator[bytes]:
        """One GET of the pinned generation for ``[start, end)``, yielded as it arrives,
        once the answer is known to carry that range."""
        params = {"alt": "media"}
        if self._generation:
            params["generation"] = self._generation
        try:
            async with self._b.stream(
                f"b/{quote(self._bucket, safe='')}/o/{quote(self._key, safe='')}",
                headers={"Range": f"bytes={start}-{end - 1}"}, **params,
            ) as response:
                check_range(start, end, self.size, response.status,
                            response.headers.get("Content-Range"),
                            response.headers.get("Content-Length"))
                while chunk := await response.content.read(MiB):
                    yield chunk
        except FileNotFoundError as exc:
            # The object was there when it was opened: its generation is gone (replaced,
            # or deleted) unless we never pinned one.
            if self._generation:
                raise VersionMismatch(f"generation {self._generation} is gone") from exc
            raise


class _GCSUpload(Upload):
    ordered = True  # a resumable session takes its chunks in order

    def __init__(self, backend: GCSBackend, bucket: str, key: str) -> None:
        self._b = backend
        self._bucket, self._key = bucket, key
        self._session: str | None = None
        self._offset = 0

    def _upload_url(self) -> str:
        return f"{self._b.fs._location}/upload/storage/v1/b/{quote(self._bucket, safe='')}/o"

    async def begin(self) -> None:
        if self._session is None:
            _, headers, _ = await self._b.request(
                "POST", self._upload_url(), uploadType="resumable", name=self._key,
                json={"name": self._key}, headers={"X-Upload-Content-Type": _CONTENT_TYPE},
            )
            self._session = headers["Location"]

    async def _send(self, data: bytes, total: str) -> None:
        if data:
            span = f"bytes {self._offset}-{self._offset + len(data) - 1}/{total}"
        else:
            span = f"bytes */{total}"
        await self._b.request(
            "PUT", self._session, data=streamed_body(data),
            headers={"Content-Range": span, "Content-Type": _CONTENT_TYPE},
        )
        self._offset += len(data)

    async def put_part(self, number: int, data: bytes) -> None:
        await self._send(data, "*")

    async def finish(self, number: int, data: bytes, total: int) -> None:
        # The object exists only once the chunk that states the total size has arrived.
        await self._send(data, str(total))
        self._session = None

    async def put_whole(self, data: bytes) -> None:
        await self._b.put_media(self._bucket, self._key, data)

    async def abort(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await self._b.request("DELETE", session)


#: Every temporary object of a composite upload ends with this, so that a bucket lifecycle
#: rule (``matchesSuffix``) can delete what a killed process left behind.
PART_SUFFIX = ".flyte-checkpoint-part"


class _GCSComposeUpload(Upload):
    """A parallel composite upload: each part is a temporary object
    (``<name>.<random>-<n>.flyte-checkpoint-part``), uploaded ``concurrency`` at a time; the
    object itself appears only with the final compose request, which is atomic (rounds of
    32 sources first when there are more). The temporary objects are deleted afterwards,
    and on abort; a process killed mid-upload leaves some behind, never a torn object."""

    ordered = False
    parts_are_objects = True

    def __init__(self, backend: GCSBackend, bucket: str, key: str) -> None:
        self._b = backend
        self._bucket, self._key = bucket, key
        self._prefix = f"{key}.{secrets.token_hex(6)}-"  # this upload's own: listed on abort
        self._parts: dict[int, str] = {}
        self._temporaries: set[str] = set()

    def _object(self, name: str) -> str:
        return f"b/{quote(self._bucket, safe='')}/o/{quote(name, safe='')}"

    async def put_part(self, number: int, data: bytes) -> None:
        name = f"{self._prefix}{number:06d}{PART_SUFFIX}"
        self._temporaries.add(name)
        await self._b.put_media(self._bucket, name, data)
        self._parts[number] = name

    async def finish(self, number: int, data: bytes, total: int) -> None:
        if data:
            await self.put_part(number, data)
        sources = [self._parts[n] for n in sorted(self._parts)]
        level = 0
        while len(sources) > _COMPOSE_SOURCES:
            groups = [sources[i:i + _COMPOSE_SOURCES]
                      for i in range(0, len(sources), _COMPOSE_SOURCES)]
            names = [f"{self._prefix}c{level}-{i:06d}{PART_SUFFIX}"
                     for i in range(len(groups))]
            self._temporaries.update(names)
            await asyncio.gather(*(self._compose(group, name)
                                   for group, name in zip(groups, names, strict=True)))
            sources, level = names, level + 1
        await self._compose(sources, self._key)  # the object appears here, whole
        await self._delete_temporaries()

    async def _compose(self, sources: list[str], destination: str) -> None:
        await self._b.request(
            "POST", f"{self._object(destination)}/compose",
            json={"sourceObjects": [{"name": name} for name in sources],
                  "destination": {"contentType": _CONTENT_TYPE}},
        )

    async def put_whole(self, data: bytes) -> None:
        await self._b.put_media(self._bucket, self._key, data)

    async def abort(self) -> None:
        await self._delete_temporaries()

    async def _delete_temporaries(self) -> None:
        """Best effort: a temporary object left behind is garbage, never part of an object.
        Listed by prefix too, for a part whose request was cancelled after the server had
        taken it whole."""
        names, self._temporaries = set(self._temporaries), set()
        with contextlib.suppress(Exception):
            _, _, listing = await self._b.request(
                "GET", f"b/{quote(self._bucket, safe='')}/o", prefix=self._prefix)
            names.update(item["name"] for item in json.loads(listing).get("items", [])
                         if item["name"].endswith(PART_SUFFIX))

        slots = asyncio.Semaphore(self._b.concurrency)  # as many requests as the upload used

        async def delete(name: str) -> None:
            try:
                async with slots:
                    await self._b.request("DELETE", self._object(name))
            except FileNotFoundError:
                pass
            except Exception as exc:
                log.warning("could not delete temporary part %s of gs://%s/%s: %s", name,
                            self._bucket, self._key, exc)

        await asyncio.gather(*(delete(name) for name in sorted(names)))


class GCSBackend(Backend):
    # A resumable session's chunks go one after another, where fewer, larger ones are
    # faster (fake-gcs-server re-handles the whole upload per chunk): 16 MiB. Composite
    # parts go 8 at a time, 8 MiB each (see __init__), as S3's parts do.
    part_size = 16 * MiB
    min_part_size = 256 * 1024
    part_multiple = 256 * 1024  # resumable chunks other than the last
    concurrency = 8
    # A real store gives each connection tens of MB/s; many ranged GETs at once fill the
    # link (the window held in memory is read_concurrency x read_range).
    read_concurrency = 8
    # Unset widths adapt to the measured rate, up to max_in_flight and the memory budget.
    widen = True

    def __init__(self, storage_options: dict[str, Any],
                 options: BackendOptions | None = None) -> None:
        super().__init__(storage_options, options)
        from gcsfs.core import GCSFileSystem

        #: ``BackendOptions(gcs_composite=True)``: parts as temporary objects in parallel,
        #: then one compose. Opt-in, like gsutil's parallel composite uploads: the temporary
        #: objects are visible while the upload runs and stay behind when the process dies
        #: or the store becomes unreachable before it can delete them, and they cost where
        #: buckets have retention policies or early-deletion storage classes. The default is
        #: one resumable session, which leaves nothing visible until it is finalised.
        self.composite_uploads = self.options.gcs_composite
        if self.composite_uploads:
            self.part_size = 8 * MiB

        from ._loop import io_loop

        self.fs = GCSFileSystem(
            asynchronous=True, loop=io_loop(), skip_instance_cache=True,
            **storage_options,
        )
        # gcsfs wraps each request in its own retry loop (up to ~30 s of sleeps); call the
        # single-attempt function under it so our policy is the only one.
        self._request_once = type(self.fs)._request.__wrapped__

    async def put_media(self, bucket: str, name: str, data: bytes) -> None:
        """Create object ``name`` with ``data`` in one request (a simple media upload)."""
        await self.request(
            "POST", f"{self.fs._location}/upload/storage/v1/b/{quote(bucket, safe='')}/o",
            uploadType="media", name=name, data=streamed_body(data),
            headers={"Content-Type": _CONTENT_TYPE},
        )

    async def request(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any, bytes]:
        status, headers, _, contents = await self._request_once(self.fs, method, path, **kwargs)
        return status, headers, contents

    @contextlib.asynccontextmanager
    async def stream(self, path: str, headers: dict[str, str], **params: Any):
        """A GET whose body is read incrementally: yields aiohttp's response (its status
        and headers; the body is its ``content`` stream).

        The same request as ``request`` (session, auth headers, error mapping), minus
        reading the whole body into memory.
        """
        import aiohttp
        from gcsfs.retry import validate_response

        fs = self.fs
        await fs._set_session()
        # aiohttp's default 5-minute total would cut a long body read slowly; a stall is
        # bounded by the caller's per-block attempt timeout instead.
        timeout = fs.requests_timeout or aiohttp.ClientTimeout(total=None, sock_connect=60)
        async with fs.session.request(
            method="GET", url=fs._format_path(path, ()), params=fs._get_params(params),
            headers=fs._get_headers(headers), timeout=timeout,
        ) as response:
            if response.status >= 400:
                validate_response(response.status, await response.read(), path)
            yield response

    def split(self, path: str) -> tuple[str, str]:
        bucket, key, _ = self.fs.split_path(path)
        if not key:
            raise IsADirectoryError(f"{path}: names a bucket, not an object")
        return bucket, key

    async def _meta(self, path: str) -> dict:
        bucket, key = self.split(path)
        _, _, contents = await self.request(
            "GET", f"b/{quote(bucket, safe='')}/o/{quote(key, safe='')}"
        )
        return json.loads(contents)

    async def size(self, path: str) -> int:
        return int((await self._meta(path)).get("size", 0))

    async def open_source(self, path: str) -> Source:
        bucket, key = self.split(path)
        return _GCSSource(self, bucket, key, await self._meta(path))

    def new_upload(self, path: str) -> Upload:
        if self.composite_uploads:
            return _GCSComposeUpload(self, *self.split(path))
        return _GCSUpload(self, *self.split(path))

    async def close(self) -> None:
        session = getattr(self.fs, "_session", None)
        if session is not None and not session.closed:
            await session.close()
