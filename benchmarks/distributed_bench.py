"""Multi-rank checkpoints through a shaped S3: the collective save against one rank saving
the same union alone, and the bytes the store serves per node for a collective load.

moto sits behind ``ShapingProxy`` (``checkpoint_testing.shaper``): every connection gets
16 MiB/s up and 64 MiB/s down and 50 ms to its first byte, so speed comes only from
connections at once, as on a real store. Each rank is a process of its own
(``tests/task_programs/dist_rank.py``, torch gloo on CPU) with ``--size`` MiB of
incompressible files:

- save: ``--ranks`` ranks save their directories as one object (each uploads its segment as
  parts of one multipart upload), against one process saving the union of the same files
  with a plain ``Checkpoint`` (rank 0 saving everything, as without multi-rank saves). Both
  at each upload width of ``--concurrency`` (parts in flight per process).
- load: ``--ranks`` ranks on ``--nodes`` pretend nodes (``CHECKPOINT_NODE_ID``) load the
  object; the bytes the proxy sent per node, against a plain load's bytes times the ranks of
  a node (every rank loading for itself).

Targets (issue 18): save >= 2.5x faster; a collective load <= 1.05x the object per node.
Wall-clock figures depend on the machine's free cores (the emulator, the proxy and every rank
share them); the bytes are exact.

    python benchmarks/distributed_bench.py                 # 4 ranks x 128 MiB
    python benchmarks/distributed_bench.py --size 16       # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_support import Moto, free_port
from checkpoint_testing.shaper import ShapingProxy

MiB = 1 << 20
RANK_PROGRAM = Path(__file__).resolve().parents[1] / "tests" / "task_programs" / "dist_rank.py"

ALONE = r"""
import json, sys, time
from flyte_checkpoint import Checkpoint, Settings
args = json.loads(sys.argv[1])
helper = Checkpoint(args["dest"], args.get("src"), storage_options=args["options"],
                    settings=Settings.from_env())
started = time.perf_counter()
if args["op"] == "save":
    helper.save_sync(args["data"])
else:
    helper.load_sync()
