"""``flyte-checkpoint``: a local retry runner, the demo, and remote inspect/validate.

``run`` plays the platform's part: every attempt of a command gets a fresh checkpoint
destination and, as its source, the destination of the newest earlier attempt that saved a
checkpoint, in the environment variables ``FLYTE_CHECKPOINT_PATH`` and
``FLYTE_PREV_CHECKPOINT_PATH`` (plus ``FLYTE_ATTEMPT``), which ``flyte.Checkpoint.from_env()``
reads.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

from checkpoint_format import cli as format_cli
from checkpoint_io import MissingBackendError

from . import __version__
from ._checkpoint import ENV_DEST, ENV_SRC
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
) -> list[Attempt]:
    """Run ``command`` until it succeeds or ``retries`` retries are used up."""
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
            shutil.rmtree(scratch, ignore_errors=True)
        attempt = Attempt(number, destination, previous, returncode, time.perf_counter() - started)
        attempts.append(attempt)
        if returncode == 0:
            echo(f"attempt {number}: succeeded in {attempt.seconds:.1f} s")
            break
        echo(f"attempt {number}: failed with exit status {returncode}"
             f" after {attempt.seconds:.1f} s")
        # The next attempt resumes from the newest checkpoint there is: an attempt that died
        # before saving must not hide its predecessor's (that would restart from scratch).
        if file_for(destination).exists_sync():
            previous = destination
        elif previous:
            echo(f"attempt {number}: saved no checkpoint; the next attempt resumes from {previous}")
    return attempts


def _default_store() -> str:
    return tempfile.mkdtemp(prefix="flyte-checkpoint-store-")


def _cmd_run(args: argparse.Namespace) -> int:
    command = args.command
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        print("flyte-checkpoint run: no command given (usage: run --retries N -- CMD ...)",
              file=sys.stderr)
        return 2
    store = args.store or _default_store()
    attempts = run_attempts(command, retries=args.retries, store=store)
    last = attempts[-1]
    if last.returncode != 0:
        print(f"all {len(attempts)} attempts failed", file=sys.stderr)
    return last.returncode


def _cmd_demo(args: argparse.Namespace) -> int:
    from . import _demo

    return _demo.run_demo(store=args.store, steps=args.steps, every=args.every,
                          kill_at=args.kill_at)


def _cmd_format(args: argparse.Namespace) -> int:
    try:
        with file_for(args.uri).open_sync("rb") as remote:
            return format_cli.run(args.which, args.uri, remote,
                                  as_json=getattr(args, "json", False))
    except FileNotFoundError:
        print(f"flyte-checkpoint {args.which}: no object at {args.uri}", file=sys.stderr)
        return 2
    except MissingBackendError as missing:
        print(f"flyte-checkpoint {args.which}: {missing.naming('flyte-checkpoint')}",
              file=sys.stderr)
        return 2
    except Exception as exc:  # an I/O error reaching the store: usage/I-O exit status
        print(f"flyte-checkpoint {args.which}: cannot read {args.uri}: {exc}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flyte-checkpoint", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="cmd", required=True)

    demo = sub.add_parser(
        "demo", help="train a small model through injected failures, resuming each time"
    )
    demo.add_argument(
        "--store", help="where checkpoints go: a directory or URI (default: a temp directory)"
    )
    demo.add_argument("--steps", type=int, default=100)
    demo.add_argument("--every", type=int, default=17, help="checkpoint every N steps")
    demo.add_argument(
        "--kill-at", default="40,75", help="global steps at which attempts 1, 2, ... are killed"
    )
    demo.set_defaults(func=_cmd_demo)

    run = sub.add_parser("run", help="run a command with retries, passing checkpoint locations")
    run.add_argument("--retries", type=int, default=3)
    run.add_argument(
        "--store", help="a directory or URI for checkpoints (default: a temp directory)"
    )
    run.add_argument("command", nargs=argparse.REMAINDER)
    run.set_defaults(func=_cmd_run)

    for which in ("inspect", "validate"):
        p = sub.add_parser(which, help=f"{which} a checkpoint object at any URI, streaming")
        p.add_argument("uri")
        if which == "inspect":
            p.add_argument("--json", action="store_true")
        p.set_defaults(func=_cmd_format, which=which)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
