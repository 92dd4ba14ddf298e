"""Where a transfer's CPU goes: per process, per thread, and the speed that implies.

A load or a save is capped by its busiest thread, whatever the machine: a thread that spends
B CPU-seconds per GiB cannot move more than 1/B GiB/s, however many cores and however fast
the network. On a small machine, wall-clock times mostly measure the other processes on the
same cores; CPU-seconds do not. So each row here runs one operation in a fresh child process
that reports its own CPU time (``getrusage``) and every thread's (``/proc/self/task/*``,
sampled while it runs, named by Python thread name or else the kernel's ``comm``), for:

- 1 GiB in 8 incompressible files (a directory checkpoint), over http and over TLS, against
  ``checkpoint_testing.mini_s3`` (a minimal S3 server that serves ranges with ``sendfile``,
  so it costs the client's cores little) with a certificate made at run time:
  our ``load_sync``/``save_sync`` on each data path the checkout has, upstream's
  ``flyte.Checkpoint`` in its own venv, raw obstore ``get_range`` (16 x 8 MiB in flight) and
  raw botocore (16 threads of 8 MiB ranged GETs); and ours with every thread pool and the
  requests in flight set wider than the cores (``--wide``, default 8);
- through ``checkpoint_testing.shaper`` (64 MiB/s down, 16 MiB/s up, 50 ms first byte per
  connection) in front of mini_s3 (or moto: ``--shaped moto,...``), fake-gcs-server and
  Azurite: a 512 MiB load and save of ours against one plain GET/PUT of the same object, and
  upstream's load on S3.

Then a table of the targets of issue 17 beside the figures (PASS/MISS), or ``--markdown``
rows for the README. Columns: wall s (not comparable under load), process CPU-s per GiB,
the busiest thread's CPU-s per GiB and its name, the ceiling that implies (GB/s), peak RSS.

    python benchmarks/cpu_bench.py                      # everything, ~10 minutes
    python benchmarks/cpu_bench.py --quick              # 256 MiB / 128 MiB, a smoke run
    python benchmarks/cpu_bench.py --size 1GiB --rows ours-load,ours-save --schemes tls
    python benchmarks/cpu_bench.py --markdown --json out.json
    python benchmarks/cpu_bench.py --rows ours-load,ours-save --before main~3   # A/B

``--before REF`` runs our rows a second time, in the same run, from a git worktree of
``REF`` (its packages put first on ``PYTHONPATH``): ``before ...`` rows beside ``ours ...``,
and the fallback target compares the two instead of the figures recorded below.

Needs the upstream venv (``bash .ci/install-upstream.sh``) for upstream's rows and the raw
obstore row when obstore is not installed here; the emulators for the shaped rows. A row
that cannot run here prints ``n/a`` and why.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench_support import PROC_STATUS, UPSTREAM_VENV, Moto, cpu_seconds

MiB = 1 << 20
GiB = 1 << 30

#: The child, the same for every interpreter: the operation, its wall time, the process's
#: CPU (getrusage: exited threads included) and each thread's, sampled every 20 ms from
#: /proc/self/task/*/schedstat (nanoseconds on CPU; stat's clock ticks without it).
CHILD = PROC_STATUS + r"""
import json, os, resource, sys, threading, time
args = json.loads(sys.argv[1])
op = args["op"]
TICK = os.sysconf("SC_CLK_TCK")

