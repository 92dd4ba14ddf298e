"""The checkpoint-format console script: output, exit codes, stdin."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from checkpoint_format import Limits, format_size, write_tarball
from checkpoint_format.cli import main, options_from_env


@pytest.fixture
def good(tmp_path: Path) -> Path:
    src = tmp_path / "tree"
    src.mkdir()
    (src / "model.pt").write_bytes(b"weights" * 100)
    (src / "step.txt").write_text("42")
    path = tmp_path / "good.tar.gz"
    with open(path, "wb") as f:
        write_tarball(src, f)
    return path


@pytest.fixture
def evil(tmp_path: Path) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in ("ok.txt", "../escape.txt", "/etc/passwd"):
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"hi"))
    path = tmp_path / "evil.tar.gz"
    path.write_bytes(buf.getvalue())
    return path


def test_validate_valid(good: Path, capsys) -> None:
    assert main(["validate", str(good)]) == 0
    assert capsys.readouterr().out.strip() == f"{good}: valid tarball (format 1.1, 2 members)"


def test_validate_reports_every_violation(evil: Path, capsys) -> None:
    assert main(["validate", str(evil)]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [
        f"{evil}: member '../escape.txt': name '../escape.txt' has a '..' component"
        " (CF-EXTRACT-02)",
        f"{evil}: member '/etc/passwd': absolute name '/etc/passwd' (CF-EXTRACT-01)",
    ]


def test_validate_missing_file_is_exit_2(tmp_path: Path, capsys) -> None:
    assert main(["validate", str(tmp_path / "nope")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_usage_error_is_exit_2(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2


def test_inspect_text(good: Path, capsys) -> None:
    assert main(["inspect", str(good)]) == 0
    out = capsys.readouterr().out
    assert "tarball" in out and "format version:  1.1" in out
    assert "digests present: 2 of 2 files" in out
    assert "model.pt" in out


@pytest.mark.parametrize(("size", "text"), [
    (0, "0 B"), (999, "999 B"), (1000, "1.0 KB"), (1500, "1.5 KB"), (300_000, "300.0 KB"),
    (999_949, "999.9 KB"), (1_000_000, "1.0 MB"), (4 << 20, "4.2 MB"), (2 * 10**9, "2.0 GB"),
    (3 * 10**12, "3000.0 GB"),
])
def test_sizes_are_told_in_decimal_units(size, text) -> None:
    assert format_size(size) == text


def test_inspect_tells_sizes_in_bytes_and_in_decimal_units(good: Path, capsys) -> None:
    assert main(["inspect", str(good)]) == 0
    out = capsys.readouterr().out
    size = good.stat().st_size
    assert f"  object size:     {size} bytes ({format_size(size)})" in out
    assert "  members:         2 (2 files, 702 B)" in out


def test_inspect_json(good: Path, capsys) -> None:
    assert main(["inspect", "--json", str(good)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["kind"] == "tarball" and doc["compression"] == "gzip"
    assert doc["format_version"] == "1.1" and doc["legacy"] is False
    assert [m["name"] for m in doc["members"]] == ["model.pt", "step.txt"]
    assert all(len(m["sha256"]) == 64 for m in doc["members"])


def test_inspect_raw_payload(tmp_path: Path, capsys) -> None:
    path = tmp_path / "blob"
    path.write_bytes(gzip.compress(b"just some bytes"))
    assert main(["inspect", "--json", str(path)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["kind"], doc["compression"], doc["size"]) == ("raw", "gzip", path.stat().st_size)


def test_console_script_reads_stdin(evil: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "checkpoint_format.cli", "validate", "-"],
        input=evil.read_bytes(),
        capture_output=True,
        check=False,
    )
    assert proc.returncode == 1
    assert b"<stdin>: member '../escape.txt'" in proc.stdout


def test_the_cli_takes_caps_and_threads_from_the_environment(good: Path, capsys) -> None:
    # The tool is this package's edge; the library itself reads no variable.
    assert options_from_env({}) == {"limits": Limits(), "decode_threads": None}
    blank = {"CHECKPOINT_MAX_MEMBERS": " ", "CHECKPOINT_DECODE_THREADS": ""}
    assert options_from_env(blank) == {"limits": Limits(), "decode_threads": None}
    set_ = {"CHECKPOINT_MAX_MEMBERS": "1_000", "CHECKPOINT_MAX_EXPANSION_RATIO": "2.5",
            "CHECKPOINT_DECODE_THREADS": "3"}
    assert options_from_env(set_) == {
        "limits": Limits(max_members=1000, max_expansion_ratio=2.5), "decode_threads": 3}
    for name, bad, allowed in [("CHECKPOINT_MAX_MEMBERS", "0", "a whole number of 1 or more"),
                               ("CHECKPOINT_MAX_TOTAL_SIZE", "1.5", "a whole number"),
                               ("CHECKPOINT_MAX_EXPANSION_RATIO", "inf", "a positive number"),
                               ("CHECKPOINT_DECODE_THREADS", "0", "a whole number"),
                               ("CHECKPOINT_DECODE_THREADS", "many", "a whole number")]:
        with pytest.raises(ValueError, match=f"{name}='{bad}': expected {allowed}"):
            options_from_env({name: bad})
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CHECKPOINT_MAX_MEMBERS", "1")
        assert main(["validate", str(good)]) == 1
        assert "max_members=1" in capsys.readouterr().out
        patch.setenv("CHECKPOINT_MAX_MEMBERS", "none")
        assert main(["validate", str(good)]) == 2
        assert "CHECKPOINT_MAX_MEMBERS='none'" in capsys.readouterr().err
