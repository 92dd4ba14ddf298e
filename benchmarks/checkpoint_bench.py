"""flyte.Checkpoint, ours vs the upstream Flyte SDK, side by side in one run.

For each workload, store and operation, a fresh child process runs ``save_sync`` or
``load_sync`` with one implementation: ours from this environment, upstream's from its own
virtual environment (``bash .ci/install-upstream.sh``). The child reports its seconds and
its peak RSS during the operation (``VmHWM`` after resetting it); the parent samples the free
space of the temporary-file system to find the peak temporary disk beyond what the operation
leaves behind (the saved object on a local store, the restored tree after a load).

    python benchmarks/checkpoint_bench.py                 # everything, file:// and S3 (moto)
    python benchmarks/checkpoint_bench.py --s3-server s3rver   # S3 on s3rver instead
    python benchmarks/checkpoint_bench.py --quick         # small sizes, a smoke run
    python benchmarks/checkpoint_bench.py --chart docs/benchmark.png --json out.json
    python benchmarks/checkpoint_bench.py --stores file --transfers all   # + transfer_bench.py

Targets on the 2-core development machine: directory save >= 10x upstream on incompressible
data, load >= 3x, small-files load >= 5x, peak RSS < 200 MiB at any size, no temporary disk
beyond the restored tree.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from bench_support import PROC_STATUS, UPSTREAM_VENV, DiskWatch, Moto, cpu_seconds

MiB = 1 << 20

# The child: identical for both implementations, since the API is the same.
CHILD = PROC_STATUS + r"""
import json, os, pathlib, sys, time
args = json.loads(sys.argv[1])
import flyte

def tree_size(root):
    root = pathlib.Path(root)
    if root.is_file():
        return root.stat().st_size, 1
    files = [p for p in root.rglob("*") if p.is_file()]
    return sum(p.lstat().st_size for p in files), len(files)

data = args["data"]
if args["op"] == "save":
    payload = pathlib.Path(data).read_bytes() if args["bytes"] else pathlib.Path(data)
    cp = flyte.Checkpoint(args["dest"])
else:
    cp = flyte.Checkpoint(args["dest"], args["src"])
open("/proc/self/clear_refs", "w").write("5")  # reset the RSS high-water mark
base = status("VmRSS")
started = time.perf_counter()
cpu = os.times()
if args["op"] == "save":
    cp.save_sync(payload)
    result = None
else:
    result = cp.load_sync()
seconds = time.perf_counter() - started
cpu_user, cpu_sys = os.times().user - cpu.user, os.times().system - cpu.system
peak = status("VmHWM")
if args["op"] == "save":
    local = args["dest"].removeprefix("file://")
    is_local = "://" not in args["dest"] or args["dest"].startswith("file://")
    artifact, files = tree_size(local) if is_local else (0, 0)
else:
    artifact, files = tree_size(result) if result is not None else (0, 0)
print(json.dumps({"seconds": seconds, "peak_rss": peak, "base_rss": base, "artifact": artifact,
                  "files": files, "cpu_user": cpu_user, "cpu_sys": cpu_sys}))
