"""Transfers as a real object store would shape them: each connection slow, each response
late, speed only from many connections at once.

Each emulator (moto, fake-gcs-server, Azurite) sits behind ``ShapingProxy``
(``checkpoint_testing.shaper``): every TCP connection gets its own bandwidth cap (64 MiB/s
down and 16 MiB/s up by default) and a first-byte delay per response (50 ms). Through it, for
a 1 GiB incompressible checkpoint:

- load: ours, one plain single-connection GET, and on S3 upstream's sync and async load;
  S3 twice: moto, and s3rver (npm), whose ranged GETs cost only their range;
- save (a directory): ours, one plain single-connection PUT, and on S3 upstream's; on GCS
  ours with one resumable stream (the default) and with parallel composite uploads;
- the local 1 GiB load pinned to one core (``taskset -c 0``) and to two;
- the restore of 20,000 files of 1 KiB against a minimal Python loop creating the same files.

Upstream's GCS and Azure clients have no setting that reaches an emulator, so those rows have
no upstream figure. Each operation runs in a fresh process. Needs the upstream venv (``bash
.ci/install-upstream.sh``) and the emulators (``bash .ci/install-emulators.sh``).
``checkpoint_bench.py --transfers all`` runs the same parts after its own table.

    python benchmarks/transfer_bench.py            # 1 GiB
    python benchmarks/transfer_bench.py --quick    # 128 MiB, a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_support import PROC_STATUS, UPSTREAM_VENV, Moto, S3rver, cpu_seconds
from checkpoint_testing.shaper import ShapingProxy

MiB = 1 << 20

CHILD = PROC_STATUS + r"""
import asyncio, json, os, sys, time
args = json.loads(sys.argv[1])
op = args["op"]
if op == "plain-get":
    import boto3, botocore.config
    s3 = boto3.client("s3", endpoint_url=args["endpoint"], region_name="us-east-1",
                      config=botocore.config.Config(max_pool_connections=1))
    t = time.perf_counter()
    body = s3.get_object(Bucket="bench", Key=args["key"])["Body"]
    while body.read(8 << 20):
        pass
elif op == "plain-put":
    import boto3, botocore.config
    s3 = boto3.client("s3", endpoint_url=args["endpoint"], region_name="us-east-1",
                      config=botocore.config.Config(max_pool_connections=1))
    with open(args["file"], "rb") as f:
        t = time.perf_counter()
        s3.put_object(Bucket="bench", Key=args["key"], Body=f)
elif op in ("plain-get-url", "plain-put-url"):
    # One HTTP request over one connection, to a pre-signed URL (Azure: a SAS URL).
    import http.client, urllib.parse
    url = urllib.parse.urlsplit(args["url"])
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=600)
    target = url.path + "?" + url.query
    t = time.perf_counter()
    if op == "plain-get-url":
        connection.request("GET", target)
        response = connection.getresponse()
        assert response.status == 200, response.status
        while response.read(8 << 20):
            pass
    else:
        with open(args["file"], "rb") as f:
            connection.request(args.get("method", "PUT"), target, body=f, headers={
                **args.get("headers", {"x-ms-blob-type": "BlockBlob"}),
                "Content-Length": str(os.fstat(f.fileno()).st_size)})
        response = connection.getresponse()
        response.read()
        assert response.status in (200, 201), response.status
elif op == "restore-loop":
    # The file system's own speed: create the same tree with the fewest calls Python has.
    root = args["target"]
    t = time.perf_counter()
    data = b"x" * args["file_size"]
    made = set()
    for i in range(args["files"]):
        d = os.path.join(root, f"d{i // 1000}")
        if d not in made:
            os.makedirs(d); made.add(d)
        fd = os.open(os.path.join(d, f"f{i}.bin"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, data); os.close(fd)
else:
    import flyte
    if op == "save":
        cp = flyte.Checkpoint(args["dest"])
        t = time.perf_counter(); cp.save_sync(args["data"])
    else:
        cp = flyte.Checkpoint(args["dest"], args["src"])
        t = time.perf_counter()
        if op == "load-async":
            asyncio.run(cp.load())
        else:
            cp.load_sync()
cpu = os.times()
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss": status("VmHWM"),
                  "cpu": cpu.user + cpu.system}))
