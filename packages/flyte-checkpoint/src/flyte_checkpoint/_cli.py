"""``flyte-checkpoint``: a local retry runner, the demo, and remote inspect/validate.

``run`` plays the platform's part (see :mod:`._runner`, which the demo uses too).
"""

from __future__ import annotations

import argparse
import sys

from checkpoint_format import cli as format_cli
from checkpoint_io import MissingBackendError

from . import __version__
from ._runner import default_store, run_attempts
from ._settings import Settings, SettingsError
from ._storage import file_for


def _settings(command: str) -> Settings | None:
    """The settings of this run, or None having said which variable is bad (exit 2)."""
    try:
        return Settings.from_env()
    except SettingsError as bad:
        print(f"flyte-checkpoint {command}: {bad}", file=sys.stderr)
        return None


def _cmd_run(args: argparse.Namespace) -> int:
    command = args.command
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        print("flyte-checkpoint run: no command given (usage: run --retries N -- CMD ...)",
              file=sys.stderr)
        return 2
    # Checked before the first attempt starts: each attempt would fail on it at start.
    settings = _settings("run")
    if settings is None:
        return 2
    store = args.store or default_store()
    attempts = run_attempts(command, retries=args.retries, store=store, settings=settings)
    last = attempts[-1]
    if last.returncode != 0:
        print(f"all {len(attempts)} attempts failed", file=sys.stderr)
    return last.returncode


def _cmd_demo(args: argparse.Namespace) -> int:
    from . import _demo

    if _settings("demo") is None:  # as for run: every attempt would fail on it at start
        return 2
    return _demo.run_demo(store=args.store, steps=args.steps, every=args.every,
                          kill_at=args.kill_at)


def _cmd_format(args: argparse.Namespace) -> int:
    settings = _settings(args.which)
    if settings is None:
        return 2
    try:
        with file_for(args.uri, settings=settings).open_sync("rb") as remote:
            return format_cli.run(args.which, args.uri, remote,
                                  as_json=getattr(args, "json", False),
                                  **settings.restore_options())
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
