"""The obstore data path's own contracts: which options translate (and what a forced path
does when they do not), the once-per-process log line, how obstore's errors are classified
(real errors, from a loopback server answering each status), a server ignoring Range, and
multipart uploads: an aborted or failed one leaves no upload listed, a killed writer leaves
no object and the previous one intact."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import http.server
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from checkpoint_io import File, RetryPolicy, StorageError, StorageRetryError
from checkpoint_io._backend import BackendOptions
from checkpoint_io._errors import (
    Fault,
    MissingBackendError,
    RangeMismatch,
    VersionMismatch,
    classify,
)
from checkpoint_io._loop import run_sync

MiB = 1 << 20
FAST = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.02, deadline=20, attempt_timeout=10)


pytestmark = pytest.mark.usefixtures("obstore_installed")


# --- storage options -> store configs (no server) -----------------------------------------


def _config(scheme, options):
    from checkpoint_io._obstore import store_config

    return store_config(scheme, options)


def test_s3_options_translate_key_secret_token_endpoint_region_and_style():
    got = _config("s3", {
        "key": "AK", "secret": "SK", "token": "ST", "endpoint_url": "http://127.0.0.1:9",
        "client_kwargs": {"region_name": "eu-west-3"},
        "config_kwargs": {"s3": {"addressing_style": "virtual"}, "retries": {"max": 9},
                          "connect_timeout": 4, "read_timeout": 61.5},
        "skip_instance_cache": True,  # tunes s3fs itself: ignored, no fallback
    })
    assert got["config"] == {
        "access_key_id": "AK", "secret_access_key": "SK", "session_token": "ST",
        "endpoint": "http://127.0.0.1:9", "region": "eu-west-3",
        "virtual_hosted_style_request": True}
    # botocore's retries are dropped (ours is the only policy); its timeouts carry over.
    assert got["client_options"]["connect_timeout"] == "4s"
    assert got["client_options"]["timeout"] == "61.5s"
    assert got["client_options"]["allow_http"] is True


def test_s3_anonymous_and_unsigned_mean_no_signature():
    assert _config("s3", {"anon": True})["config"] == {"skip_signature": True}
    unsigned = _config("s3", {"config_kwargs": {"signature_version": "UNSIGNED"}})
    assert unsigned["config"] == {"skip_signature": True}
    insecure = _config("s3a", {"client_kwargs": {"verify": False}})
    assert insecure["client_options"]["allow_invalid_certificates"] is True


def test_s3_payloads_are_signed_over_http_only(monkeypatch):
    """Over TLS the signature leaves the payload's SHA-256 out, as botocore does."""
    monkeypatch.delenv("AWS_UNSIGNED_PAYLOAD", raising=False)
    assert _config("s3", {})["config"] == {"unsigned_payload": True}
    assert _config("s3", {"endpoint_url": "https://minio.internal:9000"})["config"] == {
        "endpoint": "https://minio.internal:9000", "unsigned_payload": True}
    assert "unsigned_payload" not in _config("s3", {"endpoint_url": "http://h:1"})["config"]
    monkeypatch.setenv("AWS_UNSIGNED_PAYLOAD", "false")  # the user's word, for obstore
    assert "unsigned_payload" not in _config("s3", {})["config"]


def test_s3_credentials_in_client_kwargs_and_path_style():
    got = _config("s3", {"client_kwargs": {"aws_access_key_id": "A",
                                           "aws_secret_access_key": "S",
                                           "endpoint_url": "http://h:1"},
                         "config_kwargs": {"s3": {"addressing_style": "path"}}})
    assert got["config"] == {"access_key_id": "A", "secret_access_key": "S",
                             "endpoint": "http://h:1", "virtual_hosted_style_request": False}


