"""The three released packages share one version, and flyte-checkpoint pins its siblings to it.

Each package writes its version once, as ``__version__`` in the module ``VERSION_FILE`` names,
which hatchling reads (``[tool.hatch.version]``) and the package's ``__init__`` holds or
re-exports; flyte-checkpoint's exact sibling pins are made
from its own version by its ``hatch_build.py``. Checked from the sources, so that a bump of
one package alone fails here before a release does.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
import types
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
RELEASED = {
    "checkpoint-format": "checkpoint_format",
    "checkpoint-io": "checkpoint_io",
    "flyte-checkpoint": "flyte_checkpoint",
}
# checkpoint-format's writer names itself with the version (CF-MARK-01): in ``__init__`` it
# would tie the writer and the package's ``__init__`` into an import circle.
VERSION_FILE = {
    "checkpoint-format": "_version.py",
    "checkpoint-io": "__init__.py",
    "flyte-checkpoint": "__init__.py",
}
PIN = re.compile(r"^(?P<name>[a-z-]+)(\[[a-z0-9,]+\])?==(?P<version>\S+)$")


def _pyproject(distribution: str) -> dict:
    return tomllib.loads((ROOT / "packages" / distribution / "pyproject.toml").read_text())


def _version_in_source(distribution: str) -> str:
    path = ROOT / "packages" / distribution / "src" / RELEASED[distribution] / VERSION_FILE[
        distribution]
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and getattr(node.targets[0], "id", None) == "__version__"):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{path}: no __version__ = '...'")


def _sibling_pins(version: str) -> dict:
    """The dependencies flyte-checkpoint's build hook writes for ``version``."""
    hatchling = pytest.importorskip("hatchling.metadata.plugin.interface")
    path = ROOT / "packages" / "flyte-checkpoint" / "hatch_build.py"
    spec = importlib.util.spec_from_file_location("flyte_checkpoint_hatch_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    hook = module.SiblingPins(str(path.parent), {})
    assert isinstance(hook, hatchling.MetadataHookInterface)
    metadata = {"version": version}
    hook.update(metadata)
    return metadata


@pytest.mark.parametrize("distribution", sorted(RELEASED))
def test_the_version_is_read_from_the_package(distribution):
    project = _pyproject(distribution)
    assert "version" not in project["project"], f"{distribution}: version written twice"
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["hatch"]["version"]["path"] == (
        f"src/{RELEASED[distribution]}/{VERSION_FILE[distribution]}")


def test_the_three_versions_agree():
    versions = {d: _version_in_source(d) for d in RELEASED}
    assert len(set(versions.values())) == 1, f"versions differ: {versions}"


def test_flyte_checkpoint_pins_every_sibling_exactly_to_the_shared_version():
    version = _version_in_source("flyte-checkpoint")
    metadata = _sibling_pins(version)
    requirements = [*metadata["dependencies"],
                    *(r for reqs in metadata["optional-dependencies"].values() for r in reqs)]
    assert requirements
    for requirement in requirements:
        match = PIN.match(requirement)
        assert match, f"{requirement}: not an exact pin"
        assert match["name"] in RELEASED, f"{requirement}: not a sibling"
        assert match["version"] == version, f"{requirement}: pins another version"
    assert {PIN.match(r)["name"] for r in metadata["dependencies"]} == {
        "checkpoint-format", "checkpoint-io"}
    project = _pyproject("flyte-checkpoint")["project"]
    assert set(metadata["optional-dependencies"]) == {"s3", "gcs", "azure", "all"}
    assert {"dependencies", "optional-dependencies"} <= set(project["dynamic"])
    assert "dependencies" not in project and "optional-dependencies" not in project


@pytest.mark.parametrize("distribution", sorted(RELEASED))
def test_every_package_is_typed(distribution):
    top = RELEASED[distribution]
    assert (ROOT / "packages" / distribution / "src" / top / "py.typed").is_file()
    assert _pyproject(distribution)["tool"]["hatch"]["build"]["targets"]["wheel"][
        "packages"] == [f"src/{top}"]


def test_installed_versions_match_the_sources():
    import importlib.metadata

    import checkpoint_format
    import checkpoint_io
    import flyte_checkpoint

    version = _version_in_source("checkpoint-format")
    for module in (checkpoint_format, checkpoint_io, flyte_checkpoint):
        assert isinstance(module, types.ModuleType)
        assert module.__version__ == version, module.__name__
    for distribution in RELEASED:
        assert importlib.metadata.version(distribution) == version, distribution
