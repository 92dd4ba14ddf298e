"""Where a load and a save spend their CPU, thread by thread.

A load and a save of incompressible files (8 files, 512 MiB by default) through
``flyte_checkpoint.Checkpoint``, against s3rver (npm, installed on first use) over http and
against a local path, each in a fresh process (``--stores moto`` for moto, whose ranged GETs
each read the whole object: slow, and under load they time out). For each: wall seconds, the
process's CPU seconds per GiB, and each thread's CPU seconds per GiB (from
``/proc/self/task/*/stat``, sampled every 50 ms and named from ``threading.enumerate()``; a
pool's threads are summed under their name's prefix), busiest first. The busiest thread
bounds the throughput: its ceiling is 1 / (its CPU-s per GiB) GiB/s.

CPU seconds hold under load; wall seconds do not (the emulator shares the cores). Imports
and the store client's set-up are made before the baseline, so only the transfer counts.
Set PYTHONPATH to another tree's ``packages/*/src`` to profile that tree (a before/after).

    python benchmarks/thread_profile.py                 # 512 MiB, s3rver and local
    python benchmarks/thread_profile.py --size 128 --stores local
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_support import Moto, S3rver

MiB = 1 << 20

CHILD = r"""
import json, os, re, sys, threading, time
args = json.loads(sys.argv[1])
tick = os.sysconf("SC_CLK_TCK")
seen = {}  # tid -> [name, cpu seconds]

def sample():
    names = {t.native_id: t.name for t in threading.enumerate()}
    for tid in os.listdir("/proc/self/task"):
        try:
            fields = open(f"/proc/self/task/{tid}/stat").read().rpartition(")")[2].split()
        except OSError:
            continue
        cpu = (int(fields[11]) + int(fields[12])) / tick
        entry = seen.setdefault(int(tid), [None, 0.0])
        entry[0] = names.get(int(tid), entry[0])
        entry[1] = cpu

stop = threading.Event()
def sampler():
    while not stop.wait(0.05):
        sample()
watcher = threading.Thread(target=sampler, name="profiler", daemon=True)
from flyte_checkpoint import Checkpoint
# Imports and the store's client (s3fs, botocore's service models) are not the transfer's:
# made before the baseline, through the same File the checkpoint uses.
if args["op"] == "save":
    checkpoint = Checkpoint(args["dest"])
    checkpoint._file(args["dest"]).exists_sync()
else:
    checkpoint = Checkpoint(args["dest"], args["src"])
    checkpoint._file(args["src"]).exists_sync()
import checkpoint_format, checkpoint_io
sample()
baseline = {tid: cpu for tid, (_, cpu) in seen.items()}  # imports are not the transfer's
watcher.start()
before = os.times()
t = time.perf_counter()
if args["op"] == "save":
    checkpoint.save_sync(args["data"])
else:
    checkpoint.load_sync()
seconds = time.perf_counter() - t
sample()
after = os.times()
stop.set()
threads = {}
for tid, (name, cpu) in seen.items():
    cpu -= baseline.get(tid, 0.0)
    if name == "profiler":
        continue
    name = name or f"tid-{tid}"
    if tid == os.getpid():
        name = "main"
    # Pools: "checkpoint-inflate_3" -> "checkpoint-inflate_*", "ThreadPoolExecutor-0_1" too.
    group = re.sub(r"_\d+$", "_*", name)
    group = re.sub(r"^Thread-\d+.*", "Thread-*", group)
    threads.setdefault(group, []).append(cpu)
peak = next(int(line.split()[1]) << 10 for line in open("/proc/self/status")
            if line.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "peak_rss": peak,
                  "cpu": (after.user + after.system) - (before.user + before.system),
                  "threads": {k: [sum(v), max(v), len(v)] for k, v in threads.items()}}))
"""


def child(args: dict, env: dict[str, str]) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True,
                          text=True, check=False, timeout=900,
                          env={**os.environ, **env, "FLYTE_CHECKPOINT_PROGRESS": "off"})
    if done.returncode != 0:
        raise RuntimeError(f"{args['op']} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def tree(root: Path, size: int) -> Path:
    root.mkdir(parents=True)
    for i in range(8):
        with open(root / f"shard-{i}.bin", "wb") as f:
            for _ in range(size // 8 // (4 * MiB)):
                f.write(os.urandom(4 * MiB))
    return root


def report(store: str, op: str, result: dict, size: int) -> None:
    gib = size / (1 << 30)
    print(f"{store:13} {op:5} {result['seconds']:6.2f} s  process {result['cpu'] / gib:5.2f}"
          f" CPU-s/GiB, peak RSS {result['peak_rss'] >> 20} MiB")
    rows = sorted(result["threads"].items(), key=lambda kv: -kv[1][1])
    for name, (total, busiest, count) in rows:
        if total / gib < 0.02:
            continue
        print(f"    {name:32} x{count:<2} {total / gib:5.2f} CPU-s/GiB"
              f" (busiest {busiest / gib:5.2f}: ceiling {gib / max(busiest, 1e-9):5.2f} GiB/s)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="MiB of data (default 512)")
    parser.add_argument("--stores", default="s3rver,local",
                        help="of s3rver (ranged GETs read only their range), moto, local")
    parser.add_argument("--runs", type=int, default=1, help="keep the run of least CPU")
    parser.add_argument("--shaped", action="store_true",
                        help="S3 through the shaping proxy (64 MiB/s down, 16 MiB/s up, 50 ms"
                             " first byte per connection): wall seconds are what count")
    args = parser.parse_args()
    size = args.size * MiB
    with tempfile.TemporaryDirectory(prefix="thread-profile-") as tmp:
        work = Path(tmp)
        data = tree(work / "data", size)
        size = sum(p.stat().st_size for p in data.iterdir())
        for store in args.stores.split(","):
            moto = {"moto": Moto, "s3rver": S3rver}[store]() if store != "local" else None
            proxy = None
            try:
                env = moto.env() if moto else {}
                if moto and args.shaped:
                    from checkpoint_testing.shaper import ShapingProxy

                    proxy = ShapingProxy(moto.port, down=64 * MiB, up=16 * MiB,
                                         first_byte=0.05).__enter__()
                    env = {**env, "AWS_ENDPOINT_URL": proxy.endpoint,
                           "FLYTE_AWS_ENDPOINT": proxy.endpoint}
                dest = "s3://bench/ckpt.tar" if moto else str(work / "object")
                for op in ("save", "load"):
                    best = None
                    for run in range(args.runs):
                        with tempfile.TemporaryDirectory(dir=work) as scratch:
                            job = ({"op": "save", "dest": dest, "data": str(data)} if op == "save"
                                   else {"op": "load", "dest": dest + f"-{run}", "src": dest})
                            result = child(job, {**env, "TMPDIR": scratch})
                        if best is None or result["cpu"] < best["cpu"]:
                            best = result
                    report(store + (" shaped" if proxy else ""), op, best, size)
                    if proxy:
                        print(f"    most connections at once: {proxy.stats.most_concurrent}")
                        proxy.stats.most_concurrent = 0
            finally:
                if proxy:
                    proxy.__exit__(None, None, None)
                if moto:
                    moto.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
