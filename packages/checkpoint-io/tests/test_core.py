"""Backend-independent rules: the model's JSON shape, the sync bridge, error meaning,
the retry policy, scheme and extra handling."""

from __future__ import annotations

import asyncio
import errno
import importlib.util
import json

import checkpoint_io
import pytest
from checkpoint_io import (
    File,
    MissingBackendError,
    ObjectChangedError,
    RetryPolicy,
    StorageRetryError,
    SyncInAsyncError,
    filesystem,
)
from checkpoint_io._errors import Fault, VersionMismatch, classify
from checkpoint_io._retry import call_with_retries


class TestModel:
    def test_public_surface(self):
        for name in ("File", "StorageRetryError", "RetryPolicy", "filesystem"):
            assert name in checkpoint_io.__all__

    def test_name_defaults_to_basename(self):
        assert File(path="s3://bucket/dir/ckpt.tar").name == "ckpt.tar"
        assert File(path="/tmp/x/y.bin").name == "y.bin"
        assert File(path="gs://b/k", name="other").name == "other"

    def test_json_round_trip_uses_upstream_field_names(self):
        file = File(path="abfs://c/a/b.tar", format="tar", hash="sha256:00")
        dumped = json.loads(file.model_dump_json())
        assert dumped == {"path": "abfs://c/a/b.tar", "name": "b.tar", "format": "tar",
                          "hash": "sha256:00"}
        assert File.model_validate_json(file.model_dump_json()) == file

    def test_upstream_payload_without_name_validates(self):
        file = File.model_validate({"path": "s3://b/k/m.bin"})
        assert file.name == "m.bin" and file.format == "" and file.hash is None

    def test_options_are_not_serialised(self):
        file = File(path="memory://b/x").with_options(storage_options={"k": 1}, part_size=5)
        assert "storage_options" not in file.model_dump_json()

    def test_unsupported_scheme_is_refused(self):
        with pytest.raises(ValueError, match=r"unsupported scheme ftp://"):
            File(path="ftp://host/x")

    def test_bad_mode_is_refused(self):
        with pytest.raises(ValueError, match="mode must be one of"):
            File(path="memory://b/x").open("a")

    def test_from_existing_remote(self):
        file = File.from_existing_remote("gs://b/o.bin")
        assert file.path == "gs://b/o.bin" and file.name == "o.bin"


class TestSyncBridge:
    def test_sync_method_inside_running_loop_raises_clearly(self):
        async def go():
            File(path="memory://b/x").exists_sync()

        with pytest.raises(SyncInAsyncError, match=r"exists_sync\(\).*await exists"):
            asyncio.run(go())

    def test_sync_file_object_inside_loop_raises(self):
        file = File(path="memory://bridge/x")
        with file.open_sync("wb") as f:
            f.write(b"x")

        async def go():
            with file.open_sync("rb"):
                pass

        with pytest.raises(SyncInAsyncError, match="open_sync"):
            asyncio.run(go())

    def test_async_api_works_from_any_loop(self):
        file = File(path="memory://bridge/y")

        async def go():
            async with file.open("wb") as f:
                await f.write(b"abc")
            return await file.exists()

        assert asyncio.run(go()) and asyncio.run(go())


class _Boto(Exception):
    def __init__(self, code, status):
        super().__init__(code)
        self.response = {"Error": {"Code": code},
                         "ResponseMetadata": {"HTTPStatusCode": status}}


class _Http(Exception):
    def __init__(self, status):
        super().__init__(status)
        self.status_code = status


class ClientConnectionError(Exception):  # named like aiohttp's
    pass