def thread_cpu(tid):
    try:
        with open(f"/proc/self/task/{tid}/schedstat") as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open(f"/proc/self/task/{tid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    except OSError:
        return None

def comm(tid):
    try:
        with open(f"/proc/self/task/{tid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"

class Sampler:
    def __init__(self):
        self.names, self.last, self.base = {}, {}, {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, name="cpu-bench-sampler", daemon=True)

    def sample(self):
        python = {t.native_id: t.name for t in threading.enumerate()}
        for name in os.listdir("/proc/self/task"):
            tid = int(name)
            cpu = thread_cpu(tid)
            if cpu is None:
                continue
            if tid not in self.names:
                self.names[tid] = python.get(tid) or comm(tid)
            elif tid in python:
                self.names[tid] = python[tid]
            self.last[tid] = cpu

    def start(self):
        self.sample()
        self.base = dict(self.last)
        self.thread.start()

    def run(self):
        while not self.stop.wait(0.02):
            self.sample()

    def finish(self):
        self.stop.set()
        self.thread.join()
        self.sample()
        me = self.thread.native_id
        return [[self.names[t], round(self.last[t] - self.base.get(t, 0.0), 4)]
                for t in self.last if t != me and self.last[t] - self.base.get(t, 0.0) > 0.0005]

def ranges(size, piece):
    return [(start, min(size, start + piece)) for start in range(0, size, piece)]

def prepare():
    # Everything before the clock starts: imports, clients, the object's size.
    global cp, run
    if op in ("load", "save"):
        import flyte
        if op == "save":
            cp = flyte.Checkpoint(args["dest"])
            run = lambda: cp.save_sync(args["data"])
        else:
            cp = flyte.Checkpoint(args["dest"], args["src"])
            run = cp.load_sync
    elif op == "load-async":
        import asyncio, flyte
        cp = flyte.Checkpoint(args["dest"], args["src"])
        run = lambda: asyncio.run(cp.load())
    elif op == "obstore-ranges":
        import asyncio, obstore
        from obstore.store import S3Store
        store = S3Store(args["bucket"], endpoint=os.environ["AWS_ENDPOINT_URL"],
                        access_key_id=os.environ["AWS_ACCESS_KEY_ID"],
                        secret_access_key=os.environ["AWS_SECRET_ACCESS_KEY"],
                        region="us-east-1", client_options={"allow_http": True})
        size = obstore.head(store, args["key"])["size"]
        async def read_all():
            gate = asyncio.Semaphore(args["width"])
            async def one(start, end):
                async with gate:
                    got = await obstore.get_range_async(store, args["key"], start=start, end=end)
                    assert len(memoryview(got)) == end - start
            await asyncio.gather(*(one(s, e) for s, e in ranges(size, args["piece"])))
        run = lambda: asyncio.run(read_all())
    elif op == "botocore-ranges":
        import boto3, botocore.config
        from concurrent.futures import ThreadPoolExecutor
        s3 = boto3.client("s3", config=botocore.config.Config(
            max_pool_connections=args["width"], retries={"max_attempts": 1}))
        size = s3.head_object(Bucket=args["bucket"], Key=args["key"])["ContentLength"]
        def one(span):
            body = s3.get_object(Bucket=args["bucket"], Key=args["key"],
                                 Range=f"bytes={span[0]}-{span[1] - 1}")["Body"]
            got = 0
            while piece := body.read(1 << 20):
                got += len(piece)
            assert got == span[1] - span[0]
        def read_all():
            with ThreadPoolExecutor(args["width"], thread_name_prefix="botocore-get") as pool:
                list(pool.map(one, ranges(size, args["piece"])))
        run = read_all
    elif op in ("plain-get", "plain-put"):
        import boto3, botocore.config
        s3 = boto3.client("s3", config=botocore.config.Config(max_pool_connections=1))
        if op == "plain-get":
            def run():
                body = s3.get_object(Bucket=args["bucket"], Key=args["key"])["Body"]
                while body.read(8 << 20):
                    pass
        else:
            def run():
                with open(args["file"], "rb") as f:
                    s3.put_object(Bucket=args["bucket"], Key=args["key"], Body=f)
    elif op in ("plain-get-url", "plain-put-url"):
        # One HTTP request over one connection, to a pre-signed URL (Azure: a SAS URL).
        import http.client, urllib.parse
        url = urllib.parse.urlsplit(args["url"])
        connection = http.client.HTTPConnection(url.hostname, url.port, timeout=600)
        target = url.path + "?" + url.query
        def run():
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
    else:
        raise SystemExit(f"unknown op {op}")

prepare()
open("/proc/self/clear_refs", "w").write("5")  # reset the RSS high-water mark
sampler = Sampler()
sampler.start()
usage = resource.getrusage(resource.RUSAGE_SELF)
started = time.perf_counter()
run()
seconds = time.perf_counter() - started
after = resource.getrusage(resource.RUSAGE_SELF)
threads = sampler.finish()
print(json.dumps({
    "seconds": seconds,
    "cpu": after.ru_utime - usage.ru_utime + after.ru_stime - usage.ru_stime,
    "cpu_sys": after.ru_stime - usage.ru_stime,
    "threads": threads,
    "peak_rss": status("VmHWM"),
}))
"""


# ---------------------------------------------------------------------- rows


@dataclass
class Row:
    part: str  # "http", "tls", "tls wide", "s3 shaped", ...
    what: str  # "ours load_sync (obstore)", ...
    op: str  # load / save / read
    size: int = 0
    result: dict | None = None
    note: str = ""  # why n/a, or what else
    server_cpu: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def gib(self) -> float:
        return self.size / GiB

    def per_gib(self, seconds: float) -> float:
        return seconds / self.gib

    def busiest(self) -> tuple[str, float]:
        threads = (self.result or {}).get("threads") or [["-", 0.0]]
        name, cpu = max(threads, key=lambda t: t[1])
        return name, cpu

    def groups(self) -> list[tuple[str, float, int]]:
        """CPU per thread group: names with their trailing index dropped (``pool_3``)."""
        found: dict[str, list[float]] = {}
        for name, cpu in (self.result or {}).get("threads", []):
            found.setdefault(re.sub(r"[-_ ]?\d+$", "", name) or name, []).append(cpu)
        return sorted(((g, sum(c), len(c)) for g, c in found.items()), key=lambda x: -x[1])

    def line(self) -> str:
        head = f"{self.part:10} {self.what:44}"
        if self.result is None:
            return f"{head} n/a: {self.note}"
        r = self.result
        name, busiest = self.busiest()
        ceiling = GiB / 1e9 / self.per_gib(busiest) if busiest else float("inf")
        text = (f"{head} {r['seconds']:7.2f} s  {self.per_gib(r['cpu']):5.2f} CPU-s/GiB"
                f"  busiest {self.per_gib(busiest):5.2f} ({name[:22]})"
                f"  ceiling {ceiling:5.2f} GB/s  RSS {r['peak_rss'] / MiB:5.0f} MiB")
        if self.server_cpu is not None:
            text += f"  server CPU {self.server_cpu:5.2f} s"
        if self.note:
            text += f"  {self.note}"
        return text


def child(python: str, args: dict, env: dict[str, str], timeout: float = 900) -> dict:
    command = [python, "-c", CHILD, json.dumps(args)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False,
                              timeout=timeout,
                              env={**os.environ, **env, "FLYTE_CHECKPOINT_PROGRESS": "off"})
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"{args['op']} did not finish within {timeout:.0f} s") from exc
    lines = done.stdout.strip().splitlines()
    result = None
    if lines and lines[-1].startswith("{"):
        result = json.loads(lines[-1])
    if done.returncode != 0:
        status = (f"signal {signal.Signals(-done.returncode).name}" if done.returncode < 0
                  else f"exit status {done.returncode}")
        said = [line for line in done.stderr.splitlines() if line.strip()]
        if result is None:
            raise RuntimeError(f"{args['op']} failed ({status})"
                               + (f": {said[-1].strip()}" if said else ", nothing on stderr"))
        # The operation finished and reported; the process died after (at exit, say).
        result["exit"] = status + (f": {said[-1].strip()}" if said else "")
    if result is None:
        raise RuntimeError(f"{args['op']} reported nothing: {done.stdout[-300:]!r}")
    return result


def measure(row: Row, python: str, args: dict, env: dict[str, str], work: Path,
            server_pid: int | None = None, repeat: int = 1) -> Row:
    """Run the row's child ``repeat`` times (each in a fresh process, with its own
    TMPDIR), keep the run with the least process CPU, print the row."""
    best = None
    for _ in range(repeat):
        before = cpu_seconds(server_pid)
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            try:
                result = child(python, args, {**env, "TMPDIR": tmp})
            except RuntimeError as exc:
                row.note = str(exc).strip()[:300]
                print(row.line(), flush=True)
                return row
            if "exit" in result:
                row.note = f"the process then died: {result['exit']}"[:300]
        server = cpu_seconds(server_pid) - before if server_pid else None
        if best is None or result["cpu"] < best[0]["cpu"]:
            best = (result, server)
    row.result, row.server_cpu = best
    print(row.line(), flush=True)
    return row


# ---------------------------------------------------------------------- what the checkout has


def data_paths() -> tuple[list[str | None], str]:
    """The data paths ours can be told to take (``CHECKPOINT_IO_DATA_PATH``), fastest first,
    and a note. ``[None]`` when the checkout has one path only."""
    try:
        from flyte_checkpoint._settings import VARIABLES
    except ImportError as exc:
        return [], f"flyte_checkpoint not importable here: {exc}"
    if not any(v.name == "CHECKPOINT_IO_DATA_PATH" for v in VARIABLES):
        return [None], "one data path (fsspec) in this checkout"
    paths = []
    try:
        import obstore  # noqa: F401

        paths.append("obstore")
    except ImportError:
        pass
    return [*paths, "fsspec"], "" if paths else "obstore not installed: fsspec only"


REPO = Path(__file__).resolve().parents[1]


def before_tree(ref: str, where: Path) -> tuple[dict[str, str], list[str | None]]:
    """A worktree of ``ref`` at ``where``: the environment that makes a child import its
    packages instead of this checkout's, and the data paths it has (fsspec alone before
    issue 17, which ``CHECKPOINT_IO_DATA_PATH`` then does not reach)."""
    done = subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(where),
                           ref], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"--before {ref}: git worktree add failed: {done.stderr.strip()}")
    sources = sorted(str(src) for src in where.glob("packages/*/src"))
    env = {"PYTHONPATH": os.pathsep.join([*sources, os.environ.get("PYTHONPATH", "")])}
    has_obstore = (where / "packages/checkpoint-io/src/checkpoint_io/_obstore.py").exists()
    ours, _ = data_paths()
    paths = [p for p in ours if p == "fsspec" or (p == "obstore" and has_obstore)]
    print(f"before: {ref} at {where}, data paths {', '.join(map(str, paths))}", flush=True)
    return env, paths


def wide_env(width: int) -> dict[str, str]:
    """Every thread-count setting (``CHECKPOINT_*_THREADS``), the requests in flight
    (``CHECKPOINT_IO_CONCURRENCY``, ``CHECKPOINT_IO_READ_CONCURRENCY``) and obstore's
    runtime threads (``TOKIO_WORKER_THREADS``: one per core by default, so 2 here) set to
    ``width``, as on a node with the cores and the memory for them."""
    from flyte_checkpoint._settings import VARIABLES

    wide = {v.name: str(width) for v in VARIABLES if v.setting.endswith("_threads")}
    return {**wide, "CHECKPOINT_IO_CONCURRENCY": str(width),
            "CHECKPOINT_IO_READ_CONCURRENCY": str(width), "TOKIO_WORKER_THREADS": str(width)}


def python_with(module: str) -> str | None:
    """This interpreter if it imports ``module``, else the upstream venv's if that does."""
    for python in (sys.executable, str(UPSTREAM_VENV / "bin" / "python")):
        if Path(python).exists() and subprocess.run(
                [python, "-c", f"import {module}"], capture_output=True).returncode == 0:
            return python
    return None


