"""The upstream Flyte SDK, run out of process.

Upstream (PyPI ``flyte``) lives in virtual environments of its own, made by
``bash .ci/install-upstream.sh``; this test process never imports it.

- ``upstream_python``: upstream alone (the interoperability tests); runs a snippet with JSON
  arguments in and a JSON result out.
- ``task_venv``: upstream with CPU PyTorch and Lightning, into which the session installs
  wheels of our three packages, as a task image would hold them (the in-task tests).
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

INSTALL_COMMAND = "bash .ci/install-upstream.sh"

# Runs inside the upstream interpreter: read ``args`` from stdin, run the snippet with
# ``args`` in scope, write the snippet's ``result`` as JSON to the file named by argv[1].
# A result file rather than stdout, so that anything the SDK logs cannot corrupt it.
_RUNNER = """\
import json, sys
namespace = {"__name__": "__upstream_snippet__", "args": json.load(sys.stdin), "result": None}
exec(compile(sys.argv[2], "<upstream snippet>", "exec"), namespace)
with open(sys.argv[1], "w", encoding="utf-8") as out:
    json.dump(namespace["result"], out)
"""


def upstream_venv() -> Path:
    """Where ``.ci/install-upstream.sh`` puts the upstream virtual environment."""
    return _cached_venv("FLYTE_UPSTREAM_VENV", "upstream-venv")


def _cached_venv(variable: str, name: str) -> Path:
    explicit = os.environ.get(variable)
    if explicit:
        return Path(explicit)
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "flyte-checkpoint" / name


class UpstreamPython:
    """The upstream venv's interpreter; :meth:`run` executes a snippet in a fresh process."""

    def __init__(self, executable: Path, version: str) -> None:
        self.executable = executable
        self.version = version

    def run(self, snippet: str, /, *, timeout: float = 60, **args: Any) -> Any:
        """Run ``snippet`` with ``args`` (JSON-encodable) bound to ``args``; return its ``result``.

        The snippet sets a JSON-encodable ``result``. A non-zero exit or a timeout fails the
        test with the interpreter's stderr.
        """
        with tempfile.TemporaryDirectory(prefix="upstream-result-") as scratch:
            result_path = Path(scratch) / "result.json"
            try:
                done = subprocess.run(
                    # -I: ignore PYTHONPATH and user site, so our packages cannot leak in.
                    [str(self.executable), "-I", "-c", _RUNNER, str(result_path), snippet],
                    input=json.dumps(args),
                    capture_output=True,
                    text=True,
                    timeout=timeout,
                    check=False,
                )
            except subprocess.TimeoutExpired as exc:
                pytest.fail(f"upstream snippet timed out after {timeout}s; stderr:\n{exc.stderr}")
            if done.returncode != 0:
                pytest.fail(
                    f"upstream snippet exited with {done.returncode}; stderr:\n{done.stderr}"
                )
            return json.loads(result_path.read_text(encoding="utf-8"))


