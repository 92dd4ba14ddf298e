"""Lightning with ``flyte_checkpoint.integrations.lightning``, under ``flyte-checkpoint run``:
each attempt is a process of its own, killed with SIGKILL where the plan says, and the next
resumes from what the callback uploaded in the background.

Under torchrun (``WORLD_SIZE`` > 1) the same program trains with DDP over gloo: each rank
sees its half of every epoch, rank 0 follows the failure plan (SIGKILL: torchrun then ends
the other rank and the attempt fails), and every rank logs the resume path it was given.

Arguments (JSON): ``plan`` (the failure plan file), ``log`` (a JSON-lines file each attempt
appends to: one line per rank), ``out`` (the last attempt's result, from rank 0),
``epochs``, ``fail`` ("kill", the default, or "raise": an exception instead of SIGKILL),
``slow_uploads`` (seconds each upload is held in flight).
"""

from __future__ import annotations

import concurrent.futures
import datetime
import json
import os
import pathlib
import signal
import sys
import tempfile
import threading

import lightning as L
import torch
from flyte_checkpoint.integrations.lightning import FlyteCheckpointCallback
from training import regression_data, weights_digest

ARGS = json.loads(sys.argv[1])
RANKS = int(os.environ.get("WORLD_SIZE", "1"))
TIMEOUT = datetime.timedelta(seconds=120)  # every collective of the job


class Regressor(L.LightningModule):
    def __init__(self, mirror: FlyteCheckpointCallback) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mirror = mirror
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
                                       torch.nn.Linear(8, 1))

    def training_step(self, batch, batch_idx):
        if self.global_rank == 0:
            kill_if_planned(self.global_step, self.mirror)
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def kill_if_planned(step: int, mirror) -> None:
    plan = pathlib.Path(ARGS["plan"])
    steps = json.loads(plan.read_text()) if plan.exists() else []
    if step in steps:
        steps.remove(step)
        plan.write_text(json.dumps(steps))
        if ARGS.get("fail") == "raise":  # the callback's on_exception uploads the newest
            raise RuntimeError(f"planned failure at step {step}")
        # Upload the newest save first, so that the resume point is the same however slow
        # the uploads run (a kill during an upload is tested on its own).
        mirror.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def slow_uploads(mirror, seconds: float) -> None:
    """Each background upload is reported done ``seconds`` after it really is, as on a slow
    store: a newer save is then still waiting its turn when training fails."""
    save_sync = mirror.checkpoint.save_sync

    def slow(data, *, wait=True):
        future = save_sync(data, wait=wait)
        later = concurrent.futures.Future()
        threading.Timer(seconds, lambda: later.set_result(future.result())).start()
        return later

    mirror.checkpoint.save_sync = slow


def main() -> None:
    mirror = FlyteCheckpointCallback()
    resume = mirror.resume_path()
    if ARGS.get("slow_uploads"):
        slow_uploads(mirror, ARGS["slow_uploads"])
    work = pathlib.Path(tempfile.mkdtemp(prefix="lightning-"))
    saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=work / "ckpts", save_last=True,
                                                save_top_k=1, every_n_epochs=1)
    start = torch.load(resume, weights_only=False)["global_step"] if resume else 0
    rank = int(os.environ.get("RANK", "0"))
    with open(ARGS["log"], "a") as log:
        log.write(json.dumps({"start": start, "rank": rank, "resume": resume}) + "\n")
    model = Regressor(mirror)
    distributed = {}
    if RANKS > 1:
        distributed = {"devices": RANKS, "strategy": L.pytorch.strategies.DDPStrategy(
            timeout=TIMEOUT, process_group_backend="gloo")}
    trainer = L.Trainer(max_epochs=ARGS.get("epochs", 4), callbacks=[saver, mirror],
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, deterministic=True, accelerator="cpu",
                        default_root_dir=work, **distributed)
    trainer.fit(model, regression_data(), ckpt_path=resume)
    if trainer.global_rank != 0:
        return
    pathlib.Path(ARGS["out"]).write_text(json.dumps(
        {"step": trainer.global_step, "weights": weights_digest(model.net),
         "uploads": mirror.uploads}))


if __name__ == "__main__":
    main()