@pytest.mark.parametrize(("options", "named"), [
    ({"profile": "dev"}, "profile"),
    ({"client_kwargs": {"proxies": {"https": "x"}}}, "client_kwargs proxies"),
    ({"client_kwargs": {"verify": "/etc/ca.pem"}}, "verify= a CA bundle path"),
    ({"config_kwargs": {"s3": {"use_accelerate_endpoint": True}}},
     "config_kwargs s3 use_accelerate_endpoint"),
    ({"config_kwargs": {"max_pool_connections": 50}}, "config_kwargs.max_pool_connections"),
    ({"config_kwargs": {"signature_version": "s3"}}, "config_kwargs.signature_version"),
])
def test_s3_options_without_an_equivalent_are_named(options, named):
    from checkpoint_io._obstore import Untranslatable

    with pytest.raises(Untranslatable, match="no obstore equivalent") as info:
        _config("s3", options)
    assert named in str(info.value) and str(info.value).startswith("s3://")


def test_gcs_tokens(tmp_path, monkeypatch):
    from checkpoint_io._obstore import Untranslatable

    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    assert _config("gs", {"token": "anon", "endpoint_url": "http://127.0.0.1:4443/"}) == {
        "config": {"skip_signature": True, "base_url": "http://127.0.0.1:4443"},
        "client_options": _config("gs", {})["client_options"]}
    for chain in (None, "google_default", "cloud"):
        assert _config("gcs", {"token": chain})["config"] == {}
    key = {"type": "service_account", "client_email": "a@b", "private_key": "k"}
    assert json.loads(_config("gs", {"token": key})["config"]["service_account_key"]) == key
    path = tmp_path / "sa.json"
    path.write_text(json.dumps(key))
    assert _config("gs", {"token": str(path)})["config"] == {
        "application_credentials": str(path)}
    with pytest.raises(Untranslatable, match="gs:// token str"):
        _config("gs", {"token": "browser"})
    with pytest.raises(Untranslatable, match="requester_pays"):
        _config("gs", {"requester_pays": True})


def test_gcs_follows_the_emulator_variable_anonymously(monkeypatch):
    # gcsfs reads STORAGE_EMULATOR_HOST; the fast path must reach the same emulator, never
    # the real service instead, and as gcsfs does, anonymously.
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "127.0.0.1:4443")
    assert _config("gs", {})["config"] == {"skip_signature": True,
                                           "base_url": "http://127.0.0.1:4443"}


def test_azure_connection_strings_keys_and_sas(monkeypatch):
    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING", raising=False)
    conn = ("DefaultEndpointsProtocol=http;AccountName=dev;AccountKey=S2V5;"
            "BlobEndpoint=http://127.0.0.1:10000/dev/;")
    assert _config("abfs", {"connection_string": conn})["config"] == {
        "account_name": "dev", "account_key": "S2V5", "endpoint": "http://127.0.0.1:10000/dev"}
    suffix = "DefaultEndpointsProtocol=https;AccountName=acc;EndpointSuffix=core.windows.net"
    assert _config("az", {"connection_string": suffix})["config"]["endpoint"] == (
        "https://acc.blob.core.windows.net")
    sas = _config("abfss", {"account_name": "acc", "sas_token": "?sv=1&sig=x",
                            "account_host": "acc.blob.example"})
    assert sas["config"] == {"account_name": "acc", "sas_key": "sv=1&sig=x",
                             "endpoint": "https://acc.blob.example"}
    principal = _config("abfs", {"account_name": "a", "tenant_id": "t", "client_id": "c",
                                 "client_secret": "s", "anon": False})
    assert principal["config"] == {"account_name": "a", "tenant_id": "t", "client_id": "c",
                                   "client_secret": "s"}
    # adlfs takes the connection string from its variable when no account is named.
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", conn)
    assert _config("abfs", {})["config"]["account_name"] == "dev"
    assert _config("abfs", {"account_name": "other"})["config"] == {"account_name": "other"}