class TestClassify:
    @pytest.mark.parametrize(("exc", "fault"), [
        (FileNotFoundError("x"), Fault.MISSING),
        (_Boto("NoSuchKey", 404), Fault.MISSING),
        (_Http(404), Fault.MISSING),
        (PermissionError("x"), Fault.DENIED),
        (_Boto("AccessDenied", 403), Fault.DENIED),
        (_Http(401), Fault.DENIED),
        (_Boto("SlowDown", 503), Fault.TRANSIENT),
        (_Boto("InternalError", 500), Fault.TRANSIENT),
        (_Http(429), Fault.TRANSIENT),
        (ConnectionResetError(), Fault.TRANSIENT),
        (TimeoutError(), Fault.TRANSIENT),
        (ClientConnectionError(), Fault.TRANSIENT),
        (ValueError("bad"), Fault.FATAL),
        (_Boto("InvalidArgument", 400), Fault.FATAL),
        (_Boto("PreconditionFailed", 412), Fault.CHANGED),  # S3 If-Match
        (_Http(412), Fault.CHANGED),  # Azure ConditionNotMet
        (VersionMismatch("generation 7 is gone"), Fault.CHANGED),  # GCS
    ])
    def test_meaning(self, exc, fault):
        assert classify(exc) is fault

    def test_looks_through_causes(self):
        outer = OSError(errno.EIO, "wrapped")
        outer.__cause__ = _Boto("SlowDown", 503)
        assert classify(outer) is Fault.TRANSIENT


def _flaky(errors):
    calls = []

    async def request():
        calls.append(1)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return "ok"

    return request, calls


FAST = RetryPolicy(attempts=4, base_delay=0.001, max_delay=0.002)


class TestRetry:
    def test_transient_faults_are_retried_then_succeed(self):
        request, calls = _flaky([_Boto("SlowDown", 503)] * 3)
        assert asyncio.run(call_with_retries(FAST, "s3://b/k", "read", request)) == "ok"
        assert len(calls) == 4

    def test_exhausted_budget_raises_storage_retry_error(self):
        last = _Boto("SlowDown", 503)
        request, calls = _flaky([_Boto("SlowDown", 503)] * 3 + [last])
        with pytest.raises(StorageRetryError) as info:
            asyncio.run(call_with_retries(FAST, "s3://b/k", "read", request))
        err = info.value
        assert (err.uri, err.operation, err.attempts) == ("s3://b/k", "read", 4)
        assert err.__cause__ is last
        assert str(err).startswith("read of s3://b/k failed after 4 attempts")
        assert "SlowDown" in str(err)
        assert len(calls) == 4

    def test_missing_is_never_retried_and_names_the_uri(self):
        request, calls = _flaky([_Boto("NoSuchKey", 404)] * 5)
        with pytest.raises(FileNotFoundError) as info:
            asyncio.run(call_with_retries(FAST, "s3://b/k", "read", request))
        assert len(calls) == 1
        assert info.value.filename == "s3://b/k"
        assert isinstance(info.value.__cause__, _Boto)

    def test_changed_version_is_never_retried_and_says_so(self):
        request, calls = _flaky([_Boto("PreconditionFailed", 412)] * 5)
        with pytest.raises(ObjectChangedError) as info:
            asyncio.run(call_with_retries(FAST, "s3://b/k", "read bytes 5-9", request))
        assert len(calls) == 1
        assert str(info.value) == (
            "read bytes 5-9 of s3://b/k: the object was replaced or deleted while being "
            "read; refusing to mix versions (open it again to read the new one)")
        assert info.value.errno == errno.ESTALE
        assert isinstance(info.value.__cause__, _Boto)

    def test_denied_is_never_retried(self):
        request, calls = _flaky([_Http(403)] * 5)
        with pytest.raises(PermissionError, match="access denied"):
            asyncio.run(call_with_retries(FAST, "gs://b/k", "exists", request))
        assert len(calls) == 1

    def test_other_errors_propagate_unchanged(self):
        request, calls = _flaky([ValueError("bad request")])
        with pytest.raises(ValueError, match="bad request"):
            asyncio.run(call_with_retries(FAST, "gs://b/k", "exists", request))
        assert len(calls) == 1

    def test_hung_attempt_times_out_and_counts(self):
        async def hang():
            await asyncio.sleep(10)

        policy = RetryPolicy(attempts=2, base_delay=0.001, max_delay=0.001,
                             attempt_timeout=0.05)
        with pytest.raises(StorageRetryError) as info:
            asyncio.run(call_with_retries(policy, "az://c/k", "read", hang))
        assert info.value.attempts == 2
        assert isinstance(info.value.__cause__, TimeoutError)

    def test_backoff_is_jittered_and_capped(self):
        policy = RetryPolicy(base_delay=1, max_delay=4)
        delays = [policy.backoff(10) for _ in range(200)]
        assert all(0 <= d <= 4 for d in delays) and len(set(delays)) > 100

    def test_policy_validates(self):
        with pytest.raises(ValueError):
            RetryPolicy(base_delay=5, max_delay=1)
        with pytest.raises(ValueError):
            RetryPolicy(attempts=0)

    def test_retry_error_pickles(self):
        import pickle

        err = StorageRetryError("s3://b/k", "read", 3, 1.5, "boom")
        back = pickle.loads(pickle.dumps(err))
        assert (back.uri, back.operation, back.attempts, str(back)) == (
            "s3://b/k", "read", 3, str(err))


