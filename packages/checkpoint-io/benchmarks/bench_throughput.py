"""Throughput and peak RSS of checkpoint-io beside the raw fsspec calls, on each emulator.

Not a test: run it by hand, and copy the table into the package README.

    python packages/checkpoint-io/benchmarks/bench_throughput.py            # 1 GiB
    python packages/checkpoint-io/benchmarks/bench_throughput.py --size-mib 5120 \
        --only stream --backends gcs                                         # 5 GiB RSS proof
    python packages/checkpoint-io/benchmarks/bench_throughput.py --only read  # reads only:
        # raw get_file beside sync and async streaming reads of the same object

Each measurement runs in a fresh child process, so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

MiB = 1024 * 1024


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(op: str, uri: str, local: str, size: int) -> dict:
    """One measurement, in its own process."""
    from checkpoint_io import File, filesystem

    # checkpoint-io reads no environment: the GCS emulator's anonymous access is an option.
    emulated_gcs = uri.startswith("gs://") and os.environ.get("STORAGE_EMULATOR_HOST")
    options = {"token": "anon"} if emulated_gcs else {}
    file = File(path=uri).with_options(storage_options=options)

    start = time.perf_counter()
    if op == "ours-upload":
        File.from_local_sync(local, uri, storage_options=options)
    elif op == "raw-upload":
        filesystem(uri, options).put_file(local, uri)
    elif op == "ours-download":
        file.download_sync(local)
    elif op == "raw-download":
        filesystem(uri, options).get_file(uri, local)
    elif op == "stream-write":
        block = os.urandom(MiB)
        with file.open_sync("wb") as f:
            for _ in range(size // MiB):
                f.write(block)
    elif op == "stream-read":
        total = 0
        with file.open_sync("rb") as f:
            while chunk := f.read(MiB):
                total += len(chunk)
        assert total == size, (total, size)
    elif op == "stream-read-async":
        import asyncio

        async def read_all() -> int:
            total = 0
            async with file.open("rb") as f:
                while chunk := await f.read(MiB):
                    total += len(chunk)
            return total

        total = asyncio.run(read_all())
        assert total == size, (total, size)
    else:
        raise SystemExit(f"unknown op {op}")
    seconds = time.perf_counter() - start
    return {"op": op, "seconds": seconds, "mib_s": size / MiB / seconds,
            "peak_rss_mib": _peak_rss_mib()}


def measure(op: str, uri: str, local: str, size: int, env: dict) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", op, uri, local, str(size)],
        env=env, capture_output=True, text=True,
    )
    if out.returncode:
        raise SystemExit(f"{op} {uri} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--backends", default="local,s3,gcs,azure")
    parser.add_argument("--only", choices=["all", "transfer", "stream", "read"], default="all")
    parser.add_argument("--child", nargs=4, metavar=("OP", "URI", "LOCAL", "SIZE"))
    args = parser.parse_args()
    if args.child:
        op, uri, local, size = args.child
        print(json.dumps(child(op, uri, local, int(size))))
        return

    from checkpoint_testing.emulators import Azurite, FakeGCS, MotoS3

    size = args.size_mib * MiB
    work = Path(tempfile.mkdtemp(prefix="checkpoint-io-bench-"))
    source = work / "source.bin"
    with open(source, "wb") as f:
        block = os.urandom(16 * MiB)
        for _ in range(size // len(block)):
            f.write(block)
        f.write(block[: size % len(block)])

    rows = []
    for kind in args.backends.split(","):
        server = None
        env = dict(os.environ)
        if kind == "local":
            root = str(work / "store")
            os.makedirs(root, exist_ok=True)
        else:
            server = {"s3": MotoS3, "gcs": FakeGCS, "azure": Azurite}[kind]().start()
            env.update(server.env())
            os.environ.update(server.env())
            bucket = f"bench-{uuid.uuid4().hex[:8]}"
            _create_bucket(kind, server, bucket)
            root = {"s3": "s3", "gcs": "gs", "azure": "abfs"}[kind] + f"://{bucket}"
        try:
            ops = []
            if args.only in ("all", "transfer"):
                ops += [("raw-upload", f"{root}/raw.bin", str(source)),
                        ("ours-upload", f"{root}/ours.bin", str(source)),
                        ("raw-download", f"{root}/raw.bin", str(work / "raw.out")),
                        ("ours-download", f"{root}/ours.bin", str(work / "ours.out"))]
            if args.only in ("all", "stream"):
                ops += [("stream-write", f"{root}/stream.bin", ""),
                        ("stream-read", f"{root}/stream.bin", "")]
            if args.only == "read":
                ops += [("raw-upload", f"{root}/read.bin", str(source)),
                        ("raw-download", f"{root}/read.bin", str(work / "raw.out")),
                        ("stream-read", f"{root}/read.bin", ""),
                        ("stream-read-async", f"{root}/read.bin", "")]
            for op, uri, local in ops:
                result = measure(op, uri, local, size, env)
                result["backend"] = kind
                rows.append(result)
                print(f"{kind:6} {op:17} {result['mib_s']:8.1f} MiB/s "
                      f"{result['seconds']:7.1f} s  peak RSS {result['peak_rss_mib']:6.0f} MiB",
                      flush=True)
                for leftover in ("raw.out", "ours.out"):
                    (work / leftover).unlink(missing_ok=True)
        finally:
            if server is not None:
                server.stop()
    print(json.dumps(rows))


def _create_bucket(kind: str, server, bucket: str) -> None:
    if kind == "s3":
        import boto3

        boto3.client("s3", endpoint_url=server.endpoint).create_bucket(Bucket=bucket)
    elif kind == "gcs":
        import urllib.request

        urllib.request.urlopen(urllib.request.Request(
            f"{server.endpoint}/storage/v1/b", method="POST",
            data=json.dumps({"name": bucket}).encode(),
            headers={"Content-Type": "application/json"}), timeout=10).close()
    else:
        from azure.storage.blob import BlobServiceClient

        with BlobServiceClient.from_connection_string(server.connection_string()) as client:
            client.create_container(bucket)


if __name__ == "__main__":
    main()
