"""What ``flyte_checkpoint.install()`` promises, checked in a process of its own.

Prints one JSON document: each check's name and whether it held.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import pickle
import subprocess
import sys

import flyte
import flyte._checkpoint as upstream_module
import flyte_checkpoint
from flyte.models import CheckpointPaths, RawDataPath, TaskContext

results: dict[str, object] = {}
upstream_class = upstream_module.Checkpoint
public_before = flyte.Checkpoint


def context(dest: str | None, prev: str | None) -> TaskContext:
    from flyte.models import ActionID
    from flyte.report import Report

    return TaskContext(action=ActionID(name="a0"), version="v",
                       raw_data_path=RawDataPath(path="/tmp"), output_path="/tmp/out",
                       run_base_dir="/tmp/base", report=Report(name="r"),
                       checkpoint_paths=CheckpointPaths(prev_checkpoint_path=prev,
                                                        checkpoint_path=dest))


# A version outside the range: one clear error naming both, and nothing changed.
real_version = flyte_checkpoint._upstream._upstream_version
flyte_checkpoint._upstream._upstream_version = lambda: "2.1.0"
try:
    flyte_checkpoint.install()
    results["old_version_refused"] = "no error"
except flyte_checkpoint.UpstreamNotSupportedError as exc:
    results["old_version_refused"] = str(exc)
flyte_checkpoint._upstream._upstream_version = real_version
results["refusal_changed_nothing"] = (upstream_module.Checkpoint is upstream_class
                                      and flyte.Checkpoint is public_before
                                      and not flyte_checkpoint.installed())

early = context("/tmp/ckpt/early", None)
early_helper = early.checkpoint  # cached by upstream before install()

flyte_checkpoint.install()
served = flyte.Checkpoint
results["helper_cached_before_install_still_served"] = early.checkpoint is early_helper
flyte_checkpoint.install()  # idempotent
results["idempotent"] = flyte.Checkpoint is served and upstream_module.Checkpoint is served
results["served_is_ours"] = issubclass(served, flyte_checkpoint.Checkpoint)
results["served_is_upstreams"] = issubclass(served, upstream_class)
results["outside_a_task"] = flyte.ctx() is None or flyte.ctx().checkpoint is None

ctx = context("/tmp/ckpt/dest", "/tmp/ckpt/prev")
helper = ctx.checkpoint
results["ctx_helper_is_ours"] = isinstance(helper, flyte_checkpoint.Checkpoint)
results["cached_per_context"] = ctx.checkpoint is helper
results["paths"] = [helper.remote_destination, helper.remote_source]
results["no_destination"] = context(None, "/tmp/ckpt/prev").checkpoint is None
results["blank_destination"] = context("  ", "/tmp/ckpt/prev").checkpoint is None
os.environ["JOBSET_RESTART_ATTEMPT"] = "2"
restarted = context("/tmp/ckpt/dest", "/tmp/ckpt/prev").checkpoint
results["jobset_restart_source"] = restarted.remote_source
del os.environ["JOBSET_RESTART_ATTEMPT"]

# The resume rule (issue 18): the helper tasks get restores the newest checkpoint the store
# holds; a plain flyte.Checkpoint(dest, src) keeps upstream's meaning.
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

store = Path(tempfile.mkdtemp(prefix="resume-rule-"))
tree = store / "tree"
tree.mkdir()
(tree / "step").write_text("attempt 0")
with flyte_checkpoint.Checkpoint(str(store / "a0" / "0" / "_flytecheckpoints")) as first:
    first.save_sync(tree)  # attempt 0 saved; attempt 1 died before saving
dest, prev = (str(store / "a0" / n / "_flytecheckpoints") for n in ("2", "1"))
os.environ["JOBSET_RESTART_ATTEMPT"] = "1"  # and attempt 2 restarted before its first save
task_helper = context(dest, prev).checkpoint
del os.environ["JOBSET_RESTART_ATTEMPT"]
restored = task_helper.load_sync()
results["resume_finds_the_newest_earlier_attempt"] = (
    restored is not None and (restored / "step").read_text() == "attempt 0")
task_helper.close()
with flyte.Checkpoint(dest, prev) as plain:
    results["plain_checkpoint_keeps_upstreams_meaning"] = plain.load_sync() is None


results["class_pickles"] = pickle.loads(pickle.dumps(served)) is served
clone = pickle.loads(pickle.dumps(helper))
results["helper_pickles"] = (type(clone) is served
                             and clone.remote_destination == helper.remote_destination)
results["context_deepcopies"] = type(copy.deepcopy(ctx).checkpoint) is served
elsewhere = subprocess.run(
    [sys.executable, "-c", "import pickle, sys; h = pickle.loads(sys.stdin.buffer.read());"
     " print(type(h).__name__, h.remote_destination)"],
    input=pickle.dumps(helper), capture_output=True, check=False)
results["unpickles_where_install_never_ran"] = (
    elsewhere.stdout.decode().split() == ["FlyteCheckpoint", "/tmp/ckpt/dest"])


async def in_async() -> bool:
    return isinstance(context("/tmp/a", None).checkpoint, flyte_checkpoint.Checkpoint)

results["async_context"] = asyncio.run(in_async())

flyte_checkpoint.uninstall()
flyte_checkpoint.uninstall()
results["uninstalled"] = (upstream_module.Checkpoint is upstream_class
                          and flyte.Checkpoint is public_before)
results["after_uninstall_new_helpers_are_upstreams"] = (
    type(context("/tmp/b", None).checkpoint) is upstream_class)
results["after_uninstall_cached_helper_still_served"] = ctx.checkpoint is helper
print(json.dumps(results))