class TestExtras:
    @pytest.mark.parametrize(("uri", "extra", "module"), [
        ("s3://b/k", "s3", "s3fs"), ("gs://b/k", "gcs", "gcsfs"),
        ("abfs://c/k", "azure", "adlfs"), ("az://c/k", "azure", "adlfs"),
    ])
    def test_missing_client_names_the_pip_extra(self, monkeypatch, uri, extra, module):
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: None if name == module else real(name, *a))
        with pytest.raises(MissingBackendError, match=rf"pip install 'checkpoint-io\[{extra}\]'"):
            File(path=uri).with_options(storage_options={"x": uri}).exists_sync()
        with pytest.raises(MissingBackendError):
            filesystem(uri)

    def test_filesystem_helper_returns_fsspec_filesystem(self, tmp_path):
        fs = filesystem("memory://b/x")
        fs.pipe_file("memory://helper/x", b"1")
        assert fs.cat_file("memory://helper/x") == b"1"
        assert filesystem(str(tmp_path)).exists(str(tmp_path))


@pytest.mark.parametrize("attribute", ["concurrency", "read_concurrency"])
def test_widths_are_the_callers_over_the_stores(attribute):
    # No variable is read here: flyte-checkpoint's Settings parses CHECKPOINT_IO_* (and
    # tests that) and hands the widths to File.with_options.
    from checkpoint_io._memory import MemoryBackend

    file = File(path="memory://b/k")
    default = getattr(file._transfer(), attribute)
    assert default == getattr(MemoryBackend, attribute)
    assert getattr(file.with_options(**{attribute: 3})._transfer(), attribute) == 3
    assert getattr(file.with_options(**{attribute: 5})._transfer(), attribute) == 5
    assert getattr(file.with_options(**{attribute: None})._transfer(), attribute) == default


def test_backend_options_are_part_of_the_backend_cache_key(tmp_path):
    from checkpoint_io._backend import BackendOptions
    from checkpoint_io._loop import run_sync

    def backends(*files):
        async def run():
            return [f._transfer().backend for f in files]

        return run_sync(run, name="backends")

    plain = File(path=str(tmp_path / "a"))
    buffered = plain.with_options(direct_writes=False)
    again = File(path=str(tmp_path / "b")).with_options(direct_writes=False)
    one, two, three = backends(plain, buffered, again)
    assert one is not two and two is three  # shared per configuration, not per File
    assert one.options == BackendOptions() and two.options == BackendOptions(direct_writes=False)
    # An unset switch keeps what the File has; the other switch is independent.
    kept = buffered.with_options(gcs_composite=True)
    assert kept._options.backend == BackendOptions(direct_writes=False, gcs_composite=True)


def test_storage_errors_share_one_os_error_root() -> None:
    """Callers catch every store failure as checkpoint_io.StorageError, or as OSError."""
    from checkpoint_io import (
        MissingBackendError,
        ObjectChangedError,
        StorageError,
        StorageRetryError,
    )

    assert issubclass(StorageError, OSError)
    assert issubclass(StorageRetryError, StorageError)
    assert issubclass(ObjectChangedError, StorageError)
    assert issubclass(MissingBackendError, ImportError)
    assert not issubclass(MissingBackendError, StorageError)