def make_tree(root: Path, size: int, files: int = 8) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        with open(root / f"shard-{i}.bin", "wb") as f:
            left = size // files
            while left:
                step = min(left, 64 * MiB)
                f.write(os.urandom(step))
                left -= step
    return root


# ---------------------------------------------------------------------- loopback parts


def loopback(args: argparse.Namespace, work: Path, rows: list[Row]) -> None:
    from checkpoint_testing.mini_s3 import MiniS3

    data = make_tree(work / "data", args.size)
    upstream_size = min(args.size, args.upstream_save_size)
    upstream_data = data if upstream_size == args.size else work / "upstream-data"
    upstream = str(UPSTREAM_VENV / "bin" / "python")
    has_upstream = Path(upstream).exists()
    paths, paths_note = data_paths()
    obstore_python = python_with("obstore")
    src_key = "loaded/_flytecheckpoints"
    with MiniS3(tls=True) as server:
        import boto3

        admin = boto3.client("s3", endpoint_url=server.http_endpoint, region_name="us-east-1",
                             aws_access_key_id="mini", aws_secret_access_key="mini-secret")

        def clear(prefix: str) -> None:
            for item in admin.list_objects_v2(Bucket="bench", Prefix=prefix).get(
                    "Contents", []):
                admin.delete_object(Bucket="bench", Key=item["Key"])

        # The object every load reads: ours, saved over plain http (also a warm-up).
        child(sys.executable, {"op": "save", "dest": f"s3://bench/{src_key}",
                               "data": str(data)}, server.env(tls=False))
        size = admin.head_object(Bucket="bench", Key=src_key)["ContentLength"]
        src = f"s3://bench/{src_key}"
        n = 0

        def run(part: str, what: str, op: str, python: str | None, child_args: dict,
                env: dict[str, str], note: str = "", saved: int | None = None) -> None:
            nonlocal n
            if not args.wants(what, part):
                return
            row = Row(part, what, op, size if op != "save" else saved or args.size)
            if python is None:
                row.note = note
                rows.append(row)
                print(row.line(), flush=True)
                return
            n += 1
            if saved and saved != args.size:
                row.note = f"({saved / MiB:.0f} MiB saved, figures per GiB)"
            rows.append(measure(row, python, child_args, env, work, server.pid, args.repeat))
            if op == "save":
                clear(child_args["dest"].split("/", 3)[3].rsplit("/", 1)[0])

        for scheme in args.schemes:
            env = server.env(tls=scheme == "tls")
            for path in paths:
                label = f" ({path})" if path else ""
                path_env = {**env, "CHECKPOINT_IO_DATA_PATH": path} if path else env
                for who, who_env in (("ours", {}), ("before", args.before_env)):
                    if who_env is None or (who == "before" and path not in args.before_paths):
                        continue
                    run(scheme, f"{who} load_sync{label}", "load", sys.executable,
                        {"op": "load", "dest": f"s3://bench/x{n}/_ckpt", "src": src},
                        {**path_env, **who_env})
                    run(scheme, f"{who} save_sync{label}", "save", sys.executable,
                        {"op": "save", "dest": f"s3://bench/ours{n}/_ckpt",
                         "data": str(data)}, {**path_env, **who_env})
            if not paths:
                run(scheme, "ours load_sync", "load", None, {}, env, paths_note)
            elif paths == ["fsspec"] or paths == [None]:
                run(scheme, "ours load_sync (obstore)", "load", None, {}, env, paths_note)
                run(scheme, "ours save_sync (obstore)", "save", None, {}, env, paths_note)
            missing = "no upstream venv: bash .ci/install-upstream.sh"
            run(scheme, "upstream load_sync", "load", upstream if has_upstream else None,
                {"op": "load", "dest": f"s3://bench/y{n}/_ckpt", "src": src}, env, missing)
            # Level-9 gzip on one thread, about 30 CPU-s per GiB: a smaller tree, per GiB.
            if has_upstream and args.wants("upstream save_sync") and not upstream_data.exists():
                make_tree(upstream_data, upstream_size)
            run(scheme, "upstream save_sync", "save", upstream if has_upstream else None,
                {"op": "save", "dest": f"s3://bench/up{n}/_ckpt", "data": str(upstream_data)},
                env, missing, saved=upstream_size)
            run(scheme, "raw obstore get_range, 16 x 8 MiB", "read", obstore_python,
                {"op": "obstore-ranges", "bucket": "bench", "key": src_key, "width": 16,
                 "piece": 8 * MiB}, env, "obstore not installed here nor upstream")
            run(scheme, "raw botocore, 16 threads x 8 MiB", "read", sys.executable,
                {"op": "botocore-ranges", "bucket": "bench", "key": src_key, "width": 16,
                 "piece": 8 * MiB}, env)
        if "tls" in args.schemes and paths:
            env = {**server.env(), **wide_env(args.wide)}
            part = f"tls pools {args.wide}"
            for who, who_env in (("ours", {}), ("before", args.before_env)):
                if who_env is None:
                    continue
                run(part, f"{who} load_sync", "load", sys.executable,
                    {"op": "load", "dest": "s3://bench/w/_ckpt", "src": src}, {**env, **who_env})
                run(part, f"{who} save_sync", "save", sys.executable,
                    {"op": "save", "dest": "s3://bench/wide/_ckpt", "data": str(data)},
                    {**env, **who_env})
    shutil.rmtree(data, ignore_errors=True)
    shutil.rmtree(upstream_data, ignore_errors=True)


