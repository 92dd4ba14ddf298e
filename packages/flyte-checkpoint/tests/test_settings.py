"""Settings at the edge (issue 16): every variable of ``flyte_checkpoint.VARIABLES`` parsed
the same way, once, when a Checkpoint is built; each one's value reaching the layer that
uses it, end to end through a save or a load; a blank one unset; a bad one named."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import re
import tarfile
import tempfile
from pathlib import Path

import pytest
from checkpoint_format import Limits, write_tarball
from checkpoint_io import File
from flyte_checkpoint import Checkpoint, CheckpointLoadError, Settings, SettingsError
from flyte_checkpoint._settings import VARIABLES, readme_table

MiB = 1 << 20
README = Path(__file__).resolve().parents[1] / "README.md"


def _env(tmp_path: Path, **variables: str) -> dict[str, str]:
    """An attempt's environment: this attempt's destination, the previous one's object."""
    return {"FLYTE_CHECKPOINT_PATH": str(tmp_path / "store" / "attempt-2" / "ckpt"),
            "FLYTE_PREV_CHECKPOINT_PATH": str(tmp_path / "store" / "attempt-1" / "ckpt"),
            **variables}


def _previous(tmp_path: Path, tar: bytes) -> None:
    path = tmp_path / "store" / "attempt-1" / "ckpt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tar)