"""


def child(python: str, args: dict, env: dict[str, str] | None = None,
          pin: str | None = None) -> dict:
    command = [python, "-c", CHILD, json.dumps(args)]
    if pin:
        command = ["taskset", "-c", pin, *command]
    done = subprocess.run(command, capture_output=True, text=True, check=False,
                          env={**os.environ, **(env or {}), "FLYTE_CHECKPOINT_PROGRESS": "off"})
    if done.returncode != 0:
        raise RuntimeError(f"{args['op']} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _tree(root: Path, size: int) -> Path:
    root.mkdir(parents=True)
    for i in range(size // (4 * MiB)):
        (root / f"shard-{i}.bin").write_bytes(os.urandom(4 * MiB))
    return root


def shaped_s3(args: argparse.Namespace, work: Path, rows: list[tuple],
              server: type = Moto, store: str = "s3 shaped") -> None:
    """An S3 server behind the proxy: ours, upstream (sync and async) and one plain
    connection."""
    upstream = str(UPSTREAM_VENV / "bin" / "python")
    moto = server()
    try:
        data = work / "data" if (work / "data").exists() else _tree(work / "data", args.size)
        tarball = work / "object.bin"
        with ShapingProxy(moto.port, down=args.down * MiB, up=args.up * MiB,
                          first_byte=args.first_byte) as proxy:
            env = {**moto.env(), "AWS_ENDPOINT_URL": proxy.endpoint,
                   "FLYTE_AWS_ENDPOINT": proxy.endpoint}
            # One object for every load: ours, saved straight to moto (not through the proxy).
            child(sys.executable, {"op": "save", "dest": "s3://bench/loaded/_flytecheckpoints",
                                   "data": str(data)}, moto.env())
            import boto3

            credentials = moto.env()
            s3 = boto3.client("s3", endpoint_url=moto.endpoint, region_name="us-east-1",
                              aws_access_key_id=credentials["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=credentials["AWS_SECRET_ACCESS_KEY"])
            s3.download_file("bench", "loaded/_flytecheckpoints", str(tarball))
            src = "s3://bench/loaded/_flytecheckpoints"
            _measure(proxy, env, work, rows, store, "load", server_pid=moto.proc.pid, runs=[
                ("plain GET, one connection", sys.executable,
                 {"op": "plain-get", "endpoint": proxy.endpoint,
                  "key": "loaded/_flytecheckpoints"}),
                ("upstream load_sync", upstream,
                 {"op": "load", "dest": "s3://bench/x/a", "src": src}),
                ("upstream await load()", upstream,
                 {"op": "load-async", "dest": "s3://bench/x/b", "src": src}),
                ("ours load_sync", sys.executable,
                 {"op": "load", "dest": "s3://bench/x/c", "src": src}),
            ])
            _measure(proxy, env, work, rows, store, "save", server_pid=moto.proc.pid, runs=[
                ("plain PUT, one connection", sys.executable,
                 {"op": "plain-put", "endpoint": proxy.endpoint, "key": "put/one",
                  "file": str(tarball)}),
                ("upstream save_sync", upstream,
                 {"op": "save", "dest": "s3://bench/up/_flytecheckpoints", "data": str(data)}),
                ("ours save_sync", sys.executable,
                 {"op": "save", "dest": "s3://bench/ours/_flytecheckpoints", "data": str(data)}),
            ])
    finally:
        moto.stop()


def shaped_azure(args: argparse.Namespace, work: Path, rows: list[tuple]) -> None:
    """Azurite behind the proxy: ours and one plain connection (upstream's Azure client has
    no endpoint setting to reach an emulator)."""
    from datetime import datetime, timedelta, timezone

    from azure.storage.blob import BlobSasPermissions, BlobServiceClient, generate_blob_sas
    from checkpoint_testing.emulators import Azurite

    azurite = Azurite().start()
    try:
        data = work / "data" if (work / "data").exists() else _tree(work / "data", args.size)
        tarball = work / "object.bin"
        env = azurite.env()
        with BlobServiceClient.from_connection_string(azurite.connection_string()) as client:
            client.create_container("bench")
        child(sys.executable, {"op": "save", "dest": "abfs://bench/loaded/_flytecheckpoints",
                               "data": str(data)}, env)
        with BlobServiceClient.from_connection_string(azurite.connection_string()) as client:
            blob = client.get_blob_client("bench", "loaded/_flytecheckpoints")
            tarball.write_bytes(blob.download_blob(max_concurrency=4).readall())
        with ShapingProxy(azurite.port, down=args.down * MiB, up=args.up * MiB,
                          first_byte=args.first_byte) as proxy:
            def sas_url(name: str, **permissions: bool) -> str:
                from checkpoint_testing.emulators import AZURITE_ACCOUNT, AZURITE_KEY

                token = generate_blob_sas(
                    AZURITE_ACCOUNT, "bench", name, account_key=AZURITE_KEY,
                    permission=BlobSasPermissions(**permissions),
                    expiry=datetime.now(timezone.utc) + timedelta(hours=1))
                return f"{proxy.endpoint}/{AZURITE_ACCOUNT}/bench/{name}?{token}"

            shaped_env = {"AZURE_STORAGE_CONNECTION_STRING":
                          azurite.connection_string(proxy.endpoint)}
            src = "abfs://bench/loaded/_flytecheckpoints"
            _measure(proxy, shaped_env, work, rows, "az shaped", "load",
                     server_pid=azurite.process.pid, runs=[
                ("plain GET, one connection", sys.executable,
                 {"op": "plain-get-url", "url": sas_url("loaded/_flytecheckpoints", read=True)}),
                ("ours load_sync", sys.executable,
                 {"op": "load", "dest": "abfs://bench/x/c", "src": src}),
            ])
            _measure(proxy, shaped_env, work, rows, "az shaped", "save",
                     server_pid=azurite.process.pid, runs=[
                ("plain PUT, one connection", sys.executable,
                 {"op": "plain-put-url", "file": str(tarball),
                  "url": sas_url("put/one", write=True, create=True)}),
                ("ours save_sync", sys.executable,
                 {"op": "save", "dest": "abfs://bench/ours/_flytecheckpoints",
                  "data": str(data)}),
            ])
    finally:
        azurite.stop()


def shaped_gcs(args: argparse.Namespace, work: Path, rows: list[tuple]) -> None:
    """fake-gcs-server behind the proxy: ours (one resumable stream, and parallel composite
    uploads) and one plain connection. The server is told the proxy is its address, so that
    the resumable sessions it hands out go through the proxy too. (Upstream's GCS client has
    no emulator setting.)"""
    import urllib.parse
    import urllib.request

    from checkpoint_testing.emulators import FakeGCS

    data = work / "data" if (work / "data").exists() else _tree(work / "data", args.size)
    tarball = work / "object.bin"
    if not tarball.exists():
        child(sys.executable, {"op": "save", "dest": str(tarball), "data": str(data)})
    with ShapingProxy(0, down=args.down * MiB, up=args.up * MiB,
                      first_byte=args.first_byte) as proxy:
        class BehindProxy(FakeGCS):
            def arguments(self) -> list[str]:
                arguments = super().arguments()
                arguments[arguments.index("-external-url") + 1] = proxy.endpoint
                return arguments

        gcs = BehindProxy().start()
        try:
            proxy.upstream_port = gcs.port
            urllib.request.urlopen(urllib.request.Request(
                f"{gcs.endpoint}/storage/v1/b", data=json.dumps({"name": "bench"}).encode(),
                headers={"Content-Type": "application/json"}), timeout=30).close()
            name = "loaded/_flytecheckpoints"
            with open(tarball, "rb") as f:  # straight to the server, not through the proxy
                urllib.request.urlopen(urllib.request.Request(
                    f"{gcs.endpoint}/upload/storage/v1/b/bench/o?uploadType=media&name="
                    + urllib.parse.quote(name, safe=""), data=f, method="POST", headers={
                        "Content-Length": str(tarball.stat().st_size),
                        "Content-Type": "application/octet-stream"}), timeout=600).close()
            env = {**gcs.env(), "STORAGE_EMULATOR_HOST": proxy.endpoint}
            src = f"gs://bench/{name}"
            _measure(proxy, env, work, rows, "gcs shaped", "load",
                     server_pid=gcs.process.pid, runs=[
                ("plain GET, one connection", sys.executable,
                 {"op": "plain-get-url", "url": f"{proxy.endpoint}/storage/v1/b/bench/o/"
                  f"{urllib.parse.quote(name, safe='')}?alt=media"}),
                ("ours load_sync", sys.executable,
                 {"op": "load", "dest": "gs://bench/x/c", "src": src}),
            ])
            _measure(proxy, env, work, rows, "gcs shaped", "save",
                     server_pid=gcs.process.pid, runs=[
                ("plain PUT, one connection", sys.executable,
                 {"op": "plain-put-url", "file": str(tarball), "method": "POST",
                  "headers": {"Content-Type": "application/octet-stream"},
                  "url": f"{proxy.endpoint}/upload/storage/v1/b/bench/o?uploadType=media"
                         "&name=put%2Fone"}),
                ("ours save_sync", sys.executable,
                 {"op": "save", "dest": "gs://bench/ours/_flytecheckpoints", "data": str(data)}),
            ])
            _measure(proxy, {**env, "CHECKPOINT_IO_GCS_COMPOSITE": "1"}, work, rows,
                     "gcs shaped", "save", server_pid=gcs.process.pid, runs=[
                ("ours save_sync, composite", sys.executable,
                 {"op": "save", "dest": "gs://bench/composite/_flytecheckpoints",
                  "data": str(data)}),
            ])
        finally:
            gcs.stop()


def _measure(proxy: ShapingProxy, env: dict, work: Path, rows: list[tuple], store: str,
             op: str, runs: list[tuple], server_pid: int | None = None) -> None:
    for name, python, child_args in runs:
        proxy.stats.most_concurrent = 0
        proxy_cpu, server_cpu = time.process_time(), cpu_seconds(server_pid)
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            result = child(python, child_args, {**env, "TMPDIR": tmp})
        # What else ran on the same cores: the proxy (this process) and the emulator.
        result["proxy_cpu"] = time.process_time() - proxy_cpu
        result["server_cpu"] = cpu_seconds(server_pid) - server_cpu
        rows.append((store, op, name, result, proxy.stats.most_concurrent))
        print(_row(rows[-1]), flush=True)


def cores(args: argparse.Namespace, work: Path, rows: list[tuple]) -> None:
    data = work / "data" if (work / "data").exists() else _tree(work / "data", args.size)
    obj = work / "local-object"
    child(sys.executable, {"op": "save", "dest": str(obj), "data": str(data)})
    # A first load reads the object from disk (the save bypassed the page cache): not
    # counted. Then one core and two alternate, and each keeps its faster run.
    def load(pin: str) -> dict:
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            return child(sys.executable, {"op": "load", "dest": str(work / "unused"),
                                          "src": str(obj)}, {"TMPDIR": tmp}, pin=pin)

    load("0,1")
    best: dict[str, dict] = {}
    for pin in ("0", "0,1", "0,1", "0"):
        result = load(pin)
        if pin not in best or result["seconds"] < best[pin]["seconds"]:
            best[pin] = result
    for pin in ("0", "0,1"):
        rows.append(("file", "load", f"ours, cores {pin}", best[pin], 0))
        print(_row(rows[-1]), flush=True)


def small_files(args: argparse.Namespace, work: Path, rows: list[tuple]) -> None:
    tree = work / "small"
    for i in range(args.small):
        d = tree / f"d{i // 1000}"
        if i % 1000 == 0:
            d.mkdir(parents=True)
        (d / f"f{i}.bin").write_bytes(b"x" * 1024)
    obj = work / "small-object"
    child(sys.executable, {"op": "save", "dest": str(obj), "data": str(tree)})
    # Nothing is deleted until every run is done: on a file system mounted with online
    # discard (as here), deleting 20,000 files slows the creates of the next ten seconds or
    # more by up to 20x, which fell on whichever run came next. Runs alternate.
    runs = work / "small-runs"
    runs.mkdir()
    for round_ in range(3):
        for name in ("minimal create loop", "ours restore"):
            tmp = runs / f"{round_}-{name.split()[0]}"
            tmp.mkdir()
            if name == "ours restore":
                result = child(sys.executable, {"op": "load", "dest": str(work / "unused"),
                                                "src": str(obj)}, {"TMPDIR": str(tmp)})
            else:
                result = child(sys.executable, {"op": "restore-loop", "target": str(tmp),
                                                "files": args.small, "file_size": 1024})
            rows.append(("file", f"{args.small:,} x 1 KiB", f"{name} #{round_ + 1}", result, 0))
            print(_row(rows[-1]), flush=True)


def _row(row: tuple) -> str:
    store, op, name, result, width = row
    return (f"{store:10} {op:18} {name:28} {result['seconds']:8.2f} s"
            f"  peak RSS {result['peak_rss'] / MiB:6.0f} MiB  CPU {result['cpu']:6.2f} s"
            + (f"  connections at once {width}" if width else "")
            + (f"  proxy CPU {result['proxy_cpu']:5.2f} s  server CPU {result['server_cpu']:5.2f} s"
               if "proxy_cpu" in result else ""))


def add_arguments(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """The shaping options; ``checkpoint_bench.py`` takes them too, prefixed ``transfer-``."""
    parser.add_argument(f"--{prefix}down", type=float, default=64,
                        help="MiB/s per connection, reads (default 64)")
    parser.add_argument(f"--{prefix}up", type=float, default=16,
                        help="MiB/s per connection, writes (default 16)")
    parser.add_argument(f"--{prefix}first-byte", type=float, default=0.05,
                        help="seconds before each response's first byte (default 0.05)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    add_arguments(parser)
    parser.add_argument("--parts", default=PARTS, help=f"comma list of {PARTS}")
    parser.add_argument("--workdir", default=None)
    return run(parser.parse_args())


PARTS = "azure,s3,s3rver,gcs,cores,small"


def run(args: argparse.Namespace) -> int:
    """Every part named in ``args.parts``; prints the rows as they come, then the ratios."""
    args.size = 128 * MiB if args.quick else 1 << 30
    args.small = 2_000 if args.quick else 20_000
    if not (UPSTREAM_VENV / "bin" / "python").exists():
        sys.exit(f"upstream SDK not found at {UPSTREAM_VENV}: run `bash .ci/install-upstream.sh`")
    work = Path(tempfile.mkdtemp(prefix="transfer-bench-", dir=args.workdir))
    rows: list[tuple] = []
    started = time.perf_counter()
    try:
        parts = args.parts.split(",")
        if "azure" in parts:
            shaped_azure(args, work, rows)
        if "s3" in parts:
            shaped_s3(args, work, rows)
        if "s3rver" in parts:
            shaped_s3(args, work, rows, S3rver, "s3rver shaped")
        if "gcs" in parts:
            shaped_gcs(args, work, rows)
        if "cores" in parts:
            cores(args, work, rows)
        if "small" in parts:
            small_files(args, work, rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n({time.perf_counter() - started:.0f} s in all)")
    by = {(r[0], r[1], r[2]): r[3]["seconds"] for r in rows}
    ratios = []
    for store in ("az shaped", "s3 shaped", "s3rver shaped", "gcs shaped"):
        if (store, "load", "ours load_sync") in by:
            plain = by[(store, "load", "plain GET, one connection")]
            ratios.append(f"{store}: load vs one plain GET:"
                          f" {plain / by[(store, 'load', 'ours load_sync')]:.1f}x (target 6x)")
        if (store, "load", "upstream load_sync") in by:
            upstream = min(by[(store, "load", "upstream load_sync")],
                           by[(store, "load", "upstream await load()")])
            ratios.append(f"{store}: load vs upstream's faster load:"
                          f" {upstream / by[(store, 'load', 'ours load_sync')]:.1f}x"
                          " (target 1.5x)")
        if (store, "save", "ours save_sync") in by:
            plain = by[(store, "save", "plain PUT, one connection")]
            ratios.append(f"{store}: save vs one plain PUT:"
                          f" {plain / by[(store, 'save', 'ours save_sync')]:.1f}x (target 3x)")
        if (store, "save", "ours save_sync, composite") in by:
            plain = by[(store, "save", "plain PUT, one connection")]
            composite = by[(store, "save", "ours save_sync, composite")]
            ratios.append(f"{store}: composite save vs one plain PUT: {plain / composite:.1f}x"
                          " (target 3x)")
    by = {(r[1], r[2]): r[3]["seconds"] for r in rows}
    if ("load", "ours, cores 0") in by:
        one, two = by[("load", "ours, cores 0")], by[("load", "ours, cores 0,1")]
        ratios.append(f"local load, two cores vs one: {one / two:.2f}x (target 1.6x)")
    small = [r for r in rows if r[1].endswith("x 1 KiB")]
    if small:
        loop = min(r[3]["seconds"] for r in small if r[2].startswith("minimal"))
        ours = min(r[3]["seconds"] for r in small if r[2].startswith("ours"))
        ratios.append(f"small files, ours vs the minimal create loop: {ours / loop:.2f}x"
                      " (target <= 2x)")
    print("\n".join(ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
