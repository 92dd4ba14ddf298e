"""Storage backends for the cross-package end-to-end tests (``test_e2e_storage.py``).

The emulators are the ones checkpoint-io's own suite uses (``checkpoint_testing.emulators``): moto
(S3), fake-gcs-server (GCS) and Azurite (Azure Blob), each started once per run on a free
loopback port with dummy credentials. Every test gets a fresh bucket.

Endpoints reach the code under test only through ``storage_options``, never through process
environment variables: when the whole repository runs in one process, checkpoint-io's
fixtures start emulators of their own and point ``AWS_ENDPOINT_URL`` & co. at them.

Objects are written and read back with each service's own client (boto3, the GCS JSON API,
azure-storage-blob), not through checkpoint-io, so the checks do not share the code they
check.
"""

from __future__ import annotations

import importlib.util
import json
import os
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from checkpoint_io._loop import run_sync
from checkpoint_io._registry import close_backends
from flyte_checkpoint import Checkpoint

from .emulators import (
    INSTALL_HINT,
    Azurite,
    EmulatorMissing,
    FakeGCS,
    MotoS3,
    notify_through_pytest,
)

MiB = 1 << 20
REMOTE = ("s3", "gcs", "azure")
BASELINE = ("local", "memory")
ALL_BACKENDS = (*BASELINE, *REMOTE)
#: checkpoint-io's two clients for remote stores (``CHECKPOINT_IO_DATA_PATH``): every remote
#: case runs on each.
DATA_PATHS = ("obstore", "fsspec")

# Settings that are the same for every emulator instance (credentials, switches), so setting
# them cannot redirect anyone else's clients. Endpoints are deliberately not among them.
_SHARED_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
    # Without this gcsfs probes for zonal buckets and stalls about 60 s per call.
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    # No progress line on stderr, even when pytest runs on a terminal.
    "FLYTE_CHECKPOINT_PROGRESS": "off",
}


def storage_options(kind: str, server: Any) -> dict[str, Any] | None:
    """What a client needs to reach ``server``, passed explicitly."""
    if kind == "s3":
        return {"endpoint_url": server.endpoint, "key": "testing", "secret": "testing",
                "client_kwargs": {"region_name": "us-east-1"}}
    if kind in ("gcs", "azure"):
        return server.options()
    return None


class Emulators:
    """Starts each emulator on first use; :meth:`stop` stops those it started."""

    def __init__(self) -> None:
        self._started: dict[str, Any] = {}

    def get(self, kind: str) -> Any:
        if kind not in self._started:
            server_class = {"s3": MotoS3, "gcs": FakeGCS, "azure": Azurite}[kind]
            try:
                self._started[kind] = server_class().start()
            except EmulatorMissing as exc:
                if os.environ.get("CHECKPOINT_REQUIRE_EMULATORS") == "1":
                    pytest.fail(f"{exc}; CHECKPOINT_REQUIRE_EMULATORS=1 makes this a failure",
                                pytrace=False)
                pytest.skip(f"{exc}; {INSTALL_HINT}")
        return self._started[kind]

    def stop(self) -> None:
        for server in self._started.values():
            server.stop()
        self._started.clear()


@pytest.fixture(scope="session")
def e2e_emulators(request):
    notify_through_pytest(request.config)
    patcher = pytest.MonkeyPatch()
    for key, value in _SHARED_ENV.items():
        patcher.setenv(key, value)
    emulators = Emulators()
    try:
        yield emulators
    finally:
        emulators.stop()
        patcher.undo()