# ---------------------------------------------------------------------- shaped parts


def shaped(args: argparse.Namespace, work: Path, rows: list[Row]) -> None:
    from checkpoint_testing.shaper import ShapingProxy

    data = make_tree(work / "shaped-data", args.shaped_size)
    tarball = work / "object.bin"
    # The object all loads read and the plain PUT sends: ours, saved to a local file.
    child(sys.executable, {"op": "save", "dest": str(tarball), "data": str(data)}, {})
    size = tarball.stat().st_size
    shaping = {"down": args.down * MiB, "up": args.up * MiB, "first_byte": args.first_byte}
    name = "loaded/_flytecheckpoints"

    def measure_all(part: str, proxy: ShapingProxy, env: dict, runs: list[tuple],
                    server_pid: int | None) -> None:
        for what, op, python, child_args, *extra_env in runs:
            if not args.wants(what, part):
                continue
            row = Row(part, what, op, size)
            proxy.stats.most_concurrent = 0
            run_env = {**env, **(extra_env[0] if extra_env else {})}
            proxy_cpu = time.process_time()  # the proxy runs in this process
            rows.append(measure(row, python, child_args, run_env, work, server_pid))
            row.extra["connections"] = proxy.stats.most_concurrent
            row.extra["proxy_cpu"] = round(time.process_time() - proxy_cpu, 2)
            print(f"{'':55} connections at once {row.extra['connections']},"
                  f" proxy CPU {row.extra['proxy_cpu']:.2f} s", flush=True)

    for store in args.shaped:
        part = {"s3": "s3 shaped", "moto": "s3 shaped (moto)", "gcs": "gcs shaped",
                "azure": "az shaped"}[store]
        try:
            if store in ("s3", "moto"):
                _shaped_s3(data, tarball, name, shaping, measure_all, moto=store == "moto")
            else:
                {"gcs": _shaped_gcs, "azure": _shaped_azure}[store](
                    data, tarball, name, shaping, measure_all)
        except Exception as exc:  # an emulator missing: n/a, the other parts go on
            row = Row(part, "(all)", "-", size, note=f"{type(exc).__name__}: {exc}"[:200])
            rows.append(row)
            print(row.line(), flush=True)
    shutil.rmtree(data, ignore_errors=True)
    tarball.unlink(missing_ok=True)


