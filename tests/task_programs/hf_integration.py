"""Hugging Face ``Trainer`` with ``flyte_checkpoint.integrations.transformers``, under
``flyte-checkpoint run``: a tiny GPT-2 built from a config (no download), checkpoints every
few steps with rotation (``save_total_limit``), attempts killed with SIGKILL where the plan
says, and each retry resumed from what the callback uploaded in the background.

Under torchrun (``WORLD_SIZE`` > 1) the same program trains with DDP over gloo: rank 0
follows the failure plan, and every rank logs the resume directory it was given.

Arguments (JSON): ``plan``, ``log`` (one line per rank and attempt), ``out`` (rank 0's),
``steps``, ``output`` (a directory every rank of an attempt writes its checkpoints into,
``output/attempt-N``; default: a temporary directory of each rank's own).
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import sys
import tempfile

import torch
from flyte_checkpoint.integrations.transformers import FlyteCheckpointCallback
from training import weights_digest
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

ARGS = json.loads(sys.argv[1])


class Tokens(torch.utils.data.Dataset):
    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(3)
        self.rows = torch.randint(0, 64, (96, 16), generator=generator)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.rows[index], "labels": self.rows[index]}


class KillWhere(TrainerCallback):
    """SIGKILL at the planned steps, each once: every rank reads the plan at the start (rank
    0 rewrites it as it dies), flushes the mirror (a collective under several ranks), and
    rank 0 kills itself; torchrun then ends the others."""

    def __init__(self, mirror: FlyteCheckpointCallback) -> None:
        self.mirror = mirror
        self.plan = pathlib.Path(ARGS["plan"])
        self.steps = json.loads(self.plan.read_text()) if self.plan.exists() else []

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step not in self.steps:
            return
        # Upload the newest save first, so that the resume point is the same however slow
        # the uploads run (a kill during an upload is tested on its own).
        self.mirror.flush()
        if state.is_world_process_zero:
            self.steps.remove(state.global_step)
            self.plan.write_text(json.dumps(self.steps))
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    mirror = FlyteCheckpointCallback()
    # The arguments first: under torchrun, they start the process group (gloo, with
    # ddp_timeout bounding every collective) that resume_path() then uses.
    if ARGS.get("output"):
        output_dir = str(pathlib.Path(ARGS["output"]) / f"attempt-{os.environ['FLYTE_ATTEMPT']}")
    else:
        output_dir = tempfile.mkdtemp(prefix="hf-")
    # Only for several ranks: a backend named makes Accelerate start a group even for one.
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    distributed = {"ddp_backend": "gloo", "ddp_timeout": 120} if ranks > 1 else {}
    args = TrainingArguments(
        output_dir=output_dir, max_steps=ARGS.get("steps", 24),
        save_steps=4, save_total_limit=2, per_device_train_batch_size=4, learning_rate=1e-3,
        seed=0, data_seed=0, report_to=[], logging_strategy="no", use_cpu=True,
        disable_tqdm=True, dataloader_num_workers=0, **distributed)
    resume = mirror.resume_path()
    start = json.loads((pathlib.Path(resume) / "trainer_state.json").read_text())[
        "global_step"] if resume else 0
    with open(ARGS["log"], "a") as log:
        log.write(json.dumps({"start": start, "rank": args.process_index, "resume": resume})
                  + "\n")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64,
                                       n_positions=16, bos_token_id=0, eos_token_id=0))
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(),
                      callbacks=[mirror, KillWhere(mirror)])
    trainer.train(resume_from_checkpoint=resume)
    if not trainer.is_world_process_zero():
        return
    pathlib.Path(ARGS["out"]).write_text(json.dumps(
        {"step": trainer.state.global_step, "weights": weights_digest(model),
         "uploads": mirror.uploads}))


if __name__ == "__main__":
    main()