print(json.dumps({"seconds": time.perf_counter() - started}))
"""


def make_trees(root: Path, ranks: int, size: int) -> tuple[dict[str, str], Path]:
    """Each rank's directory of ``size`` MiB in 8 MiB files, and their union (hard links)."""
    trees = {}
    union = root / "union"
    union.mkdir(parents=True)
    for rank in range(ranks):
        tree = root / f"rank{rank}"
        (tree / "shards").mkdir(parents=True)
        (union / "shards").mkdir(exist_ok=True)
        for index in range(max(1, size // 8)):
            name = f"shard-{rank}-{index:03d}.bin"
            (tree / "shards" / name).write_bytes(os.urandom(min(size, 8) * MiB))
            os.link(tree / "shards" / name, union / "shards" / name)
        trees[str(rank)] = str(tree)
    return trees, union


def job(ranks: int, nodes: int, args: dict, env: dict[str, str], timeout: float) -> list[dict]:
    out = Path(tempfile.mkdtemp(prefix="dist-bench-out-"))
    port = free_port()
    processes = []
    for rank in range(ranks):
        environment = {**env, "RANK": str(rank), "WORLD_SIZE": str(ranks),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "CHECKPOINT_NODE_ID": f"node-{rank * nodes // ranks}"}
        processes.append(subprocess.Popen(
            [sys.executable, str(RANK_PROGRAM), json.dumps({**args, "out": str(out)})],
            env=environment, stdin=subprocess.DEVNULL))
    for process in processes:
        process.wait(timeout)
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]
    for report in reports:
        if "error" in report:
            raise SystemExit(f"rank {report['rank']} failed: {report['error']}\n"
                             f"{report.get('traceback', '')}")
    return reports


def alone(args: dict, env: dict[str, str], timeout: float) -> float:
    done = subprocess.run([sys.executable, "-c", ALONE, json.dumps(args)], env=env,
                          capture_output=True, text=True, timeout=timeout, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["seconds"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--size", type=int, default=128, help="MiB per rank")
    parser.add_argument("--up", type=float, default=16, help="MiB/s up per connection")
    parser.add_argument("--down", type=float, default=64, help="MiB/s down per connection")
    parser.add_argument("--first-byte", type=float, default=0.05)
    parser.add_argument("--concurrency", default="2,8",
                        help="parts in flight per process, comma-separated")
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="dist-bench-"))
    trees, union = make_trees(work / "data", args.ranks, args.size)
    total = args.ranks * args.size * MiB
    moto = Moto()
    rows = []
    try:
        with ShapingProxy(moto.port, up=args.up * MiB, down=args.down * MiB,
                          first_byte=args.first_byte) as proxy:
            options = {"endpoint_url": proxy.endpoint, "key": "testing", "secret": "testing",
                       "client_kwargs": {"region_name": "us-east-1"}}
            base_env = {**os.environ, **moto.env(), "FLYTE_CHECKPOINT_PROGRESS": "off",
                        "OMP_NUM_THREADS": "1"}
            for width in [int(w) for w in args.concurrency.split(",")]:
                env = {**base_env, "CHECKPOINT_IO_CONCURRENCY": str(width)}
                single = alone({"op": "save", "dest": f"s3://bench/alone-{width}",
                                "data": str(union), "options": options}, env, args.timeout)
                reports = job(args.ranks, args.nodes,
                              {"scenario": "time_save", "dest": f"s3://bench/dist-{width}",
                               "options": options, "data": trees, "timeout": args.timeout},
                              env, args.timeout)
                collective = max(r["seconds"] for r in reports)
                growth = max(r["rss_growth"] for r in reports) / MiB
                rows.append(("save", width, single, collective, growth))
                print(f"save {args.ranks} x {args.size} MiB, {width} parts in flight per"
                      f" process: rank 0 alone {single:.1f} s ({total / MiB / single:.0f}"
                      f" MiB/s), collective {collective:.1f} s"
                      f" ({total / MiB / collective:.0f} MiB/s): {single / collective:.2f}x;"
                      f" peak RSS growth of a rank {growth:.0f} MiB", flush=True)

            # Loads: one long GET per loader, so moto serves each byte once per loader.
            env = {**base_env, "CHECKPOINT_IO_READ_CONCURRENCY": "1"}
            src = f"s3://bench/dist-{args.concurrency.split(',')[0]}"
            size = _object_size(moto, src)
            before = proxy.stats.bytes_down
            alone({"op": "load", "dest": "s3://bench/unused", "src": src, "options": options},
                  env, args.timeout)
            plain = proxy.stats.bytes_down - before
            before = proxy.stats.bytes_down
            job(args.ranks, args.nodes, {"scenario": "load", "dest": "s3://bench/unused",
                                         "src": src, "options": options,
                                         "timeout": args.timeout}, env, args.timeout)
            per_node = (proxy.stats.bytes_down - before) / args.nodes
            per_node_ranks = args.ranks // args.nodes
            print(f"load of {size / MiB:.0f} MiB by {args.ranks} ranks on {args.nodes} nodes:"
                  f" {per_node / size:.3f}x the object per node (every rank loading:"
                  f" {per_node_ranks * plain / size:.3f}x, {per_node_ranks} loads of"
                  f" {plain / size:.3f}x)", flush=True)
    finally:
        moto.stop()
        subprocess.run(["rm", "-rf", str(work)], check=False)
    print(json.dumps({"save": rows, "load_per_node": per_node / size,
                      "load_every_rank": per_node_ranks * plain / size}))
    return 0


def _object_size(moto: Moto, uri: str) -> int:
    import boto3

    bucket, _, key = uri.removeprefix("s3://").partition("/")
    s3 = boto3.client("s3", endpoint_url=moto.endpoint, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    return s3.head_object(Bucket=bucket, Key=key)["ContentLength"]


if __name__ == "__main__":
    sys.exit(main())
