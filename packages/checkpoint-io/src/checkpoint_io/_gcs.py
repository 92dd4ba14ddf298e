"""Google Cloud Storage through gcsfs's session and auth: parallel composite uploads (parts
as temporary objects, composed into the object in one atomic request) or a resumable
session finalised only by the last chunk; ranged reads pinned to one generation."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import quote

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
from ._errors import SharedUploadError, VersionMismatch

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
        sources = [{"name": self._parts[n]} for n in sorted(self._parts)]
        await self._b.compose_tree(  # the object appears in its last request, whole
            self._bucket, sources, self._key,
            lambda level, i: f"{self._prefix}c{level}-{i:06d}{PART_SUFFIX}",
            self._temporaries.add)
        await self._delete_temporaries()

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


def _created(stamp: str) -> datetime.datetime:
    """An RFC 3339 ``timeCreated`` (any number of fraction digits: Python 3.10's
    ``fromisoformat`` takes 3 or 6)."""
    head, _, rest = stamp.rstrip("Z").partition(".")
    fraction = "".join(ch for ch in rest if ch.isdigit())
    when = datetime.datetime.fromisoformat(head).replace(tzinfo=datetime.timezone.utc)
    return when + datetime.timedelta(microseconds=int((fraction + "000000")[:6]))


class _GCSSegment(SegmentSink):
    """Segment ``index``: each part a temporary object
    ``<key>.<upload>-<index>-<part>.flyte-checkpoint-part``; the part's identifier is the
    generation it was created with, which the commit's compose pins."""

    def __init__(self, target: _GCSShared, index: int) -> None:
        self._target = target
        self._index = index

    async def open(self) -> None:
        await self._target.check_open(f"open segment {self._index}", self._index)

    async def put_part(self, number: int, offset: int, data: bytes) -> str:
        target = self._target
        meta = await target.b.put_media(target.bucket, target.part_name(self._index, number),
                                        data)
        return str(meta.get("generation", ""))

    async def close(self, size: int) -> None:
        try:
            await self._target.check_open(f"close segment {self._index}", self._index)
        except SharedUploadError:
            await self.abort()  # committed or aborted meanwhile: ours would stay behind
            raise

    async def abort(self) -> None:
        await self._target.delete_under(self._target.segment_prefix(self._index))


