"""Tar header blocks and pax records: the byte-level layer shared by detection, reader and
writer."""

from __future__ import annotations

import dataclasses
import re
import struct
import zlib
from decimal import MAX_EMAX, MIN_EMIN, Context, Decimal, InvalidOperation, Overflow

from ._spec import BLOCK

ZERO_BLOCK = bytes(BLOCK)

# Type flags (POSIX ustar / pax, plus GNU long names).
REGULAR = b"0"
REGULAR_OLD = b"\0"
HARDLINK = b"1"
SYMLINK = b"2"
CHARDEV = b"3"
BLOCKDEV = b"4"
DIRECTORY = b"5"
FIFO = b"6"
CONTIGUOUS = b"7"
PAX_LOCAL = b"x"
PAX_GLOBAL = b"g"
GNU_LONGNAME = b"L"
GNU_LONGLINK = b"K"

REGULAR_TYPES = (REGULAR, REGULAR_OLD, CONTIGUOUS)
EXTENDED_TYPES = (PAX_LOCAL, PAX_GLOBAL, GNU_LONGNAME, GNU_LONGLINK)

_CHKSUM = slice(148, 156)
_OCTAL_BODY = re.compile(rb"[0-7]*")
# The general path's arithmetic, independent of the calling thread's decimal context: the
# values have at most 64 characters, so 80 digits are exact, and the widest exponents mean
# that a tiny value floors like any other instead of underflowing to zero.
_DECIMAL = Context(prec=80, Emin=MIN_EMIN, Emax=MAX_EMAX, traps=[InvalidOperation, Overflow])
# A pax mtime of whole seconds and up to nine fraction digits: exact in integers.
_PLAIN_PAX_MTIME = re.compile(r"(-?)([0-9]{1,12})(?:\.([0-9]{0,9}))?")
_PAX_MTIME = re.compile(r"-?[0-9]+(\.[0-9]*)?([eE][-+]?[0-9]+)?")  # CF-MARK-05


class HeaderError(ValueError):
    """A header field does not parse. The reader turns it into CF-INTEG-02 with the member name."""


def parse_number(field: bytes) -> int:
    """A numeric header field: base-256 (first byte 0x80 or 0xFF) or NUL/space-terminated octal."""
    body = field.partition(b"\0")[0].strip(b" ")
    if body.isdigit():  # the common case; the same value as the general path below
        try:
            return int(body, 8)
        except ValueError:  # an 8 or a 9: the general path says what is wrong
            pass
    if field[:1] in (b"\x80", b"\xff"):
        value = int.from_bytes(field[1:], "big")
        if field[0] == 0xFF:
            value -= 1 << (8 * (len(field) - 1))
        return value
    body = field.split(b"\0", 1)[0].strip(b" \t\n\r\x0b\x0c")
    if not _OCTAL_BODY.fullmatch(body):
        raise HeaderError(f"numeric field {field!r} is not octal")
    return int(body, 8) if body else 0


def is_header_block(block: bytes) -> bool:
    """CF-DETECT-03: the block's checksum field parses and matches the unsigned or the
    signed sum of the block, with the checksum field counted as spaces."""
    if len(block) != BLOCK:
        return False
    try:
        stored = parse_number(block[_CHKSUM])
    except HeaderError:
        return False
    if stored == 256 + _byte_sum(block):  # what every writer uses
        return True
    return stored == 256 + sum(struct.unpack_from("148b8x356b", block))


def _byte_sum(block: bytes) -> int:
    """The unsigned sum of the block's bytes outside the checksum field.

    Adler-32's low half is 1 + the byte sum modulo 65521, which is exact for runs of at most
    256 bytes (256 * 255 < 65521): three C calls instead of a Python loop over 504 bytes.
    """
    return (
        (zlib.adler32(block[0:148]) & 0xFFFF)
        + (zlib.adler32(block[156:404]) & 0xFFFF)
        + (zlib.adler32(block[404:512]) & 0xFFFF)
        - 3
    )


def _field_str(field: bytes) -> str:
    return field.partition(b"\0")[0].decode("utf-8", "surrogateescape")


@dataclasses.dataclass
class RawHeader:
    """The fields of one ustar/v7/GNU header block, before extended headers are applied."""

    name: str
    mode: int
    size: int
    mtime: int
    typeflag: bytes
    linkname: str


# name, mode, (uid, gid), size, mtime, (checksum), typeflag, linkname, magic, (version, uname,
# gname, devmajor, devminor), prefix: one C call instead of a slice per field.
_FIELDS = struct.Struct("100s8s16x12s12s8x1s100s6s82x155s")


def parse_header(block: bytes) -> RawHeader:
    """Parse a block already known to verify (``is_header_block``)."""
    name, mode, size, mtime, typeflag, linkname, magic, prefix = _FIELDS.unpack_from(block)
    name = _field_str(name)
    if magic == b"ustar\x00":  # POSIX ustar: the prefix field extends the name
        prefix = _field_str(prefix)
        if prefix:
            name = f"{prefix}/{name}"
    return RawHeader(
        name=name,
        mode=parse_number(mode),
        size=parse_number(size),
        mtime=parse_number(mtime),
        typeflag=typeflag,
        linkname=_field_str(linkname),
    )


