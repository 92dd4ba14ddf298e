"""How long a training loop waits for its checkpoints: upstream (sync), ours (sync) and ours
(background, ``save_sync(..., wait=False)``), side by side in one run.

Each run is a fresh process playing a training loop: CPU work between checkpoints (SHA-256
over a buffer, a fixed amount calibrated once, one core, the GIL released as in a PyTorch
loop), then the framework's own checkpoint write (every file of the state written to a
temporary name and renamed into place, as Lightning and Hugging Face do), then the save.
It reports the time the loop was blocked in each save, the run's wall time against the same
loop without saves ("local files only"), its peak RSS above the loop's own baseline, and
the peak temporary disk beyond the live state (upstream's temporary tarball; our snapshot).

    python benchmarks/background_bench.py             # file:// and S3 (moto), 256 MiB and 1 GiB
    python benchmarks/background_bench.py --quick     # small sizes, a smoke run
    python benchmarks/background_bench.py --chart docs/background.png --json out.json

Targets on the 2-core development machine: blocked per background save of 1 GiB at most 5%
of our synchronous save and at least 100x less than upstream's; total run time with
background saves within 10% of the run without saves, when the interval is longer than one
upload; peak RSS less than 256 MiB above baseline; no temporary disk beyond the snapshot.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from bench_support import PROC_STATUS, UPSTREAM_VENV, DiskWatch, Moto

MiB = 1 << 20
FILE = 4 * MiB

LOOP = PROC_STATUS + r"""
import hashlib, json, os, pathlib, sys, time
args = json.loads(sys.argv[1])

block = os.urandom(4 << 20)
def work(rounds):
    for _ in range(rounds):
        hashlib.sha256(block).digest()

if args["mode"] == "calibrate":
    started = time.perf_counter(); work(200)
    print(json.dumps({"rounds_per_second": 200 / (time.perf_counter() - started)}))
    sys.exit()

state = pathlib.Path(args["state"])
state.mkdir(parents=True, exist_ok=True)
pool = os.urandom(4 << 20)
def write_state(number):
    # What the framework does: each file written under a temporary name, renamed into place.
    for i in range(args["files"]):
        tmp = state / f"shard-{i}.bin.tmp"
        with open(tmp, "wb") as f:
            f.write(number.to_bytes(8, "little") + i.to_bytes(8, "little"))
            f.write(memoryview(pool)[16:])
        os.replace(tmp, state / f"shard-{i}.bin")

checkpoint = None
if args["mode"] != "none":
    import flyte
    checkpoint = flyte.Checkpoint(args["dest"])
write_state(0)
open("/proc/self/clear_refs", "w").write("5")  # reset the RSS high-water mark
base = status("VmRSS")
blocked, writes = [], []
started = time.perf_counter()
for number in range(1, args["checkpoints"] + 1):
    work(args["rounds"])
    t = time.perf_counter(); write_state(number); writes.append(time.perf_counter() - t)
    if checkpoint is not None:
        t = time.perf_counter()
        if args["mode"] == "background":
            checkpoint.save_sync(state, wait=False)
        else:
            checkpoint.save_sync(state)
        blocked.append(time.perf_counter() - t)
work(args["rounds"])  # the stretch after the last checkpoint
loop_end = time.perf_counter()
final_wait = 0.0
if args["mode"] == "background":
    t = time.perf_counter(); checkpoint.close(); final_wait = time.perf_counter() - t
print(json.dumps({"blocked": blocked, "writes": writes, "loop": loop_end - started,
                  "total": time.perf_counter() - started, "final_wait": final_wait,
                  "peak_rss": status("VmHWM"), "base_rss": base}))