def _shaped_s3(data, tarball, name, shaping, measure_all, moto: bool = False) -> None:
    """S3 behind the proxy: mini_s3 by default; moto reads the whole object to serve each
    range, so on moto a parallel load measures moto (44 CPU-s of moto for 512 MiB)."""
    import boto3
    from checkpoint_testing.mini_s3 import MiniS3
    from checkpoint_testing.shaper import ShapingProxy

    if moto:
        server = Moto()
        endpoint, port, pid, env = server.endpoint, server.port, server.proc.pid, server.env()
        part = "s3 shaped (moto)"
    else:
        server = MiniS3().start()
        endpoint, port, pid, env = server.endpoint, server.port, server.pid, server.env()
        part = "s3 shaped"
    try:
        admin = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                             aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                             aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
        admin.upload_file(str(tarball), "bench", name)  # straight to the server
        upstream = str(UPSTREAM_VENV / "bin" / "python")
        src = f"s3://bench/{name}"
        with ShapingProxy(port, **shaping) as proxy:
            env = {**env, "AWS_ENDPOINT_URL": proxy.endpoint,
                   "FLYTE_AWS_ENDPOINT": proxy.endpoint}
            runs = [
                ("plain GET, one connection", "load", sys.executable,
                 {"op": "plain-get", "bucket": "bench", "key": name}),
                ("ours load_sync", "load", sys.executable,
                 {"op": "load", "dest": "s3://bench/x/c", "src": src}),
                ("plain PUT, one connection", "save", sys.executable,
                 {"op": "plain-put", "bucket": "bench", "key": "put/one",
                  "file": str(tarball)}),
                ("ours save_sync", "save", sys.executable,
                 {"op": "save", "dest": "s3://bench/ours/_ckpt", "data": str(data)}),
            ]
            if Path(upstream).exists():
                runs[2:2] = [
                    ("upstream load_sync", "load", upstream,
                     {"op": "load", "dest": "s3://bench/x/u", "src": src}),
                    ("upstream await load()", "load", upstream,
                     {"op": "load-async", "dest": "s3://bench/x/v", "src": src}),
                ]
            measure_all(part, proxy, env, runs, pid)
    finally:
        server.stop()


def _shaped_gcs(data, tarball, name, shaping, measure_all) -> None:
    import urllib.parse
    import urllib.request

    from checkpoint_testing.emulators import FakeGCS
    from checkpoint_testing.shaper import ShapingProxy

    with ShapingProxy(0, **shaping) as proxy:
        # The server is told the proxy is its address, so that the resumable sessions it
        # hands out go through the proxy too.
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
            with open(tarball, "rb") as f:  # straight to the server, not through the proxy
                urllib.request.urlopen(urllib.request.Request(
                    f"{gcs.endpoint}/upload/storage/v1/b/bench/o?uploadType=media&name="
                    + urllib.parse.quote(name, safe=""), data=f, method="POST", headers={
                        "Content-Length": str(tarball.stat().st_size),
                        "Content-Type": "application/octet-stream"}), timeout=600).close()
            env = {**gcs.env(), "STORAGE_EMULATOR_HOST": proxy.endpoint}
            quoted = urllib.parse.quote(name, safe="")
            measure_all("gcs shaped", proxy, env, [
                ("plain GET, one connection", "load", sys.executable,
                 {"op": "plain-get-url",
                  "url": f"{proxy.endpoint}/storage/v1/b/bench/o/{quoted}?alt=media"}),
                ("ours load_sync", "load", sys.executable,
                 {"op": "load", "dest": "gs://bench/x/c", "src": f"gs://bench/{name}"}),
                ("plain PUT, one connection", "save", sys.executable,
                 {"op": "plain-put-url", "file": str(tarball), "method": "POST",
                  "headers": {"Content-Type": "application/octet-stream"},
                  "url": f"{proxy.endpoint}/upload/storage/v1/b/bench/o?uploadType=media"
                         "&name=put%2Fone"}),
                ("ours save_sync", "save", sys.executable,
                 {"op": "save", "dest": "gs://bench/ours/_ckpt", "data": str(data)}),
                ("ours save_sync, composite", "save", sys.executable,
                 {"op": "save", "dest": "gs://bench/composite/_ckpt", "data": str(data)},
                 {"CHECKPOINT_IO_GCS_COMPOSITE": "1"}),
            ], gcs.process.pid)
        finally:
            gcs.stop()


