"""Inside real Flyte tasks: ours installed beside the upstream SDK, serving
``flyte.ctx().checkpoint`` after ``flyte_checkpoint.install()``.

Everything here runs in the in-task venv (upstream ``flyte``, CPU PyTorch, Lightning, and
wheels of our three packages), through programs in ``tests/task_programs`` written against
upstream's public API and run in its local mode with retries. Mixed-fleet tests also use the
upstream-alone venv. Needs ``bash .ci/install-upstream.sh``; without it every test here skips.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from checkpoint_testing import stores as storage_fixtures

pytestmark = [pytest.mark.interop, pytest.mark.slow]

OURS = "flyte_checkpoint._upstream.FlyteCheckpoint"
e2e_emulators = storage_fixtures.e2e_emulators


def _resumed(result: dict) -> list[int]:
    assert result["ok"], result["error"] + "\n" + result["log"][-4000:]
    assert {a["class"] for a in result["attempts"]} == {OURS}, result["attempts"]
    assert all(a["is_upstream_instance"] for a in result["attempts"])
    return [a["start"] for a in result["attempts"]]


# ---------------------------------------------------------------------- installing beside upstream


def test_installing_ours_changes_no_file_of_upstream(task_venv):
    """Every file in upstream's RECORD still has its recorded hash with ours installed, and
    again after ours is uninstalled; pip finds no conflict; no file of ours is upstream's."""
    def check() -> dict:
        record = task_venv.record_check("flyte")
        assert record["hashed"] > 100, record
        assert record["changed"] == [] and record["missing"] == [], record
        return record

    upstream_paths = set(check()["paths"])
    for ours in ("checkpoint-format", "checkpoint-io", "flyte-checkpoint"):
        overlap = upstream_paths & set(task_venv.record_check(ours)["paths"])
        assert not overlap, f"{ours} ships files that upstream owns: {sorted(overlap)[:5]}"
    task_venv.pip("check")
    api = task_venv.run("-c", "import flyte; print(flyte.TaskEnvironment.__name__,"
                        " callable(flyte.ctx), callable(flyte.run), flyte.Checkpoint.__module__)")
    assert api.stdout.split() == ["TaskEnvironment", "True", "True", "flyte._checkpoint"]
    assert "Usage: flyte" in task_venv.tool("flyte", "--help").stdout

    task_venv.uninstall_ours()
    try:
        check()
        task_venv.pip("check")
        assert "Usage: flyte" in task_venv.tool("flyte", "--help").stdout
    finally:
        task_venv.install_ours()


def test_upstream_cli_runs_our_commands(task_venv, tmp_path):
    good = tmp_path / "good"
    task_venv.run("-c", "import sys, pathlib, flyte_checkpoint as f;"
                  " d = pathlib.Path(sys.argv[1] + '.src'); d.mkdir();"
                  " (d / 'w.bin').write_bytes(b'x' * 5000);"
                  " f.Checkpoint(sys.argv[1]).save_sync(d)", str(good))
    inspected = task_venv.tool("flyte", "checkpoint", "inspect", "--json", str(good))
    assert json.loads(inspected.stdout)["kind"] == "tarball"
    assert task_venv.tool("flyte", "checkpoint", "validate", str(good)).returncode == 0

    torn = tmp_path / "torn"
    torn.write_bytes(good.read_bytes()[:-20])
    invalid = task_venv.tool("flyte", "checkpoint", "validate", str(torn), check=False)
    assert invalid.returncode == 1, invalid.stdout + invalid.stderr
    missing = task_venv.tool("flyte", "checkpoint", "validate", str(tmp_path / "nothing"),
                             check=False)
    assert missing.returncode == 2 and "no object at" in missing.stderr
    assert "inspect" in task_venv.tool("flyte", "checkpoint", "--help").stdout
    assert task_venv.tool("flyte-checkpoint", "validate", str(good)).returncode == 0


def test_install_keeps_upstreams_context_rules(task_venv):
    """install(): idempotent, undone by uninstall(), refused (changing nothing) for an
    unsupported upstream; the helper upstream builds is ours, cached per context, None
    without a destination, and follows the JobSet restart rule."""
    done = task_venv.run(str(Path(__file__).parent / "task_programs" / "contract.py"))
    results = json.loads(done.stdout.strip().splitlines()[-1])
    refusal = results.pop("old_version_refused")
    assert "found flyte 2.1.0" in refusal and "flyte>=2.6,<3" in refusal
    assert "Nothing was changed" in refusal
    assert results.pop("paths") == ["/tmp/ckpt/dest", "/tmp/ckpt/prev"]
    assert results.pop("jobset_restart_source") == "/tmp/ckpt/dest"
    assert all(results.values()), results


# ---------------------------------------------------------------------- tasks that die and resume


@pytest.mark.parametrize("kind", ["bytes", "file", "dir"])
@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_each_retry_resumes_from_the_previous_attempt(task_venv, tmp_path, kind, flavour):
    plan = tmp_path / "plan.json"
    plan.write_text("[5, 11]")
    result = task_venv.program("resume", tmp_path, ours=True, kind=kind, plan=str(plan),
                               steps=20, every=3, **{"async": flavour == "async"})
    # Saved at 3 and 9 before dying at 5 and 11; each retry starts from the last save.
    assert _resumed(result) == [0, 3, 9]
    assert result["output"] == {"step": 20, "total": sum(i * i for i in range(1, 21))}


