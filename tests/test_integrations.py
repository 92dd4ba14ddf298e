"""Framework integrations for real: PyTorch Lightning and Hugging Face ``Trainer`` with
CPU PyTorch, attempts killed with SIGKILL mid-training by ``flyte-checkpoint run`` and
resumed from what the callbacks uploaded in the background.

Runs in the in-task venv (``bash .ci/install-upstream.sh``); skips without it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.interop, pytest.mark.slow]

PROGRAMS = Path(__file__).parent / "task_programs"


def _run(task_venv, tmp_path: Path, program: str, plan: list[int], **args) -> tuple[list, dict]:
    """Run ``program`` under the retry runner; return each attempt's start and the result."""
    tmp_path.mkdir(parents=True)
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    args = {"plan": str(tmp_path / "plan.json"), "log": str(tmp_path / "attempts.jsonl"),
            "out": str(tmp_path / "out.json"), **args}
    done = task_venv.tool(
        "flyte-checkpoint", "run", "--retries", str(len(plan) + 1), "--store",
        str(tmp_path / "store"), "--", str(task_venv.python), str(PROGRAMS / program),
        json.dumps(args), timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    starts = [json.loads(line)["start"]
              for line in (tmp_path / "attempts.jsonl").read_text().splitlines()]
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
