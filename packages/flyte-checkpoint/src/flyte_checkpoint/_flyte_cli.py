"""``flyte checkpoint inspect|validate URI``: our commands inside the upstream SDK's CLI.

Upstream loads this module through its ``flyte.plugins.cli.commands`` entry point, only when
it runs ``flyte checkpoint ...``; it is never imported otherwise, so ``click`` (which upstream
brings) is no dependency of ours. Both commands run the same code as ``flyte-checkpoint
inspect|validate`` and exit with its status: 0 valid, 1 invalid, 2 unreadable.
"""

from __future__ import annotations

import click

from . import _cli


@click.group(name="checkpoint")
def checkpoint() -> None:
    """Inspect and validate checkpoint objects (flyte-checkpoint)."""


@checkpoint.command()
@click.argument("uri")
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of a table.")
def inspect(uri: str, as_json: bool) -> None:
    """Show what a checkpoint object holds, streaming it from any store."""
    raise SystemExit(_cli.main(["inspect", uri, *(["--json"] if as_json else [])]))


@checkpoint.command()
@click.argument("uri")
def validate(uri: str) -> None:
    """Check a checkpoint object against the format spec, streaming it from any store."""
    raise SystemExit(_cli.main(["validate", uri]))
