"""The emulator helpers take nothing when what they need is missing, give everything back
when a start fails, and install Azurite on first use only when allowed.

These run everywhere, emulators installed or not: the executables here are small stand-ins
(shell scripts), which is the only way to produce "missing", "crashes at start" and "npm
fails" on demand.
"""

from __future__ import annotations

import gc
import glob
import os
import stat
import tempfile
from pathlib import Path

import checkpoint_testing.emulators as emulators
import pytest
from checkpoint_testing.emulators import Azurite, EmulatorMissing, FakeGCS


def _script(directory: Path, name: str, body: str) -> Path:
    path = directory / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _leftovers(name: str) -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), f"checkpoint-io-{name}-*")))


@pytest.fixture(autouse=True)
def own_tempdir(tmp_path, monkeypatch):
    """Servers make their data directories here, where no other test run looks."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setattr(emulators, "_provision_failures", {})


@pytest.fixture
def bare(tmp_path, monkeypatch):
    """An environment with no Azurite anywhere: empty cache, nothing on PATH but ``bin``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("CHECKPOINT_AZURITE", "CHECKPOINT_AZURITE_DIR", "CHECKPOINT_PROVISION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(bin_dir))
    notices: list[str] = []
    monkeypatch.setattr(emulators, "notify", notices.append)
    return bin_dir, notices


def test_missing_azurite_takes_nothing(bare, monkeypatch):
    monkeypatch.setenv("CHECKPOINT_PROVISION", "0")
    before = _leftovers("azurite")
    with pytest.raises(EmulatorMissing, match="CHECKPOINT_PROVISION=0 forbids"):
        Azurite()
    gc.collect()  # a leaked TemporaryDirectory would warn here, and warnings are errors
    assert _leftovers("azurite") == before


def test_missing_npm_names_what_to_install(bare):
    with pytest.raises(EmulatorMissing, match="no npm on PATH"):
        Azurite()


def test_azurite_is_installed_on_first_use_with_one_notice(bare, tmp_path):
    bin_dir, notices = bare
    # Stands in for npm: "installs" an azurite-blob under --prefix, as the real one does.
    _script(bin_dir, "npm", 'set -e\nprefix="$3"\n'
            '/bin/mkdir -p "$prefix/node_modules/.bin"\n'
            'printf "#!/bin/sh\\n" > "$prefix/node_modules/.bin/azurite-blob"\n'
            '/bin/chmod +x "$prefix/node_modules/.bin/azurite-blob"\n')
    installed = tmp_path / "cache" / "flyte-checkpoint" / "azurite"
    binary = installed / "node_modules" / ".bin" / "azurite-blob"

    assert Azurite().command == [str(binary)]
    assert len(notices) == 1 and "installing Azurite with npm" in notices[0]
    assert Azurite().command == [str(binary)]  # second use: found, no second install
    assert len(notices) == 1
    assert sorted(p.name for p in installed.parent.iterdir()) == [".azurite.lock", "azurite"]


def test_failed_npm_install_leaves_nothing_half_installed(bare, tmp_path):
    bin_dir, _ = bare
    _script(bin_dir, "npm", '/bin/mkdir -p "$3/node_modules"\n'
            'echo "E404 registry says no" >&2\nexit 1\n')
    with pytest.raises(EmulatorMissing, match=r"npm install azurite` failed with exit 1: "
                                              r"E404 registry says no"):
        Azurite()
    cache = tmp_path / "cache" / "flyte-checkpoint"
    assert sorted(p.name for p in cache.iterdir()) == [".azurite.lock"]
    # Not tried again in this run: the next Azure test skips with the same reason at once.
    (bin_dir / "npm").write_text("#!/bin/sh\necho called >> " + str(tmp_path / "calls") + "\n")
    with pytest.raises(EmulatorMissing, match="E404 registry says no"):
        Azurite()
    assert not (tmp_path / "calls").exists()


def test_server_that_dies_at_start_gives_everything_back(tmp_path, monkeypatch):
    crash = _script(tmp_path, "fake-gcs-server", "exit 3\n")
    monkeypatch.setenv("CHECKPOINT_FAKE_GCS_SERVER", str(crash))
    before = _leftovers("fake-gcs-server")
    server = FakeGCS()
    with pytest.raises(RuntimeError, match="exited with 3 before it was ready"):
        server.start()
    assert server.process is None
    gc.collect()
    assert _leftovers("fake-gcs-server") == before
    server.stop()  # stopping twice is harmless
