"""One rank of a multi-rank job (tests/test_distributed_torch.py, benchmarks/distributed_bench.py).

Started once per rank with RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (and CHECKPOINT_NODE_ID
to pretend several nodes on one machine) in its environment and one JSON argument: the
scenario and its inputs. It joins a gloo job, runs the scenario through
``DistributedCheckpoint`` and writes what it saw to ``<out>/rank<N>.json``, then leaves with
``os._exit`` (a job whose peer was killed must not hang in the process group's teardown).

Scenarios: ``save`` (its directory; ``kill_after`` bytes into its segment it SIGKILLs itself,
mid-upload; with ``again``, a failed save is followed by another on the same helper and
``close()``, each timed), ``background`` (``save(wait=False)`` then the future), ``load``
(restores, reports the tree it sees), ``dcp_save`` / ``dcp_load`` (a DTensor state dict through
``torch.distributed.checkpoint`` in a per-rank directory, then the collective save; the
collective load, then ``dcp.load`` resharding onto this job's ranks), ``time_save`` (seconds of
one collective save, for the benchmark).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import pathlib
import signal
import sys
import time
import traceback


def tree_of(root: pathlib.Path) -> dict[str, str]:
    found = {}
    for path in sorted(root.rglob("*")):
        name = path.relative_to(root).as_posix()
        found[name] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def main() -> None:
    args = json.loads(sys.argv[1])
    rank = int(os.environ["RANK"])
    out = pathlib.Path(args["out"]) / f"rank{rank}.json"
    report: dict = {"rank": rank}
    try:
        report.update(run(args, rank))
    except BaseException as exc:
        report["error"] = f"{type(exc).__name__}: {exc}"
        report["error_type"] = type(exc).__name__
        report["traceback"] = traceback.format_exc()
    out.write_text(json.dumps(report))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run(args: dict, rank: int) -> dict:
    import torch.distributed as dist
    from flyte_checkpoint import Checkpoint, Settings
    from flyte_checkpoint.distributed import DistributedCheckpoint

    timeout = float(args.get("timeout", 60))
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout))
    settings = Settings.from_env()
    helper = Checkpoint(args["dest"], args.get("src"), storage_options=args.get("options"),
                        settings=settings)
    dcp_ckpt = DistributedCheckpoint(helper, timeout=timeout)
    scenario = args["scenario"]
    data = args.get("data", {}).get(str(rank))
    if scenario == "save":
        if rank == args.get("kill_rank"):
            _kill_after(int(args["kill_after"]))
        if rank == args.get("hang_rank"):
            time.sleep(3600)  # a rank stuck elsewhere: the test kills it
        started = time.monotonic()
        if not args.get("again"):
            dcp_ckpt.save_sync(data)
            return {"saved": True}
        try:
            dcp_ckpt.save_sync(data)
            return {"saved": True}
        except Exception as exc:  # then the same helper once more: it must fail at once
            failed = {"first": f"{type(exc).__name__}: {exc}",
                      "first_seconds": time.monotonic() - started}
        started = time.monotonic()
        try:
            dcp_ckpt.save_sync(data)
        except Exception as exc:
            failed["again"] = f"{type(exc).__name__}: {exc}"
        failed["again_seconds"] = time.monotonic() - started
        started = time.monotonic()
        dcp_ckpt.close()
        failed["close_seconds"] = time.monotonic() - started
        return failed
    if scenario == "background":
        future = dcp_ckpt.save_sync(data, wait=False)
        returned = time.perf_counter()
        future.result(timeout * 2)
        dist.barrier()  # the training's own collectives go on meanwhile, on their group
        dcp_ckpt.close()
        return {"saved": True, "returned": returned}
    if scenario == "time_save":
        dist.barrier()
        before = _reset_peak()
        started = time.perf_counter()
        dcp_ckpt.save_sync(data)
        return {"seconds": time.perf_counter() - started,
                "rss_growth": _status("VmHWM") - before}
    if scenario == "load":
        restored = dcp_ckpt.load_sync()
        seen = None if restored is None else tree_of(restored)
        dcp_ckpt._group.barrier(step="test: read")
        path = None if restored is None else str(restored)
        dcp_ckpt.close()
        return {"path": path, "tree": seen}
    if scenario == "dcp_save":
        return dcp_save(args, rank, dcp_ckpt)
    if scenario == "dcp_load":
        return dcp_load(args, rank, dcp_ckpt)
    raise ValueError(f"no scenario {scenario!r}")


def _status(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak() -> int:
    """Reset the peak RSS to the current one (``clear_refs`` 5); return the current RSS."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return _status("VmRSS")


def _kill_after(limit: int) -> None:
    """SIGKILL this process once its segment has sent ``limit`` bytes into the upload."""
    import checkpoint_format

    real = checkpoint_format.write_segment

    def killing(directory, manifest, names, sink, **kwargs):
        class Sink:
            written = 0

            def write(self, data):
                n = sink.write(data)
                Sink.written += len(data)
                if Sink.written >= limit:
                    time.sleep(0.5)  # let the part uploads get going
                    os.kill(os.getpid(), signal.SIGKILL)
                return n

        return real(directory, manifest, names, Sink(), **kwargs)

    checkpoint_format.write_segment = killing


def _state(world: int) -> dict:
    """A model's state as DTensors sharded over ``world`` ranks (the same values for any
    sharding: made from a seed, then distributed)."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(64, 32, generator=generator)
    bias = torch.randn(64, generator=generator)
    return {"weight": distribute_tensor(weight, mesh, [Shard(0)]),
            "bias": distribute_tensor(bias, mesh, [Shard(0)]),
            "step": torch.tensor(41)}


def dcp_save(args: dict, rank: int, dcp_ckpt) -> dict:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    state = _state(dist.get_world_size())
    local = pathlib.Path(args["local"]) / f"rank{rank}"  # each rank's own directory
    local.mkdir(parents=True)
    # Each rank writes its own shard file; the coordinator also writes .metadata: the union
    # of the directories is the DCP checkpoint.
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(local)))
    dcp_ckpt.save_sync(local)
    return {"saved": sorted(p.name for p in local.iterdir())}


def dcp_load(args: dict, rank: int, dcp_ckpt) -> dict:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import DTensor

    restored = dcp_ckpt.load_sync()
    state = _state(dist.get_world_size())  # the shapes and this job's sharding
    expected = {k: (v.full_tensor() if isinstance(v, DTensor) else v).clone()
                for k, v in state.items()}
    for value in state.values():
        if isinstance(value, DTensor):
            value.to_local().zero_()
    state["step"] = torch.tensor(0)
    dcp.load(state, storage_reader=dcp.FileSystemReader(str(restored)))
    same = all(torch.equal(state[k].full_tensor() if isinstance(state[k], DTensor)
                           else state[k], expected[k]) for k in state)
    files = sorted(os.listdir(restored))
    dcp_ckpt._group.barrier(step="test: read")
    dcp_ckpt.close()
    return {"equal": same, "step": int(state["step"]), "files": files}


if __name__ == "__main__":
    main()
