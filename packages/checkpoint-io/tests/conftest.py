"""Fixtures: one emulator per backend for the whole run, a fresh bucket per test.

Emulators that are not installed make their tests skip with an install hint, unless
CHECKPOINT_REQUIRE_EMULATORS=1 (as in CI), which turns the skip into a failure.
"""

from __future__ import annotations

import importlib.util
import os
import uuid
from pathlib import Path

import pytest
from checkpoint_io import File
from checkpoint_io._loop import run_sync
from checkpoint_io._registry import close_backends
from checkpoint_testing.emulators import (
    INSTALL_HINT,
    Azurite,
    EmulatorMissing,
    FakeGCS,
    FaultProxy,
    MotoS3,
    notify_through_pytest,
)

MiB = 1024 * 1024
REMOTE = ("s3", "gcs", "azure")
ALL_BACKENDS = ("local", "memory", *REMOTE)


def _start(server_class):
    try:
        return server_class().start()
    except EmulatorMissing as exc:
        if os.environ.get("CHECKPOINT_REQUIRE_EMULATORS") == "1":
            pytest.fail(f"{exc}; CHECKPOINT_REQUIRE_EMULATORS=1 makes this a failure",
                        pytrace=False)
        pytest.skip(f"{exc}; {INSTALL_HINT}")


@pytest.fixture(scope="session")
def servers(request):
    """Start each emulator on first use; stop them all at the end of the run."""
    notify_through_pytest(request.config)
    started: dict[str, object] = {}
    patcher = pytest.MonkeyPatch()

    def get(kind: str):
        if kind not in started:
            server = _start({"s3": MotoS3, "gcs": FakeGCS, "azure": Azurite}[kind])
            for key, value in server.env().items():
                patcher.setenv(key, value)
            started[kind] = server
        return started[kind]

    yield get
    for server in started.values():
        server.stop()
    patcher.undo()


def require_obstore() -> None:
    """Skip (fail under CHECKPOINT_REQUIRE_OBSTORE=1, as in CI) when obstore is missing."""
    if importlib.util.find_spec("obstore") is None:
        reason = "obstore data path: obstore is not installed (pip install obstore)"
        if os.environ.get("CHECKPOINT_REQUIRE_OBSTORE") == "1":
            pytest.fail(f"{reason}; CHECKPOINT_REQUIRE_OBSTORE=1 makes this a failure",
                        pytrace=False)
        pytest.skip(reason)


@pytest.fixture
def obstore_installed() -> None:
    """For tests of the obstore data path itself: skips (fails in CI) without obstore."""
    require_obstore()


class Store:
    """One backend as seen by a test: a fresh bucket (or directory) and helpers.

    Remote stores run on each data path (``data_path``: ``"obstore"`` or ``"fsspec"``);
    every File a test makes through :meth:`file` is forced onto it."""

    def __init__(self, kind: str, tmp_path: Path, server=None,
                 data_path: str | None = None) -> None:
        self.kind = kind
        self.data_path = data_path
        self.server = server
        self.bucket = f"test-{uuid.uuid4().hex[:12]}"
        self.tmp_path = tmp_path
        self.proxies: list[FaultProxy] = []
        # Small parts, so multipart paths run on small objects (S3's floor is 5 MiB).
        self.part_size = 5 * MiB if kind == "s3" else 256 * 1024
        if kind == "local":
            self.root = str(tmp_path / "store")
        elif kind == "memory":
            self.root = f"memory://{self.bucket}"
        else:
            self.root = {"s3": "s3", "gcs": "gs", "azure": "abfs"}[kind] + f"://{self.bucket}"
            self._create_bucket()

    def _create_bucket(self) -> None:
        if self.kind == "s3":
            import boto3

            boto3.client("s3", endpoint_url=self.server.endpoint).create_bucket(
                Bucket=self.bucket)
        elif self.kind == "gcs":
            import json
            import urllib.request

            req = urllib.request.Request(
                f"{self.server.endpoint}/storage/v1/b", method="POST",
                data=json.dumps({"name": self.bucket}).encode(),
                headers={"Content-Type": "application/json"})
            urllib.request.urlopen(req, timeout=10).close()
        else:
            from azure.storage.blob import BlobServiceClient

            with BlobServiceClient.from_connection_string(
                    self.server.connection_string()) as client:
                client.create_container(self.bucket)

    def uri(self, name: str) -> str:
        return f"{self.root}/{name}"

    def file(self, name: str, **options) -> File:
        options.setdefault("part_size", self.part_size)
        if self.data_path is not None:
            options.setdefault("data_path", self.data_path)
        return File(path=self.uri(name)).with_options(**options)

    def proxy(self) -> tuple[FaultProxy, dict]:
        """A fault-injecting proxy in front of this store's emulator, and the storage
        options that route a File through it."""
        proxy = FaultProxy(self.server.port, self.kind)
        self.proxies.append(proxy)
        return proxy, self.server.options(proxy.endpoint)

    def close(self) -> None:
        for proxy in self.proxies:
            proxy.stop()
        run_sync(close_backends, name="close_backends")
        if self.server is not None:
            self.server.reset()


DATA_PATHS = ("obstore", "fsspec")


def _backend_params(kinds):
    params = []
    for kind in kinds:
        if kind in REMOTE:
            params += [pytest.param((kind, path), marks=[pytest.mark.emulator],
                                    id=f"{kind}-{path}") for path in DATA_PATHS]
        else:
            params.append(pytest.param((kind, None), id=kind))
    return params


@pytest.fixture(params=_backend_params(ALL_BACKENDS))
def store(request, servers, tmp_path):
    yield from _store(request.param, servers, tmp_path)


@pytest.fixture(params=_backend_params(REMOTE))
def remote_store(request, servers, tmp_path):
    yield from _store(request.param, servers, tmp_path)


def _store(param, servers, tmp_path):
    if isinstance(param, str):  # indirect: "gcs" (the default data path) or "gcs-obstore"
        kind, _, path = param.partition("-")
        param = (kind, path or None)
    kind, data_path = param
    if data_path == "obstore":
        require_obstore()
    server = servers(kind) if kind in REMOTE else None
    store = Store(kind, tmp_path, server, data_path)
    try:
        yield store
    finally:
        store.close()
