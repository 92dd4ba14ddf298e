"""The demo's training task: a small, deterministic training loop that resumes from checkpoints.

It runs as its own process under ``flyte-checkpoint run``, exactly as user code would: it
builds its helper with ``Checkpoint.from_env()``, restores, trains, saves a directory
checkpoint every few steps, and may be killed at any moment.

The model: a linear regression trained by SGD on synthetic data, plus a 150,000-entry
embedding table updated sparsely (so the checkpoint weighs about 1.2 MB, like a small model).
Every random draw comes from a generator whose state is part of the checkpoint, so a resumed
run computes exactly what an uninterrupted run would.
"""

from __future__ import annotations

import array
import hashlib
import json
import os
import pathlib
import random
import sys
import tempfile
import time

from flyte_checkpoint import Checkpoint

FEATURES = 8
EMBEDDINGS = 150_000
TOUCHED_PER_STEP = 2_000
BATCH = 32
LEARNING_RATE = 0.05
SEED = 20261127

ENV_STEPS = "DEMO_STEPS"
ENV_EVERY = "DEMO_CHECKPOINT_EVERY"
ENV_KILL_AT = "DEMO_KILL_AT"  # comma-separated global steps; attempt N dies at the Nth


class State:
    """Everything a resumed run needs: weights, embeddings, RNG state and the step history."""

    def __init__(self) -> None:
        rng = random.Random(SEED)
        self.true_weights = [rng.uniform(-2, 2) for _ in range(FEATURES)]
        self.weights = [0.0] * FEATURES
        self.embeddings = array.array("d", bytes(8 * EMBEDDINGS))
        self.rng = random.Random(SEED + 1)
        self.step = 0
        self.applied: list[int] = []  # every step applied to these weights, in order
        self.losses: list[float] = []

    def train_step(self) -> float:
        rng = self.rng
        grad = [0.0] * FEATURES
        loss = 0.0
        for _ in range(BATCH):
            x = [rng.gauss(0, 1) for _ in range(FEATURES)]
            y = sum(w * xi for w, xi in zip(self.true_weights, x, strict=True)) + rng.gauss(0, 0.1)
            err = sum(w * xi for w, xi in zip(self.weights, x, strict=True)) - y
            loss += err * err / BATCH
            for i in range(FEATURES):
                grad[i] += 2 * err * x[i] / BATCH
        self.weights = [w - LEARNING_RATE * g for w, g in zip(self.weights, grad, strict=True)]
        for _ in range(TOUCHED_PER_STEP):
            self.embeddings[rng.randrange(EMBEDDINGS)] += rng.gauss(0, 0.01)
        self.step += 1
        self.applied.append(self.step)
        self.losses.append(loss)
        return loss

    def digest(self) -> str:
        h = hashlib.sha256()
        h.update(array.array("d", self.weights).tobytes())
        h.update(self.embeddings.tobytes())
        return h.hexdigest()

    # A directory checkpoint: weights and history as JSON, the table as raw float64s.
    def write(self, directory: pathlib.Path) -> None:
        (directory / "embeddings.bin").write_bytes(self.embeddings.tobytes())
        meta = {
            "step": self.step,
            "weights": self.weights,
            "rng": _encode_rng(self.rng.getstate()),
            "applied": self.applied,
            "losses": self.losses,
        }
        (directory / "state.json").write_text(json.dumps(meta))

    @classmethod
    def read(cls, directory: pathlib.Path) -> State:
        state = cls()
        meta = json.loads((directory / "state.json").read_text())
        state.embeddings = array.array("d")
        state.embeddings.frombytes((directory / "embeddings.bin").read_bytes())
        state.step = meta["step"]
        state.weights = meta["weights"]
        state.rng.setstate(_decode_rng(meta["rng"]))
        state.applied = meta["applied"]
        state.losses = meta["losses"]
        return state


def _encode_rng(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _decode_rng(data: list) -> tuple:
    version, internal, gauss = data
    return (version, tuple(internal), gauss)


def reference_digest(steps: int) -> str:
    """What an uninterrupted run ends with, for the demo's final proof."""
    state = State()
    for _ in range(steps):
        state.train_step()
    return state.digest()


def _checkpoint_size(directory: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir())


def main() -> int:
    steps = int(os.environ.get(ENV_STEPS, "100"))
    every = int(os.environ.get(ENV_EVERY, "17"))
    attempt = int(os.environ.get("FLYTE_ATTEMPT", "1"))
    kill_at = [int(s) for s in os.environ.get(ENV_KILL_AT, "").split(",") if s.strip()]
    die_at = kill_at[attempt - 1] if attempt <= len(kill_at) else None

    with Checkpoint.from_env() as checkpoint:
        started = time.perf_counter()
        restored = checkpoint.load_sync()
        seconds = time.perf_counter() - started
        if restored is None:
            state = State()
            print(f"  attempt {attempt}: no previous checkpoint, starting at step 0")
        else:
            state = State.read(restored)
            size = _checkpoint_size(restored)
            print(
                f"  attempt {attempt}: resumed at step {state.step} from a {size / 1e6:.1f} MB"
                f" checkpoint restored in {seconds:.2f} s"
            )
        with tempfile.TemporaryDirectory(prefix="demo-ckpt-") as scratch:
            scratch_dir = pathlib.Path(scratch)
            while state.step < steps:
                loss = state.train_step()
                if state.step % every == 0 or state.step == steps:
                    state.write(scratch_dir)
                    t0 = time.perf_counter()
                    checkpoint.save_sync(scratch_dir)
                    print(
                        f"  attempt {attempt}: step {state.step:3d}  loss {loss:8.4f}  "
                        f"checkpoint saved in {time.perf_counter() - t0:.2f} s"
                    )
                if die_at is not None and state.step == die_at:
                    print(f"  attempt {attempt}: step {state.step:3d}  *** node lost (killed) ***")
                    sys.stdout.flush()
                    os._exit(137)  # like SIGKILL: no cleanup, no atexit, no flush
    print(f"  attempt {attempt}: finished all {steps} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