def test_azure_sas_connection_string_names_the_account_through_its_endpoint(monkeypatch):
    from checkpoint_io._obstore import Untranslatable
    from checkpoint_io._registry import data_path_for

    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING", raising=False)
    for endpoint, account in (("http://127.0.0.1:10000/devstoreaccount1", "devstoreaccount1"),
                              ("https://acc.blob.core.windows.net/", "acc")):
        conn = f"BlobEndpoint={endpoint};SharedAccessSignature=sv=1&sig=x"
        assert _config("abfs", {"connection_string": conn})["config"] == {
            "sas_key": "sv=1&sig=x", "endpoint": endpoint.rstrip("/"), "account_name": account}
    with pytest.raises(Untranslatable, match="names no account"):
        _config("abfs", {"connection_string": "BlobEndpoint=http://h:1/;SharedAccessSignature=x"})
    # Settings obstore itself refuses fall back with its reason, before any transfer.
    monkeypatch.delenv("AZURE_STORAGE_ACCOUNT_NAME", raising=False)
    path, reason = data_path_for("abfs://c/k", {})
    assert path == "fsspec"
    assert reason.startswith("abfs:// obstore refuses these settings: ") and "Account" in reason


def test_azure_credential_objects_do_not_translate():
    from checkpoint_io._obstore import Untranslatable

    with pytest.raises(Untranslatable, match=r"abfs:// storage option.* credential"):
        _config("abfs", {"account_name": "a", "credential": object()})


# --- which path, forced or not, and the log line ----------------------------------------


def test_auto_falls_back_with_the_reason_and_forced_obstore_raises_naming_it():
    from checkpoint_io._registry import data_path_for

    uri = "s3://bucket/key"
    assert data_path_for(uri, {"key": "a", "secret": "b"}) == (
        "obstore", "obstore installed, storage options translated")
    path, reason = data_path_for(uri, {"profile": "dev"})
    assert path == "fsspec" and "profile" in reason and "no obstore equivalent" in reason
    forced = BackendOptions(data_path="obstore")
    with pytest.raises(ValueError, match=r"s3://bucket/key: data_path='obstore' cannot serve"
                                         r" it: .*profile") as info:
        data_path_for(uri, {"profile": "dev"}, forced)
    assert info.value.__cause__ is None  # the message says it all, no library traceback
    assert data_path_for(uri, {"profile": "dev"}, BackendOptions(data_path="fsspec"))[0] == \
        "fsspec"
    assert data_path_for("/tmp/x", None, forced)[0] == "builtin"
    with pytest.raises(ValueError, match="data_path 'fast' is not one of auto"):
        data_path_for(uri, None, BackendOptions(data_path="fast"))
    with pytest.raises(ValueError, match="data_path must be one of auto, obstore, fsspec"):
        File(path=uri).with_options(data_path="rust")


def test_forced_obstore_without_obstore_names_the_extra(monkeypatch):
    import importlib.util

    from checkpoint_io._registry import data_path_for

    real = importlib.util.find_spec
    # Not installed is a state of the machine no server can produce: only find_spec lies.
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "obstore" else real(name, *a))
    assert data_path_for("gs://b/k") == ("fsspec", "obstore is not installed")
    with pytest.raises(MissingBackendError) as info:
        data_path_for("gs://b/k", None, BackendOptions(data_path="obstore"))
    assert "obstore" in str(info.value) and "gcs" in str(info.value)


def test_the_data_path_is_logged_once_per_process_per_scheme_and_reason(caplog, monkeypatch):
    from checkpoint_io import _registry

    monkeypatch.setattr(_registry, "_said", set())
    caplog.set_level(logging.INFO, logger="checkpoint_io")

    async def backends():
        # Different options make different backends; the same path and reason is said once.
        for switches in ({}, {"direct_writes": False}, {"data_path": "obstore"}):
            _registry.backend_for("s3://b/k", {"key": "a", "secret": "b"},
                                  BackendOptions(**switches))
        _registry.backend_for("s3://b/k", {"profile": "p"})  # a fallback: said, with why
        _registry.backend_for("/tmp/whatever")  # local: nothing to say

    run_sync(backends, name="test backends")
    run_sync(_registry.close_backends, name="close_backends")
    lines = [r.getMessage() for r in caplog.records if r.name == "checkpoint_io"]
    assert lines == [
        "checkpoint-io data path for s3://: obstore (obstore installed, storage options "
        "translated)",
        "checkpoint-io data path for s3://: obstore (data_path='obstore' asks for it)",
        "checkpoint-io data path for s3://: fsspec (s3:// storage option(s) profile have no "
        "obstore equivalent)",
    ]
    assert all(r.levelno == logging.INFO for r in caplog.records if r.name == "checkpoint_io")


