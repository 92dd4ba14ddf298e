"""checkpoint-format's writer and extractor against plain ``tarfile`` (what upstream uses).

Two workloads, generated once into a temp directory:

- ``incompressible``: one file of ``--size-mib`` MiB of ``os.urandom`` data (model weights);
- ``small-files``: ``--small-files`` files of 1 KiB of random data in about 100 directories.

For each: our ``write_tarball`` to a null sink and to a file, our ``restore`` from that file
(with ISA-L when installed, and with the stdlib zlib fallback), then ``tarfile.open(..., "w:gz")``
at its default level 9 and ``tarfile.open(..., "r:*").extractall``. Throughput is MB/s
(10^6 bytes) of file contents. ``ours/tarfile`` is ours MB/s over tarfile's for the same
direction (write vs write, restore vs extract), so above 1 means we are faster.

    python benchmarks/format_bench.py            # 1 GiB + 20,000 files, a few minutes
    python benchmarks/format_bench.py --quick    # 64 MiB + 2,000 files
    python benchmarks/format_bench.py --json out.json

Not a test: nothing here asserts. Targets are printed as PASS/MISS.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import checkpoint_format
from checkpoint_format import _codec, restore, write_tarball

MB = 1_000_000
SMALL_FILE_SIZE = 1024
SMALL_FILE_DIRS = 100
#: Targets, in MB/s of file bytes, on the incompressible workload.
WRITER_TARGET = 500
EXTRACTOR_TARGET = 600


@dataclass
class Row:
    workload: str
    operation: str  # "write -> null", "write -> file", "restore", "tarfile write", ...
    impl: str  # "ours" or "tarfile"
    codec: str
    seconds: float
    file_bytes: int
    object_bytes: int | None
    vs_tarfile: float | None = None
    runs: list[float] = field(default_factory=list)

    @property
    def mb_per_s(self) -> float:
        return self.file_bytes / MB / self.seconds if self.seconds else float("inf")


class NullSink:
    """Counts what it is given; measures the writer without any I/O."""

    def __init__(self) -> None:
        self.size = 0

    def write(self, data: bytes) -> int:
        self.size += len(data)
        return len(data)


# --------------------------------------------------------------------------- workloads


def make_incompressible(root: Path, size: int) -> int:
    root.mkdir(parents=True)
    chunk = 16 << 20
    with open(root / "weights.bin", "wb") as out:
        remaining = size
        while remaining:
            n = min(chunk, remaining)
            out.write(os.urandom(n))
            remaining -= n
    return size


def make_small_files(root: Path, count: int) -> int:
    root.mkdir(parents=True)
    dirs = max(1, min(SMALL_FILE_DIRS, count))
    for d in range(dirs):
        (root / f"shard-{d:03d}").mkdir()
    for i in range(count):
        path = root / f"shard-{i % dirs:03d}" / f"part-{i:06d}.bin"
        path.write_bytes(os.urandom(SMALL_FILE_SIZE))
    return count * SMALL_FILE_SIZE


# --------------------------------------------------------------------------- runs


@contextlib.contextmanager
def codec(name: str) -> Iterator[None]:
    """Run ours with ISA-L (as installed) or with the stdlib zlib fallback."""
    saved = _codec._fast_zlib
    if name == "zlib":
        _codec._fast_zlib = None
    try:
        assert _codec.codec_name() == name, f"cannot select codec {name}"
        yield
    finally:
        _codec._fast_zlib = saved


def measure(
    action: Callable[[], object], cleanup: Callable[[], object], repeat: int
) -> list[float]:
    """Wall-clock seconds of ``repeat`` runs; ``cleanup`` removes the previous run's output."""
    times = []
    for _ in range(repeat):
        cleanup()
        os.sync()  # earlier runs' dirty pages are written back outside the timed region
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return times


def ours_write_null(src: Path) -> int:
    sink = NullSink()
    write_tarball(src, sink)
    return sink.size


def ours_write_file(src: Path, obj: Path) -> None:
    with open(obj, "wb") as sink:
        write_tarball(src, sink)


