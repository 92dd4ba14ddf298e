"""What every task program shares: its arguments, the switch to our helper, injected
failures, and the run in upstream's local mode.

A program runs in a virtual environment that holds the upstream Flyte SDK (and, for most,
ours): ``python PROGRAM.py '{"raw": ..., "out": ..., ...}'``. It writes one JSON document to
``out``: ``{"ok": true, "output": ...}`` or ``{"ok": false, "error": "..."}``.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
from typing import Any

import flyte

ARGS: dict[str, Any] = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}

if ARGS.get("ours"):
    import flyte_checkpoint

    flyte_checkpoint.install()  # the one line a task module adds

if ARGS.get("s3"):
    # An S3 store (moto) named to upstream the way a deployment names it: through
    # flyte.init(storage=...), or through the FLYTE_AWS_* variables Flyte sets in task pods.
    # The test process's own AWS_* settings must not be what finds it.
    for variable in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.pop(variable, None)
    s3 = ARGS["s3"]
    if s3["via"] == "init":
        import flyte.storage

        flyte.init(storage=flyte.storage.S3(
            endpoint=s3["endpoint"], access_key_id="testing", secret_access_key="testing",
            region="us-east-1"))
    else:
        os.environ.update({"FLYTE_AWS_ENDPOINT": s3["endpoint"],
                           "FLYTE_AWS_ACCESS_KEY_ID": "testing",
                           "FLYTE_AWS_SECRET_ACCESS_KEY": "testing"})

#: What each attempt saw, appended by the task; attempts run in this process, one by one.
ATTEMPTS: list[dict[str, Any]] = []


def describe(helper: Any) -> dict[str, Any]:
    """Which implementation ``flyte.ctx().checkpoint`` served."""
    from flyte._checkpoint import Checkpoint as upstream_class

    cls = type(helper)
    return {"class": f"{cls.__module__}.{cls.__qualname__}",
            "is_upstream_instance": isinstance(helper, upstream_class)}


class FailurePlan:
    """Steps at which an attempt dies, each once: a file, so the plan survives the attempt."""

    def __init__(self, path: str | None) -> None:
        self.path = pathlib.Path(path) if path else None

    def check(self, step: int) -> None:
        if self.path is None or not self.path.exists():
            return
        steps = json.loads(self.path.read_text())
        if step in steps:
            steps.remove(step)
            self.path.write_text(json.dumps(steps))
            raise RuntimeError(f"injected failure at step {step}")


def run(task: Any, **inputs: Any) -> None:
    """Run ``task`` in upstream's local mode, under ARGS["raw"], and write the outcome."""
    out = pathlib.Path(ARGS["out"])
    try:
        result = flyte.with_runcontext(mode="local", raw_data_path=ARGS["raw"]).run(
            task, **inputs)
        outcome = {"ok": True, "output": json.loads(result.outputs()[0])}
    except Exception as exc:  # the run failed: report it, the test decides
        outcome = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    outcome["attempts"] = ATTEMPTS
    out.write_text(json.dumps(outcome))