def _tarball(tree: dict[str, bytes]) -> bytes:
    """A gzip tarball of ``tree`` as our writer makes it."""
    with tempfile.TemporaryDirectory() as scratch:
        for name, data in tree.items():
            path = Path(scratch, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        sink = io.BytesIO()
        write_tarball(scratch, sink)
        return sink.getvalue()


def _implied(tmp_path: Path) -> bytes:
    """One file three directories down, with no member for the directories (CF-EXTRACT-10)."""
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w", format=tarfile.PAX_FORMAT) as archive:
        info = tarfile.TarInfo("a/b/c/f.txt")
        info.size = 2
        archive.addfile(info, io.BytesIO(b"hi"))
    return gzip.compress(tar.getvalue(), 1)


def _ratio(tmp_path: Path) -> bytes:
    """70 MiB of zeros: past the ratio's 64 MiB grace, far above a ratio of 2."""
    src = tmp_path / "zeros"
    src.mkdir()
    with open(src / "zeros.bin", "wb") as f:
        f.truncate(70 * MiB)
    sink = io.BytesIO()
    write_tarball(src, sink)
    return sink.getvalue()


# Each cap, a small value and an object that breaks it (the defaults let it through).
CAPS = {
    "CHECKPOINT_MAX_MEMBERS": ("1", lambda p: _tarball({"a": b"1", "b": b"2"}),
                               "max_members=1"),
    "CHECKPOINT_MAX_TOTAL_SIZE": ("10", lambda p: _tarball({"a": b"x" * 100}),
                                  "max_total_size"),
    "CHECKPOINT_MAX_NAME_LENGTH": ("8", lambda p: _tarball({"a-long-name.txt": b"1"}),
                                   "max_name_length=8"),
    "CHECKPOINT_MAX_EXPANSION_RATIO": ("2", _ratio, "max_expansion_ratio"),
    "CHECKPOINT_MAX_EXTENDED_HEADER": ("16", lambda p: _tarball({"a": b"1"}),
                                       "max_extended_header=16"),
    "CHECKPOINT_MAX_IMPLIED_DIRS": ("2", _implied, "max_implied_dirs"),
}


def test_every_cap_of_limits_has_its_variable():
    names = {v.name for v in VARIABLES}
    assert set(CAPS) == {n for n in names if n.startswith("CHECKPOINT_MAX_")}


@pytest.mark.parametrize("variable", sorted(CAPS))
def test_each_cap_takes_effect_through_checkpoint(tmp_path, variable):
    value, make, named = CAPS[variable]
    _previous(tmp_path, make(tmp_path))
    with Checkpoint.from_env(_env(tmp_path, **{variable: "  "})) as cp:  # blank: the default
        assert cp.settings.limits == Limits()
        assert cp.load_sync() == cp.path
    with Checkpoint.from_env(_env(tmp_path, **{variable: value})) as cp:
        with pytest.raises(CheckpointLoadError, match="CF-LIMIT-01") as info:
            cp.load_sync()
        assert named in str(info.value)
        assert list(cp.path.iterdir()) == []


def _spy(monkeypatch, owner, name, record):
    """Wrap ``owner.name`` so that each call's result (or self) is handed to ``record``."""
    real = getattr(owner, name)

    def spy(*args, **kwargs):
        result = real(*args, **kwargs)
        record(args, kwargs, result)
        return result

    monkeypatch.setattr(owner, name, spy)


def _save_and_load(tmp_path, env, tree=None):
    src = tmp_path / "tree"
    src.mkdir(parents=True, exist_ok=True)
    for name, data in (tree or {"model.bin": os.urandom(9 * MiB), "step": b"7"}).items():
        (src / name).write_bytes(data)
    with Checkpoint.from_env(env) as first:
        first.save_sync(src)
    next_env = {**env, "FLYTE_PREV_CHECKPOINT_PATH": env["FLYTE_CHECKPOINT_PATH"],
                "FLYTE_CHECKPOINT_PATH": env["FLYTE_CHECKPOINT_PATH"] + "-next"}
    with Checkpoint.from_env(next_env) as second:
        assert second.load_sync() == second.path
        assert (second.path / "step").read_bytes() == b"7"


def test_decode_threads_reach_the_decoder(tmp_path, monkeypatch):
    from checkpoint_format import _codec

    widths = []
    _spy(monkeypatch, _codec.GzipMembers, "__init__",
         lambda args, kwargs, _: widths.append(args[0]._width))
    _save_and_load(tmp_path, _env(tmp_path, CHECKPOINT_DECODE_THREADS="3"))
    assert widths == [3]
    widths.clear()
    _save_and_load(tmp_path / "blank", _env(tmp_path / "blank", CHECKPOINT_DECODE_THREADS=""))
    assert widths == [_codec.decode_width()]


def test_compress_threads_reach_the_writer(tmp_path, monkeypatch):
    from checkpoint_format import _writer

    widths = []
    _spy(monkeypatch, _writer, "compress_width", lambda args, kwargs, result: widths.append(result))
    _save_and_load(tmp_path, _env(tmp_path, CHECKPOINT_COMPRESS_THREADS="3"))
    assert widths == [3]
    widths.clear()
    _save_and_load(tmp_path / "blank", _env(tmp_path / "blank", CHECKPOINT_COMPRESS_THREADS=""))
    from checkpoint_format._width import cores

    assert widths == [cores()]  # the default: every core


@pytest.mark.parametrize("variable, attribute", [
    ("CHECKPOINT_IO_CONCURRENCY", "concurrency"),
    ("CHECKPOINT_IO_READ_CONCURRENCY", "read_concurrency"),
])
def test_io_widths_reach_every_transfer(tmp_path, monkeypatch, variable, attribute):
    from checkpoint_io import _stream

    seen = []
    _spy(monkeypatch, _stream.Transfer, "__init__",
         lambda args, kwargs, _: seen.append(getattr(args[0], attribute)))
    _save_and_load(tmp_path, _env(tmp_path, **{variable: "3"}))
    assert seen and set(seen) == {3}
    seen.clear()
    _save_and_load(tmp_path / "blank", _env(tmp_path / "blank", **{variable: " "}))
    from checkpoint_io._local import LocalBackend

    assert seen and set(seen) == {getattr(LocalBackend, attribute)}  # the store's default


def test_the_memory_budget_reaches_every_transfer(tmp_path, monkeypatch):
    from checkpoint_io import _stream

    seen = []
    _spy(monkeypatch, _stream.Transfer, "__init__",
         lambda args, kwargs, _: seen.append(args[0].memory_budget))
    _save_and_load(tmp_path, _env(tmp_path, CHECKPOINT_IO_MEMORY_BUDGET="64_000_000"))
    assert seen and set(seen) == {64_000_000}
    seen.clear()
    _save_and_load(tmp_path / "blank", _env(tmp_path / "blank", CHECKPOINT_IO_MEMORY_BUDGET=""))
    assert seen and set(seen) == {_stream.DEFAULT_MEMORY_BUDGET}


@pytest.mark.parametrize("value, direct", [("off", False), ("on", True), ("", True)])
def test_direct_writes_reach_the_local_writer(tmp_path, monkeypatch, value, direct):
    from checkpoint_io import _local

    seen = []
    real = _local._DirectWriter.__init__

    def spy(self, fd, *, direct=True):
        seen.append(direct)
        real(self, fd, direct=direct)

    monkeypatch.setattr(_local._DirectWriter, "__init__", spy)
    _save_and_load(tmp_path, _env(tmp_path, CHECKPOINT_IO_DIRECT_WRITES=value))
    assert seen and set(seen) == {direct}  # 9 MiB: more than one 8 MiB part, so parts


@pytest.mark.parametrize("value, composite", [("1", True), ("off", False), ("", False)])
def test_gcs_composite_reaches_the_gcs_backend(tmp_path, value, composite):
    pytest.importorskip("gcsfs")
    from checkpoint_io import _gcs
    from checkpoint_io._loop import run_sync

    env = {"FLYTE_CHECKPOINT_PATH": "gs://bucket/ckpt", "CHECKPOINT_IO_GCS_COMPOSITE": value}
    # No request is made: the backend is built (anonymously, for a server never reached)
    # and asked how it would upload.
    cp = Checkpoint.from_env(env, storage_options={"token": "anon",
                                                   "endpoint_url": "http://127.0.0.1:9"})

    async def upload_kind():
        backend = cp._file("gs://bucket/ckpt")._transfer().backend
        return backend.composite_uploads, type(backend.new_upload("gs://bucket/ckpt"))

    uploads, kind = run_sync(upload_kind, name="upload_kind")
    assert uploads is composite
    assert kind is (_gcs._GCSComposeUpload if composite else _gcs._GCSUpload)


@pytest.mark.parametrize("value, shown", [("on", True), ("off", False), ("auto", False),
                                          ("", False)])
def test_progress_setting_draws_or_not(tmp_path, capsys, value, shown):
    _save_and_load(tmp_path, _env(tmp_path, FLYTE_CHECKPOINT_PROGRESS=value),
                   tree={"step": b"7"})
    err = capsys.readouterr().err
    assert ("checkpoint save:" in err and "checkpoint load:" in err) is shown
    if not shown:
        assert "checkpoint save:" not in err  # auto: standard error is no terminal here


BAD = {
    "CHECKPOINT_MAX_MEMBERS": ("0", "a whole number of 1 or more"),
    "CHECKPOINT_MAX_TOTAL_SIZE": ("1TB", "a whole number of 1 or more"),
    "CHECKPOINT_MAX_NAME_LENGTH": ("-5", "a whole number of 1 or more"),
    "CHECKPOINT_MAX_EXPANSION_RATIO": ("inf", "a positive number"),
    "CHECKPOINT_MAX_EXTENDED_HEADER": ("1.5", "a whole number of 1 or more"),
    "CHECKPOINT_MAX_IMPLIED_DIRS": ("lots", "a whole number of 1 or more"),
    "CHECKPOINT_DECODE_THREADS": ("0", "a whole number of 1 or more"),  # was silently 1
    # (a superscript two is a digit to str.isdigit(), and no number to int())
    "CHECKPOINT_COMPRESS_THREADS": ("\u00b2", "a whole number of 1 or more"),
    "CHECKPOINT_IO_CONCURRENCY": ("0", "a whole number of 1 or more"),
    "CHECKPOINT_IO_READ_CONCURRENCY": ("-1", "a whole number of 1 or more"),
    "CHECKPOINT_IO_MEMORY_BUDGET": ("256MiB", "a whole number of 1 or more"),
    "CHECKPOINT_IO_DIRECT_WRITES": ("sometimes", "one of 1, on, true, yes, 0, off, false, no"),
    "CHECKPOINT_IO_GCS_COMPOSITE": ("2", "one of 1, on, true, yes, 0, off, false, no"),
    "CHECKPOINT_DISTRIBUTED_TIMEOUT": ("0", "a positive number"),
    "CHECKPOINT_NODE_ID": ("node\n1", "a printable name of at most 255 characters"),
    "CHECKPOINT_IO_DATA_PATH": ("fast", "one of auto, obstore, fsspec"),
    "FLYTE_CHECKPOINT_PROGRESS": ("loud", "auto or one of 1, on, true, yes, 0, off, false, no"),
}


def test_every_variable_has_a_bad_value_here():
    assert set(BAD) == {v.name for v in VARIABLES}


@pytest.mark.parametrize("variable", sorted(BAD))
def test_a_bad_value_fails_at_construction_naming_the_variable(tmp_path, variable):
    value, allowed = BAD[variable]
    with pytest.raises(SettingsError) as info:
        Checkpoint.from_env(_env(tmp_path, **{variable: value}))
    assert str(info.value) == f"{variable}={value!r}: expected {allowed}"
    assert info.value.variable == variable and info.value.value == value
    assert isinstance(info.value, ValueError)
    again = pickle.loads(pickle.dumps(info.value))
    assert str(again) == str(info.value) and again.variable == variable
    assert not (tmp_path / "store").exists()  # nothing was made


@pytest.mark.parametrize("variable", sorted(v for v in BAD if v.startswith("CHECKPOINT_MAX_")
                                             or v == "CHECKPOINT_DECODE_THREADS"))
def test_the_format_cli_refuses_the_same_bad_values(variable):
    """checkpoint-format's CLI parses its variables itself: the same values fail there too."""
    from checkpoint_format.cli import options_from_env

    value, allowed = BAD[variable]
    with pytest.raises(ValueError, match=f"^{variable}=.*: expected {allowed}$"):
        options_from_env({variable: value})
    with pytest.raises(ValueError, match=f"^{variable}="):
        options_from_env({variable: "\u00b2"})


@pytest.mark.parametrize("variable", sorted(BAD))
def test_a_blank_value_is_unset(variable):
    assert Settings.from_env({variable: ""}) == Settings.from_env({variable: " \t"}) == Settings()


def test_checkpoint_reads_the_environment_once_at_construction(tmp_path, monkeypatch):
    monkeypatch.setenv("CHECKPOINT_DECODE_THREADS", "2")
    cp = Checkpoint(str(tmp_path / "a"))
    monkeypatch.setenv("CHECKPOINT_DECODE_THREADS", "0")  # too late to matter, or to fail
    assert cp.settings.decode_threads == 2
    with pytest.raises(SettingsError, match="CHECKPOINT_DECODE_THREADS='0'"):
        Checkpoint(str(tmp_path / "b"))
    given = Settings(decode_threads=4)
    assert Checkpoint(str(tmp_path / "c"), settings=given).settings is given  # env not read


def test_copies_and_pickles_keep_the_settings(tmp_path, monkeypatch):
    import copy

    settings = Settings(limits=Limits(max_members=7), io_concurrency=3, direct_writes=False,
                        progress=False)
    cp = Checkpoint(str(tmp_path / "a"), settings=settings, storage_options={"x": 1})
    monkeypatch.setenv("CHECKPOINT_IO_CONCURRENCY", "bad")  # never read by the copies
    for again in (pickle.loads(pickle.dumps(cp)), copy.copy(cp), copy.deepcopy(cp)):
        assert again.settings == settings and again._storage_options == {"x": 1}


def test_settings_check_their_own_values():
    for bad in ({"decode_threads": 0}, {"io_concurrency": True}, {"compress_threads": 1.5},
                {"direct_writes": "off"}, {"progress": "auto"}, {"limits": {"max_members": 1}}):
        with pytest.raises(ValueError, match=f"Settings.{next(iter(bad))} must be"):
            Settings(**bad)


def test_the_readme_table_is_the_code():
    text = README.read_text()
    found = re.search(r"<!-- settings-table -->\n(.*?)\n<!-- /settings-table -->", text, re.S)
    assert found, "the README's table of variables lost its markers"
    assert found.group(1) == readme_table(), "regenerate it: print(readme_table())"


@pytest.mark.parametrize("value", ["auto", "obstore", "FSSPEC"])
def test_the_data_path_reaches_the_file(value):
    settings = Settings.from_env({"CHECKPOINT_IO_DATA_PATH": value})
    assert settings.data_path == value.lower()
    file = File(path="s3://bucket/key").with_options(**settings.file_options())
    assert file._options.backend.data_path == value.lower()