# --- obstore's errors, as real errors from a server answering each status ----------------


class _Answering:
    """A loopback HTTP server answering every request with one status (an S3-style error
    body), or dropping the connection (``status=None``)."""

    def __init__(self, status: int | None) -> None:
        outer = self
        self.requests = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _answer(self) -> None:
                outer.requests += 1
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                if status is None:
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                body = b"" if self.command == "HEAD" else (
                    b"<?xml version='1.0'?><Error><Code>Test</Code><Message>answered "
                    + str(status).encode() + b"</Message></Error>")
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _answer

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


def _obstore_error(status: int | None, operation: str = "head") -> BaseException:
    """The exception obstore raises for one request answered by ``status``."""
    import obstore
    from obstore.store import S3Store

    server = _Answering(status)
    try:
        store = S3Store("bucket", config={"endpoint": server.endpoint, "access_key_id": "a",
                                          "secret_access_key": "b", "region": "us-east-1"},
                        client_options={"allow_http": True, "timeout": "10s",
                                        "connect_timeout": "5s"},
                        retry_config={"max_retries": 0})

        async def call():
            if operation == "head":
                await obstore.head_async(store, "key")
            else:
                await obstore.get_async(store, "key", options={"range": (0, 10),
                                                               "if_match": '"e"'})

        with pytest.raises(BaseException) as info:
            asyncio.run(asyncio.wait_for(call(), 30))
        assert server.requests == 1  # retries off: one request
        return info.value
    finally:
        server.close()


@pytest.mark.parametrize(("status", "operation", "kind", "fault"), [
    (404, "head", FileNotFoundError, Fault.MISSING),
    (403, "head", PermissionError, Fault.DENIED),
    (401, "get", PermissionError, Fault.DENIED),
    (412, "get", VersionMismatch, Fault.CHANGED),
    (500, "get", ConnectionError, Fault.TRANSIENT),
    (503, "head", ConnectionError, Fault.TRANSIENT),
    (429, "get", ConnectionError, Fault.TRANSIENT),
    (408, "get", ConnectionError, Fault.TRANSIENT),
    (400, "get", OSError, Fault.FATAL),
    (None, "get", ConnectionError, Fault.TRANSIENT),  # connection dropped
])
def test_real_obstore_errors_are_classified(status, operation, kind, fault):
    from checkpoint_io._obstore import _signal

    exc = _obstore_error(status, operation)
    signal_ = _signal(exc, "s3://bucket/key")
    assert isinstance(signal_, kind), (type(exc), str(exc)[:400])
    assert classify(signal_) is fault, (type(exc), str(exc)[:400])
    if signal_ is not exc:
        assert signal_.__cause__ is exc  # obstore's own error kept as the cause
    if isinstance(signal_, OSError) and not isinstance(signal_, ConnectionError):
        assert signal_.filename == "s3://bucket/key"
        if kind is FileNotFoundError:
            assert signal_.errno == errno.ENOENT


def test_a_refused_connection_is_transient():
    from checkpoint_io._obstore import _signal

    server = _Answering(200)
    endpoint = server.endpoint
    server.close()  # nothing listens there now

    import obstore
    from obstore.store import S3Store

    store = S3Store("bucket", config={"endpoint": endpoint, "access_key_id": "a",
                                      "secret_access_key": "b", "region": "us-east-1"},
                    client_options={"allow_http": True, "connect_timeout": "5s"},
                    retry_config={"max_retries": 0})
    async def head():
        await obstore.head_async(store, "key")

    with pytest.raises(BaseException) as info:
        asyncio.run(asyncio.wait_for(head(), 30))
    assert classify(_signal(info.value, "s3://bucket/key")) is Fault.TRANSIENT


