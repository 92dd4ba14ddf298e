"""The local retry runner behind ``flyte-checkpoint run`` and the demo.

It plays the platform's part: every attempt of a command gets a fresh checkpoint
destination and, as its source, the destination of the newest earlier attempt that saved a
checkpoint, in the environment variables ``FLYTE_CHECKPOINT_PATH`` and
``FLYTE_PREV_CHECKPOINT_PATH`` (plus ``FLYTE_ATTEMPT``), which ``flyte.Checkpoint.from_env()``
reads. A module of its own so that the CLI and the demo both use it without importing each
other.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import tempfile
import time
import uuid

from checkpoint_format import remove_tree

from ._checkpoint import ENV_DEST, ENV_SRC
from ._settings import Settings
from ._storage import file_for

ENV_ATTEMPT = "FLYTE_ATTEMPT"
OBJECT_NAME = "_flytecheckpoints"


@dataclasses.dataclass
class Attempt:
    number: int
    destination: str
    source: str | None
    returncode: int
    seconds: float


def _join(store: str, *parts: str) -> str:
    return "/".join([store.rstrip("/"), *parts])


def run_attempts(
    command: list[str],
    *,
    retries: int,
    store: str,
    env: dict[str, str] | None = None,
    echo=print,
    settings: Settings | None = None,
) -> list[Attempt]:
    """Run ``command`` until it succeeds or ``retries`` retries are used up. Each attempt
    reads its own settings from the environment it is given; ``settings`` are the runner's
    (for its look at the store between attempts)."""
    run_id = time.strftime("run-%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    attempts: list[Attempt] = []
    previous: str | None = None
    for number in range(1, retries + 2):
        destination = _join(store, run_id, f"attempt-{number}", OBJECT_NAME)
        scratch = tempfile.mkdtemp(prefix=f"flyte-checkpoint-attempt{number}-")
        child_env = {**os.environ, **(env or {})}
        child_env.update(
            {
                ENV_DEST: destination,
                ENV_SRC: previous or "",
                ENV_ATTEMPT: str(number),
                "TMPDIR": scratch,
            }
        )
        echo(f"attempt {number}: checkpoint -> {destination}")
        if previous:
            echo(f"attempt {number}: resume from {previous}")
        started = time.perf_counter()
        try:
            returncode = subprocess.call(command, env=child_env)
        finally:
            # A killed attempt's scratch may hold restored trees too deep for rmtree's
            # recursion, or read-only ones: the iterative remover takes them.
            if not remove_tree(scratch):
                echo(f"attempt {number}: could not remove its scratch directory {scratch}")
        attempt = Attempt(number, destination, previous, returncode, time.perf_counter() - started)
        attempts.append(attempt)
        if returncode == 0:
            echo(f"attempt {number}: succeeded in {attempt.seconds:.1f} s")
            break
        echo(f"attempt {number}: failed with exit status {returncode}"
             f" after {attempt.seconds:.1f} s")
        # The next attempt resumes from the newest checkpoint there is: an attempt that died
        # before saving must not hide its predecessor's (that would restart from scratch).
        if file_for(destination, settings=settings).exists_sync():
            previous = destination
        elif previous:
            echo(f"attempt {number}: saved no checkpoint; the next attempt resumes from {previous}")
    return attempts


def default_store() -> str:
    return tempfile.mkdtemp(prefix="flyte-checkpoint-store-")