def ours_restore(obj: Path, target: Path) -> None:
    with open(obj, "rb") as source:
        restore(source, target)


def tarfile_write(src: Path, obj: Path) -> None:
    with tarfile.open(obj, "w:gz") as tar:  # compresslevel defaults to 9, as upstream
        for child in sorted(src.iterdir()):
            tar.add(child, arcname=child.name, recursive=True)


def tarfile_extract(obj: Path, target: Path) -> None:
    # Python >= 3.12 warns without a filter; "fully_trusted" is the historical default.
    extra = {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}
    with tarfile.open(obj, "r:*") as tar:
        tar.extractall(target, **extra)


def _append_result(results: list, action: Callable, *args: object) -> None:
    results.append(action(*args))


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def run_workload(
    name: str, src: Path, file_bytes: int, scratch: Path, codecs: list[str], repeat: int
) -> list[Row]:
    rows: list[Row] = []

    def run(operation: str, impl: str, codec_name: str, action, output: Path | None) -> Row:
        """Time ``action``, which writes ``output`` (removed before each run) if not None."""
        cleanup = (lambda: _remove(output)) if output is not None else (lambda: None)
        times = measure(action, cleanup, repeat)
        row = Row(name, operation, impl, codec_name, statistics.median(times), file_bytes, None)
        row.runs = times
        rows.append(row)
        line = f"  {operation:<14} {impl:<8} {codec_name:<5} {row.seconds:8.2f} s (median)"
        runs = ", ".join(f"{t:.2f}" for t in times)
        print(f"{line} {row.mb_per_s:8.1f} MB/s  runs: {runs}", flush=True)
        return row

    print(f"{name}: {file_bytes / MB:,.1f} MB of file data", flush=True)
    for codec_name in codecs:
        with codec(codec_name):
            obj = scratch / f"{name}-ours-{codec_name}.tar.gz"
            target = scratch / f"{name}-ours-{codec_name}-restored"
            sizes: list[int] = []
            write_null = partial(_append_result, sizes, ours_write_null, src)
            row = run("write -> null", "ours", codec_name, write_null, None)
            row.object_bytes = sizes[-1]
            row = run("write -> file", "ours", codec_name, partial(ours_write_file, src, obj), obj)
            row.object_bytes = obj.stat().st_size
            row = run("restore", "ours", codec_name, partial(ours_restore, obj, target), target)
            row.object_bytes = obj.stat().st_size
            _remove(target)
            _remove(obj)
    obj = scratch / f"{name}-tarfile.tar.gz"
    target = scratch / f"{name}-tarfile-restored"
    row = run("write -> file", "tarfile", "zlib9", partial(tarfile_write, src, obj), obj)
    row.object_bytes = obj.stat().st_size
    row = run("restore", "tarfile", "zlib9", partial(tarfile_extract, obj, target), target)
    row.object_bytes = obj.stat().st_size
    _remove(target)
    _remove(obj)

    baseline = {
        "write": next(r for r in rows if r.impl == "tarfile" and r.operation.startswith("write")),
        "restore": next(r for r in rows if r.impl == "tarfile" and r.operation == "restore"),
    }
    for row in rows:
        if row.impl == "ours":
            base = baseline["restore" if row.operation == "restore" else "write"]
            row.vs_tarfile = row.mb_per_s / base.mb_per_s
    return rows


# --------------------------------------------------------------------------- report


def print_table(rows: list[Row]) -> None:
    header = (
        f"{'workload':<15} {'operation':<14} {'impl':<8} {'codec':<6} {'median s':>8}"
        f" {'MB/s':>9} {'object MiB':>11} {'ours/tarfile':>13}"
    )
    print()
    print(header)
    print("-" * len(header))
    for row in rows:
        obj = f"{row.object_bytes / (1 << 20):,.1f}" if row.object_bytes is not None else "-"
        ratio = f"{row.vs_tarfile:.1f}x" if row.vs_tarfile is not None else "-"
        print(
            f"{row.workload:<15} {row.operation:<14} {row.impl:<8} {row.codec:<6}"
            f" {row.seconds:8.2f} {row.mb_per_s:9.1f} {obj:>11} {ratio:>13}"
        )


