"""Framework integrations for real: PyTorch Lightning and Hugging Face ``Trainer`` with
CPU PyTorch, attempts killed with SIGKILL mid-training by ``flyte-checkpoint run`` and
resumed from what the callbacks uploaded in the background; the same under torchrun with 2
DDP ranks over gloo; and ``integrations.dcp`` with DTensors sharded over a CPU mesh of 4
ranks, restored by 2.

Runs in the in-task venv (``bash .ci/install-upstream.sh``); skips without it. Every
collective of the multi-rank jobs is bounded (``CHECKPOINT_DISTRIBUTED_TIMEOUT`` and the
frameworks' own timeouts: 120 s), and every job by the subprocess timeout.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.interop, pytest.mark.slow]

PROGRAMS = Path(__file__).parent / "task_programs"


#: Seconds any collective of a multi-rank job may wait (the frameworks' own timeouts in the
#: programs are the same).
COLLECTIVE_TIMEOUT = "120"


def _torchrun(task_venv, ranks: int) -> list[str]:
    """A torchrun command line of ``ranks`` workers on this machine (its rendezvous on a free
    loopback port); a failed worker ends the others, with no restart in place."""
    return [str(task_venv.root / "bin" / "torchrun"), "--standalone", "--nnodes", "1",
            "--nproc-per-node", str(ranks), "--max-restarts", "0"]


def _run(task_venv, tmp_path: Path, program: str, plan: list[int], *, ranks: int = 1,
         **args) -> tuple[list, dict]:
    """Run ``program`` under the retry runner (under torchrun with ``ranks`` > 1); return each
    attempt's start (checked alike on every rank) and rank 0's result."""
    tmp_path.mkdir(parents=True)
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    args = {"plan": str(tmp_path / "plan.json"), "log": str(tmp_path / "attempts.jsonl"),
            "out": str(tmp_path / "out.json"), **args}
    launcher = _torchrun(task_venv, ranks) if ranks > 1 else [str(task_venv.python)]
    done = task_venv.tool(
        "flyte-checkpoint", "run", "--retries", str(len(plan) + 1), "--store",
        str(tmp_path / "store"), "--", *launcher, str(PROGRAMS / program),
        json.dumps(args), timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    lines = [json.loads(line)
             for line in (tmp_path / "attempts.jsonl").read_text().splitlines()]
    if ranks == 1:
        return [line["start"] for line in lines], json.loads((tmp_path / "out.json").read_text())
    # Each attempt's lines, one per rank: the same start and the same resume path on all.
    attempts: dict[object, list[dict]] = {}
    for line in lines:
        attempts.setdefault(line["resume"], []).append(line)
    for seen in attempts.values():
        assert sorted(line["rank"] for line in seen) == list(range(ranks)), seen
        assert len({line["start"] for line in seen}) == 1, seen
    starts = sorted(seen[0]["start"] for seen in attempts.values())
    return starts, json.loads((tmp_path / "out.json").read_text())


def test_lightning_callback_resumes_killed_attempts(task_venv, tmp_path):
    # 8 steps an epoch, last.ckpt at each epoch's end; killed at steps 11 and 27.
    starts, killed = _run(task_venv, tmp_path / "killed", "lightning_integration.py", [11, 27])
    clean_starts, clean = _run(task_venv, tmp_path / "clean", "lightning_integration.py", [])
    assert starts == [0, 8, 24] and clean_starts == [0]
    assert killed["weights"] == clean["weights"] and killed["step"] == clean["step"] == 32
    assert killed["uploads"] >= 1


def test_lightning_callback_uploads_the_newest_save_when_training_fails(task_venv, tmp_path):
    # Uploads held 3 s in flight, so the epoch-2 save (step 16) still waits behind the
    # epoch-1 upload when the error at step 19 ends the attempt; on_exception uploads it.
    starts, result = _run(task_venv, tmp_path / "raised", "lightning_integration.py", [19],
                          fail="raise", slow_uploads=3)
    assert starts == [0, 16]
    assert result["step"] == 32


def test_transformers_callback_resumes_killed_attempts(task_venv, tmp_path):
    # save_steps=4 with save_total_limit=2: killed at steps 6 and 19.
    starts, killed = _run(task_venv, tmp_path / "killed", "hf_integration.py", [6, 19])
    clean_starts, clean = _run(task_venv, tmp_path / "clean", "hf_integration.py", [])
    assert starts == [0, 4, 16] and clean_starts == [0]
    assert killed["step"] == clean["step"] == 24
    assert killed["weights"] == clean["weights"]


# ---------------------------------------------------------------------- several ranks


@pytest.fixture
def bounded_collectives(monkeypatch):
    monkeypatch.setenv("CHECKPOINT_DISTRIBUTED_TIMEOUT", COLLECTIVE_TIMEOUT)


def test_lightning_ddp_resumes_killed_attempts(task_venv, tmp_path, bounded_collectives):
    # 2 ranks, 4 steps an epoch each, last.ckpt at each epoch's end: rank 0 SIGKILLed at
    # steps 6 and 13 (torchrun ends rank 1); both ranks resume from the same path.
    starts, killed = _run(task_venv, tmp_path / "killed", "lightning_integration.py", [6, 13],
                          ranks=2)
    clean_starts, clean = _run(task_venv, tmp_path / "clean", "lightning_integration.py", [],
                               ranks=2)
    assert starts == [0, 4, 12] and clean_starts == [0]
    assert killed["weights"] == clean["weights"] and killed["step"] == clean["step"] == 16
    assert killed["uploads"] >= 1


def test_transformers_ddp_resumes_killed_attempts(task_venv, tmp_path, bounded_collectives):
    # 2 ranks, 12 steps an epoch, save_steps=4: killed at steps 6 and 19. The killed run's
    # ranks share one output_dir (each file contributed by both, stored once); the clean
    # run's write each into its own, as on two nodes: either way the object holds both
    # ranks' RNG states, and both resume alike.
    starts, killed = _run(task_venv, tmp_path / "killed", "hf_integration.py", [6, 19],
                          ranks=2, output=str(tmp_path / "shared-output"))
    clean_starts, clean = _run(task_venv, tmp_path / "clean", "hf_integration.py", [], ranks=2)
    assert starts == [0, 4, 16] and clean_starts == [0]
    assert killed["step"] == clean["step"] == 24
    assert killed["weights"] == clean["weights"]


def _dcp(task_venv, tmp_path: Path, phase: str, ranks: int) -> list[dict]:
    args = {"phase": phase, "store": str(tmp_path / "store"),
            "staging": str(tmp_path / "staging"), "out": str(tmp_path / phase)}
    done = task_venv.tool("torchrun", *_torchrun(task_venv, ranks)[1:],
                          str(PROGRAMS / "dcp_reshard.py"), json.dumps(args), timeout=300,
                          check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return [json.loads((tmp_path / phase / f"rank{r}.json").read_text()) for r in range(ranks)]


def test_dcp_dtensors_saved_by_4_ranks_restore_on_2(task_venv, tmp_path, bounded_collectives):
    saved = _dcp(task_venv, tmp_path, "save", 4)
    assert [r["local_shard_rows"] for r in saved] == [16] * 4
    # Each staging directory is gone once its files are frozen (async) or published.
    assert all(r["staged_after_async"] == r["staged_after_save"] == [] for r in saved)
    loaded = _dcp(task_venv, tmp_path, "load", 2)
    for report in loaded:
        assert report["loaded_absent"] is False and report["untouched"] is True
        assert report["not_dcp"].startswith(f"checkpoint at {tmp_path / 'store' / 'plain.obj'}"
                                            " holds no .metadata: it was not saved by"
                                            " torch.distributed.checkpoint")
        assert report["loaded"] is True and report["step"] == 7
        assert report["equal"] == {"w": True, "uneven": True, "bias": True}
        assert report["local_shard_rows"] == 32
        assert ".metadata" in report["files"]
        assert {f"__{r}_0.distcp" for r in range(4)} <= set(report["files"])
    # One node: one restore, the same directory handed to both ranks.
    assert loaded[0]["restored_at"] == loaded[1]["restored_at"]


_STRATEGIES = """
import json, os, pathlib, sys, tempfile
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy
from flyte_checkpoint.integrations.lightning import newest_checkpoint, sharded_strategy

