"""A PyTorch training loop in a Flyte task: a small MLP on synthetic data, checkpointed
every few steps as a directory (``torch.save`` of model, optimizer, step and RNG state),
killed where the plan says, and resumed by each retry.

Every random draw comes from torch's generator, whose state is in the checkpoint, so a
resumed run computes bit for bit what an uninterrupted one does; the output is a digest of
the final weights.
"""

from __future__ import annotations

import json
import pathlib
import tempfile

import flyte
import torch
from harness import ARGS, ATTEMPTS, FailurePlan, describe, run
from training import weights_digest

env = flyte.TaskEnvironment(name="torch_loop")
plan = FailurePlan(ARGS.get("plan"))
STEPS, EVERY = ARGS.get("steps", 30), ARGS.get("every", 4)


def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    return model, torch.optim.Adam(model.parameters(), lr=0.01)


@env.task(retries=ARGS.get("retries", 3))
def train() -> str:
    helper = flyte.ctx().checkpoint
    model, optimizer = build()
    step = 0
    restored = helper.load_sync()
    if restored is not None:
        state = torch.load(restored / "last.pt", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        step = state["step"]
    ATTEMPTS.append({**describe(helper), "start": step})
    work = pathlib.Path(tempfile.mkdtemp(prefix="torch-ckpt-"))
    while step < STEPS:
        x = torch.randn(32, 8)
        y = x.sum(dim=1, keepdim=True).sin()
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        if step % EVERY == 0:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "rng": torch.get_rng_state(), "step": step}, work / "last.pt")
            helper.save_sync(work)
        plan.check(step)
    return json.dumps({"step": step, "weights": weights_digest(model), "loss": float(loss)})


if __name__ == "__main__":
    run(train)
