"""Cost of small hostile objects: peak RSS and seconds to validate and to restore each one.

    python benchmarks/hostile_bench.py [--src PATH] [--timeout SECONDS]

Builds each archive in memory (issue 15: D1 many pax headers, D2 deep names, D3 many
symbolic links, D4 a legal tree 1,500 levels deep), then validates and restores it in a
fresh subprocess, so that the peak RSS is that one operation's (``ru_maxrss`` of the
child). ``--src`` is the ``checkpoint-format`` source directory to measure (default: this
checkout's), so the same script measures another branch's code.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BLOCK = 512
ROOT = Path(__file__).resolve().parents[1]


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def _header(name: str, typeflag: bytes = b"0", size: int = 0, linkname: str = "") -> bytes:
    block = bytearray(BLOCK)
    block[0:100] = name.encode()[:100].ljust(100, b"\0")
    block[100:108] = _octal(0o755 if typeflag == b"5" else 0o644, 8)
    block[108:116] = _octal(0, 8)
    block[116:124] = _octal(0, 8)
    block[124:136] = _octal(size, 12)
    block[136:148] = _octal(1_700_000_000, 12)
    block[148:156] = b" " * 8
    block[156:157] = typeflag
    block[157:257] = linkname.encode()[:100].ljust(100, b"\0")
    block[257:265] = b"ustar\x0000"
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def _record(key: str, value: str) -> bytes:
    body = f" {key}={value}\n".encode()
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length = len(str(length)) + len(body)
    return str(length).encode() + body


def _pax(*records: tuple[str, str]) -> bytes:
    data = b"".join(_record(k, v) for k, v in records)
    return _header("././@PaxHeader", b"x", len(data)) + data + bytes(-len(data) % BLOCK)


def many_pax_headers(count: int = 200, size: int = (1 << 20) - 64) -> bytes:
    """D1: consecutive pax headers, each under max_extended_header, each with a new key."""
    parts = []
    for index in range(count):
        key = f"X.{index}"
        parts.append(_pax((key, "v" * (size - len(key) - 16))))
    parts.append(_header("f"))
    return b"".join(parts) + bytes(2 * BLOCK)


def deep_names(members: int = 64, depth: int = 2040) -> bytes:
    """D2: files whose names have ~2,000 components, each under its own top directory."""
    parts = []
    for index in range(members):
        name = f"d{index}/" + "a/" * depth + "f"
        parts.append(_pax(("path", name)) + _header("f"))
    return b"".join(parts) + bytes(2 * BLOCK)


def many_links(links: int = 201, depth: int = 800) -> bytes:
    """D3: links whose targets go ``depth`` levels down and back up, each through the
    previous link (chains of 30, under the 40-hop bound): all stay inside."""
    parts = []
    for index in range(links):
        target = "x/" * depth + "../" * depth
        target += f"l{index - 1}" if index % 30 else "."
        parts.append(_pax(("linkpath", target)) + _header(f"l{index}", b"2"))
    return b"".join(parts) + bytes(2 * BLOCK)


def deep_tree(depth: int = 1500) -> bytes:
    """D4: a legal tree 1,500 directories deep (names under 4,096 bytes), one file at the
    bottom, followed by a member that is refused (so that restore's cleanup runs)."""
    parts = []
    name = ""
    for _ in range(depth):
        name = f"{name}a/" if name else "a/"
        parts.append(_pax(("path", name)) + _header("a", b"5"))
    parts.append(_pax(("path", name + "f")) + _header("f"))
    parts.append(_header("/etc/refused"))
    return b"".join(parts) + bytes(2 * BLOCK)


CASES = {
    "D1 many pax headers": many_pax_headers,
    "D2 deep names": deep_names,
    "D3 many links": many_links,
    "D4 1,500-level tree, refused at the end": deep_tree,
}

_CHILD = r"""
import io, resource, sys, time, tempfile, os
from checkpoint_format import restore, validate, remove_tree, CheckpointFormatError
data = open(sys.argv[2], "rb").read()
started = time.perf_counter()
seconds = 0.0
outcome = "ok"
try:
    if sys.argv[1] == "validate":
        report = validate(io.BytesIO(data))
        outcome = "valid" if report.valid else report.violations[0].rule
    else:
        tmp = tempfile.mkdtemp()
        try:
            restore(io.BytesIO(data), os.path.join(tmp, "t"))
        finally:
            seconds = time.perf_counter() - started
            left = [n for n in os.listdir(tmp) if ".partial-" in n]
            if left:
                outcome = "staging left behind; "
            try:
                remove_tree(tmp)  # not timed: the restore is what is measured
            except RecursionError:
                os.system(f"rm -rf {tmp}")
except CheckpointFormatError as exc:
    outcome = ("" if outcome == "ok" else outcome) + exc.rule
except Exception as exc:
    outcome = ("" if outcome == "ok" else outcome) + type(exc).__name__
print(f"{seconds if sys.argv[1] == 'restore' else time.perf_counter() - started:.2f} {outcome}")
"""


def measure(operation: str, path: str, src: str, timeout: float) -> dict:
    env = dict(os.environ, PYTHONPATH=src)
    started = time.perf_counter()
    try:
        child = subprocess.run(
            [sys.executable, "-c", _CHILD, operation, path],
            env=env, capture_output=True, text=True, timeout=timeout, check=False,
        )
    except subprocess.TimeoutExpired:
        return {"seconds": f">{timeout:.0f}", "peak_rss_mib": "?", "outcome": "timeout"}
    # ru_maxrss of the children is the largest of them: each child runs alone, one per call.
    import resource

    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    line = child.stdout.strip() or f"{time.perf_counter() - started:.2f} ?"
    seconds, _, outcome = line.partition(" ")
    if child.returncode:
        outcome = child.stderr.strip().splitlines()[-1][:80] if child.stderr else "crashed"
    return {"seconds": seconds, "peak_rss_mib": round(peak), "outcome": outcome}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", default=str(ROOT / "packages/checkpoint-format/src"))
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--case", action="append", help="substring of a case name")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, build in CASES.items():
            if args.case and not any(part in label for part in args.case):
                continue
            data = gzip.compress(build(), 9, mtime=0)
            path = os.path.join(tmp, "object")
            Path(path).write_bytes(data)
            for operation in ("validate", "restore"):
                # One measuring process per operation, so RUSAGE_CHILDREN sees only its child.
                result = json.loads(subprocess.run(
                    [sys.executable, __file__, "--measure", operation, path, args.src,
                     str(args.timeout)],
                    capture_output=True, text=True, check=True,
                ).stdout) if "--measure" not in sys.argv else None
                rows.append((label, len(data), operation, result))
    for label, size, operation, result in rows:
        print(f"{label:42} {size:>9,} B  {operation:8}  {result['seconds']:>6} s  "
              f"{result['peak_rss_mib']:>5} MiB  {result['outcome']}")


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--measure":
        print(json.dumps(measure(sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5]))))
    else:
        main()