sys.stdout.flush()
"""


@dataclass
class Row:
    workload: str
    store: str
    op: str
    impl: str
    bytes: int
    seconds: float
    peak_rss: int
    rss_growth: int
    temp_disk: int
    #: CPU seconds the S3 server used during the operation, on the same cores.
    server_cpu: float = 0.0
    #: CPU seconds of the measured process itself during the operation (all its threads).
    cpu_user: float = 0.0
    cpu_sys: float = 0.0

    @property
    def mbps(self) -> float:
        return self.bytes / 1e6 / self.seconds


# ---------------------------------------------------------------------- workloads


def _random_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 16 * MiB)
            f.write(os.urandom(n))
            left -= n


def _text_file(path: Path, size: int) -> None:
    rng = random.Random(7)
    words = [
        "".join(rng.choices("etaoinshrdlucmfwypvbgkqjxz", k=rng.randint(2, 9))) for _ in range(3000)
    ]
    with open(path, "w") as f:
        written = 0
        while written < size:
            line = " ".join(rng.choices(words, k=12)) + ".\n"
            block = line * 1 + "".join(
                " ".join(rng.choices(words, k=12)) + ".\n" for _ in range(2000)
            )
            f.write(block)
            written += len(block)
    with open(path, "r+b") as f:
        f.truncate(size)


def _size(n: int) -> str:
    return f"{n / (1 << 30):g} GiB" if n >= 1 << 30 else f"{n / MiB:g} MiB"


def make_workloads(root: Path, scale: float) -> dict[str, tuple[Path, bool, int]]:
    """name -> (data path, saved as bytes?, payload bytes)."""
    root.mkdir(parents=True, exist_ok=True)
    loads: dict[str, tuple[Path, bool, int]] = {}

    def once(name: str, build) -> Path:
        path = root / name
        if not (root / f"{name}.done").exists():
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir(parents=True)
            build(path)
            (root / f"{name}.done").write_text("ok")
        return path

    big = int(1024 * MiB * scale)
    loads[f"{_size(big)} incompressible"] = (
        once("incompressible", lambda p: _random_file(p / "model.bin", big)),
        False,
        big,
    )
    shards = max(4, int(256 * scale))
    loads[f"{shards} x 4 MiB"] = (
        once(
            "shards",
            lambda p: [_random_file(p / f"shard-{i:04d}.bin", 4 * MiB) for i in range(shards)],
        ),
        False,
        shards * 4 * MiB,
    )
    small = max(200, int(20_000 * scale))

    def small_files(p: Path) -> None:
        for i in range(small):
            d = p / f"dir-{i % 100:03d}"
            d.mkdir(exist_ok=True)
            (d / f"f-{i:05d}.bin").write_bytes(os.urandom(1024))

    loads[f"{small:,} x 1 KiB"] = (once("small", small_files), False, small * 1024)
    text = int(512 * MiB * scale)
    loads[f"{_size(text)} text"] = (
        once("text", lambda p: _text_file(p / "corpus.txt", text)),
        False,
        text,
    )
    raw = int(256 * MiB * scale)
    loads[f"{_size(raw)} bytes"] = (
        once("bytes", lambda p: _random_file(p / "blob.bin", raw)) / "blob.bin",
        True,
        raw,
    )
    return loads


# ---------------------------------------------------------------------- stores


# ---------------------------------------------------------------------- measuring


def run_child(
    python: str,
    args: dict,
    env: dict[str, str],
    tmp: Path,
    store: Path | None,
    trash: Path,
    server_pid: int | None = None,
) -> dict:
    tmp.mkdir(parents=True, exist_ok=True)
    watch = DiskWatch(tmp, *([store] if store else []))
    server_before = cpu_seconds(server_pid)
    proc = subprocess.run(
        [python, "-c", CHILD, json.dumps(args)],
        env={**os.environ, **env, "TMPDIR": str(tmp), "FLYTE_CHECKPOINT_PROGRESS": "off"},
        capture_output=True,
        text=True,
        check=False,
    )
    growth = watch.growth()
    server_cpu = cpu_seconds(server_pid) - server_before
    if proc.returncode != 0:
        raise RuntimeError(f"{python} {args['op']} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["temp_disk"] = max(0, growth - result["artifact"])
    result["server_cpu"] = server_cpu
    _discard(tmp, result["files"], trash)
    return result


def _discard(tree: Path, files: int, trash: Path) -> None:
    """Remove what a run left behind; a tree of many files only at the end of the benchmark.

    Deleting thousands of files slows the next run that creates files, for a minute or more:
    on an ext4 without a journal (as on the development VM) the inode allocator re-reads and
    skips every recently deleted inode. Deleting the first implementation's restored tree
    just before the second one runs would charge the second for the first one's cleanup.
    """
    if files > 1000:
        trash.mkdir(parents=True, exist_ok=True)
        tree.rename(trash / f"{len(list(trash.iterdir()))}")
    else:
        shutil.rmtree(tree, ignore_errors=True)


def _s3_server(kind: str):
    """moto, or s3rver (npm, installed on first use), whose ranged GETs cost only their
    range: moto reads the whole object for each one, which parallel ranged loads pay for."""
    if kind == "s3rver":
        from bench_support import S3rver

        return S3rver()
    return Moto()


def bench(args: argparse.Namespace) -> list[Row]:
    upstream_python = str(UPSTREAM_VENV / "bin" / "python")
    if not Path(upstream_python).exists():
        sys.exit(f"upstream SDK not found at {UPSTREAM_VENV}: run `bash .ci/install-upstream.sh`")
    work = Path(args.workdir)
    workloads = make_workloads(work / "data", args.scale)
    stores = ["file"] + (["s3"] if "s3" in args.stores else [])
    server = _s3_server(args.s3_server) if "s3" in stores else None
    rows: list[Row] = []
    impls = {"upstream": upstream_python, "ours": sys.executable}
    trash = work / "trash"
    shutil.rmtree(trash, ignore_errors=True)
    try:
        for store in stores:
            env = server.env() if (store == "s3" and server) else {}
            for wi, (name, (data, as_bytes, size)) in enumerate(workloads.items()):
                for op in ("save", "load"):
                    best: dict[str, Row] = {}
                    # Interleaved as upstream, ours, ours, upstream, ... so that drift in the
                    # machine's speed falls on both (file creation here slows down run after
                    # run, see _discard); each keeps its fastest run. Upstream goes first,
                    # so a drift favours it, never us.
                    order = [
                        list(impls.items())[:: 1 if rnd % 2 == 0 else -1]
                        for rnd in range(args.repeat)
                    ]
                    for impl, python in itertools.chain.from_iterable(order):
                        base = (
                            f"file://{work}/store/{impl}/{wi}"
                            if store == "file"
                            else f"s3://bench/{impl}/{wi}"
                        )
                        saved = f"{base}/attempt-1/_flytecheckpoints"
                        child_args = {
                            "op": op,
                            "data": str(data),
                            "bytes": as_bytes,
                            "dest": saved
                            if op == "save"
                            else f"{base}/attempt-2/_flytecheckpoints",
                            "src": saved,
                        }
                        local_store = work / "store" / impl / str(wi) if store == "file" else None
                        if local_store is not None and op == "save":
                            shutil.rmtree(local_store, ignore_errors=True)
                        r = run_child(
                            python, child_args, env, work / "tmp", local_store, trash,
                            server.proc.pid if (store == "s3" and server) else None,
                        )
                        row = Row(
                            name,
                            store,
                            op,
                            impl,
                            size,
                            r["seconds"],
                            r["peak_rss"],
                            r["peak_rss"] - r["base_rss"],
                            r["temp_disk"],
                            r["server_cpu"],
                            r["cpu_user"],
                            r["cpu_sys"],
                        )
                        print(
                            f"  {store:4} {name:22} {op:4} {impl:8} {row.seconds:7.2f} s"
                            f" {row.mbps:8.1f} MB/s  rss {row.peak_rss / MiB:6.0f} MiB"
                            f"  tmp {row.temp_disk / MiB:6.0f} MiB"
                            f"  cpu user {row.cpu_user:5.2f} s sys {row.cpu_sys:5.2f} s"
                            + (f"  server cpu {row.server_cpu:5.1f} s" if row.server_cpu else ""),
                            flush=True,
                        )
                        best[impl] = _better(best.get(impl), row)
                    rows.extend(best.values())
    finally:
        if server:
            server.stop()
        shutil.rmtree(trash, ignore_errors=True)
    return rows


def _better(kept: Row | None, new: Row) -> Row:
    """The faster run's time; the worst peak RSS and temporary disk seen in any run."""
    if kept is None:
        return new
    fast = new if new.seconds < kept.seconds else kept
    return dataclasses.replace(
        fast,
        peak_rss=max(kept.peak_rss, new.peak_rss),
        rss_growth=max(kept.rss_growth, new.rss_growth),
        temp_disk=max(kept.temp_disk, new.temp_disk),
    )