"""


@dataclass
class Run:
    store: str
    size: int
    mode: str  # none | upstream-sync | ours-sync | ours-background
    blocked: list[float]
    total: float
    final_wait: float
    rss_growth: int
    temp_disk: int

    @property
    def blocked_median(self) -> float:
        return statistics.median(self.blocked) if self.blocked else 0.0


def _human(size: int) -> str:
    return f"{size / (1 << 30):g} GiB" if size >= 1 << 30 else f"{size // MiB} MiB"


def run_loop(python: str, args: dict, env: dict[str, str], tmp: Path, watch_roots: list[Path]):
    tmp.mkdir(parents=True, exist_ok=True)
    watch = DiskWatch(tmp, *watch_roots)
    done = subprocess.run([python, "-c", LOOP, json.dumps(args)], capture_output=True, text=True,
                          env={**os.environ, **env, "TMPDIR": str(tmp),
                               "FLYTE_CHECKPOINT_PROGRESS": "off"}, check=False)
    growth = watch.growth()
    if done.returncode != 0:
        raise RuntimeError(f"{args['mode']} loop failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]), growth


def bench(args: argparse.Namespace) -> list[Run]:
    upstream_python = str(UPSTREAM_VENV / "bin" / "python")
    if not Path(upstream_python).exists():
        sys.exit(f"upstream SDK not found at {UPSTREAM_VENV}: run `bash .ci/install-upstream.sh`")
    work = Path(tempfile.mkdtemp(prefix="background-bench-", dir=args.workdir))
    rounds_per_second = json.loads(subprocess.run(
        [sys.executable, "-c", LOOP, json.dumps({"mode": "calibrate"})], capture_output=True,
        text=True, check=True).stdout)["rounds_per_second"]
    moto = Moto() if "s3" in args.stores else None
    runs: list[Run] = []
    try:
        for store in args.stores:
            env = moto.env() if store == "s3" else {}
            for size in args.sizes:
                interval = max(args.interval[store] * size / (1 << 30), args.floor[store])
                for mode in ("none", "upstream-sync", "ours-sync", "ours-background"):
                    python = upstream_python if mode.startswith("upstream") else sys.executable
                    slot = f"{mode}-{size}"
                    dest = (f"s3://bench/{slot}/_flytecheckpoints" if store == "s3"
                            else f"file://{work}/store/{slot}/_flytecheckpoints")
                    state = work / "state" / slot / "ckpt"
                    loop_args = {
                        "mode": {"upstream-sync": "sync", "ours-sync": "sync",
                                 "ours-background": "background"}.get(mode, "none"),
                        "dest": dest, "state": str(state), "files": size // FILE,
                        "checkpoints": args.checkpoints,
                        "rounds": max(1, round(rounds_per_second * interval)),
                    }
                    result, growth = run_loop(python, loop_args, env, work / "tmp" / slot,
                                              [state.parent])
                    # The loop writes its live state (``size``) after the watch starts: growth
                    # beyond it is what saves kept on disk (upstream's temporary tarball, our
                    # snapshot) plus the one file the loop has under a temporary name.
                    run = Run(store, size, mode, result["blocked"], result["total"],
                              result["final_wait"], result["peak_rss"] - result["base_rss"],
                              max(0, growth - size))
                    runs.append(run)
                    print(_line(run), flush=True)
                    shutil.rmtree(work / "state" / slot, ignore_errors=True)
                    shutil.rmtree(work / "store" / slot, ignore_errors=True)
    finally:
        if moto:
            moto.stop()
        shutil.rmtree(work, ignore_errors=True)
    return runs


def _line(run: Run) -> str:
    blocked = (f"blocked/save median {run.blocked_median * 1e3:9.1f} ms"
               f" max {max(run.blocked) * 1e3:9.1f} ms" if run.blocked else " " * 46)
    return (f"{run.store:4} {_human(run.size):>8} {run.mode:16} {blocked}  total"
            f" {run.total:7.2f} s  final wait {run.final_wait:5.2f} s"
            f"  RSS +{run.rss_growth / MiB:4.0f} MiB  tmp disk {run.temp_disk / MiB:5.0f} MiB")


def table(runs: list[Run]) -> str:
    """The README table: one row per store and size, with the ratios the targets name."""
    out = ["| store | size | blocked per save: upstream sync | ours sync | ours background"
           " | background vs ours sync | upstream vs background | run time: no saves"
           " | upstream sync | ours sync | ours background | background over no saves"
           " | RSS growth (background) | tmp disk: upstream | background |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    keys = sorted({(r.store, r.size) for r in runs}, key=lambda k: (k[0] != "file", k[1]))
    for store, size in keys:
        by = {r.mode: r for r in runs if (r.store, r.size) == (store, size)}
        up, sync, bg, none = (by[m] for m in ("upstream-sync", "ours-sync", "ours-background",
                                              "none"))
        out.append(
            f"| {store} | {_human(size)} | {up.blocked_median:.2f} s | {sync.blocked_median:.2f} s"
            f" | {bg.blocked_median * 1e3:.1f} ms"
            f" | **{bg.blocked_median / sync.blocked_median:.1%}**"
            f" | **{up.blocked_median / bg.blocked_median:,.0f}x**"
            f" | {none.total:.1f} s | {up.total:.1f} s | {sync.total:.1f} s | {bg.total:.1f} s"
            f" | **{bg.total / none.total - 1:+.1%}** | {bg.rss_growth / MiB:.0f} MiB"
            f" | {up.temp_disk / MiB:.0f} MiB | {bg.temp_disk / MiB:.0f} MiB |")
    return "\n".join(out)


def chart(runs: list[Run], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(matplotlib not installed: no chart written to {path}; `pip install matplotlib`)")
        return
    keys = sorted({(r.store, r.size) for r in runs}, key=lambda k: (k[0] != "file", k[1]))
    labels = [f"{store}\n{_human(size)}" for store, size in keys]
    modes = [("upstream-sync", "upstream (sync)", "#999999"),
             ("ours-sync", "ours (sync)", "#4c72b0"),
             ("ours-background", "ours (background)", "#55a868")]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.27
    for i, (mode, label, color) in enumerate(modes):
        values = [next(r for r in runs if (r.store, r.size, r.mode) == (*k, mode)).blocked_median
                  for k in keys]
        left.bar([x + (i - 1) * width for x in range(len(keys))], values, width, label=label,
                 color=color)
    left.set_yscale("log")
    left.set_ylabel("loop blocked per save, s (log)")
    left.set_xticks(range(len(keys)), labels)
    left.set_title("Time the training loop waits per checkpoint")
    left.legend()
    modes = [("none", "no saves", "#dddddd"), *modes]
    width = 0.2
    for i, (mode, label, color) in enumerate(modes):
        values = [next(r for r in runs if (r.store, r.size, r.mode) == (*k, mode)).total
                  for k in keys]
        right.bar([x + (i - 1.5) * width for x in range(len(keys))], values, width,
                  label=label, color=color)
    right.set_ylabel("run wall time, s")
    right.set_xticks(range(len(keys)), labels)
    right.set_title("Whole run (same work, same checkpoints)")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"chart written to {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 and 64 MiB, file store only")
    parser.add_argument("--stores", default="file,s3", help="comma-separated: file, s3")
    parser.add_argument("--sizes", default="256,1024", help="checkpoint sizes in MiB")
    parser.add_argument("--checkpoints", type=int, default=3)
    # Longer than one upload of ours (the targets' premise): 4.4 s for 1 GiB to the local
    # store right after the loop wrote it, 12-14 s to moto.
    parser.add_argument("--interval-file", type=float, default=8.0,
                        help="seconds of work between checkpoints per GiB, local store")
    parser.add_argument("--interval-s3", type=float, default=20.0,
                        help="seconds of work between checkpoints per GiB, S3 (moto)")
    parser.add_argument("--workdir", default=None, help="where state and stores go")
    parser.add_argument("--chart", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.stores = [s for s in args.stores.split(",") if s]
    args.sizes = ([16 * MiB, 64 * MiB] if args.quick
                  else [int(size) * MiB for size in args.sizes.split(",")])
    if args.quick:
        args.stores = ["file"]
    args.interval = {"file": args.interval_file, "s3": args.interval_s3}
    args.floor = {"file": 1.0 if args.quick else 3.0, "s3": 6.0}
    runs = bench(args)
    print()
    print(table(runs))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in runs], indent=1))
    if args.chart:
        chart(runs, args.chart)
    return 0


if __name__ == "__main__":
    sys.exit(main())
