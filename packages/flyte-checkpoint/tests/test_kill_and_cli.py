"""Process-level behaviour: SIGKILL during a save, and the flyte-checkpoint CLI."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from flyte_checkpoint import Checkpoint
from flyte_checkpoint._cli import main


def _writing_beside(target: pathlib.Path) -> bool:
    """Whether a hidden temporary sibling of ``target`` holds bytes: its writer has started."""
    for path in target.parent.iterdir():
        try:
            if path.name.startswith(".") and path.is_file() and path.stat().st_size > 0:
                return True
        except FileNotFoundError:  # renamed or removed while we looked
            continue
    return False


def test_sigkill_during_save_leaves_the_previous_object(tmp_path) -> None:
    dest = tmp_path / "store" / "obj"
    Checkpoint(str(dest)).save_sync(b"previous checkpoint")
    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        (src / f"shard{i}.bin").write_bytes(os.urandom(32 << 20))
    script = textwrap.dedent(
        f"""
        import sys, flyte
        cp = flyte.Checkpoint({str(dest)!r})
        print("saving", flush=True)
        cp.save_sync({str(src)!r})
        print("saved", flush=True)
        """
    )
    with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                          text=True) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "saving"
        # Kill only once the child has provably started writing: bytes in its hidden
        # temporary sibling of the object (a fixed sleep could kill before the first byte).
        deadline = time.monotonic() + 60
        while not _writing_beside(dest):
            assert proc.poll() is None, "the child ended before it was seen writing"
            assert time.monotonic() < deadline, "the child never started writing"
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert dest.read_bytes() == b"previous checkpoint"
    # Whatever temporary sibling the writer had is hidden, never visible as the object.
    assert [p.name for p in dest.parent.iterdir() if not p.name.startswith(".")] == ["obj"]


def test_run_retries_and_passes_locations(tmp_path, capsys) -> None:
    script = tmp_path / "task.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, sys, flyte
            cp = flyte.Checkpoint.from_env()
            prev = cp.load_sync()
            attempt = int(os.environ["FLYTE_ATTEMPT"])
            seen = prev.read_text() if prev else ""
            cp.save_sync(f"{seen}{attempt},".encode())
            sys.exit(0 if attempt == 3 else 1)
            """
        )
    )
    store = tmp_path / "store"
    assert main(["run", "--retries", "4", "--store", str(store), "--",
                 sys.executable, str(script)]) == 0
    out = capsys.readouterr().out
    assert "attempt 3: succeeded" in out and "attempt 4" not in out
    (final,) = store.glob("run-*/attempt-3/_flytecheckpoints")
    assert final.read_bytes() == b"1,2,3,"


def test_run_reports_exhausted_retries(tmp_path, capsys) -> None:
    code = main(["run", "--retries", "1", "--store", str(tmp_path), "--",
                 sys.executable, "-c", "raise SystemExit(3)"])
    assert code == 3
    assert "all 2 attempts failed" in capsys.readouterr().err


def test_inspect_and_validate_a_stored_object(tmp_path, capsys) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "w.bin").write_bytes(b"w" * 1000)
    uri = f"file://{tmp_path}/obj"
    Checkpoint(uri).save_sync(src)
    assert main(["validate", uri]) == 0
    assert "valid tarball (format 1.1, 1 members)" in capsys.readouterr().out
    assert main(["inspect", "--json", uri]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["members"][0]["name"] == "w.bin"
    assert main(["validate", f"file://{tmp_path}/missing"]) == 2
    assert "no object at" in capsys.readouterr().err


def test_inspect_without_the_client_library_names_the_extra(monkeypatch, capsys) -> None:
    import importlib.util

    # Neither S3 client: with obstore alone the obstore data path would serve the URI.
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec",
        lambda name, *a: None if name in ("s3fs", "obstore") else real(name, *a)
    )
    assert main(["inspect", "s3://bucket/ckpt"]) == 2
    assert "pip install 'flyte-checkpoint[s3]'" in capsys.readouterr().err