class _GCSShared(SharedTarget):
    """Temporary objects under ``<key>.<upload>-``, made the object by compose (a tree of
    requests of at most 32 sources, pinned to the generations the segments wrote); the
    marker ``<key>.<upload>-open.flyte-checkpoint-part`` says the upload is open."""

    max_segments = 100_000

    def __init__(self, backend: GCSBackend, path: str, segments: int, upload: str,
                 state: dict | None) -> None:
        super().__init__(path, segments, upload, state)
        self.b = backend
        self.bucket, self.key = backend.split(path)
        self.prefix = f"{self.key}.{upload}-"
        self.marker = f"{self.prefix}open{PART_SUFFIX}"
        self._published = False  # the final compose succeeded (a retry only cleans up)

    def segment_prefix(self, index: int) -> str:
        return f"{self.prefix}{index:05d}-"

    def part_name(self, index: int, number: int) -> str:
        return f"{self.segment_prefix(index)}{number:06d}{PART_SUFFIX}"

    async def check_open(self, operation: str, index: int | None = None) -> None:
        try:
            await self.b.request("GET", self.b.object_path(self.bucket, self.marker))
        except FileNotFoundError:
            raise SharedUploadError(
                self.path, operation, f"shared upload {self.upload} is no longer open (it was "
                f"committed or aborted, or swept: gs://{self.bucket}/{self.marker} is gone)",
                index) from None

    async def begin(self) -> dict:
        await self.b.put_media(self.bucket, self.marker, b"")
        return self.state

    def segment(self, index: int) -> SegmentSink:
        return _GCSSegment(self, index)

    async def commit(self, segments: list[tuple[int, int, list[PartRecord]]]) -> None:
        if not self._published:
            await self.check_open("commit shared upload")
            await self._check_parts(segments)
            # The listing above checks the generations now; the preconditions hold them
            # until the compose (a service that ignores them, as fake-gcs-server does, is
            # left with the listing's check).
            sources = [{"name": self.part_name(index, number), "generation": generation,
                        "objectPreconditions": {"ifGenerationMatch": generation}}
                       for index, _, parts in segments for number, generation, _ in parts]
            if sources:
                await self.b.compose_tree(
                    self.bucket, sources, self.key,
                    lambda level, i: f"{self.prefix}c{level}-{i:06d}{PART_SUFFIX}")
            else:  # every segment empty; compose needs a source
                await self.b.put_media(self.bucket, self.key, b"")
            self._published = True
        await self.abort()  # the temporaries and the marker

    async def _check_parts(self, segments: list[tuple[int, int, list[PartRecord]]]) -> None:
        """Every part of every receipt is there, as the generation its segment wrote and of
        the size it says (one listing per 1,000 objects, not a request per part)."""
        held = {item["name"]: item for item in await self.b.list_objects(self.bucket,
                                                                          self.prefix)}
        for index, _, parts in segments:
            for number, generation, size in parts:
                item = held.get(self.part_name(index, number))
                if item is None or str(item.get("generation")) != generation \
                        or int(item.get("size", -1)) != size:
                    found = "gone" if item is None else (
                        f"generation {item.get('generation')} of {item.get('size')} bytes")
                    raise SharedUploadError(
                        self.path, "commit shared upload", f"part {number} of segment {index} "
                        f"is not what its receipt says (generation {generation} of {size} "
                        f"bytes): {found}", index)

    async def delete_under(self, prefix: str, first: str | None = None) -> None:
        """Delete ``first`` (when given), then every temporary object under ``prefix``."""
        if first is not None:
            await self.b.delete_quietly(self.bucket, first)
        items = await self.b.list_objects(self.bucket, prefix)
        slots = asyncio.Semaphore(self.b.concurrency)

        async def delete(name: str) -> None:
            async with slots:
                await self.b.delete_quietly(self.bucket, name)

        await asyncio.gather(*(delete(item["name"]) for item in items
                               if item["name"].endswith(PART_SUFFIX)))

    async def abort(self) -> None:
        # The marker first: a segment still writing then fails at close and removes its own.
        await self.delete_under(self.prefix, first=self.marker)


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

    async def put_media(self, bucket: str, name: str, data: bytes) -> dict:
        """Create object ``name`` with ``data`` in one request (a simple media upload);
        returns the new object's metadata (its ``generation``)."""
        _, _, contents = await self.request(
            "POST", f"{self.fs._location}/upload/storage/v1/b/{quote(bucket, safe='')}/o",
            uploadType="media", name=name, data=streamed_body(data),
            headers={"Content-Type": _CONTENT_TYPE},
        )
        with contextlib.suppress(ValueError):
            return json.loads(contents or b"{}")
        return {}

    @staticmethod
    def object_path(bucket: str, name: str) -> str:
        return f"b/{quote(bucket, safe='')}/o/{quote(name, safe='')}"

    async def compose(self, bucket: str, sources: list[dict], destination: str) -> None:
        await self.request(
            "POST", f"{self.object_path(bucket, destination)}/compose",
            json={"sourceObjects": sources, "destination": {"contentType": _CONTENT_TYPE}},
        )

    async def compose_tree(self, bucket: str, sources: list[dict], destination: str,
                           intermediate: Callable[[int, int], str],
                           created: Callable[[str], None] = lambda name: None) -> None:
        """Compose ``sources`` (compose's ``sourceObjects`` entries, in order) into
        ``destination``: rounds of at most 32 sources into intermediate objects named
        ``intermediate(level, i)`` (each reported to ``created`` first) while there are more,
        then one request; ``destination`` appears whole with that last one."""
        level = 0
        while len(sources) > _COMPOSE_SOURCES:
            groups = [sources[i:i + _COMPOSE_SOURCES]
                      for i in range(0, len(sources), _COMPOSE_SOURCES)]
            names = [intermediate(level, i) for i in range(len(groups))]
            for name in names:
                created(name)
            await asyncio.gather(*(self.compose(bucket, group, name)
                                   for group, name in zip(groups, names, strict=True)))
            sources, level = [{"name": name} for name in names], level + 1
        await self.compose(bucket, sources, destination)

    async def list_objects(self, bucket: str, prefix: str) -> list[dict]:
        """Every object under ``prefix`` (metadata: ``name``, ``timeCreated``, ...)."""
        items, page = [], {}
        while True:
            _, _, listing = await self.request("GET", f"b/{quote(bucket, safe='')}/o",
                                               prefix=prefix, **page)
            data = json.loads(listing)
            items.extend(data.get("items", []))
            if not data.get("nextPageToken"):
                return items
            page = {"pageToken": data["nextPageToken"]}

    async def delete_quietly(self, bucket: str, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            await self.request("DELETE", self.object_path(bucket, name))

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

    def shared_target(self, path: str, segments: int, upload: str,
                      state: dict | None) -> SharedTarget:
        return _GCSShared(self, path, segments, upload, state)

    async def sweep_shared(self, path: str, older_than: float) -> list[str]:
        """Delete the temporary objects beside ``path`` (``<key>.*.flyte-checkpoint-part``:
        shared uploads' and composite uploads') created over ``older_than`` seconds ago."""
        bucket, key = self.split(path)
        cutoff = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(
            seconds=older_than)
        removed = []
        for item in await self.list_objects(bucket, f"{key}."):
            name = item["name"]
            created = item.get("timeCreated")
            if not name.endswith(PART_SUFFIX) or not created:
                continue
            if _created(created) <= cutoff:
                await self.delete_quietly(bucket, name)
                removed.append(f"gs://{bucket}/{name}")
        return removed

    def new_upload(self, path: str) -> Upload:
        if self.composite_uploads:
            return _GCSComposeUpload(self, *self.split(path))
        return _GCSUpload(self, *self.split(path))

    async def close(self) -> None:
        session = getattr(self.fs, "_session", None)
        if session is not None and not session.closed:
            await session.close()
