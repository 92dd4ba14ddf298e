"""``checkpoint-format``: inspect and validate a checkpoint object from a file or stdin.

Exit status: 0 valid, 1 invalid (one line per violation), 2 usage or I/O error (or a bad
``CHECKPOINT_*`` value).

This tool is the package's edge: the only code of it that reads the environment
(:func:`options_from_env`); the library takes everything as arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Mapping
from typing import Any, BinaryIO

from ._limits import Limits
from ._sizes import format_size
from ._validate import Report, validate
from ._version import __version__

EXIT_VALID, EXIT_INVALID, EXIT_USAGE = 0, 1, 2


def _number(name: str, raw: str, kind: type) -> int | float:
    text = raw.replace("_", "")
    try:
        value = int(text) if kind is int and text.isascii() and text.isdigit() else float(text)
    except ValueError:
        value = 0
    if kind is int and not (isinstance(value, int) and value >= 1):
        raise ValueError(f"{name}={raw!r}: expected a whole number of 1 or more")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name}={raw!r}: expected a positive number")
    return value


def options_from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The :func:`~checkpoint_format.validate` arguments the environment sets: ``limits``
    from ``CHECKPOINT_MAX_<FIELD>`` for each cap of :class:`Limits`, ``decode_threads`` from
    ``CHECKPOINT_DECODE_THREADS``. A blank variable is unset; a bad value raises
    ``ValueError`` naming the variable and what it allows (parsed as flyte-checkpoint's
    ``Settings.from_env`` parses them)."""
    env = os.environ if environ is None else environ
    caps: dict[str, int | float] = {}
    for field in dataclasses.fields(Limits):
        name = f"CHECKPOINT_{field.name.upper()}"
        raw = env.get(name, "").strip()
        if field.name.startswith("max_") and raw:
            kind = float if field.type in (float, "float") else int
            caps[field.name] = _number(name, raw, kind)
    raw = env.get("CHECKPOINT_DECODE_THREADS", "").strip()
    threads = int(_number("CHECKPOINT_DECODE_THREADS", raw, int)) if raw else None
    return {"limits": Limits(**caps), "decode_threads": threads}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="checkpoint-format",
        description="Inspect and validate flyte-checkpoint objects (format spec v1).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="describe an object: kind, version, members")
    inspect.add_argument("path", help="a checkpoint object, or - for standard input")
    inspect.add_argument("--json", action="store_true", help="print one JSON document")
    check = commands.add_parser("validate", help="check an object against the spec")
    check.add_argument("path", help="a checkpoint object, or - for standard input")
    return parser


def _open(path: str) -> BinaryIO:
    return sys.stdin.buffer if path == "-" else open(path, "rb")


def print_inspect(report: Report, name: str, out=None) -> None:
    out = out or sys.stdout
    d = report.detection
    print(f"{name}: {d.kind}", file=out)
    print(f"  object size:     {report.size} bytes ({format_size(report.size)})", file=out)
    print(f"  compression:     {d.compression}", file=out)
    print(f"  decided by:      {d.reason}", file=out)
    if d.kind == "tarball":
        version = report.format_version or "none (legacy v1, e.g. written by upstream flyte)"
        print(f"  format version:  {version}", file=out)
        if report.writer:
            print(f"  writer:          {report.writer}", file=out)
        files = [m for m in report.members if m.type == "file"]
        print(
            f"  members:         {len(report.members)} ({len(files)} files,"
            f" {format_size(sum(m.size for m in files))})",
            file=out,
        )
        print(f"  digests present: {report.digests_present} of {len(files)} files", file=out)
        for m in report.members:
            extra = f" -> {m.linkname}" if m.linkname else ""
            print(f"    {m.type:8} {m.size:>12}  {m.name}{extra}", file=out)
    for v in report.violations:
        print(f"  violation: {v.message}", file=out)


def run(command: str, name: str, source: BinaryIO, *, as_json: bool = False,
        limits: Limits | None = None, decode_threads: int | None = None) -> int:
    """Run ``inspect`` or ``validate`` on an open stream and print the result; returns the
    exit status. Other tools (``flyte-checkpoint inspect s3://...``) call this with a stream
    and the ``limits``/``decode_threads`` of their own settings."""
    report = validate(source, limits=limits, decode_threads=decode_threads)
    if command == "inspect":
        if as_json:
            json.dump({"object": name, **report.to_dict()}, sys.stdout, indent=2)
            print()
        else:
            print_inspect(report, name)
        return EXIT_VALID if report.valid else EXIT_INVALID
    if report.valid:
        summary = ""
        if report.detection.kind == "tarball":
            version = report.format_version or "legacy v1"
            summary = f" (format {version}, {len(report.members)} members)"
        print(f"{name}: valid {report.detection.kind}{summary}")
        return EXIT_VALID
    for v in report.violations:
        print(f"{name}: {v.message}")
    return EXIT_INVALID


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    name = "<stdin>" if args.path == "-" else args.path
    try:
        options = options_from_env()
    except ValueError as exc:
        print(f"checkpoint-format: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with _open(args.path) as source:
            return run(args.command, name, source, as_json=getattr(args, "json", False),
                       **options)
    except OSError as exc:
        print(f"checkpoint-format: cannot read {name}: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
