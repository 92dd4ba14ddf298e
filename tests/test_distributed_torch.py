"""Multi-rank checkpoints with real processes: torch gloo on CPU, 2-4 ranks, each a process
of its own (``task_programs/dist_rank.py``), on local paths and the S3, GCS and Azure
emulators. Several nodes are pretended on one machine with ``CHECKPOINT_NODE_ID``.

Union round trips (read back through a plain Checkpoint and upstream's helper), one download
per node (the bytes the store served, counted by a proxy), a failing rank, a rank SIGKILLed
mid-upload, background saves, and a DCP state dict of DTensors sharded over 4 ranks restored
by 2. Every job is bounded: ranks that outlive their deadline are killed and the test fails.

Needs PyTorch in the test environment: ``CHECKPOINT_REQUIRE_TORCH=1 hatch test`` installs
it (root ``pyproject.toml``; set ``UV_FIND_LINKS`` to where a CPU wheel lies, as ``.ci/run``
does, or uv takes PyPI's CUDA build) and makes a missing torch a failure, as CI does;
without it these tests skip.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Any

import pytest
from checkpoint_testing import stores as storage_fixtures
from checkpoint_testing.emulators import free_port
from checkpoint_testing.stores import MiB, make_store
from flyte_checkpoint import Checkpoint, Settings

e2e_emulators = storage_fixtures.e2e_emulators

PROGRAM = pathlib.Path(__file__).parent / "task_programs" / "dist_rank.py"
JOB_TIMEOUT = 240.0  # a whole job, start to end
STEP_TIMEOUT = 60.0  # CHECKPOINT_DISTRIBUTED_TIMEOUT of the ranks

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module", autouse=True)
def torch_installed() -> None:
    if importlib.util.find_spec("torch") is None:
        message = ("PyTorch unavailable: `CHECKPOINT_REQUIRE_TORCH=1 hatch test` installs the"
                   " CPU wheel into the test environment")
        if os.environ.get("CHECKPOINT_REQUIRE_TORCH") == "1":
            pytest.fail(f"{message} (CHECKPOINT_REQUIRE_TORCH=1)", pytrace=False)
        pytest.skip(message)


@pytest.fixture(params=["local", "s3", "gcs", "azure"])
def store(request, e2e_emulators, tmp_path):
    yield from make_store(request.param, e2e_emulators, tmp_path)


@pytest.fixture
def local_store(e2e_emulators, tmp_path):
    yield from make_store("local", e2e_emulators, tmp_path)


@pytest.fixture
def s3_store(e2e_emulators, tmp_path):
    yield from make_store("s3", e2e_emulators, tmp_path)


# ------------------------------------------------------------------------------ the job


def launch(tmp_path: pathlib.Path, size: int, *, nodes: int = 1,
           env: dict[str, str] | None = None, **args: Any) -> list[dict[str, Any]]:
    """Run ``size`` ranks of ``dist_rank.py`` with ``args``; each rank's report (a rank that
    died without one: its exit status and log). A ``hang_rank`` is killed once the others
    have ended."""
    job = tmp_path / f"job-{time.monotonic_ns()}"
    job.mkdir()
    port = free_port()
    ranks = []
    for rank in range(size):
        environment = {
            **os.environ, "RANK": str(rank), "WORLD_SIZE": str(size),
            "LOCAL_RANK": str(rank % max(1, size // nodes)), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), "CHECKPOINT_NODE_ID": f"node-{rank * nodes // size}",
            "FLYTE_CHECKPOINT_PROGRESS": "off", "CHECKPOINT_COMPRESS_THREADS": "1",
            "CHECKPOINT_DISTRIBUTED_TIMEOUT": str(STEP_TIMEOUT), "OMP_NUM_THREADS": "1",
            **(env or {})}
        log = open(job / f"rank{rank}.log", "wb")  # noqa: SIM115 - closed below
        process = subprocess.Popen(
            [sys.executable, str(PROGRAM),
             json.dumps({"timeout": STEP_TIMEOUT, **args, "out": str(job)})],
            env=environment, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        ranks.append((process, log))
    deadline = time.monotonic() + JOB_TIMEOUT
    try:
        for rank, (process, _) in enumerate(ranks):
            if rank != args.get("hang_rank"):
                process.wait(max(0.1, deadline - time.monotonic()))
        if "hang_rank" in args:
            ranks[args["hang_rank"]][0].kill()
            ranks[args["hang_rank"]][0].wait(10)
    except subprocess.TimeoutExpired:
        for process, _ in ranks:
            process.kill()
            process.wait(10)
        pytest.fail(f"the job outlived {JOB_TIMEOUT:g} s; logs: {_logs(job)}", pytrace=False)
    finally:
        for _, log in ranks:
            log.close()
    reports = []
    for rank, (process, _) in enumerate(ranks):
        found = job / f"rank{rank}.json"
        if found.exists():
            reports.append(json.loads(found.read_text()))
        else:
            reports.append({"rank": rank, "returncode": process.returncode,
                            "log": (job / f"rank{rank}.log").read_text(errors="replace")})
    return reports


def _logs(job: pathlib.Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                     for p in sorted(job.glob("rank*.log")))


def ok(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for report in reports:
        assert "error" not in report and "returncode" not in report, report
    return reports


def tree_of(root: pathlib.Path) -> dict[str, str]:
    found = {}
    for path in sorted(root.rglob("*")):
        name = path.relative_to(root).as_posix()
        found[name] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def rank_trees(base: pathlib.Path, size: int, *, big: int = 0) -> dict[str, str]:
    """Each rank's directory: a shard of its own, a config every rank has alike; ``big``
    bytes more of random data per rank (several parts of a segment)."""
    trees = {}
    for rank in range(size):
        root = base / f"rank{rank}"
        (root / "model" / "shards").mkdir(parents=True)
        (root / "model" / "shards" / f"{rank:02d}.bin").write_bytes(os.urandom(300_000 + rank))
        (root / "model" / "config.json").write_text('{"layers": 2}')
        (root / f"optim-{rank}.pt").write_bytes(bytes([rank]) * 70_000)
        if big:
            (root / "model" / f"big-{rank}.bin").write_bytes(os.urandom(big))
        trees[str(rank)] = str(root)
    return trees


def union_of(trees: dict[str, str]) -> dict[str, str]:
    union: dict[str, str] = {}
    for root in trees.values():
        union.update(tree_of(pathlib.Path(root)))
    return union


def plain_load(store, name: str) -> dict[str, str]:
    with Checkpoint(store.uri(name), store.uri(name), storage_options=store.options,
                    settings=Settings(progress=False)) as helper:
        restored = helper.load_sync()
        assert restored is not None
        return tree_of(restored)


def previous(store, name: str, tmp_path: pathlib.Path) -> bytes:
    old = tmp_path / "old"
    old.mkdir()
    (old / "step").write_text("1")
    with store.checkpoint(name) as helper:
        helper.save_sync(old)
    return store.get(name)


# ------------------------------------------------------------------------------ tests


def test_union_round_trip_and_one_download_per_node(store, tmp_path):
    trees = rank_trees(tmp_path / "trees", 2)
    ok(launch(tmp_path, 2, scenario="save", dest=store.uri("ckpt"), options=store.options,
              data=trees))
    union = union_of(trees)
    assert plain_load(store, "ckpt") == union
    assert store.names() == {"ckpt"}
    size = len(store.get("ckpt"))

    # 4 ranks on 2 nodes load it: each node's first rank downloads, once.
    if store.server is not None:
        proxy, options = store.counting_proxy()
    else:
        proxy, options = None, store.options
    reports = ok(launch(tmp_path, 4, nodes=2, scenario="load", dest=store.uri("next"),
                        src=store.uri("ckpt"), options=options))
    assert all(r["tree"] == union for r in reports)
    assert reports[0]["path"] == reports[1]["path"] != reports[2]["path"] == reports[3]["path"]
    if proxy is not None:
        # what the store sent for GETs: the object's bytes and any metadata (GCS, Azure)
        assert proxy.get_bytes <= 2 * size * 1.05, (proxy.get_bytes, size, proxy.gets)


def test_upstream_loads_the_union_as_an_ordinary_directory_checkpoint(
        local_store, tmp_path, upstream_python):
    trees = rank_trees(tmp_path / "trees", 2)
    ok(launch(tmp_path, 2, scenario="save", dest=local_store.uri("ckpt"), data=trees))
    restored = tmp_path / "upstream-restored"
    (tmp_path / "upstream-tmp").mkdir()
    returned = upstream_python.run(
        "import flyte, os, tempfile\n"
        "tempfile.tempdir = args['tmp']\n"
        "loader = flyte.Checkpoint(os.path.join(args['tmp'], 'unused'), args['uri'])\n"
        "returned = loader.load_sync()\n"
        "result = 'path' if returned == loader.path else str(returned)\n"
        "os.rename(loader.path, args['restored'])\n"
        "loader.path\n",
        uri=local_store.uri("ckpt"), restored=str(restored), tmp=str(tmp_path / "upstream-tmp"))
    assert returned == "path"
    assert tree_of(restored) == union_of(trees)


def test_a_failing_rank_fails_every_rank_naming_it(local_store, tmp_path):
    before = previous(local_store, "ckpt", tmp_path)
    trees = rank_trees(tmp_path / "trees", 3)
    trees["1"] = str(tmp_path / "no-such-directory")
    reports = launch(tmp_path, 3, scenario="save", dest=local_store.uri("ckpt"), data=trees)
    for report in reports:
        assert report.get("error_type") == "CheckpointSaveError", report
        assert "rank 1 failed: FileNotFoundError" in report["error"]
        assert "the previous object is unchanged" in report["error"]
    assert local_store.get("ckpt") == before
    assert local_store.names() == {"ckpt"}


def test_a_rank_sigkilled_mid_upload_fails_the_others_and_nothing_is_published(store,
                                                                             tmp_path):
    before = previous(store, "ckpt", tmp_path)
    trees = rank_trees(tmp_path / "trees", 2, big=12 * MiB)  # several parts of 5 MiB
    reports = launch(tmp_path, 2, scenario="save", dest=store.uri("ckpt"),
                     options=store.options, data=trees, kill_rank=1, kill_after=6 * MiB)
    assert reports[1].get("returncode") == -9, reports[1]  # SIGKILLed: no report
    assert reports[0].get("error_type") == "CheckpointSaveError", reports[0]
    assert "rank 1 does not answer at step 'save: segments'" in reports[0]["error"], reports[0]
    assert store.get("ckpt") == before
    assert store.pending_uploads() == []  # S3: rank 0 aborted the multipart upload
    assert store.names() == {"ckpt"}  # no part file (local) or temporary (GCS) left


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_the_committing_rank_killed_mid_upload_fails_the_others_and_the_sweep_clears_it(
        kind, e2e_emulators, tmp_path):
    """Rank 0 (which began the upload and would commit it) is SIGKILLed inside its own
    segment: the survivors raise naming it within the bounded time, nothing new appears,
    the previous object is intact, and ``sweep_shared_uploads`` removes what the crash left
    (S3: the multipart upload; local: the part files and the marker). The survivors' helper
    then fails at once, saying to build a new one."""
    from checkpoint_io import File, sweep_shared_uploads_sync

    for store in make_store(kind, e2e_emulators, tmp_path):
        before = previous(store, "ckpt", tmp_path)
        trees = rank_trees(tmp_path / "trees", 3, big=12 * MiB)  # several parts of 5 MiB
        started = time.monotonic()
        reports = launch(tmp_path, 3, scenario="save", dest=store.uri("ckpt"),
                         options=store.options, data=trees, kill_rank=0, kill_after=6 * MiB,
                         again=True)
        elapsed = time.monotonic() - started
        assert reports[0].get("returncode") == -9, reports[0]  # SIGKILLed: no report
        for report in reports[1:]:
            assert "first" in report, report
            assert report["first"].startswith("CheckpointSaveError"), report
            assert "rank 0 does not answer at step 'save: segments'" in report["first"], report
            assert report["first_seconds"] < STEP_TIMEOUT, report
            assert "build a new DistributedCheckpoint on every rank" in report["again"], report
            assert report["again_seconds"] < 1 and report["close_seconds"] < 5, report
        assert elapsed < STEP_TIMEOUT + 30
        assert store.get("ckpt") == before
        left = store.names() - {"ckpt"}
        if kind == "s3":
            assert store.pending_uploads() == ["ckpt"] and not left
        else:
            assert left, "the killed rank's part files and marker"
        file = File(path=store.uri("ckpt")).with_options(storage_options=store.options or {})
        removed = sweep_shared_uploads_sync(file, older_than=0)
        assert removed, "the sweep found nothing to remove"
        assert store.pending_uploads() == [] and store.names() == {"ckpt"}
        assert store.get("ckpt") == before


def test_a_rank_that_hangs_fails_the_others_within_the_timeout_naming_it(local_store,
                                                                         tmp_path):
    before = previous(local_store, "ckpt", tmp_path)
    trees = rank_trees(tmp_path / "trees", 2)
    started = time.monotonic()
    reports = launch(tmp_path, 2, scenario="save", dest=local_store.uri("ckpt"), data=trees,
                     hang_rank=1, timeout=10)
    elapsed = time.monotonic() - started
    assert reports[0].get("error_type") == "CheckpointSaveError", reports[0]
    assert "rank 1 does not answer at step 'save: scan'" in reports[0]["error"], reports[0]
    assert elapsed < JOB_TIMEOUT
    assert local_store.get("ckpt") == before and local_store.names() == {"ckpt"}


def test_background_saves_return_a_future_on_every_rank(local_store, tmp_path):
    trees = rank_trees(tmp_path / "trees", 2)
    reports = ok(launch(tmp_path, 2, scenario="background", dest=local_store.uri("ckpt"),
                        data=trees))
    assert all(r["saved"] for r in reports)
    assert plain_load(local_store, "ckpt") == union_of(trees)


@pytest.mark.parametrize("kind", ["local"])  # the stores are covered above; this is DCP's
def test_a_dcp_state_dict_sharded_over_4_ranks_is_restored_by_2(kind, e2e_emulators,
                                                                  tmp_path):
    for store in make_store(kind, e2e_emulators, tmp_path):
        saved = ok(launch(tmp_path, 4, scenario="dcp_save", dest=store.uri("dcp"),
                          options=store.options, local=str(tmp_path / "local")))
        assert ".metadata" in saved[0]["saved"]  # DCP's coordinator wrote it on rank 0
        loaded = ok(launch(tmp_path, 2, nodes=2, scenario="dcp_load", dest=store.uri("next"),
                           src=store.uri("dcp"), options=store.options))
        for report in loaded:
            assert report["equal"] and report["step"] == 41, report
            assert ".metadata" in report["files"]
            assert sum(f.endswith(".distcp") for f in report["files"]) == 4


def test_background_saves_of_files_ranks_share_on_one_node(local_store, tmp_path):
    """Two processes of one node pass the same directory, and a third a tree with a file
    hard-linked from it under the same name and under another: each file is frozen once
    per name, so no rank's hard links move the change time under another rank's record
    (which read as an in-place rewrite, CF-WRITE-07, and failed the save)."""
    trees = rank_trees(tmp_path / "trees", 3)
    shared = pathlib.Path(trees["0"])
    trees["1"] = str(shared)
    third = pathlib.Path(trees["2"])
    os.link(shared / "optim-0.pt", third / "optim-0.pt")  # the same name, the same file
    os.link(shared / "model" / "config.json", third / "settings.json")  # another name
    expected = union_of(trees)
    reports = ok(launch(tmp_path, 3, scenario="background", dest=local_store.uri("ckpt"),
                        data=trees))
    assert all(r["saved"] for r in reports)
    assert plain_load(local_store, "ckpt") == expected
