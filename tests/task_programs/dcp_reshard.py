"""``flyte_checkpoint.integrations.dcp`` on DTensors sharded over a CPU device mesh, one rank
of a torchrun job: ``phase`` "save" (an async save, then a blocking one, over however many
ranks torchrun started) or "load" (into a mesh of this job's size: DCP reshards).

Arguments (JSON): ``phase``, ``store`` (a local directory for the objects), ``staging`` (the
root of the per-rank staging directories), ``out`` (a directory: ``rank<R>.json`` each).
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import sys

import torch
import torch.distributed as dist
from flyte_checkpoint import Checkpoint, CheckpointLoadError
from flyte_checkpoint.integrations import dcp as flyte_dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

ARGS = json.loads(sys.argv[1])
TIMEOUT = 120  # every collective of this job, and every wait for a save


def expected(step: int) -> dict[str, torch.Tensor]:
    """The full tensors of the checkpoint of ``step``: rows that 4 and 2 ranks divide, rows
    that they do not (10 over 4 ranks: shards of 3, 3, 3, 1), and a replicated bias."""
    return {"w": torch.arange(64 * 8, dtype=torch.float32).reshape(64, 8) + step,
            "uneven": torch.linspace(0, 1, 10 * 3).reshape(10, 3) * step,
            "bias": torch.full((5,), float(step))}


def sharded(full: dict[str, torch.Tensor], mesh) -> dict[str, torch.Tensor]:
    return {"w": distribute_tensor(full["w"], mesh, [Shard(0)]),
            "uneven": distribute_tensor(full["uneven"], mesh, [Shard(0)]),
            "bias": distribute_tensor(full["bias"], mesh, [Replicate()])}


def main() -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=TIMEOUT))
    rank, size = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (size,))
    store = pathlib.Path(ARGS["store"])
    staging = pathlib.Path(ARGS["staging"]) / f"rank{rank}"
    staging.mkdir(parents=True, exist_ok=True)
    report: dict = {"rank": rank, "size": size}
    if ARGS["phase"] == "save":
        checkpoint = Checkpoint(store / "dcp.obj")
        state = {"model": sharded(expected(5), mesh), "step": 5}
        future = flyte_dcp.async_save(state, checkpoint, staging_dir=staging)
        report["staged_after_async"] = sorted(os.listdir(staging))
        future.result(timeout=TIMEOUT)
        state = {"model": sharded(expected(7), mesh), "step": 7}
        flyte_dcp.save(state, checkpoint, staging_dir=staging)
        report["staged_after_save"] = sorted(os.listdir(staging))
        if rank == 0:  # an ordinary directory checkpoint, for the load phase to refuse
            plain = staging / "plain"
            plain.mkdir()
            (plain / "model.bin").write_bytes(b"not dcp")
            Checkpoint(store / "plain.obj").save_sync(plain)
        report["local_shard_rows"] = state["model"]["w"].to_local().shape[0]
    else:
        nothing = Checkpoint(store / "unused.obj", store / "absent.obj")
        empty = {"model": sharded({k: torch.zeros_like(v) for k, v in expected(0).items()},
                                  mesh), "step": -1}
        report["loaded_absent"] = flyte_dcp.load(empty, nothing)
        report["untouched"] = empty["step"] == -1
        try:
            flyte_dcp.load(empty, Checkpoint(store / "unused2.obj", store / "plain.obj"))
        except CheckpointLoadError as refused:
            report["not_dcp"] = str(refused)
        checkpoint = Checkpoint(store / "next.obj", store / "dcp.obj")
        state = {"model": sharded({k: torch.zeros_like(v) for k, v in expected(0).items()},
                                  mesh), "step": -1}
        report["loaded"] = flyte_dcp.load(state, checkpoint)
        report["step"] = state["step"]
        full = {name: tensor.full_tensor() for name, tensor in state["model"].items()}
        report["equal"] = {name: bool(torch.equal(full[name], expected(7)[name]))
                           for name in full}
        report["local_shard_rows"] = state["model"]["w"].to_local().shape[0]
        report["restored_at"] = str(flyte_dcp.helper_for(checkpoint).path)
        report["files"] = sorted(os.listdir(report["restored_at"]))
    dist.barrier()
    out = pathlib.Path(ARGS["out"])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