kinds = {name: sharded_strategy(strategy) for name, strategy in [
    ("fsdp-sharded", FSDPStrategy(state_dict_type="sharded")), ("fsdp-full", FSDPStrategy()),
    ("ddp", DDPStrategy()), ("model-parallel", ModelParallelStrategy()),
    ("model-parallel-full", ModelParallelStrategy(save_distributed_checkpoint=False))]}
root = pathlib.Path(tempfile.mkdtemp())
for age, name in enumerate(["epoch=0-step=4.ckpt", "last.ckpt"]):  # sharded: directories
    (root / "ckpts" / name).mkdir(parents=True)
    (root / "ckpts" / name / "__0_0.distcp").write_bytes(b"shard")
    (root / "ckpts" / name / "meta.pt").write_bytes(b"meta")
    os.utime(root / "ckpts" / name / "meta.pt", ns=(10**18 + age, 10**18 + age))
(root / "ckpts" / "stray.ckpt").write_bytes(b"old")
os.utime(root / "ckpts" / "stray.ckpt", ns=(10**17, 10**17))
picked = {"last": newest_checkpoint(root, "**/last.ckpt").name,
          "any": newest_checkpoint(root, "**/*.ckpt").name}
print(json.dumps({"kinds": kinds, "picked": picked}))
"""


def test_lightning_tells_sharded_strategies_and_resumes_a_sharded_directory(task_venv):
    # Constructing a strategy needs no GPU; FSDP itself does, so only the decision is run.
    found = json.loads(task_venv.run("-c", _STRATEGIES, timeout=120).stdout.splitlines()[-1])
    assert found["kinds"] == {"fsdp-sharded": True, "fsdp-full": False, "ddp": False,
                              "model-parallel": True, "model-parallel-full": False}
    assert found["picked"] == {"last": "last.ckpt", "any": "last.ckpt"}