def check_targets(rows: list[Row]) -> list[dict]:
    checks = []
    for row in rows:
        if row.workload != "incompressible" or row.impl != "ours":
            continue
        target = EXTRACTOR_TARGET if row.operation == "restore" else WRITER_TARGET
        kind = "extractor" if row.operation == "restore" else "writer"
        checks.append(
            {
                "what": f"{kind} ({row.operation}, {row.codec})",
                "target_mb_s": target,
                "measured_mb_s": round(row.mb_per_s, 1),
                "pass": row.mb_per_s >= target,
            }
        )
    print()
    print(
        f"Targets (incompressible workload): writer >= {WRITER_TARGET} MB/s,"
        f" extractor >= {EXTRACTOR_TARGET} MB/s"
    )
    for check in checks:
        verdict = "PASS" if check["pass"] else "MISS"
        print(
            f"  {verdict}  {check['what']:<36} {check['measured_mb_s']:>9.1f} MB/s"
            f" (target {check['target_mb_s']})"
        )
    return checks


def source_state() -> str:
    """Which checkpoint-format code ran: its path, and git HEAD plus uncommitted files."""
    package = Path(checkpoint_format.__file__).parent
    try:
        head = subprocess.run(
            ["git", "-C", str(package), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(package), "status", "--porcelain", "--", "."],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return str(package)
    changed = [line[3:] for line in dirty if line.strip()]
    return f"{package} at {head}" + (f" + uncommitted {', '.join(changed)}" if changed else "")


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover - not on every platform
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="incompressible file size")
    parser.add_argument("--small-files", type=int, default=20_000, help="number of 1 KiB files")
    parser.add_argument("--quick", action="store_true", help="64 MiB and 2,000 files")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (median)")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write results as JSON")
    parser.add_argument("--tmp", type=Path, help="where to generate data (default: system temp)")
    args = parser.parse_args(argv)
    if args.quick:
        args.size_mib, args.small_files = 64, 2_000

    codecs = ["isal", "zlib"] if _codec._fast_zlib is not None else ["zlib"]
    environment = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "codec_in_use": _codec.codec_name(),
        "codecs": codecs,
        "source": source_state(),
        "load_average_before": load_average(),
    }
    print(
        f"checkpoint-format {checkpoint_format.__version__}, codec in use: {_codec.codec_name()}"
        f" (runs: {', '.join(codecs)}{'' if 'isal' in codecs else '; isal not installed'})"
    )
    print(f"source: {environment['source']}")
    print(
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs, writer workers ="
        f" CPU count; tarfile baseline: gzip level 9; {args.repeat} runs each, median shown;"
        f" load average {environment['load_average_before']}"
    )

    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="format-bench-", dir=args.tmp) as tmp:
        scratch = Path(tmp)
        started = time.perf_counter()
        size = make_incompressible(scratch / "incompressible", args.size_mib << 20)
        print(
            f"generated {args.size_mib} MiB incompressible file in"
            f" {time.perf_counter() - started:.1f} s"
        )
        rows += run_workload(
            "incompressible", scratch / "incompressible", size, scratch, codecs, args.repeat
        )
        shutil.rmtree(scratch / "incompressible")
        started = time.perf_counter()
        size = make_small_files(scratch / "small-files", args.small_files)
        print(f"generated {args.small_files} small files in {time.perf_counter() - started:.1f} s")
        rows += run_workload(
            "small-files", scratch / "small-files", size, scratch, codecs, args.repeat
        )

    environment["load_average_after"] = load_average()
    print_table(rows)
    print(
        f"load average before {environment['load_average_before']},"
        f" after {environment['load_average_after']} (other jobs on this host skew results)"
    )
    checks = check_targets(rows)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    **environment,
                    "size_mib": args.size_mib,
                    "small_files": args.small_files,
                    "repeat": args.repeat,
                    "rows": [{**asdict(r), "mb_per_s": r.mb_per_s} for r in rows],
                    "targets": checks,
                },
                indent=2,
            )
        )
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