def parse_pax_records(data: bytes) -> dict[str, str]:
    """Parse ``"<len> <key>=<value>\\n"`` records; raise HeaderError on any malformed record."""
    records: dict[str, str] = {}
    pos = 0
    end = len(data)
    while pos < end:
        if data[pos] == 0:  # trailing NUL padding is tolerated, as tarfile and GNU tar do
            if data[pos:].strip(b"\0"):
                raise HeaderError("pax header has data after NUL padding")
            break
        space = data.find(b" ", pos, min(end, pos + 21))
        if space <= pos or not data[pos:space].isdigit():
            raise HeaderError(f"pax record at offset {pos} has no valid length")
        length = int(data[pos:space])
        record_end = pos + length
        if length < 5 or record_end > end or data[record_end - 1 : record_end] != b"\n":
            raise HeaderError(f"pax record at offset {pos} has a bad length {length}")
        key, sep, value = data[space + 1 : record_end - 1].partition(b"=")
        if not sep or not key:
            raise HeaderError(f"pax record at offset {pos} has no key=value")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos = record_end
    return records


def parse_pax_mtime(value: str) -> int:
    """A pax ``mtime`` value in nanoseconds: decimal seconds with an optional fraction and
    exponent, as Python's tarfile writes ``str(float)`` (``1700000000.25``, ``5e-05``)."""
    plain = _PLAIN_PAX_MTIME.fullmatch(value)
    if plain is not None:  # exact integer arithmetic, no Decimal
        sign, whole, fraction = plain.groups()
        ns = int(whole) * 1_000_000_000 + int((fraction or "").ljust(9, "0"))
        return -ns if sign else ns
    if not _PAX_MTIME.fullmatch(value):
        raise HeaderError(f"pax mtime {value!r} is not a decimal number")
    if len(value) > 64:
        raise HeaderError(f"pax mtime {value[:20]!r}... is too long")
    try:
        seconds = Decimal(value)
        if _DECIMAL.abs(seconds).compare(Decimal(10**12)) > 0:  # the reader bounds it further
            raise HeaderError(f"pax mtime {value!r} is out of range")
        nanoseconds = _DECIMAL.multiply(seconds, Decimal(1_000_000_000))
        return int(nanoseconds.to_integral_value(rounding="ROUND_FLOOR", context=_DECIMAL))
    except Overflow:  # an exponent past the decimal context ("1e9999999")
        raise HeaderError(f"pax mtime {value[:20]!r} is out of range") from None
    except InvalidOperation as exc:  # pragma: no cover - the regex admits only valid decimals
        raise HeaderError(f"pax mtime {value!r} is not a decimal number") from exc


def format_pax_mtime(mtime_ns: int) -> str:
    """Nanoseconds as a minimal decimal string: ``1700000000``, ``1700000000.5``, ``-1.25``."""
    sign = "-" if mtime_ns < 0 else ""
    seconds, frac = divmod(abs(mtime_ns), 1_000_000_000)
    if frac == 0:
        return f"{sign}{seconds}"
    return f"{sign}{seconds}.{frac:09d}".rstrip("0")


# --------------------------------------------------------------------------- writing


def _octal(value: int, width: int) -> bytes:
    """A ``width``-byte octal field, NUL-terminated."""
    return b"%0*o\0" % (width - 1, value)


def build_header(
    name: bytes, *, mode: int, size: int, mtime: int, typeflag: bytes, linkname: bytes = b""
) -> bytes:
    """One ustar header block. Callers put long or non-ASCII names in pax records first."""
    block = bytearray(BLOCK)
    block[0:100] = name[:100].ljust(100, b"\0")
    block[100:108] = _octal(mode, 8)
    block[108:116] = _octal(0, 8)  # uid (CF-WRITE-06)
    block[116:124] = _octal(0, 8)  # gid
    block[124:136] = _octal(size, 12)
    block[136:148] = _octal(mtime, 12)
    block[148:156] = b" " * 8
    block[156:157] = typeflag
    block[157:257] = linkname[:100].ljust(100, b"\0")
    block[257:265] = b"ustar\x0000"
    # uname, gname (265..329) stay empty; devmajor/devminor as zero octal.
    block[329:337] = _octal(0, 8)
    block[337:345] = _octal(0, 8)
    checksum = sum(block)
    block[148:156] = b"%06o\0 " % checksum
    return bytes(block)


def pax_record(key: str, value: str) -> bytes:
    """One ``"<len> key=value\\n"`` record; the length counts its own digits."""
    body = f" {key}={value}\n".encode()
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length = len(str(length)) + len(body)
    return str(length).encode() + body


def pax_header(records: list[tuple[str, str]], typeflag: bytes = PAX_LOCAL) -> bytes:
    """A pax extended header member (header block, records, padding)."""
    data = b"".join(pax_record(key, value) for key, value in records)
    header = build_header(b"././@PaxHeader", mode=0o644, size=len(data), mtime=0, typeflag=typeflag)
    return header + data + padding(len(data))


def padding(size: int) -> bytes:
    """Zero bytes that round ``size`` up to a whole block."""
    return bytes(-size % BLOCK)
