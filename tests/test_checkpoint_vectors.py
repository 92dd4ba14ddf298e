"""Every spec vector through flyte.Checkpoint: hostile ones fail loudly and restore nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from flyte_checkpoint import Checkpoint, CheckpointLoadError

VECTORS = Path(__file__).resolve().parent.parent / "spec" / "vectors"
INDEX = json.loads((VECTORS / "vectors.json").read_text())


def _ids(vector: dict) -> str:
    return vector["file"]


def _env_settable(vector: dict) -> bool:
    return all(key.startswith("max_") for key in vector.get("limits", {}))


@pytest.mark.parametrize("vector", [v for v in INDEX if _env_settable(v)], ids=_ids)
def test_vector_through_checkpoint(vector: dict, tmp_path: Path, monkeypatch) -> None:
    # Limit vectors use small caps; flyte.Checkpoint takes them from the environment.
    for key, value in vector.get("limits", {}).items():
        monkeypatch.setenv(f"CHECKPOINT_{key.upper()}", str(value))
    source = tmp_path / "store" / "attempt-1" / "_flytecheckpoints"
    source.parent.mkdir(parents=True)
    shutil.copyfile(VECTORS / vector["file"], source)
    outside_before = sorted(p.name for p in tmp_path.iterdir())
    expect = vector["expect"]
    with Checkpoint(str(tmp_path / "store" / "attempt-2" / "_flytecheckpoints"), str(source)) as cp:
        if "error" in expect:
            with pytest.raises(CheckpointLoadError) as info:
                cp.load_sync()
            message = str(info.value)
            assert expect["rule"] in message and str(source) in message
            if expect.get("member"):
                assert repr(expect["member"])[1:-1] in message
            assert list(cp.path.iterdir()) == []  # nothing half-restored
            assert sorted(p.name for p in cp.path.parent.iterdir()) == ["checkpoint"]
        elif expect["kind"] == "none":
            assert cp.load_sync() is None
        elif expect["kind"] == "raw":
            assert cp.load_sync() == cp.path / "payload"
            assert (cp.path / "payload").read_bytes() == (VECTORS / vector["file"]).read_bytes()
        else:
            assert cp.load_sync() == cp.path
            restored = {p.relative_to(cp.path).as_posix() for p in cp.path.rglob("*")}
            assert {m["name"] for m in expect.get("members", [])} <= restored
    assert sorted(p.name for p in tmp_path.iterdir()) == outside_before
