"""A counting "training" loop that checkpoints every few steps and dies where the plan says.

Arguments: ``kind`` (bytes, file or dir: what is saved), ``async`` (an async task),
``steps``, ``every``, ``plan`` (the failure plan file), ``retries``, ``corrupt`` (after the
first failure, truncate the saved object, as a torn upload would leave it).
"""

from __future__ import annotations

import json
import pathlib
import tempfile

import flyte
from harness import ARGS, ATTEMPTS, FailurePlan, describe, run

env = flyte.TaskEnvironment(name="resume")
plan = FailurePlan(ARGS.get("plan"))
STEPS, EVERY, KIND = ARGS.get("steps", 20), ARGS.get("every", 3), ARGS.get("kind", "dir")
work = pathlib.Path(tempfile.mkdtemp(prefix="task-work-"))


def restore(restored: pathlib.Path | None) -> tuple[int, int]:
    if restored is None:
        return 0, 0
    if KIND == "dir":
        state = json.loads((restored / "state" / "state.json").read_text())
    else:
        state = json.loads(restored.read_bytes())
    return state["step"], state["total"]


def snapshot(step: int, total: int):
    body = json.dumps({"step": step, "total": total}).encode()
    if KIND == "bytes":
        return body
    if KIND == "file":
        (work / "state.json").write_bytes(body)
        return work / "state.json"
    (work / "ckpt" / "state").mkdir(parents=True, exist_ok=True)
    (work / "ckpt" / "state" / "state.json").write_bytes(body)
    (work / "ckpt" / "weights.bin").write_bytes(bytes(range(256)) * (step + 1))
    return work / "ckpt"


def corrupt(helper) -> None:
    target = pathlib.Path(helper.remote_destination)
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])


def train_steps(helper, restored) -> tuple[int, int, list]:
    step, total = restore(restored)
    ATTEMPTS.append({**describe(helper), "start": step, "source": helper.remote_source})
    saves = []
    while step < STEPS:
        step += 1
        total += step * step
        if step % EVERY == 0:
            saves.append(snapshot(step, total))
            yield saves[-1]
        try:
            plan.check(step)
        except RuntimeError:
            if ARGS.get("corrupt"):
                corrupt(helper)
            raise
    return step, total, saves


@env.task(retries=ARGS.get("retries", 3))
def train_sync() -> str:
    helper = flyte.ctx().checkpoint
    loop = train_steps(helper, helper.load_sync())
    try:
        while True:
            helper.save_sync(next(loop))
    except StopIteration as done:
        step, total, _ = done.value
    return json.dumps({"step": step, "total": total})


@env.task(retries=ARGS.get("retries", 3))
async def train_async() -> str:
    helper = flyte.ctx().checkpoint
    loop = train_steps(helper, await helper.load())
    try:
        while True:
            await helper.save(next(loop))
    except StopIteration as done:
        step, total, _ = done.value
    return json.dumps({"step": step, "total": total})


if __name__ == "__main__":
    run(train_async if ARGS.get("async") else train_sync)