def _missing(reason: str) -> None:
    message = f"upstream Flyte SDK unavailable ({reason}); run `{INSTALL_COMMAND}`"
    if os.environ.get("CHECKPOINT_REQUIRE_UPSTREAM") == "1":
        pytest.fail(f"{message} (CHECKPOINT_REQUIRE_UPSTREAM=1)", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def upstream_python() -> UpstreamPython:
    """The upstream SDK's interpreter; skips (or fails, in CI) when it is not installed."""
    executable = upstream_venv() / "bin" / "python"
    if not executable.is_file():
        _missing(f"no interpreter at {executable}")
    probe = subprocess.run(
        [
            str(executable),
            "-I",
            "-c",
            "import flyte, importlib.metadata as m; assert hasattr(flyte, 'Checkpoint');"
            " print(m.version('flyte'))",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if probe.returncode != 0:
        _missing(f"{executable} cannot import flyte.Checkpoint: {probe.stderr.strip()[-500:]}")
    return UpstreamPython(executable, probe.stdout.strip())


# ---------------------------------------------------------------------- in-task venv

REPO = Path(__file__).resolve().parents[1]
OUR_PACKAGES = ("checkpoint-format", "checkpoint-io", "flyte-checkpoint")


class TaskVenv:
    """A venv holding upstream ``flyte``, CPU PyTorch, Lightning, and wheels of ours."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.python = root / "bin" / "python"
        self.wheels: list[Path] = []

    def run(self, *args: str, timeout: float = 300,
            check: bool = True) -> subprocess.CompletedProcess:
        """Run the venv's python with ``args`` (``tool()`` for its other commands)."""
        return self.tool("python", *args, timeout=timeout, check=check)

    def tool(self, name: str, *args: str, timeout: float = 300,
             check: bool = True) -> subprocess.CompletedProcess:
        command = [str(self.root / "bin" / name), *args]
        environment = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              check=False, env=environment, stdin=subprocess.DEVNULL)
        if check and done.returncode != 0:
            pytest.fail(f"{' '.join(command)} exited with {done.returncode}:\n"
                        f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}", pytrace=False)
        return done

    def pip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run("-m", "pip", "--disable-pip-version-check", *args, check=check)

    def install_ours(self) -> None:
        self.pip("install", "--quiet", *map(str, self.wheels))

    def uninstall_ours(self) -> None:
        self.pip("uninstall", "--quiet", "--yes", *OUR_PACKAGES)

    def record_check(self, distribution: str) -> dict[str, Any]:
        """Check every file that ``distribution``'s RECORD lists against the hash recorded
        there: ``{"files": N, "hashed": N, "changed": [...], "missing": [...]}``."""
        snippet = (
            "import base64, hashlib, json, sys, importlib.metadata as m\n"
            "d = m.distribution(sys.argv[1]); out = {'files': 0, 'hashed': 0, 'changed': [],"
            " 'missing': [], 'paths': []}\n"
            "for f in d.files or []:\n"
            "    out['files'] += 1; p = f.locate(); out['paths'].append(str(p.resolve()))\n"
            "    if not p.is_file(): out['missing'].append(str(f)); continue\n"
            "    if f.hash is None: continue\n"
            "    out['hashed'] += 1\n"
            "    digest = base64.urlsafe_b64encode(hashlib.new(f.hash.mode, p.read_bytes())"
            ".digest()).rstrip(b'=').decode()\n"
            "    if digest != f.hash.value: out['changed'].append(str(f))\n"
            "print(json.dumps(out))\n"
        )
        return json.loads(self.run("-c", snippet, distribution).stdout)

    def program(self, name: str, tmp_path: Path, *, timeout: float = 300, **args: Any) -> dict:
        """Run ``tests/task_programs/NAME.py`` with ``args``; return what it reported, with
        its stderr under ``"log"``."""
        tmp_path.mkdir(parents=True, exist_ok=True)
        out = tmp_path / f"{name}-{uuid.uuid4().hex[:8]}.json"
        args = {"raw": str(tmp_path / "raw"), "out": str(out), **args}
        done = self.run(str(REPO / "tests" / "task_programs" / f"{name}.py"), json.dumps(args),
                        timeout=timeout, check=False)
        if not out.exists():
            pytest.fail(f"task program {name} wrote no result (exit {done.returncode}):\n"
                        f"{done.stderr[-6000:]}", pytrace=False)
        result = json.loads(out.read_text())
        result["log"] = done.stderr
        return result


@pytest.fixture(scope="session")
def task_venv(tmp_path_factory) -> Iterator[TaskVenv]:
    """The in-task venv with our wheels freshly installed; skips (or fails, in CI) without it."""
    root = _cached_venv("CHECKPOINT_TASK_VENV", "task-venv")
    python = root / "bin" / "python"
    if not python.is_file():
        _missing(f"no in-task venv at {root}")
    probe = subprocess.run([str(python), "-I", "-c", "import flyte, torch, lightning"],
                           capture_output=True, text=True, timeout=300, check=False)
    if probe.returncode != 0:
        _missing(f"{root} cannot import flyte, torch and lightning: "
                 f"{probe.stderr.strip()[-500:]}")
    # The venv is shared by every test run of this user, and this session installs into it:
    # hold it until the session ends, so that a second run waits instead of mixing wheels.
    with open(root / ".flyte-checkpoint-tests.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"\nwaiting for another test run to release {root}", file=sys.stderr)
            fcntl.flock(lock, fcntl.LOCK_EX)
        wheels_dir = tmp_path_factory.mktemp("wheels")
        venv = TaskVenv(root)
        venv.pip("wheel", "--quiet", "--no-deps", "--wheel-dir", str(wheels_dir),
                 *(str(REPO / "packages" / name) for name in OUR_PACKAGES))
        venv.wheels = sorted(wheels_dir.glob("*.whl"))
        venv.uninstall_ours()  # whatever an earlier run left
        venv.install_ours()
        yield venv


@pytest.fixture(scope="session")
def upstream_alone(upstream_python) -> TaskVenv:
    """The upstream-alone venv, able to run task programs as a fleet without us would."""
    return TaskVenv(upstream_python.executable.parent.parent)
