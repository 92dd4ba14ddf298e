"""Upstream's storage settings turned into fsspec options: the same store, the same
credentials, whichever helper a task gets. (With upstream's own ``flyte.init`` settings:
``tests/test_in_task.py``.)"""

from __future__ import annotations

import sys
import types

import pytest
from flyte_checkpoint import Checkpoint
from flyte_checkpoint._storage import flyte_storage_options

SANDBOX = {
    "FLYTE_AWS_ENDPOINT": "http://minio.flyte:9000",
    "FLYTE_AWS_ACCESS_KEY_ID": "minio",
    "FLYTE_AWS_SECRET_ACCESS_KEY": "miniostorage",
}


def test_s3_from_the_variables_flyte_sets_in_task_pods():
    assert flyte_storage_options("s3://bucket/ckpt", SANDBOX) == {
        "endpoint_url": "http://minio.flyte:9000", "key": "minio", "secret": "miniostorage"}
    assert flyte_storage_options("s3a://bucket/ckpt", SANDBOX)["key"] == "minio"


@pytest.mark.parametrize(("style", "botocore"), [("virtual", "virtual"), ("path", "path")])
def test_s3_addressing_style(style, botocore):
    env = {**SANDBOX, "FLYTE_AWS_S3_ADDRESSING_STYLE": style}
    options = flyte_storage_options("s3://bucket/ckpt", env)
    assert options["config_kwargs"] == {"s3": {"addressing_style": botocore}}


def test_s3_without_settings_leaves_the_clients_own_lookup():
    assert flyte_storage_options("s3://bucket/ckpt", {}) == {}
    # A key without its secret is no credential: the AWS chain decides.
    assert flyte_storage_options("s3://b/c", {"FLYTE_AWS_ACCESS_KEY_ID": "k"}) == {}


def test_azure_from_upstreams_variables():
    env = {"AZURE_STORAGE_ACCOUNT_NAME": "acct", "AZURE_TENANT_ID": "t",
           "AZURE_CLIENT_ID": "c", "AZURE_CLIENT_SECRET": "s"}
    for uri in ("abfs://c/ckpt", "abfss://c/ckpt", "az://c/ckpt"):
        assert flyte_storage_options(uri, env) == {
            "account_name": "acct", "tenant_id": "t", "client_id": "c", "client_secret": "s"}


@pytest.mark.parametrize("uri", ["gs://bucket/ckpt", "/tmp/ckpt", "file:///tmp/c", "memory://c"])
def test_other_stores_take_nothing(uri):
    assert flyte_storage_options(uri, {**SANDBOX, "AZURE_STORAGE_ACCOUNT_NAME": "a"}) == {}


def test_flyte_init_settings_win_over_the_variables_and_are_not_mixed_with_them(monkeypatch):
    """As upstream: a matching ``flyte.init(storage=...)`` object is used alone."""

    class S3:  # what upstream's flyte.storage.S3 holds (matched by class name)
        endpoint = "http://127.0.0.1:9000"
        access_key_id = None
        secret_access_key = None
        region = "eu-west-1"
        addressing_style = None

    initialize = types.ModuleType("flyte._initialize")
    initialize.get_storage = lambda: S3()
    monkeypatch.setitem(sys.modules, "flyte", types.ModuleType("flyte"))
    monkeypatch.setitem(sys.modules, "flyte._initialize", initialize)
    assert flyte_storage_options("s3://bucket/ckpt", SANDBOX) == {
        "endpoint_url": "http://127.0.0.1:9000", "client_kwargs": {"region_name": "eu-west-1"}}
    # A setting for another store: the variables, as upstream's S3.auto() would.
    initialize.get_storage = lambda: type("GCS", (), {})()
    assert flyte_storage_options("s3://bucket/ckpt", SANDBOX)["key"] == "minio"


def test_uninitialised_or_foreign_flyte_module_means_the_variables(monkeypatch):
    def not_initialised():
        raise RuntimeError("Configuration has not been initialized")

    initialize = types.ModuleType("flyte._initialize")
    initialize.get_storage = not_initialised
    monkeypatch.setitem(sys.modules, "flyte", types.ModuleType("flyte"))
    monkeypatch.setitem(sys.modules, "flyte._initialize", initialize)
    assert flyte_storage_options("s3://b/c", SANDBOX)["endpoint_url"] == "http://minio.flyte:9000"
    monkeypatch.delitem(sys.modules, "flyte._initialize")  # a flyte without it (our facade)
    assert flyte_storage_options("s3://b/c", SANDBOX)["key"] == "minio"