def _shaped_azure(data, tarball, name, shaping, measure_all) -> None:
    from datetime import datetime, timedelta, timezone

    from azure.storage.blob import BlobSasPermissions, BlobServiceClient, generate_blob_sas
    from checkpoint_testing.emulators import AZURITE_ACCOUNT, AZURITE_KEY, Azurite
    from checkpoint_testing.shaper import ShapingProxy

    azurite = Azurite().start()
    try:
        with BlobServiceClient.from_connection_string(azurite.connection_string()) as client:
            client.create_container("bench")
            with open(tarball, "rb") as f:
                client.get_blob_client("bench", name).upload_blob(f, max_concurrency=4)
        with ShapingProxy(azurite.port, **shaping) as proxy:
            def sas_url(blob: str, **permissions: bool) -> str:
                token = generate_blob_sas(
                    AZURITE_ACCOUNT, "bench", blob, account_key=AZURITE_KEY,
                    permission=BlobSasPermissions(**permissions),
                    expiry=datetime.now(timezone.utc) + timedelta(hours=1))
                return f"{proxy.endpoint}/{AZURITE_ACCOUNT}/bench/{blob}?{token}"

            env = {"AZURE_STORAGE_CONNECTION_STRING": azurite.connection_string(proxy.endpoint)}
            measure_all("az shaped", proxy, env, [
                ("plain GET, one connection", "load", sys.executable,
                 {"op": "plain-get-url", "url": sas_url(name, read=True)}),
                ("ours load_sync", "load", sys.executable,
                 {"op": "load", "dest": "abfs://bench/x/c", "src": f"abfs://bench/{name}"}),
                ("plain PUT, one connection", "save", sys.executable,
                 {"op": "plain-put-url", "file": str(tarball),
                  "url": sas_url("put/one", write=True, create=True)}),
                ("ours save_sync", "save", sys.executable,
                 {"op": "save", "dest": "abfs://bench/ours/_ckpt", "data": str(data)}),
            ], azurite.process.pid)
    finally:
        azurite.stop()


# ---------------------------------------------------------------------- targets and output


#: Main before issue 17 (8edd1db, this script, 1 GiB, TLS, on the 2-core development VM
#: shared with other work): process CPU-s per GiB of ``load_sync``/``save_sync``, the median
#: of three runs (3.81-4.43 and 3.80-4.07). The fallback path must stay within 15% of them,
#: about that spread.
BEFORE = {"load": 4.38, "save": 4.03}
TOLERANCE = 1.15


@dataclass
class Target:
    what: str
    figure: str
    ok: bool | None  # None: no figure

    @property
    def verdict(self) -> str:
        return "n/a" if self.ok is None else ("PASS" if self.ok else "MISS")


def _find(rows: list[Row], part: str, what: str) -> Row | None:
    for row in rows:
        if row.part == part and row.what == what and row.result is not None:
            return row
    return None


