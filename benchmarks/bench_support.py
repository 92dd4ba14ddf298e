"""What the benchmark scripts share: the upstream venv's location, the /proc probe their
child scripts start with, the S3 servers (moto, s3rver), the disk watcher and CPU-time reads.

One module that the scripts import, so that none of them imports another one for its
helpers (checkpoint_bench.py and transfer_bench.py used to import each other).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

UPSTREAM_VENV = Path(
    os.environ.get(
        "FLYTE_UPSTREAM_VENV",
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        / "flyte-checkpoint"
        / "upstream-venv",
    )
)

#: Prepended to every child script (they run in other interpreters, so cannot import it):
#: a field of /proc/self/status in bytes, e.g. VmRSS, or VmHWM for the peak.
PROC_STATUS = r"""
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0
"""


# ---------------------------------------------------------------------- stores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 30) -> None:
    """Return once a server started as ``proc`` accepts connections on ``port``; raise when
    it exits first or does not within ``timeout`` seconds."""
    deadline = time.time() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                raise RuntimeError(f"{what} did not start on port {port}") from None
            time.sleep(0.1)


class Moto:
    """A moto S3 server on loopback; its spill files go to /dev/shm, off the measured disk."""

    def __init__(self) -> None:
        self.port = free_port()
        env = {**os.environ, "TMPDIR": "/dev/shm"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        self.endpoint = f"http://127.0.0.1:{self.port}"
        wait_for_port(self.port, self.proc, "moto")
        import boto3

        boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        ).create_bucket(Bucket="bench")

    def env(self) -> dict[str, str]:
        return {
            # ours (s3fs / botocore)
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            # upstream (flyte.storage.S3.auto)
            "FLYTE_AWS_ENDPOINT": self.endpoint,
            "FLYTE_AWS_ACCESS_KEY_ID": "testing",
            "FLYTE_AWS_SECRET_ACCESS_KEY": "testing",
        }

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class S3rver:
    """s3rver (npm) on loopback, with the interface of ``Moto``: a second S3
    server, whose ranged GETs read only their range (moto's read the whole object for each
    one). Installed with npm into the cache directory on first use; its data lives in
    /dev/shm, off the measured disk, as moto's spill files do."""

    def __init__(self) -> None:
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        home = cache / "flyte-checkpoint" / "s3rver"
        binary = home / "node_modules" / ".bin" / "s3rver"
        if not binary.exists():
            if shutil.which("npm") is None:
                raise RuntimeError("s3rver needs npm (or drop the s3rver part)")
            print(f"installing s3rver with npm into {home}", flush=True)
            subprocess.run(["npm", "install", "--prefix", str(home), "--no-audit", "--no-fund",
                            "--loglevel=error", "s3rver@3"], check=True,
                           stdout=subprocess.DEVNULL)
        self.data = tempfile.mkdtemp(prefix="s3rver-", dir="/dev/shm")
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [str(binary), "-d", self.data, "-a", "127.0.0.1", "-p", str(self.port), "-s",
             "--configure-bucket", "bench"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for_port(self.port, self.proc, "s3rver")
        except RuntimeError:
            self.stop()
            raise

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "S3RVER",
                "AWS_SECRET_ACCESS_KEY": "S3RVER", "AWS_DEFAULT_REGION": "us-east-1",
                "FLYTE_AWS_ENDPOINT": self.endpoint, "FLYTE_AWS_ACCESS_KEY_ID": "S3RVER",
                "FLYTE_AWS_SECRET_ACCESS_KEY": "S3RVER"}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        shutil.rmtree(self.data, ignore_errors=True)


# ---------------------------------------------------------------------- measuring


WATCHER = r"""
import os, sys, threading, time
roots = sys.argv[1:]

def used():
    # Counted once per inode: a tree renamed while it is being walked (a restore publishing
    # its staging directory) would otherwise be counted under both names.
    total = 0
    seen = set()
    stack = [r for r in roots if os.path.isdir(r)]
    while stack:
        try:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(entry.path)
                        elif entry.is_file(follow_symlinks=False) and entry.inode() not in seen:
                            seen.add(entry.inode())
                            total += entry.stat(follow_symlinks=False).st_size
                    except FileNotFoundError:
                        continue
        except (FileNotFoundError, NotADirectoryError):
            continue
    return total

os.nice(19)  # sample with what the measured process leaves idle
start = peak = used()
done = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
print("ready", flush=True)
while not done.is_set():
    peak = max(peak, used())
    time.sleep(0.02)
peak = max(peak, used())
print(peak - start, flush=True)
"""


class DiskWatch:
    """Samples the bytes of the files under some directories, from a separate low-priority
    process (walking a 20,000-file tree in the measuring process would slow the measured
    one), and reports the peak growth. Walking the trees rather than reading the file
    system's free space keeps other processes' writes and delayed allocation out of it."""

    def __init__(self, *roots: Path) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-c", WATCHER, *map(str, roots)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert self._proc.stdout is not None
        self._proc.stdout.readline()  # "ready": the baseline is taken

    def growth(self) -> int:
        out, _ = self._proc.communicate("", timeout=600)
        return int(out.strip().splitlines()[-1])


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a process so far (0 without one)."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
