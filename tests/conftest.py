"""The upstream Flyte SDK, run out of process for the interoperability tests.

Upstream (PyPI ``flyte``) lives in its own virtual environment, made by
``bash .ci/install-upstream.sh``; neither our packages nor this test process ever import it.
Tests talk to it through the ``upstream_python`` fixture, which runs a snippet in that
interpreter with JSON arguments in and a JSON result out.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
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
    explicit = os.environ.get("FLYTE_UPSTREAM_VENV")
    if explicit:
        return Path(explicit)
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "flyte-checkpoint" / "upstream-venv"


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
