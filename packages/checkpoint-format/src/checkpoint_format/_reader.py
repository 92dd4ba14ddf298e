"""The streaming tar reader: parses a tarball member by member and enforces spec §4-§6.

It does no file-system I/O of its own. The extractor writes what it yields into a staging
directory; the validator only counts and hashes. Both share every check, so a tarball the
validator passes is one the extractor restores, and the other way round.
"""

from __future__ import annotations

import dataclasses
import hashlib
import queue
import re
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO, Literal

from . import _codec
from ._digest import PieceHashing, PooledTreeHasher, TreeHasher
from ._errors import (
    CheckpointFormatError,
    CorruptArchiveError,
    LimitExceededError,
    UnsafeMemberError,
    UnsupportedFormatError,
)
from ._limits import Limits
from ._links import Dir, Link, NameTree, target_problem
from ._spec import (
    BLOCK,
    FORMAT_MAJOR,
    FORMAT_VERSION,
    PIECE,
    PLAIN_KEY,
    TREE_KEY,
    VERSION_KEY,
    WRITER_KEY,
)
from ._tarheader import (
    DIRECTORY,
    EXTENDED_TYPES,
    GNU_LONGNAME,
    HARDLINK,
    PAX_GLOBAL,
    PAX_LOCAL,
    REGULAR_TYPES,
    SYMLINK,
    ZERO_BLOCK,
    HeaderError,
    is_header_block,
    parse_header,
    parse_pax_mtime,
    parse_pax_records,
)
from ._width import decode_width

__all__ = ["Member", "TarReader"]

_READ_SIZE = 1 << 20
_QUEUE_BYTES = 8 << 20  # decoded bytes in flight between the decode thread and the writer
_VERIFY_DEPTH = 16  # data pieces queued for the verify thread (each a view of a chunk)
_VERIFY_INLINE = 1 << 20  # members up to this size are hashed inline: a thread hop costs more
_END = object()
_MAX_COMPONENT = 255  # CF-EXTRACT-09
_MAX_MTIME_NS = 2**63 - 1  # what os.utime(ns=...) can set
_VERSION_RE = re.compile(r"([0-9]{1,9})\.([0-9]{1,9})")
_DIGEST_RE = re.compile(r"[0-9a-f]{64}")
_DIGITS = re.compile(r"[0-9]{1,30}")
_REFUSED_GLOBAL_KEYS = ("path", "linkpath", "size")
_MEMBER_KEYS = ("path", "linkpath", "size", "mtime", PLAIN_KEY, TREE_KEY)

MemberType = Literal["file", "dir", "symlink", "hardlink"]


@dataclasses.dataclass(frozen=True)
class Member:
    """One restorable tar member, after extended headers and name normalisation."""

    name: str
    type: MemberType
    size: int
    mode: int
    mtime_ns: int
    linkname: str | None = None
    #: The expected digest (hex), and which record carried it: ``FLYTECKPT.sha256`` (plain
    #: SHA-256) or ``FLYTECKPT.sha256-pieces`` (SHA-256 of the 4 MiB pieces' SHA-256s).
    sha256: str | None = None
    digest_key: str | None = None


def _type_of(typeflag: bytes) -> MemberType | None:
    if typeflag in REGULAR_TYPES:
        return "file"
    return {DIRECTORY: "dir", SYMLINK: "symlink", HARDLINK: "hardlink"}.get(typeflag)


_TYPE_NAMES = {
    b"3": "character device",
    b"4": "block device",
    b"6": "FIFO",
    b"S": "GNU sparse file",
    b"V": "GNU volume header",
    b"M": "GNU multi-volume continuation",
}


