"""A Lightning ``Trainer`` with ``ModelCheckpoint`` in a Flyte task.

``ModelCheckpoint`` writes ``last.ckpt`` at the end of every epoch, and a subclass of it saves
that directory to ``flyte.ctx().checkpoint`` right after. An attempt killed mid-epoch is
resumed by the next one with ``trainer.fit(..., ckpt_path=<restored last.ckpt>)``. The data
is fixed and unshuffled, so the resumed run ends with the same weights as an uninterrupted
one; the output is their digest.
"""

from __future__ import annotations

import json
import pathlib
import tempfile

import flyte
import lightning as L
import torch
from harness import ARGS, ATTEMPTS, FailurePlan, describe, run
from training import regression_data, weights_digest

env = flyte.TaskEnvironment(name="lightning_loop")
plan = FailurePlan(ARGS.get("plan"))
EPOCHS = ARGS.get("epochs", 4)


class Regressor(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
                                       torch.nn.Linear(8, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        plan.check(self.global_step)  # dies mid-epoch where the plan says
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class MirroredCheckpoint(L.pytorch.callbacks.ModelCheckpoint):
    """ModelCheckpoint that saves its directory to the Flyte checkpoint right after writing."""

    def __init__(self, helper, **options) -> None:
        super().__init__(**options)
        self.helper = helper

    def on_train_epoch_end(self, trainer, module) -> None:
        super().on_train_epoch_end(trainer, module)
        self.helper.save_sync(self.dirpath)


@env.task(retries=ARGS.get("retries", 3))
def train() -> str:
    helper = flyte.ctx().checkpoint
    restored = helper.load_sync()
    resume = flyte.latest_checkpoint(restored, "**/last.ckpt") if restored else None
    work = pathlib.Path(tempfile.mkdtemp(prefix="lightning-"))
    saver = MirroredCheckpoint(helper, dirpath=work, save_last=True, save_top_k=1,
                               every_n_epochs=1)
    model = Regressor()
    trainer = L.Trainer(max_epochs=EPOCHS, callbacks=[saver], logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, deterministic=True, accelerator="cpu",
                        default_root_dir=work)
    start = 0
    if resume is not None:
        start = torch.load(resume, weights_only=False)["global_step"]
    ATTEMPTS.append({**describe(helper), "start": start})
    trainer.fit(model, regression_data(), ckpt_path=str(resume) if resume else None)
    return json.dumps({"step": trainer.global_step, "weights": weights_digest(model)})


if __name__ == "__main__":
    run(train)