# --- against the emulators ---------------------------------------------------------------

def _write(file: File, data: bytes) -> None:
    with file.open_sync("wb") as f:
        f.write(data)


def _read(file: File) -> bytes:
    with file.open_sync("rb") as f:
        return f.read()


@pytest.mark.emulator
@pytest.mark.parametrize("remote_store", ["s3-obstore", "gcs-obstore", "azure-obstore"],
                         indirect=True)
def test_a_server_ignoring_range_fails_the_read_at_once(remote_store):
    """A 200 with the whole object for a ranged GET: obstore refuses it, and that is a
    RangeMismatch that no retry can cure: one request, a StorageError naming the URI."""
    data = os.urandom(3 * MiB + 5)
    _write(remote_store.file("whole.bin"), data)
    proxy, options = remote_store.proxy()
    file = remote_store.file("whole.bin", storage_options=options, retry=FAST)
    proxy.ignore_ranges = True
    with pytest.raises(StorageError) as info:
        _read(file)
    err = info.value
    assert not isinstance(err, StorageRetryError) and err.uri == file.path
    assert "ignores Range requests" in str(err)
    cause = err.__cause__
    assert isinstance(cause, RangeMismatch) and cause.ignored
    assert len(ranged := [g for g in proxy.gets if g]) == 1, ranged


def _s3_client(server):
    import boto3

    return boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def _pending(store) -> list[str]:
    listing = _s3_client(store.server).list_multipart_uploads(Bucket=store.bucket)
    return [u["Key"] for u in listing.get("Uploads", [])]


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


class _Refused(Exception):
    pass


@pytest.mark.emulator
@pytest.mark.parametrize("remote_store", ["s3-obstore"], indirect=True)
class TestS3MultipartOnObstore:
    def test_a_stream_abandoned_mid_upload_aborts_it(self, remote_store):
        direct = remote_store.file("abandoned.bin")
        _write(direct, b"previous")
        chunk = os.urandom(remote_store.part_size)
        with pytest.raises(_Refused), direct.open_sync("wb") as f:
            for i in range(4):
                f.write(chunk)
                if i == 2:
                    # parts are on their way: the upload is listed while it runs
                    _wait_for(lambda: _pending(remote_store), 30, "the multipart upload")
            raise _Refused
        assert _pending(remote_store) == []
        assert _read(direct) == b"previous"

    def test_a_write_of_known_size_goes_in_8_mib_parts_and_a_huge_one_in_larger(
            self, remote_store):
        file = remote_store.file("sized.bin", part_size=None, size_hint=40 * MiB)
        assert file._transfer().part_size == 8 * MiB
        assert remote_store.file("x", part_size=None)._transfer().part_size == 16 * MiB
        # 200 GiB would need more than 10,000 parts of 8 MiB: they start larger instead.
        huge = remote_store.file("x", part_size=None, size_hint=200 << 30)._transfer()
        assert 9_999 * huge.part_size > 200 << 30
        data = os.urandom(40 * MiB)
        _write(file, data)
        assert _read(file) == data
        head = _s3_client(remote_store.server).head_object(Bucket=remote_store.bucket,
                                                            Key="sized.bin")
        assert head["ETag"].strip('"').endswith("-5")  # 5 parts of 8 MiB

    @pytest.mark.parametrize("options, width", [
        ({"size_hint": 40 * MiB}, 6),           # 8 MiB parts within the upload budget
        ({}, 2),                                # 16 MiB parts of a write of unknown size
        ({"size_hint": 40 * MiB, "concurrency": 3}, 3),  # the caller's width stands
    ])
    def test_parts_in_flight(self, remote_store, monkeypatch, options, width):
        import obstore

        widths = []
        real = obstore.put_async

        def spy(*args, **kwargs):
            widths.append(kwargs.get("max_concurrency"))
            return real(*args, **kwargs)

        monkeypatch.setattr(obstore, "put_async", spy)
        file = remote_store.file("width.bin", part_size=None, **options)
        _write(file, os.urandom(40 * MiB))
        assert widths == [width]

    def test_a_failed_upload_is_aborted_names_the_part_and_leaves_the_old_object(
            self, remote_store):
        direct = remote_store.file("fails.bin")
        _write(direct, b"previous")
        proxy, options = remote_store.proxy()
        file = remote_store.file("fails.bin", storage_options=options, retry=FAST)
        chunk = os.urandom(remote_store.part_size)
        started = time.monotonic()
        with pytest.raises(StorageRetryError) as info, file.open_sync("wb") as f:
            for i in range(6):
                f.write(chunk)
                if i == 1:
                    _wait_for(lambda: _pending(remote_store), 30, "the multipart upload")
                    # Every part upload fails from now on (503); the abort gets through.
                    proxy.fail_when = lambda method, path: method == "PUT" and \
                        "partNumber=" in path
        err = info.value
        assert err.uri == file.path and err.attempts == FAST.attempts
        assert err.operation.startswith("upload part "), err.operation
        assert f"{err.operation} of {file.path} failed after 3 attempts" in str(err)
        assert err.__cause__ is not None
        assert time.monotonic() - started < 60
        proxy.fail_when = None
        # obstore aborted the upload when it failed: nothing listed, no object made.
        _wait_for(lambda: not _pending(remote_store), 30, "no multipart upload listed")
        assert _read(direct) == b"previous"