def test_checkpoint_options_given_explicitly_take_precedence(monkeypatch, tmp_path):
    for variable, value in SANDBOX.items():
        monkeypatch.setenv(variable, value)
    checkpoint = Checkpoint("s3://bucket/ckpt", storage_options={"endpoint_url": "http://x:1"})
    assert checkpoint._options("s3://bucket/ckpt") == {
        "endpoint_url": "http://x:1", "key": "minio", "secret": "miniostorage"}
    assert Checkpoint(str(tmp_path / "c"))._options(str(tmp_path / "c")) == {}


@pytest.mark.parametrize("uri", ["gs://bucket/ckpt", "gcs://bucket/ckpt"])
def test_a_gcs_emulator_is_reached_anonymously(uri):
    """STORAGE_EMULATOR_HOST (gcsfs's endpoint for an emulator): this edge, not checkpoint-io,
    adds anonymous access, so that no credential lookup reaches for a metadata server."""
    emulator = {"STORAGE_EMULATOR_HOST": "http://127.0.0.1:4443"}
    assert flyte_storage_options(uri, emulator) == {"token": "anon"}
    assert flyte_storage_options(uri, {"STORAGE_EMULATOR_HOST": " "}) == {}
    assert flyte_storage_options("s3://b/k", emulator) == {}


# --- the same settings on checkpoint-io's obstore data path ---------------------------------

def _obstore_config(uri, options):
    """What checkpoint-io's obstore path makes of ``options`` for ``uri``: (path, reason,
    store config)."""
    pytest.importorskip("obstore", reason="obstore data path: obstore is not installed")
    from checkpoint_io._obstore import Untranslatable, store_config
    from checkpoint_io._registry import data_path_for, scheme_of

    path, reason = data_path_for(uri, options)
    try:
        config = store_config(scheme_of(uri), options)["config"]
    except Untranslatable:
        config = None
    return path, reason, config


@pytest.mark.parametrize("style", [None, "virtual", "path"])
def test_upstreams_s3_settings_reach_the_obstore_path(style):
    env = {**SANDBOX, **({"FLYTE_AWS_S3_ADDRESSING_STYLE": style} if style else {})}
    path, _, config = _obstore_config("s3://bucket/ckpt", flyte_storage_options(
        "s3://bucket/ckpt", env))
    assert path == "obstore"
    expected = {"endpoint": "http://minio.flyte:9000", "access_key_id": "minio",
                "secret_access_key": "miniostorage"}
    if style:
        expected["virtual_hosted_style_request"] = style == "virtual"
    assert config == expected


def test_upstreams_flyte_init_s3_region_reaches_the_obstore_path():
    options = {"endpoint_url": "http://127.0.0.1:9000",
               "client_kwargs": {"region_name": "eu-west-1"}}  # what flyte.init gives (above)
    assert _obstore_config("s3://b/c", options) == (
        "obstore", "obstore installed, storage options translated",
        {"endpoint": "http://127.0.0.1:9000", "region": "eu-west-1"})


def test_upstreams_azure_and_gcs_settings_reach_the_obstore_path(monkeypatch):
    env = {"AZURE_STORAGE_ACCOUNT_NAME": "acct", "AZURE_STORAGE_ACCOUNT_KEY": "a2V5",
           "AZURE_TENANT_ID": "t", "AZURE_CLIENT_ID": "c", "AZURE_CLIENT_SECRET": "s"}
    path, _, config = _obstore_config("abfs://c/ckpt", flyte_storage_options("abfs://c/ckpt",
                                                                             env))
    assert path == "obstore"
    assert config == {"account_name": "acct", "account_key": "a2V5", "tenant_id": "t",
                      "client_id": "c", "client_secret": "s"}
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:4443")
    options = flyte_storage_options("gs://b/ckpt")
    assert _obstore_config("gs://b/ckpt", options)[::2] == (
        "obstore", {"skip_signature": True, "base_url": "http://127.0.0.1:4443"})


def test_an_explicit_option_obstore_cannot_take_falls_back_and_says_why():
    options = {**flyte_storage_options("s3://b/c", SANDBOX), "profile": "dev"}
    path, reason, config = _obstore_config("s3://b/c", options)
    assert (path, config) == ("fsspec", None)
    assert reason == "s3:// storage option(s) profile have no obstore equivalent"