def targets(rows: list[Row], args: argparse.Namespace) -> list[Target]:
    found: list[Target] = []
    paths, _ = data_paths()
    default = f" ({paths[0]})" if paths and paths[0] else ""
    limits = {"load": (0.8, 3.5), "save": (0.8, 2.5)}
    for op, (thread_cap, process_cap) in limits.items():
        row = _find(rows, "tls", f"ours {op}_sync{default}")
        if row is None:
            if args.wants(f"ours {op}_sync") and "tls" in args.schemes:
                found.append(Target(f"{op}, TLS: busiest thread <= {thread_cap}, process <="
                                    f" {process_cap} CPU-s/GiB", "-", None))
            continue
        name, busiest = row.busiest()
        found.append(Target(f"{op}, TLS: busiest thread <= {thread_cap} CPU-s/GiB",
                            f"{row.per_gib(busiest):.2f} ({name})",
                            row.per_gib(busiest) <= thread_cap))
        cpu = row.per_gib(row.result["cpu"])
        found.append(Target(f"{op}, TLS: process <= {process_cap} CPU-s/GiB", f"{cpu:.2f}",
                            cpu <= process_cap))
    for op in ("load", "save"):
        row = _find(rows, f"tls pools {args.wide}", f"ours {op}_sync")
        what = f"{op}, TLS, pools {args.wide}: every thread <= 0.32 CPU-s/GiB"
        if row is None:
            if args.wants(f"ours {op}_sync", f"tls pools {args.wide}") and "tls" in args.schemes:
                found.append(Target(what, "-", None))
        else:
            name, busiest = row.busiest()
            found.append(Target(what, f"{row.per_gib(busiest):.2f} ({name})",
                                row.per_gib(busiest) <= 0.32))
    ours = [r for r in rows if r.what.startswith("ours") and r.result is not None]
    if ours:
        worst = max(ours, key=lambda r: r.result["peak_rss"])
        found.append(Target("peak RSS <= 300 MiB in every row of ours",
                            f"{worst.result['peak_rss'] / MiB:.0f} MiB ({worst.part},"
                            f" {worst.what})", worst.result["peak_rss"] <= 300 * MiB))
    for op in ("load", "save"):
        row = _find(rows, "tls", f"ours {op}_sync (fsspec)") or _find(
            rows, "tls", f"ours {op}_sync")
        what = f"fallback {op} (fsspec), TLS: process CPU within 15% of before"
        if row is None and not (args.wants(f"ours {op}_sync") and "tls" in args.schemes):
            continue
        before = _find(rows, "tls", f"before {op}_sync (fsspec)") or _find(
            rows, "tls", f"before {op}_sync")
        if before is not None:  # --before: the same run
            base, source = before.per_gib(before.result["cpu"]), f"{args.before}, this run"
        else:
            base, source = BEFORE[op], "8edd1db, recorded on another VM"
        if row is None:
            found.append(Target(what, "-", None))
        else:
            cpu = row.per_gib(row.result["cpu"])
            found.append(Target(what, f"{cpu:.2f} vs {base:.2f} ({source})",
                                cpu <= TOLERANCE * base))
    for part in ("s3 shaped", "s3 shaped (moto)", "gcs shaped", "az shaped"):
        ran = {row.what for row in rows if row.part == part}
        plain_get = _find(rows, part, "plain GET, one connection")
        plain_put = _find(rows, part, "plain PUT, one connection")
        upstream = [r for r in (_find(rows, part, "upstream load_sync"),
                                _find(rows, part, "upstream await load()")) if r]
        faster = min(upstream, key=lambda r: r.result["seconds"]) if upstream else None
        for what, ours_name, base, base_name, goal in (
            ("load vs one plain GET", "ours load_sync", plain_get,
             "plain GET, one connection", 6.0),
            ("load vs upstream's faster load", "ours load_sync", faster,
             "upstream load_sync", 1.5),
            ("save vs one plain PUT", "ours save_sync", plain_put,
             "plain PUT, one connection", 4.0),
            ("composite save vs one plain PUT", "ours save_sync, composite", plain_put,
             "plain PUT, one connection", 4.0),
        ):
            if ours_name not in ran or base_name not in ran:
                continue  # not run here (not asked for, or no upstream setting for it)
            row = _find(rows, part, ours_name)
            if row is None or base is None:
                found.append(Target(f"{part}: {what} >= {goal:g}x", "-", None))
                continue
            ratio = base.result["seconds"] / row.result["seconds"]
            found.append(Target(f"{part}: {what} >= {goal:g}x",
                                f"{ratio:.1f}x ({row.result['seconds']:.1f} s vs"
                                f" {base.result['seconds']:.1f} s)", ratio >= goal))
    return found


def print_text(rows: list[Row], found: list[Target]) -> None:
    print("\nthread groups (CPU-s per GiB: sum over the group's threads, threads):")
    for row in rows:
        if row.result is not None:
            groups = ", ".join(f"{g} {row.per_gib(c):.2f}/{k}" for g, c, k in row.groups()[:6])
            print(f"  {row.part:10} {row.what:44} {groups}")
    print("\ntargets (issue 17):")
    for target in found:
        print(f"  {target.verdict:4}  {target.what:62} {target.figure}")


def print_markdown(rows: list[Row], found: list[Target]) -> None:
    print("\n| run | operation | wall s | process CPU-s/GiB | busiest thread CPU-s/GiB"
          " | ceiling GB/s | peak RSS |")
    print("|---|---|---:|---:|---|---:|---:|")
    for row in rows:
        if row.part.endswith("shaped"):
            continue
        if row.result is None:
            print(f"| {row.part} | {row.what} | n/a | | {row.note} | | |")
            continue
        name, busiest = row.busiest()
        ceiling = GiB / 1e9 / row.per_gib(busiest) if busiest else float("inf")
        print(f"| {row.part} | {row.what} | {row.result['seconds']:.2f} |"
              f" {row.per_gib(row.result['cpu']):.2f} | {row.per_gib(busiest):.2f}"
              f" (`{name}`) | {ceiling:.2f} | {row.result['peak_rss'] / MiB:.0f} MiB |")
    shaped_rows = [r for r in rows if r.part.endswith("shaped")]
    if shaped_rows:
        print("\n| store, behind the proxy | operation | s | connections at once |"
              " process CPU-s | peak RSS |")
        print("|---|---|---:|---:|---:|---:|")
        for row in shaped_rows:
            if row.result is None:
                print(f"| {row.part} | {row.what} | n/a: {row.note} | | | |")
                continue
            print(f"| {row.part} | {row.what} | {row.result['seconds']:.2f} |"
                  f" {row.extra.get('connections', 0)} | {row.result['cpu']:.2f} |"
                  f" {row.result['peak_rss'] / MiB:.0f} MiB |")
    print("\n| target (issue 17) | figure | |")
    print("|---|---|---|")
    for target in found:
        print(f"| {target.what} | {target.figure} | **{target.verdict}** |")


# ---------------------------------------------------------------------- main


ROWS = "ours-load,ours-save,upstream-load,upstream-save,obstore,botocore,wide,shaped"
#: Rows only on request: fake-gcs-server handles a resumable session's whole upload again
#: for each chunk (18 CPU-s of it, 96 s, for 512 MiB), so that row measures the emulator.
OPTIONAL = "gcs-resumable"


