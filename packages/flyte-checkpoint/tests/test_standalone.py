"""Without the upstream SDK: the standalone ``flyte`` facade, and ``install()`` refusing.

The facade directory is appended to ``sys.path`` by our .pth line; these tests check that it
serves ``import flyte`` when nothing else does, and steps aside for any other ``flyte``.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import flyte_checkpoint
import pytest

FACADE = Path(flyte_checkpoint.__file__).parent / "_standalone"
upstream_here = importlib.util.find_spec("flyte") is not None and importlib.util.find_spec(
    "flyte").origin != str(FACADE / "flyte" / "__init__.py")


def _python(code: str, *path: Path, cwd: Path | None = None) -> dict:
    """Run ``code`` in a fresh interpreter whose sys.path starts with ``path``."""
    prelude = f"import sys; sys.path[:0] = {[str(p) for p in path]!r}\n"
    done = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True,
                          text=True, timeout=60, check=False, cwd=cwd)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.skipif(upstream_here, reason="the upstream SDK is installed in this environment")
def test_import_flyte_finds_the_facade_when_nothing_else_is_installed():
    found = _python("import json, flyte, flyte.io, flyte_checkpoint as f\n"
                    "print(json.dumps([flyte.STANDALONE, flyte.Checkpoint is f.Checkpoint,"
                    " flyte.io.File.__name__, flyte.latest_checkpoint is f.latest_checkpoint]))")
    assert found == [True, True, "File", True]


@pytest.mark.skipif(upstream_here, reason="the upstream SDK is installed in this environment")
def test_the_facades_file_takes_the_settings_a_checkpoint_takes(monkeypatch):
    """flyte.io.File obeys CHECKPOINT_IO_* as the Checkpoint helper does; arguments win."""
    monkeypatch.setenv("CHECKPOINT_IO_CONCURRENCY", "3")
    monkeypatch.setenv("CHECKPOINT_IO_DIRECT_WRITES", "off")
    found = _python("import json, flyte.io\n"
                    "f = flyte.io.File(path='memory://x')\n"
                    "g = f.with_options(concurrency=5)\n"
                    "h = flyte.io.File.from_existing_remote('memory://y')\n"
                    "print(json.dumps([f._options.concurrency, f._options.backend.direct_writes,"
                    " g._options.concurrency, h._options.concurrency]))")
    assert found == [3, False, 5, 3]


def test_facade_steps_aside_for_any_other_flyte(tmp_path):
    """Even when the facade comes first on sys.path, another ``flyte`` wins."""
    other = tmp_path / "site" / "flyte"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("REAL = True\n")
    (other / "models.py").write_text("WHERE = __name__\n")
    found = _python("import json, flyte, flyte.models\n"
                    "print(json.dumps([getattr(flyte, 'REAL', False), flyte.models.WHERE,"
                    " hasattr(flyte, 'STANDALONE')]))", FACADE, tmp_path / "site")
    assert found == [True, "flyte.models", False]


@pytest.mark.skipif(upstream_here, reason="the upstream SDK is installed in this environment")
def test_facade_ignores_bare_flyte_directories_and_copies_of_itself(tmp_path):
    """A ``flyte/`` directory without ``__init__.py`` (upstream's local mode makes
    /tmp/flyte) is no package to step aside for, and two copies of the facade on sys.path
    (a lib64 symlink, two site directories) must not hand over to each other forever."""
    (tmp_path / "cwd" / "flyte" / "metadata").mkdir(parents=True)
    copy = tmp_path / "copy"
    shutil.copytree(FACADE, copy)
    found = _python("import json, os, sys;"
                    " sys.path.insert(0, os.getcwd())\n"
                    "import flyte\nprint(json.dumps([flyte.STANDALONE,"
                    " hasattr(flyte, 'Checkpoint')]))",
                    tmp_path / "cwd", copy, FACADE, cwd=tmp_path / "cwd")
    assert found == [True, True]


def test_facade_steps_aside_for_a_flyte_served_by_a_meta_path_finder(tmp_path):
    """Editable installs often serve their package through a finder of their own."""
    real = tmp_path / "editable" / "flyte"
    real.mkdir(parents=True)
    (real / "__init__.py").write_text("REAL = 'editable'\n")
    code = (
        "import importlib.util, json, sys\n"
        "class Finder:\n"
        "    @staticmethod\n"
        "    def find_spec(name, path=None, target=None):\n"
        f"        if name == 'flyte': return importlib.util.spec_from_file_location("
        f"'flyte', {str(real / '__init__.py')!r}, submodule_search_locations=[{str(real)!r}])\n"
        "sys.meta_path.append(Finder())\n"
        "import flyte\nprint(json.dumps([getattr(flyte, 'REAL', None)]))"
    )
    assert _python(code, FACADE) == ["editable"]


@pytest.mark.skipif(upstream_here, reason="the upstream SDK is installed in this environment")
def test_install_without_upstream_names_what_is_missing():
    with pytest.raises(flyte_checkpoint.UpstreamNotSupportedError,
                       match=r"found no upstream Flyte SDK \(PyPI `flyte`\): it is not "
                             r"installed\. Nothing was changed\."):
        flyte_checkpoint.install()
    assert not flyte_checkpoint.installed()
    flyte_checkpoint.uninstall()  # harmless when not installed