def table(rows: list[Row]) -> str:
    by = {(r.workload, r.store, r.op, r.impl): r for r in rows}
    lines = [
        "| store | workload | op | upstream s | ours s | upstream MB/s | ours MB/s | speed-up |"
        " RSS upstream | RSS ours | tmp disk upstream | tmp disk ours | server CPU s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    seen = []
    for r in rows:
        key = (r.workload, r.store, r.op)
        if key in seen:
            continue
        seen.append(key)
        up, us = by.get((*key, "upstream")), by.get((*key, "ours"))
        if not up or not us:
            continue
        lines.append(
            f"| {r.store} | {r.workload} | {r.op} | {up.seconds:.2f} | {us.seconds:.2f} |"
            f" {up.mbps:.0f} | {us.mbps:.0f} | **{up.seconds / us.seconds:.1f}x** |"
            f" {up.peak_rss / MiB:.0f} MiB | {us.peak_rss / MiB:.0f} MiB |"
            f" {up.temp_disk / MiB:.0f} MiB | {us.temp_disk / MiB:.0f} MiB |"
            + (f" {up.server_cpu:.1f} / {us.server_cpu:.1f} |" if r.store == "s3" else " - |")
        )
    return "\n".join(lines)


def targets(rows: list[Row]) -> list[str]:
    by = {(r.workload, r.store, r.op, r.impl): r for r in rows}
    out = []

    def ratio(workload: str, store: str, op: str) -> float | None:
        up, us = by.get((workload, store, op, "upstream")), by.get((workload, store, op, "ours"))
        return up.seconds / us.seconds if up and us else None

    incompressible = next((r.workload for r in rows if r.workload.endswith("incompressible")), "")
    for store in sorted({r.store for r in rows}):
        for label, workload, op, goal in (
            ("directory save, incompressible", incompressible, "save", 10),
            ("load, incompressible", incompressible, "load", 3),
            (
                "small-files load",
                next((r.workload for r in rows if "KiB" in r.workload), ""),
                "load",
                5,
            ),
        ):
            value = ratio(workload, store, op)
            if value is not None:
                out.append(
                    f"{'PASS' if value >= goal else 'MISS'}  {store}: {label} {value:.1f}x"
                    f" (target >= {goal}x)"
                )
        ours = [r for r in rows if r.impl == "ours" and r.store == store]
        worst = max(ours, key=lambda r: r.rss_growth)
        out.append(
            f"{'PASS' if worst.rss_growth < 200 * MiB else 'MISS'}  {store}: peak RSS growth"
            f" during an operation {worst.rss_growth / MiB:.0f} MiB ({worst.workload} {worst.op};"
            " target < 200 MiB; a bytes save also holds the payload itself)"
        )
        temp = max(r.temp_disk for r in ours)
        out.append(
            f"{'PASS' if temp < 16 * MiB else 'MISS'}  {store}: temporary disk beyond the result"
            f" {temp / MiB:.0f} MiB (target: none)"
        )
    return out


def chart(rows: list[Row], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(matplotlib not installed: no chart written to {path}; `pip install matplotlib`)")
        return
    stores = sorted({r.store for r in rows})
    fig, axes = plt.subplots(len(stores), 2, figsize=(13, 4.2 * len(stores)), squeeze=False)
    for si, store in enumerate(stores):
        for oi, op in enumerate(("save", "load")):
            ax = axes[si][oi]
            names = [
                r.workload for r in rows if r.store == store and r.op == op and r.impl == "ours"
            ]
            ours = [r.mbps for r in rows if r.store == store and r.op == op and r.impl == "ours"]
            up = [r.mbps for r in rows if r.store == store and r.op == op and r.impl == "upstream"]
            xs = range(len(names))
            ax.bar([x - 0.2 for x in xs], up, 0.4, label="upstream flyte", color="#b0b0b0")
            ax.bar([x + 0.2 for x in xs], ours, 0.4, label="flyte-checkpoint", color="#2a7ab0")
            for x, (u, o) in enumerate(zip(up, ours, strict=True)):
                ax.text(x + 0.2, o, f"{o / u:.1f}x", ha="center", va="bottom", fontsize=8)
            ax.set_xticks(list(xs), names, rotation=15, fontsize=8)
            ax.set_ylabel("MB/s (payload bytes)")
            ax.set_title(f"{op} to {store}" if op == "save" else f"{op} from {store}")
            ax.legend(fontsize=8)
    fig.suptitle("flyte.Checkpoint throughput: flyte-checkpoint vs upstream flyte SDK (2 cores)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"chart written to {path}")


def _warm_memory(gib: float) -> None:
    """Touch some memory once. On a fresh VM the first touch of each guest page is several
    times slower than later ones; whichever implementation ran first would pay for it."""
    chunks = []
    for _ in range(int(gib * 4)):
        chunks.append(bytearray(256 * MiB))  # zero-filled: every page is touched
    del chunks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1/16 of the sizes: a smoke run")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--stores", default="file,s3", help="comma list: file, s3")
    parser.add_argument("--s3-server", choices=("moto", "s3rver"), default="moto",
                        help="the S3 server on loopback (s3rver needs npm; default moto)")
    parser.add_argument(
        "--workdir", default=os.path.join(tempfile.gettempdir(), "flyte-checkpoint-bench")
    )
    parser.add_argument("--warm-gib", type=float, default=16.0,
                        help="memory to touch once before measuring (see _warm_memory)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of each operation per implementation, interleaved; the"
                        " fastest counts (default 1)")
    parser.add_argument("--json", help="write the rows as JSON here")
    parser.add_argument("--chart", help="write a PNG chart here")
    parser.add_argument(
        "--transfers", default="", metavar="PARTS",
        help="also run these parts of transfer_bench.py (comma list of azure, s3, gcs, cores,"
        " small, or 'all'): each store behind a shaping proxy, ours against upstream and one"
        " plain connection, loads on one core and two, the small-file ratio")
    from transfer_bench import PARTS, add_arguments

    add_arguments(parser, prefix="transfer-")
    args = parser.parse_args()
    if args.transfers == "all":
        args.transfers = PARTS
    if args.quick:
        args.scale = 1 / 16
    print(
        f"flyte.Checkpoint benchmark: ours ({sys.executable}) vs upstream ({UPSTREAM_VENV}); "
        f"{os.cpu_count()} CPUs; scale {args.scale:g}"
    )
    _warm_memory(args.warm_gib)
    rows = bench(args)
    print()
    print(table(rows))
    print()
    for line in targets(rows):
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=2))
    if args.chart:
        chart(rows, Path(args.chart))
    if args.transfers:
        import transfer_bench

        print("\nTransfers (transfer_bench.py):")
        transfer_bench.run(argparse.Namespace(
            quick=args.quick, parts=args.transfers, workdir=None, down=args.transfer_down,
            up=args.transfer_up, first_byte=args.transfer_first_byte))
    return 0


if __name__ == "__main__":
    sys.exit(main())