def test_demo_runs_end_to_end(tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "flyte_checkpoint._cli", "demo", "--steps", "30", "--every", "7",
         "--kill-at", "10,25", "--store", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "attempt 2: resumed at step 7 from a 1.2 MB checkpoint" in proc.stdout
    assert "attempt 3: resumed at step 21" in proc.stdout
    assert "identical" in proc.stdout and "OK: training survived every kill" in proc.stdout


@pytest.mark.parametrize("argv", [["run", "--retries", "1"], ["run", "--"]])
def test_run_without_a_command_is_a_usage_error(argv, capsys) -> None:
    assert main(argv) == 2
    assert "no command given" in capsys.readouterr().err


def test_latest_checkpoint(tmp_path) -> None:
    from flyte import latest_checkpoint

    assert latest_checkpoint(tmp_path / "missing") is None
    for i, name in enumerate(["a/last.ckpt", "b/c/last.ckpt", "epoch=3.ckpt", "epoch=10.ckpt"]):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(name)
        os.utime(path, ns=(10**18 + i, 10**18 + i))
    assert latest_checkpoint(tmp_path) == tmp_path / "b/c/last.ckpt"
    assert latest_checkpoint(tmp_path, "*.ckpt") == tmp_path / "epoch=10.ckpt"
    by_epoch = latest_checkpoint(
        tmp_path, "epoch=*.ckpt", key=lambda p: int(p.stem.split("=")[1])
    )
    assert by_epoch == pathlib.Path(tmp_path / "epoch=10.ckpt")
    assert latest_checkpoint(tmp_path, "**/nothing") is None


def test_run_skips_attempts_that_saved_nothing(tmp_path, capsys) -> None:
    script = tmp_path / "task.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, sys, flyte
            cp = flyte.Checkpoint.from_env()
            attempt = int(os.environ["FLYTE_ATTEMPT"])
            prev = cp.load_sync()
            print("loaded", prev.read_bytes() if prev else None, flush=True)
            if attempt == 1:
                cp.save_sync(b"step-40")
            sys.exit(0 if attempt == 3 else 1)   # attempt 2 dies before saving
            """
        )
    )
    assert main(["run", "--retries", "3", "--store", str(tmp_path / "s"), "--",
                 sys.executable, str(script)]) == 0
    out = capsys.readouterr().out
    assert "attempt 2: saved no checkpoint; the next attempt resumes from" in out
    assert "attempt 3: resume from" in out and (
        "attempt-1/_flytecheckpoints" in out.split("attempt 3: resume from")[1].splitlines()[0]
    )


_DEEP_SCRATCH = textwrap.dedent("""
    import os, sys, tempfile
    scratch = tempfile.gettempdir()
    print(scratch, flush=True)
    fd = os.open(scratch, os.O_RDONLY)
    for _ in range(1_500):  # past the recursion limit; from descriptors, short paths only
        os.mkdir("d", dir_fd=fd)
        inner = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = inner
    os.close(os.open("leaf", os.O_CREAT | os.O_WRONLY, 0o400, dir_fd=fd))
    os.chmod(fd, 0o500)  # a read-only directory, as a restore of one leaves it
    sys.exit(3)
""")


def test_run_removes_a_deep_read_only_scratch_of_a_failed_attempt(tmp_path, capfd) -> None:
    from flyte_checkpoint._runner import run_attempts

    lines: list[str] = []
    attempts = run_attempts([sys.executable, "-c", _DEEP_SCRATCH], retries=0,
                            store=str(tmp_path / "store"), echo=lines.append)
    assert [a.returncode for a in attempts] == [3]
    scratch = pathlib.Path(capfd.readouterr().out.split()[0])
    assert scratch.name.startswith("flyte-checkpoint-attempt1-")
    assert not scratch.exists()
    assert not any("could not remove" in line for line in lines)


@pytest.mark.parametrize("command", [["demo", "--steps", "3"],
                                     ["run", "--retries", "1", "--", "true"]])
def test_a_bad_setting_stops_a_command_before_any_attempt(tmp_path, monkeypatch, capsys,
                                                          command) -> None:
    monkeypatch.setenv("CHECKPOINT_IO_CONCURRENCY", "0")
    assert main([*command[:1], "--store", str(tmp_path / "store"), *command[1:]]) == 2
    err = capsys.readouterr().err
    assert f"flyte-checkpoint {command[0]}: CHECKPOINT_IO_CONCURRENCY='0'" in err
    assert not (tmp_path / "store").exists()  # no attempt ran