_KILLED_WRITER = textwrap.dedent("""
    import os, sys
    from checkpoint_io import File
    file = File(path=sys.argv[1], storage_options={"endpoint_url": sys.argv[2]}).with_options(
        part_size=5 << 20, data_path="obstore")
    chunk = os.urandom(1 << 20)
    with file.open_sync("wb") as f:
        for i in range(10_000):
            f.write(chunk)
            if i == 12:
                print("streaming", flush=True)
""")


@pytest.mark.emulator
@pytest.mark.parametrize("remote_store", ["s3-obstore"], indirect=True)
def test_sigkill_mid_save_leaves_no_object_and_the_previous_intact(remote_store):
    direct = remote_store.file("killed.bin")
    _write(direct, b"previous checkpoint")
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, remote_store.uri("killed.bin"),
         remote_store.server.endpoint],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline().strip()
            if line:
                break
        assert line == "streaming", proc.stderr.read() if proc.poll() is not None else line
        _wait_for(lambda: _pending(remote_store), 60, "the writer's multipart upload")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(30)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    # The upload was never completed: the object is the previous one, whole.
    assert _read(direct) == b"previous checkpoint"
    # What a killed process leaves is an incomplete upload, invisible to readers (a bucket
    # lifecycle rule removes such uploads; nothing else can, the process being gone).
    assert _pending(remote_store) == ["killed.bin"]


_SAVE_AND_EXIT = textwrap.dedent("""
    import os, sys
    from checkpoint_io import File
    file = File(path=sys.argv[1], storage_options={"endpoint_url": sys.argv[2]}).with_options(
        part_size=5 << 20, data_path="obstore")
    with file.open_sync("wb") as f:
        f.write(os.urandom(12 << 20))
    print("saved", flush=True)
""")


@pytest.mark.emulator
@pytest.mark.parametrize("remote_store", ["s3-obstore"], indirect=True)
def test_a_process_exits_cleanly_right_after_an_obstore_save(remote_store):
    """obstore's runtime threads finish work a little after a call returns; one touching
    Python while the interpreter finalizes aborted 3 exits in 8 (SIGABRT after a successful
    save). Four short processes must all exit with 0."""
    codes = []
    for i in range(4):
        done = subprocess.run(
            [sys.executable, "-c", _SAVE_AND_EXIT, remote_store.uri(f"exit-{i}.bin"),
             remote_store.server.endpoint], capture_output=True, text=True, timeout=120)
        codes.append((done.returncode, done.stdout.strip(), done.stderr[-500:]))
    assert [c[:2] for c in codes] == [(0, "saved")] * 4, codes