@pytest.fixture
def s3_store(e2e_emulators, tmp_path):
    yield from storage_fixtures.make_store("s3", e2e_emulators, tmp_path)


@pytest.mark.emulator
@pytest.mark.parametrize("via", ["init", "env"])
def test_the_store_upstream_is_configured_for_is_the_one_used(task_venv, tmp_path, s3_store,
                                                               via):
    """Raw data on an S3 store that is not AWS (moto here, a sandbox's MinIO in a
    deployment), named to upstream by flyte.init(storage=S3(...)) or by FLYTE_AWS_*: our
    helper saves and restores on that store with those credentials, as upstream's would.

    Upstream's local mode stages the previous attempt's object only on local paths; here the
    test stages it between two runs, as the platform does between attempts.
    """
    if task_venv.run("-c", "import s3fs", check=False).returncode != 0:
        pytest.fail("the in-task venv has no s3fs: run bash .ci/install-upstream.sh",
                    pytrace=False)
    args = {"ours": True, "kind": "dir", "every": 3, "raw": s3_store.uri("raw"),
            "s3": {"via": via, "endpoint": s3_store.server.endpoint}}
    first = task_venv.program("resume", tmp_path, steps=20, **args)
    assert _resumed(first) == [0]
    assert "raw/checkpoint" in s3_store.names()
    s3_store.put("raw/prev_checkpoint", s3_store.get("raw/checkpoint"))
    second = task_venv.program("resume", tmp_path, steps=30, **args)
    assert _resumed(second) == [18]  # the last save of the first run
    assert second["attempts"][0]["source"] == s3_store.uri("raw/prev_checkpoint")
    assert second["output"] == {"step": 30, "total": sum(i * i for i in range(1, 31))}


def test_corrupt_previous_checkpoint_fails_the_attempt_loudly(task_venv, tmp_path):
    """A torn object is an error naming the URI, never 'no checkpoint': no attempt restarts
    training from scratch."""
    plan = tmp_path / "plan.json"
    plan.write_text("[5]")
    result = task_venv.program("resume", tmp_path, ours=True, kind="dir", plan=str(plan),
                               corrupt=True, retries=2)
    assert not result["ok"]
    # Since the resume rule, the error names the object it chose (the previous attempt's,
    # here) by its URI rather than as "prev_checkpoint".
    assert "checkpoint at " in result["error"] and "CF-INTEG-01" in result["error"]
    assert "nothing was restored" in result["error"]
    assert [a["start"] for a in result["attempts"]] == [0], "an attempt restarted from scratch"


def test_pytorch_loop_resumes_to_the_uninterrupted_result(task_venv, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text("[13, 22]")
    killed = task_venv.program("torch_loop", tmp_path / "killed", ours=True, plan=str(plan))
    clean = task_venv.program("torch_loop", tmp_path / "clean", ours=True)
    assert _resumed(killed) == [0, 12, 20]
    assert _resumed(clean) == [0]
    assert killed["output"] == clean["output"]


def test_lightning_trainer_resumes_to_the_uninterrupted_result(task_venv, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text("[11, 27]")  # mid-epoch: 8 steps an epoch, last.ckpt at each epoch's end
    killed = task_venv.program("lightning_loop", tmp_path / "killed", ours=True, plan=str(plan))
    clean = task_venv.program("lightning_loop", tmp_path / "clean", ours=True)
    assert _resumed(killed) == [0, 8, 24]
    assert _resumed(clean) == [0]
    assert killed["output"] == clean["output"]


# ---------------------------------------------------------------------- mixed fleets


@pytest.mark.parametrize("kind", ["dir", "file", "bytes"])
@pytest.mark.parametrize("direction", ["ours-to-upstream", "upstream-to-ours"])
def test_mixed_fleet(task_venv, upstream_alone, tmp_path, kind, direction):
    """An object saved by one fleet's flyte.ctx().checkpoint restores in the other's."""
    saver, loader = (task_venv, upstream_alone) if direction == "ours-to-upstream" \
        else (upstream_alone, task_venv)
    saved = saver.program("roundtrip", tmp_path / "saver", ours=saver is task_venv,
                          mode="save", kind=kind)
    assert saved["ok"], saved["error"] + saved["log"][-3000:]
    assert saved["attempts"][0]["class"] == (
        OURS if saver is task_venv else "flyte._checkpoint.Checkpoint")
    (tmp_path / "loader" / "raw").mkdir(parents=True)
    shutil.copy(tmp_path / "saver" / "raw" / "checkpoint",
                tmp_path / "loader" / "raw" / "prev_checkpoint")
    loaded = loader.program("roundtrip", tmp_path / "loader", ours=loader is task_venv,
                            mode="load", kind=kind)
    assert loaded["ok"], loaded["error"] + loaded["log"][-3000:]
    blob = hashlib.sha256(b"seed").digest() * 4096
    if kind == "dir":
        assert loaded["output"] == {"restored": "tree", "files": {
            "meta.json": hashlib.sha256(b'{"step": 7}').hexdigest(),
            "shards/0.bin": hashlib.sha256(blob).hexdigest(),
            "shards/1.bin": hashlib.sha256(blob[::-1]).hexdigest(),
        }}
    else:
        assert loaded["output"] == {"restored": "payload",
                                    "sha256": hashlib.sha256(blob).hexdigest()}