class _Blocks:
    """Decompressed tar bytes, pulled from the object on demand in bounded chunks."""

    def __init__(self, source: BinaryIO, compression: str, limits: Limits, width: int) -> None:
        self._source = source
        # gzip (what every writer of this format and upstream produce) is cut into members
        # and inflated on several cores; bzip2 and xz, read only, stream through one decoder.
        self._decoder: _codec.Decoder | _codec.GzipMembers | None = None
        if compression == _codec.GZIP:
            self._decoder = _codec.GzipMembers(source.read, width=width, read_size=_READ_SIZE,
                                               read_pieces=getattr(source, "read_pieces", None))
        elif compression != _codec.NONE:
            self._decoder = _codec.Decoder(compression)
        self._limits = limits
        self._chunks = self._decoded()
        self._buf = memoryview(b"")
        self.offset = 0  # position in the tar stream of the next unread byte
        #: The member whose data is being read, so that a fault found meanwhile (truncation,
        #: a bad CRC, the expansion ratio) names it.
        self.member: str | None = None
        self.last_member: str | None = None

    def close(self) -> None:
        """Stop the decode thread and let go of the source (idempotent)."""
        self._chunks.close()

    def _decoded(self) -> Iterator[memoryview]:
        """Decoded chunks, produced on a helper thread so that reading and inflating the
        object overlap with hashing and writing the files (both release the GIL)."""
        chunks: queue.SimpleQueue[object] = queue.SimpleQueue()
        stop = threading.Event()
        # Bounded in bytes, not chunks: a chunk is up to a whole gzip member (16 MiB).
        room = threading.Condition()
        queued = 0

        def put(item: object) -> bool:
            nonlocal queued
            size = len(item) if isinstance(item, memoryview) else 0
            with room:
                while queued and queued + size > _QUEUE_BYTES:
                    if stop.is_set():
                        return False
                    room.wait(0.05)
                if stop.is_set():
                    return False
                queued += size
            chunks.put(item)
            return True

        def produce() -> None:
            try:
                for chunk in self._decode_inline():
                    if not put(chunk):
                        return
                put(_END)
            except BaseException as exc:  # handed to the consuming thread, raised there
                put(exc)

        worker = threading.Thread(target=produce, name="checkpoint-decode", daemon=True)
        worker.start()
        try:
            while True:
                item = chunks.get()
                if isinstance(item, memoryview):
                    with room:
                        queued -= len(item)
                        room.notify()
                if item is _END:
                    return
                if isinstance(item, CheckpointFormatError) and item.member is None:
                    # A fault found by the decode thread names the member being read; an
                    # expansion judged just after a member's data names that member.
                    culprit = self.member
                    if culprit is None and isinstance(item, LimitExceededError):
                        culprit = self.last_member
                    if culprit is not None:
                        raise type(item)(item.rule, item.detail, culprit)
                if isinstance(item, BaseException):
                    raise item
                yield item  # type: ignore[misc]
        finally:
            stop.set()
            worker.join()

    def _decode_inline(self) -> Iterator[memoryview]:
        if isinstance(self._decoder, _codec.GzipMembers):
            for out in self._decoder.chunks():
                yield memoryview(out)
                self._check_ratio()
            return
        while True:
            data = self._source.read(_READ_SIZE)
            if not data:
                if self._decoder is not None:
                    self._decoder.finish()
                return
            if self._decoder is None:
                yield memoryview(data)
                continue
            for out in self._decoder.feed(data):
                yield memoryview(out)
                # Judged after the chunk is handed on, so that the error names the member
                # whose data was being inflated.
                self._check_ratio()

    def _check_ratio(self) -> None:
        decoder = self._decoder
        assert decoder is not None
        produced, consumed = decoder.decompressed_out, max(decoder.compressed_in, 1)
        if (
            produced > self._limits.ratio_grace_bytes
            and produced / consumed > self._limits.max_expansion_ratio
        ):
            raise LimitExceededError(
                "CF-LIMIT-01",
                f"expansion ratio {produced / consumed:.0f}:1 exceeds max_expansion_ratio="
                f"{self._limits.max_expansion_ratio:g} (raise it: Limits.max_expansion_ratio,"
                " CHECKPOINT_MAX_EXPANSION_RATIO for the helper and CLIs)",
            )

    def _fill(self) -> bool:
        for chunk in self._chunks:
            if chunk:
                self._buf = chunk
                return True
        return False

    def read_exact(self, size: int, what: str) -> bytes:
        """Exactly ``size`` bytes, or CF-INTEG-01 naming what was being read."""
        if len(self._buf) >= size:  # the common case: a header inside the current chunk
            piece = self._buf[:size]
            self._buf = self._buf[size:]
            self.offset += size
            return bytes(piece)
        return b"".join(self.stream(size, what))

    def take(self, size: int, padding: int) -> memoryview | None:
        """``size`` bytes and then ``padding`` skipped, if the current chunk holds them all."""
        end = size + padding
        if len(self._buf) < end:
            return None
        piece = self._buf[:size]
        self._buf = self._buf[end:]
        self.offset += end
        return piece

    def stream(self, size: int, what: str) -> Iterator[memoryview]:
        """``size`` bytes as a sequence of views into the decoded chunks (no copies)."""
        remaining = size
        while remaining:
            if not self._buf and not self._fill():
                raise CorruptArchiveError(
                    "CF-INTEG-01",
                    f"stream ends at tar offset {self.offset} inside {what} (truncated)",
                    self.member,
                )
            piece = self._buf[:remaining]
            self._buf = self._buf[len(piece) :]
            self.offset += len(piece)
            remaining -= len(piece)
            yield piece

    def drain_zeros(self) -> int:
        """Consume the rest of the stream; every byte must be zero (CF-INTEG-05)."""
        count = 0
        while self._buf or self._fill():
            if bytes(self._buf).strip(b"\0"):
                raise CorruptArchiveError(
                    "CF-INTEG-05",
                    f"non-zero data after the end-of-archive marker at tar offset {self.offset}",
                )
            count += len(self._buf)
            self.offset += len(self._buf)
            self._buf = memoryview(b"")
        return count