def _size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B?)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1GiB, 512MiB)")
    unit = (match.group(2) or "B")[0].upper()
    return int(float(match.group(1)) * {"B": 1, "K": 1 << 10, "M": MiB, "G": GiB}[unit])


def _key(what: str, part: str) -> str:
    if "pools" in part:
        return "wide"
    if part == "gcs shaped" and what == "ours save_sync":
        return "gcs-resumable"
    if part.endswith("shaped"):
        return "shaped"
    for prefix, key in (("ours load", "ours-load"), ("ours save", "ours-save"),
                        ("before load", "ours-load"), ("before save", "ours-save"),
                        ("upstream load", "upstream-load"), ("upstream save", "upstream-save"),
                        ("raw obstore", "obstore"), ("raw botocore", "botocore")):
        if what.startswith(prefix):
            return key
    return what


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=_size, default=GiB,
                        help="checkpoint size of the loopback rows (default 1GiB)")
    parser.add_argument("--shaped-size", type=_size, default=512 * MiB,
                        help="checkpoint size of the shaped rows (default 512MiB)")
    parser.add_argument("--upstream-save-size", type=_size, default=256 * MiB,
                        help="checkpoint size of upstream's saves, figures per GiB (default"
                             " 256MiB: its level-9 gzip takes ~30 CPU-s per GiB)")
    parser.add_argument("--quick", action="store_true",
                        help="256MiB loopback, 128MiB shaped: a smoke run")
    parser.add_argument("--rows", default=ROWS,
                        help=f"comma list of {ROWS} (default), {OPTIONAL}")
    parser.add_argument("--schemes", default="http,tls", help="comma list of http,tls")
    parser.add_argument("--shaped", default="s3,gcs,azure",
                        help="comma list of the shaped stores: s3 (mini_s3), moto, gcs, azure"
                             " (default s3,gcs,azure: moto's ranged reads cost it the whole"
                             " object each, minutes for one load)")
    parser.add_argument("--wide", type=int, default=8,
                        help="thread count of every pool in the wide rows (default 8)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per loopback row, the least CPU counts (default 1)")
    parser.add_argument("--down", type=float, default=64, help="MiB/s per connection down")
    parser.add_argument("--up", type=float, default=16, help="MiB/s per connection up")
    parser.add_argument("--first-byte", type=float, default=0.05,
                        help="seconds to each response's first byte (default 0.05)")
    parser.add_argument("--markdown", action="store_true",
                        help="print the README's rows (markdown tables) at the end")
    parser.add_argument("--json", type=Path, help="write every row here")
    parser.add_argument("--before", metavar="REF",
                        help="also run our loopback rows from a git worktree of REF (a"
                             " commit, branch or tag of this repository), for A/B figures")
    parser.add_argument("--workdir", default=None,
                        help="where the data and restores go (default /dev/shm when it has"
                             " room, else the temporary directory)")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.shaped_size = 256 * MiB, 128 * MiB
    wanted = set(args.rows.split(","))
    unknown = wanted - set(f"{ROWS},{OPTIONAL}".split(","))
    if unknown:
        parser.error(f"--rows: unknown {', '.join(sorted(unknown))} (known: {ROWS},"
                     f" {OPTIONAL})")
    args.wants = lambda what, part="": _key(what, part) in wanted
    args.schemes = [s for s in args.schemes.split(",") if s]
    args.shaped = [s for s in args.shaped.split(",") if s] if "shaped" in wanted else []
    if set(args.shaped) - {"s3", "moto", "gcs", "azure"}:
        parser.error(f"--shaped: unknown {args.shaped} (known: s3, moto, gcs, azure)")
    paths, note = data_paths()
    has_upstream = (UPSTREAM_VENV / "bin" / "python").exists()
    print(f"data paths of ours: {', '.join(p or 'fsspec' for p in paths) or 'none'}"
          + (f" ({note})" if note else "")
          + f"; upstream venv: {UPSTREAM_VENV if has_upstream else 'missing'}"
          + f"; {os.cpu_count()} cores, shared with the servers (wall-clock figures vary)",
          flush=True)
    if args.workdir is None and os.path.isdir("/dev/shm"):
        # tmpfs, when it has room: the figures are CPU, not a disk other processes share
        # (writing files there still costs the kernel's copy, as on any file system).
        free = shutil.disk_usage("/dev/shm").free
        args.workdir = "/dev/shm" if free > 6 * max(args.size, args.shaped_size) else None
    work = Path(tempfile.mkdtemp(prefix="cpu-bench-", dir=args.workdir))
    print(f"data and restores in {work}", flush=True)
    rows: list[Row] = []
    started = time.perf_counter()
    args.before_env, args.before_paths = None, []
    try:
        if args.before:
            args.before_env, args.before_paths = before_tree(args.before, work / "before")
        if args.schemes and wanted - {"shaped"}:
            loopback(args, work, rows)
        if args.shaped:
            shaped(args, work, rows)
    finally:
        if args.before:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force",
                            str(work / "before")], capture_output=True, check=False)
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n({time.perf_counter() - started:.0f} s in all)")
    found = targets(rows, args)
    print_text(rows, found)
    if args.markdown:
        print_markdown(rows, found)
    if args.json:
        args.json.write_text(json.dumps(
            [{"part": r.part, "what": r.what, "op": r.op, "bytes": r.size, "result": r.result,
              "note": r.note, "server_cpu": r.server_cpu, **r.extra} for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
