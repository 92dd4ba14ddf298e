"""Save one checkpoint, or load one, through ``flyte.ctx().checkpoint``, in a task run in
upstream's local mode: the two halves of a mixed fleet, where one environment has our helper
installed and the other has upstream alone.

Arguments: ``mode`` (save or load), ``kind`` (dir, file or bytes), ``ours``. A load expects
the object at ``<raw>/prev_checkpoint`` and reports what it restored: every file under the
returned path with its SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import tempfile

import flyte
from harness import ARGS, ATTEMPTS, describe, run

env = flyte.TaskEnvironment(name="roundtrip")


def payload() -> bytes | pathlib.Path:
    """The same content in every environment: deterministic bytes, and a small tree."""
    blob = hashlib.sha256(b"seed").digest() * 4096
    if ARGS["kind"] == "bytes":
        return blob
    work = pathlib.Path(tempfile.mkdtemp(prefix="roundtrip-"))
    if ARGS["kind"] == "file":
        (work / "model.bin").write_bytes(blob)
        return work / "model.bin"
    (work / "ckpt" / "shards").mkdir(parents=True)
    (work / "ckpt" / "shards" / "0.bin").write_bytes(blob)
    (work / "ckpt" / "shards" / "1.bin").write_bytes(blob[::-1])
    (work / "ckpt" / "meta.json").write_text('{"step": 7}')
    return work / "ckpt"


def listing(restored: pathlib.Path | None, root: pathlib.Path) -> dict:
    if restored is None:
        return {"restored": None}
    if restored.is_file():
        return {"restored": "payload", "sha256": hashlib.sha256(restored.read_bytes()).hexdigest()}
    files = {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(root.rglob("*")) if p.is_file()}
    return {"restored": "tree", "files": files}


@env.task
def save() -> str:
    helper = flyte.ctx().checkpoint
    ATTEMPTS.append(describe(helper))
    helper.save_sync(payload())
    return json.dumps({"saved": helper.remote_destination})


@env.task
async def load() -> str:
    helper = flyte.ctx().checkpoint
    ATTEMPTS.append(describe(helper))
    return json.dumps(listing(await helper.load(), helper.path))


if __name__ == "__main__":
    run(save if ARGS["mode"] == "save" else load)