class Store:
    """One backend as a test sees it: a fresh bucket (or directory), checkpoints on it, and
    raw access to its objects through the service's own client."""

    def __init__(self, kind: str, tmp_path: Path, server: Any = None,
                 data_path: str | None = None) -> None:
        self.kind = kind
        #: The data path forced for this test (through ``CHECKPOINT_IO_DATA_PATH``, so that
        #: every Checkpoint a test makes, and every probe process, takes it); ``None``: auto.
        self.data_path = data_path
        self.server = server
        self.bucket = f"e2e-{uuid.uuid4().hex[:12]}"
        self.options = storage_options(kind, server)
        self._proxies: list[Any] = []
        if kind == "local":
            self.root = str(tmp_path / "store")
            Path(self.root).mkdir()
        elif kind == "memory":
            self.root = f"memory://{self.bucket}"
        else:
            self.root = {"s3": "s3", "gcs": "gs", "azure": "abfs"}[kind] + f"://{self.bucket}"
            self._create_bucket()

    # -- the code under test ------------------------------------------------------------

    def uri(self, name: str) -> str:
        return f"{self.root}/{name}"

    def checkpoint(self, dest: str, src: str | None = None, *,
                   options: dict[str, Any] | None = None) -> Checkpoint:
        """A Checkpoint writing object ``dest`` and restoring object ``src`` of this store
        (through ``options`` if given, else this store's own)."""
        return Checkpoint(self.uri(dest), self.uri(src) if src else None,
                          storage_options=self.options if options is None else options)

    # -- raw access, independent of checkpoint-io -----------------------------------------

    def put(self, name: str, data: bytes) -> None:
        if self.kind == "local":
            Path(self.uri(name)).write_bytes(data)
        elif self.kind == "memory":
            self._memory_fs().pipe_file(self.uri(name), data)
        elif self.kind == "s3":
            self._s3().put_object(Bucket=self.bucket, Key=name, Body=data)
        elif self.kind == "gcs":
            query = urllib.parse.urlencode({"uploadType": "media", "name": name})
            self._gcs("POST", f"/upload/storage/v1/b/{self.bucket}/o?{query}", data).close()
        else:
            with self._azure() as client:
                client.get_blob_client(self.bucket, name).upload_blob(data, overwrite=True)

    def get(self, name: str) -> bytes:
        if self.kind == "local":
            return Path(self.uri(name)).read_bytes()
        if self.kind == "memory":
            return self._memory_fs().cat_file(self.uri(name))
        if self.kind == "s3":
            return self._s3().get_object(Bucket=self.bucket, Key=name)["Body"].read()
        if self.kind == "gcs":
            quoted = urllib.parse.quote(name, safe="")
            with self._gcs("GET", f"/storage/v1/b/{self.bucket}/o/{quoted}?alt=media") as r:
                return r.read()
        with self._azure() as client:
            return client.get_blob_client(self.bucket, name).download_blob().readall()

    def names(self) -> set[str]:
        """Every object in the bucket (every file, hidden ones included, for local)."""
        if self.kind == "local":
            root = Path(self.root)
            return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
        if self.kind == "memory":
            prefix = self.root.removeprefix("memory://")
            found = self._memory_fs().find(self.root)
            return {p.lstrip("/").removeprefix(prefix).lstrip("/") for p in found}
        if self.kind == "s3":
            pages = self._s3().get_paginator("list_objects_v2").paginate(Bucket=self.bucket)
            return {o["Key"] for page in pages for o in page.get("Contents", [])}
        if self.kind == "gcs":
            with self._gcs("GET", f"/storage/v1/b/{self.bucket}/o") as r:
                return {o["name"] for o in json.load(r).get("items", [])}
        with self._azure() as client:
            return set(client.get_container_client(self.bucket).list_blob_names())

    def pending_uploads(self) -> list[str]:
        """Unfinished S3 multipart uploads left behind. (Azure has no way to drop uncommitted
        blocks short of deleting the blob; the service discards them after a week.)"""
        if self.kind != "s3":
            return []
        listing = self._s3().list_multipart_uploads(Bucket=self.bucket)
        return [u["Key"] for u in listing.get("Uploads", [])]

    def counting_proxy(self) -> tuple[Any, dict[str, Any]]:
        """A loopback proxy in front of this store's emulator that counts requests, and the
        storage options that route a client through it."""
        from .emulators import FaultProxy

        proxy = FaultProxy(self.server.port, self.kind)
        self._proxies.append(proxy)
        options = storage_options(self.kind, self.server)
        if self.kind == "s3":
            options["endpoint_url"] = proxy.endpoint
        else:
            options = self.server.options(proxy.endpoint)
        return proxy, options

    def deny(self, action: str) -> None:
        """A bucket policy denying everyone ``action`` (e.g. ``s3:GetObject``) on every object:
        moto enforces ``Deny`` statements on GetObject and PutObject (HEAD stays allowed)."""
        if self.kind != "s3":
            raise NotImplementedError(self.kind)
        policy = {
            "Version": "2012-10-17",
            "Statement": [{
                "Effect": "Deny", "Principal": "*", "Action": action,
                "Resource": f"arn:aws:s3:::{self.bucket}/*",
            }],
        }
        self._s3().put_bucket_policy(Bucket=self.bucket, Policy=json.dumps(policy))

    def sas_options(self, permission: str) -> dict[str, Any]:
        """Storage options holding an Azure container SAS that grants only ``permission``
        (Azurite checks SAS permissions)."""
        from datetime import datetime, timedelta, timezone

        from azure.storage.blob import ContainerSasPermissions, generate_container_sas

        from .emulators import AZURITE_ACCOUNT, AZURITE_KEY

        sas = generate_container_sas(
            AZURITE_ACCOUNT, self.bucket, account_key=AZURITE_KEY,
            permission=ContainerSasPermissions.from_string(permission),
            expiry=datetime.now(timezone.utc) + timedelta(hours=1),
        )
        endpoint = f"{self.server.endpoint}/{AZURITE_ACCOUNT}"
        return {"connection_string": f"BlobEndpoint={endpoint};SharedAccessSignature={sas}"}

    # -- plumbing -------------------------------------------------------------------------

    def _create_bucket(self) -> None:
        if self.kind == "s3":
            self._s3().create_bucket(Bucket=self.bucket)
        elif self.kind == "gcs":
            self._gcs("POST", "/storage/v1/b", json.dumps({"name": self.bucket}).encode(),
                      content_type="application/json").close()
        else:
            with self._azure() as client:
                client.create_container(self.bucket)

    def _s3(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.server.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def _gcs(self, method: str, path: str, data: bytes | None = None,
             content_type: str = "application/octet-stream"):
        request = urllib.request.Request(f"{self.server.endpoint}{path}", data=data,
                                         method=method, headers={"Content-Type": content_type})
        return urllib.request.urlopen(request, timeout=60)

    def _azure(self):
        from azure.storage.blob import BlobServiceClient

        return BlobServiceClient.from_connection_string(self.server.connection_string())

    @staticmethod
    def _memory_fs():
        import fsspec

        return fsspec.filesystem("memory")

    def close(self) -> None:
        for proxy in self._proxies:
            proxy.stop()
        run_sync(close_backends, name="close_backends")
        if self.kind == "memory":
            fs = self._memory_fs()
            if fs.exists(self.root):
                fs.rm(self.root, recursive=True)
        elif self.server is not None:
            self.server.reset()


def _require_obstore() -> None:
    if importlib.util.find_spec("obstore") is None:
        reason = "obstore data path: obstore is not installed (pip install obstore)"
        if os.environ.get("CHECKPOINT_REQUIRE_OBSTORE") == "1":
            pytest.fail(f"{reason}; CHECKPOINT_REQUIRE_OBSTORE=1 makes this a failure",
                        pytrace=False)
        pytest.skip(reason)


def make_store(param: str, emulators: Emulators, tmp_path: Path):
    """Generator for a fixture: a fresh :class:`Store`, closed and emptied afterwards.
    ``param`` is a kind, or ``kind-path`` for a remote one on a forced data path."""
    kind, _, data_path = param.partition("-")
    if data_path == "obstore":
        _require_obstore()
    server = emulators.get(kind) if kind in REMOTE else None
    with pytest.MonkeyPatch.context() as patch:
        if data_path:
            patch.setenv("CHECKPOINT_IO_DATA_PATH", data_path)
        store = Store(kind, tmp_path, server, data_path or None)
        try:
            yield store
        finally:
            store.close()


def _params(kinds) -> list:
    params = []
    for kind in kinds:
        if kind in REMOTE:
            params += [f"{kind}-{path}" for path in DATA_PATHS]
        else:
            params.append(kind)
    return params


@pytest.fixture(params=_params(ALL_BACKENDS))
def store(request, e2e_emulators, tmp_path):
    """Every backend: local and memory as the baseline, then the three emulators, each on
    both data paths."""
    yield from make_store(request.param, e2e_emulators, tmp_path)


@pytest.fixture(params=_params(REMOTE))
def remote_store(request, e2e_emulators, tmp_path):
    yield from make_store(request.param, e2e_emulators, tmp_path)


# --------------------------------------------------------------------- memory measurement

#: One save or one load, in a fresh interpreter so that its peak RSS is its own (memory freed
#: by a save stays in the allocator and would hide a load's peak). Reads JSON arguments on
#: stdin, prints one JSON line. The peak is reset (``clear_refs`` 5 sets VmHWM to the
#: current RSS) right before the operation; growth is the peak minus the RSS at that moment.
RSS_PROBE = r"""
import hashlib, json, os, pathlib, sys, time

from flyte_checkpoint import Checkpoint

args = json.load(sys.stdin)
options = args["storage_options"]


def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status("VmRSS")


# Warm up on a small object: imports, client sessions and thread pools are paid once per
# process, not per checkpoint, and would otherwise be charged to the measured operation.
warm = pathlib.Path(args["scratch"]) / f"warm-{os.getpid()}"
warm.mkdir()
(warm / "w.bin").write_bytes(os.urandom(1 << 20))
warm_uri = args["uri"] + f"-warm-{os.getpid()}"
Checkpoint(warm_uri, storage_options=options).save_sync(warm)
with Checkpoint(warm_uri + "-next", warm_uri, storage_options=options) as cp:
    cp.load_sync()
started_rss = status("VmRSS")

if args["operation"] == "save":
    cp = Checkpoint(args["uri"], storage_options=options)
    operation = lambda: cp.save_sync(pathlib.Path(args["source"]))
else:
    cp = Checkpoint(args["uri"] + "-next", args["uri"], storage_options=options)
    operation = cp.load_sync

before = reset_peak()
started = time.perf_counter()
restored = operation()
seconds = time.perf_counter() - started
peak = status("VmHWM")
result = {"rss_before": before, "peak": peak, "growth": peak - before, "seconds": seconds}

if args["operation"] == "load":
    restored_file = pathlib.Path(restored) / args["file_name"]
    digest = hashlib.sha256()
    with open(restored_file, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    st = restored_file.stat()
    result.update(sha256=digest.hexdigest(), mtime_ns=st.st_mtime_ns, size=st.st_size)
cp.close()
print(json.dumps(result))
"""