class _Verifier:
    """Checks SHA-256 digests of large members on a thread of its own, so that hashing runs
    beside writing the files instead of after it. Mismatches are reported, in archive
    order, by :meth:`finish`, before anything is published."""

    def __init__(self) -> None:
        self._jobs: queue.Queue[object] = queue.Queue(maxsize=_VERIFY_DEPTH)
        self._thread: threading.Thread | None = None
        self._mismatches: list[tuple[str, str, str]] = []
        self._failure: BaseException | None = None

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="checkpoint-verify", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if self._failure is not None:
                continue  # drain after a failure so producers never block
            try:
                kind, hasher, value = job  # type: ignore[misc]
                if kind == "data":
                    hasher.update(value)
                else:
                    name, expected = value
                    actual = hasher.hexdigest()
                    if actual != expected:
                        self._mismatches.append((name, actual, expected))
            except BaseException as exc:  # pragma: no cover - hashlib does not fail
                self._failure = exc

    def update(self, hasher, piece: memoryview) -> None:
        self._start()
        self._jobs.put(("data", hasher, piece))

    def end(self, hasher, name: str, expected: str) -> None:
        self._start()
        self._jobs.put(("end", hasher, (name, expected)))

    def finish(self) -> list[tuple[str, str, str]]:
        """Wait for every queued member; returns (member, actual, expected) mismatches."""
        self.close()
        if self._failure is not None:  # pragma: no cover
            raise self._failure
        return self._mismatches

    def close(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None


class TarReader:
    """Iterate the members of one tarball stream, enforcing every reader rule of the spec.

    ``on_violation`` decides what a rule violation does: the extractor raises it, the validator
    records it and reading goes on. Structural faults (truncation, bad checksums, undecodable
    compression, an unknown major version) always raise.

    Iterate :meth:`members`; for a ``file`` member the second item is an iterator of data
    chunks to consume before asking for the next member (what is left unconsumed is skipped,
    still hashed and verified).

    ``limits`` are the caps of spec §5.1 (default: ``Limits()``); ``decode_threads`` the
    width of the inflate and hash pools (default: :func:`~checkpoint_format._width.decode_width`).
    Neither is ever read from a ``CHECKPOINT_*`` variable.
    """

    def __init__(
        self,
        source: BinaryIO,
        compression: str,
        *,
        limits: Limits | None = None,
        decode_threads: int | None = None,
        on_violation: Callable[[CheckpointFormatError], None] | None = None,
    ) -> None:
        self.limits = limits or Limits()
        #: Threads inflating gzip members and hashing large members' pieces.
        self.decode_threads = decode_width(decode_threads)
        self._blocks = _Blocks(source, compression, self.limits, self.decode_threads)
        self._on_violation = on_violation or _raise
        self.format_version: str | None = None
        self.writer: str | None = None
        self.member_count = 0
        self.total_size = 0
        self.digests_present = 0
        self._names = NameTree()  # every member and implied parent, as a trie of components
        #: Archive positions of the members whose digests are checked off the main thread,
        #: so that mismatches are reported in archive order.
        self._positions: dict[str, int] = {}
        self._verifier = _Verifier()
        # With more than one core, the pieces of large members' piecewise digests are hashed
        # on a pool, their checks deferred to the end of the archive.
        self._hash_pool: ThreadPoolExecutor | None = None
        self._piece_hashing: PieceHashing | None = None
        self._deferred: list[tuple[PooledTreeHasher, str, str]] = []

    # ---------------------------------------------------------------- public

    @property
    def marked(self) -> bool:
        return self.format_version is not None

    def close(self) -> None:
        """Stop reading: ends the decode and verify threads and releases the source."""
        self._blocks.close()
        self._verifier.close()
        if self._hash_pool is not None:
            self._hash_pool.shutdown(wait=True, cancel_futures=True)
            self._hash_pool = None

    def __enter__(self) -> TarReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def members(self) -> Iterator[tuple[Member, Iterator[memoryview]]]:
        pax: dict[str, str] = {}
        long_name: str | None = None
        long_link: str | None = None
        # A local extended header waits for its member, whether or not it held a key kept
        # in ``pax``: one before the end-of-archive marker is a truncation (CF-INTEG-01).
        pending = False
        while True:
            header_offset = self._blocks.offset
            block = self._blocks.read_exact(BLOCK, "a header block (no end-of-archive marker)")
            if block == ZERO_BLOCK:
                self._finish_archive(pending)
                return
            if not is_header_block(block):
                raise CorruptArchiveError(
                    "CF-INTEG-02", f"header block at tar offset {header_offset} fails its checksum"
                )
            try:
                raw = parse_header(block)
            except HeaderError as exc:
                raise CorruptArchiveError(
                    "CF-INTEG-02", f"header at tar offset {header_offset}: {exc}"
                ) from None
            if raw.size < 0:
                raise CorruptArchiveError(
                    "CF-INTEG-02", f"header at tar offset {header_offset} has a negative size"
                )
            if raw.typeflag in EXTENDED_TYPES:
                payload = self._read_extended(raw.typeflag, raw.size, header_offset)
                pending = pending or raw.typeflag != PAX_GLOBAL
                if raw.typeflag == PAX_LOCAL:
                    # Only the records a member uses are kept (CF-MARK-05: the rest are
                    # ignored), so that however many headers precede a member, what is held
                    # is at most one value per key, each within max_extended_header.
                    records = self._parse_pax(payload, header_offset)
                    pax.update((key, records[key]) for key in _MEMBER_KEYS if key in records)
                elif raw.typeflag == PAX_GLOBAL:
                    self._apply_global(self._parse_pax(payload, header_offset), header_offset)
                elif raw.typeflag == GNU_LONGNAME:
                    long_name = payload.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                else:
                    long_link = payload.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                continue
            yield from self._member(raw, pax, long_name, long_link, header_offset)
            pax, long_name, long_link, pending = {}, None, None, False

    # ---------------------------------------------------------------- headers

    def _read_extended(self, typeflag: bytes, size: int, offset: int) -> bytes:
        if size > self.limits.max_extended_header:
            raise LimitExceededError(
                "CF-LIMIT-01",
                f"extended header ({typeflag.decode()!r}) at tar offset {offset} is {size} bytes,"
                f" over max_extended_header={self.limits.max_extended_header}",
            )
        data = self._blocks.read_exact(size + (-size % BLOCK), "an extended header")
        return data[:size]

    def _parse_pax(self, payload: bytes, offset: int) -> dict[str, str]:
        try:
            records = parse_pax_records(payload)
        except HeaderError as exc:
            raise CorruptArchiveError(
                "CF-INTEG-02", f"pax header at tar offset {offset}: {exc}"
            ) from None
        if b"GNU.sparse." in payload and any(key.startswith("GNU.sparse.") for key in records):
            name = records.get("GNU.sparse.name") or records.get("path")
            self._violation(
                UnsafeMemberError("CF-EXTRACT-05", "GNU sparse files are not supported", name)
            )
        return records

    def _apply_global(self, records: dict[str, str], offset: int) -> None:
        for key in _REFUSED_GLOBAL_KEYS:
            if key in records:
                raise CorruptArchiveError(
                    "CF-INTEG-02",
                    f"global pax header at tar offset {offset} sets {key!r} for every member",
                )
        version = records.get(VERSION_KEY)
        if version is not None:
            if offset != 0:
                raise CorruptArchiveError(
                    "CF-MARK-01", f"format marker at tar offset {offset}, not at the start"
                )
            match = _VERSION_RE.fullmatch(version)
            if not match:
                raise UnsupportedFormatError(
                    "CF-MARK-02", f"format marker {version[:24]!r} is not MAJOR.MINOR"
                )
            if int(match.group(1)) != FORMAT_MAJOR:
                raise UnsupportedFormatError(
                    "CF-MARK-02",
                    f"format version {version} is not readable by this v{FORMAT_VERSION} reader;"
                    " upgrade checkpoint-format",
                )
            self.format_version = version
        self.writer = records.get(WRITER_KEY, self.writer)

    # ---------------------------------------------------------------- members

    def _member(
        self,
        raw,
        pax: dict[str, str],
        long_name: str | None,
        long_link: str | None,
        offset: int,
    ) -> Iterator[tuple[Member, Iterator[memoryview]]]:
        raw_name = pax.get("path", long_name if long_name is not None else raw.name)
        linkname = pax.get("linkpath", long_link if long_link is not None else raw.linkname)
        size = raw.size
        mtime_ns = raw.mtime * 1_000_000_000
        try:
            if "size" in pax:
                if not _DIGITS.fullmatch(pax["size"]):
                    raise HeaderError(f"pax size {pax['size']!r} is not a number")
                size = int(pax["size"])
            if "\0" in raw_name or "\0" in linkname:
                raise HeaderError("a name or link target holds a NUL byte")
            if "mtime" in pax:
                mtime_ns = parse_pax_mtime(pax["mtime"])
            if not -_MAX_MTIME_NS <= mtime_ns <= _MAX_MTIME_NS:
                raise HeaderError(f"modification time {mtime_ns} ns is out of range")
        except HeaderError as exc:
            raise CorruptArchiveError(
                "CF-INTEG-02", f"header at tar offset {offset}: {exc}", raw_name
            ) from None
        kind = _type_of(raw.typeflag)
        digest = pax.get(PLAIN_KEY)
        digest_key = PLAIN_KEY if digest is not None else None
        if TREE_KEY in pax:
            if digest is not None:
                raise CorruptArchiveError(
                    "CF-INTEG-02", f"both {PLAIN_KEY} and {TREE_KEY} records", raw_name
                )
            digest, digest_key = pax[TREE_KEY], TREE_KEY
        # As in tarfile, only regular files and unknown types have a data region; links and
        # directories never do, whatever their size field says.
        data_size = size if kind in ("file", None) else 0
        member = self._check(
            raw_name, kind, raw.typeflag, size, linkname, digest, digest_key,
            raw.mode & 0o777, mtime_ns,
        )
        if member is None or member.name == "":
            # A violation recorded (validator mode), or the target itself ("." or "./"):
            # nothing to restore, the data is skipped.
            for _ in self._blocks.stream(data_size + (-data_size % BLOCK), "member data"):
                pass
            return
        whole = self._small_file(member, data_size)
        if whole is not None:
            yield member, whole
            return
        chunks = self._data(member, data_size)
        yield member, chunks
        for _ in chunks:  # whatever the consumer left is still read, hashed and verified
            pass

    def _small_file(self, member: Member, size: int) -> tuple[memoryview] | None:
        """The data of a small file that lies whole in the current chunk, read and verified
        at once: most members of a tree of many small files take this path, without the
        generators of :meth:`_data`. None when the file is large or crosses a chunk."""
        if member.type != "file" or size > _VERIFY_INLINE or member.digest_key == TREE_KEY:
            return None
        piece = self._blocks.take(size, -size % BLOCK)
        if piece is None:
            return None
        self._blocks.last_member = member.name
        if member.sha256 is not None:
            actual = hashlib.sha256(piece).hexdigest()
            if actual != member.sha256:
                self._digest_mismatch(member.name, actual, member.sha256)
        return (piece,)

    def _data(self, member: Member, size: int) -> Iterator[memoryview]:
        hasher: Any = None
        pooled = False
        if member.digest_key == PLAIN_KEY:
            hasher = hashlib.sha256()
        elif member.digest_key == TREE_KEY:
            hashing = self._pieces() if size > PIECE else None
            pooled = hashing is not None
            hasher = PooledTreeHasher(hashing) if hashing is not None else TreeHasher()
        offload = hasher is not None and size > _VERIFY_INLINE and not pooled
        if offload or pooled:  # checked later: its mismatch is sorted back into place
            self._positions[member.name] = self.member_count
        self._blocks.member = member.name
        for piece in self._blocks.stream(size, "member data"):
            if offload:
                self._verifier.update(hasher, piece)
            elif hasher is not None:
                hasher.update(piece)
            if member.type == "file":
                yield piece
        for _ in self._blocks.stream(-size % BLOCK, "member padding"):
            pass
        self._blocks.member = None
        self._blocks.last_member = member.name
        if hasher is None:
            return
        assert member.sha256 is not None
        if pooled:
            hasher.end()
            self._deferred.append((hasher, member.name, member.sha256))
        elif offload:
            self._verifier.end(hasher, member.name, member.sha256)
        elif hasher.hexdigest() != member.sha256:
            self._digest_mismatch(member.name, hasher.hexdigest(), member.sha256)

    def _pieces(self) -> PieceHashing | None:
        """The shared piece hashing, started on first use; None on one core."""
        if self._piece_hashing is None:
            width = self.decode_threads
            if width < 2:
                return None
            self._hash_pool = ThreadPoolExecutor(width, "checkpoint-hash")
            self._piece_hashing = PieceHashing(self._hash_pool, window=2 * width)
        return self._piece_hashing

    def _digest_mismatch(self, name: str, actual: str, expected: str) -> None:
        self._violation(
            CorruptArchiveError(
                "CF-INTEG-04",
                f"SHA-256 mismatch: content hashes to {actual}, header says {expected}",
                name,
            )
        )

    def _check(
        self,
        raw_name: str,
        kind: MemberType | None,
        typeflag: bytes,
        size: int,
        linkname: str,
        digest: str | None,
        digest_key: str | None,
        mode: int,
        mtime_ns: int,
    ) -> Member | None:
        """Every per-member rule. Returns the member, or None when a violation was recorded."""
        name = self._normalise(raw_name)
        if name is None:
            return None
        if kind is None:
            label = _TYPE_NAMES.get(typeflag, f"unknown type {typeflag!r}")
            return self._refuse(
                UnsafeMemberError("CF-EXTRACT-05", f"{label} members are refused", raw_name)
            )
        if name == "":
            if kind != "dir":
                return self._refuse(
                    UnsafeMemberError(
                        "CF-EXTRACT-07", f"a {kind} named as the target directory itself", raw_name
                    )
                )
            return Member("", "dir", 0, 0, 0)
        if len(linkname.encode("utf-8", "surrogateescape")) > self.limits.max_name_length:
            return self._refuse(self._name_too_long("link target", raw_name))

        self.member_count += 1
        if self.member_count > self.limits.max_members:
            raise LimitExceededError(
                "CF-LIMIT-01",
                f"more than max_members={self.limits.max_members} members (raise it:"
                " Limits.max_members, CHECKPOINT_MAX_MEMBERS for the helper and CLIs)",
                name,
            )
        if kind == "file":
            if self.total_size + size > self.limits.max_total_size:
                raise LimitExceededError(
                    "CF-LIMIT-01",
                    f"total size would reach {self.total_size + size} bytes, over max_total_size="
                    f"{self.limits.max_total_size} (raise it: Limits.max_total_size,"
                    " CHECKPOINT_MAX_TOTAL_SIZE for the helper and CLIs)",
                    name,
                )
            self.total_size += size
            if digest is not None:
                self.digests_present += 1
                if not _DIGEST_RE.fullmatch(digest):
                    raise CorruptArchiveError(
                        "CF-INTEG-02",
                        f"{digest_key} {digest!r} is not a lowercase hex SHA-256",
                        name,
                    )
            elif self.marked:
                self._violation(
                    CorruptArchiveError(
                        "CF-MARK-04",
                        f"marked v{self.format_version} tarball but no {PLAIN_KEY} or {TREE_KEY}"
                        " record",
                        name,
                    )
                )

        parts = name.split("/")
        parent = self._check_parents(name, parts)
        if parent is None:
            return None
        if self._names.implied > self.limits.max_implied_dirs:
            raise LimitExceededError(
                "CF-LIMIT-01",
                f"its parent directories make more than max_implied_dirs="
                f"{self.limits.max_implied_dirs} directories that are not members (raise it:"
                " Limits.max_implied_dirs, CHECKPOINT_MAX_IMPLIED_DIRS for the helper and CLIs)",
                name,
            )
        previous = parent.children.get(parts[-1])
        if previous is not None and not (type(previous) is Dir and kind == "dir"):
            return self._refuse(
                UnsafeMemberError(
                    "CF-EXTRACT-07",
                    f"duplicate name (an earlier {_kind_name(previous)} has the same name)",
                    name,
                )
            )

        target: str | None = None
        if kind == "symlink":
            # Where the link leads is judged once the archive ends, with every link known
            # (a later link can redirect it): NameTree.problems, from _finish_archive.
            problem = target_problem(linkname)
            if problem is not None:
                return self._refuse(UnsafeMemberError("CF-EXTRACT-03", problem, name))
            target = linkname
            self._names.add_link(parent, name, parts[-1], linkname)
        elif kind == "hardlink":
            target = self._normalise(linkname, for_link_of=name)
            if target is None:
                return None
            if self._names.lookup(target.split("/")) not in ("file", "hardlink"):
                return self._refuse(
                    UnsafeMemberError(
                        "CF-EXTRACT-04",
                        f"hard link target {linkname!r} is not an earlier regular-file member",
                        name,
                    )
                )
        if kind == "dir":
            if previous is None:
                parent.children[parts[-1]] = Dir(parent)
        elif kind != "symlink":
            parent.children[parts[-1]] = kind
        if kind != "file":
            digest = digest_key = None
        return Member(
            name, kind, size if kind == "file" else 0, mode, mtime_ns, target, digest, digest_key
        )

    def _normalise(self, raw_name: str, for_link_of: str | None = None) -> str | None:
        member = for_link_of if for_link_of is not None else raw_name
        what = "hard link target" if for_link_of is not None else "name"
        encoded_length = len(raw_name.encode("utf-8", "surrogateescape"))
        if encoded_length > self.limits.max_name_length:
            return self._refuse(self._name_too_long(what, member))
        if raw_name.startswith("/"):
            return self._refuse(
                UnsafeMemberError("CF-EXTRACT-01", f"absolute {what} {raw_name!r}", member)
            )
        parts = [part for part in raw_name.split("/") if part not in ("", ".")]
        if ".." in parts:
            return self._refuse(
                UnsafeMemberError(
                    "CF-EXTRACT-02", f"{what} {raw_name!r} has a '..' component", member
                )
            )
        for part in parts if encoded_length > _MAX_COMPONENT else ():  # else none can be
            if len(part.encode("utf-8", "surrogateescape")) > _MAX_COMPONENT:
                return self._refuse(
                    UnsafeMemberError(
                        "CF-EXTRACT-09",
                        f"a component of {raw_name!r} is longer than {_MAX_COMPONENT} bytes",
                        member,
                    )
                )
        return "/".join(parts)

    def _check_parents(self, name: str, parts: list[str]) -> Dir | None:
        """The directory node that holds ``name``, its missing parents added as directories
        (the extractor creates them implicitly); None when one of them is not a directory."""
        found = self._names.parent(parts)
        if isinstance(found, Dir):
            return found
        blocker = "/".join(parts[: found + 1])
        kind = _kind_name(self._names.lookup(parts[: found + 1]))
        self._refuse(
            UnsafeMemberError(
                "CF-EXTRACT-08",
                f"lies below {blocker!r}, which is a {kind}, not a directory",
                name,
            )
        )
        return None

    def _finish_archive(self, extended_pending: bool) -> None:
        mismatches = self._verifier.finish()
        if self._piece_hashing is not None:
            self._piece_hashing.drain()
            for hasher, name, expected in self._deferred:
                actual = hasher.hexdigest()
                if actual != expected:
                    mismatches.append((name, actual, expected))
        order = self._positions
        for name, actual, expected in sorted(mismatches, key=lambda m: order.get(m[0], 0)):
            self._digest_mismatch(name, actual, expected)
        if extended_pending:
            raise CorruptArchiveError(
                "CF-INTEG-01",
                "an extended header is followed by the end-of-archive marker, not a member",
            )
        if self._blocks.drain_zeros() < BLOCK:
            raise CorruptArchiveError(
                "CF-INTEG-01",
                "stream ends after a single zero block (end-of-archive marker truncated)",
            )
        # CF-EXTRACT-03, judged with every link known: a later link can redirect an earlier
        # one. (Nothing is ever written through a link meanwhile: CF-EXTRACT-08.)
        for name, problem in self._names.problems():
            self._violation(UnsafeMemberError("CF-EXTRACT-03", problem, name))

    # ---------------------------------------------------------------- violations

    def _name_too_long(self, what: str, member: str) -> LimitExceededError:
        return LimitExceededError(
            "CF-LIMIT-01",
            f"{what} is longer than max_name_length={self.limits.max_name_length} bytes (raise"
            " it: Limits.max_name_length, CHECKPOINT_MAX_NAME_LENGTH for the helper and CLIs)",
            member[:200],
        )

    def _violation(self, error: CheckpointFormatError) -> None:
        self._on_violation(error)

    def _refuse(self, error: CheckpointFormatError) -> None:
        self._on_violation(error)
        return None


def _kind_name(entry: Dir | Link | str | None) -> str:
    if type(entry) is Dir:
        return "dir"
    if type(entry) is Link:
        return "symlink"
    return str(entry)


def _raise(error: CheckpointFormatError) -> None:
    raise error
