"""DistributedCheckpoint's orchestration with ranks as threads (``ThreadGroup``), on local
paths: fast, torch-free. The same code with torch gloo, real processes and the emulators is
in tests/test_distributed_torch.py.

Union round trips (the object loads through a plain Checkpoint), duplicates kept once,
conflicts and failing or silent ranks failing every rank naming the culprit with the previous
object untouched, background saves with a future on every rank, one restore per node.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from flyte_checkpoint import Checkpoint, CheckpointLoadError, CheckpointSaveError, Settings
from flyte_checkpoint.distributed import (
    CollectiveError,
    Collectives,
    DistributedCheckpoint,
    ThreadGroup,
    new_collectives,
    node_identity,
)

JOIN = 60.0  # no rank thread may outlive this


def run_ranks(size: int, work: Callable[[int, Any], Any], *, timeout: float = 20.0,
              ranks: range | None = None) -> tuple[list[Any], list[BaseException | None]]:
    """Run ``work(rank, collectives)`` on ``size`` threads (only ``ranks`` of them, when
    given: the others never call, like a killed process); each one's result or error."""
    group = ThreadGroup(size, timeout=timeout)
    results: list[Any] = [None] * size
    errors: list[BaseException | None] = [None] * size

    def one(rank: int) -> None:
        try:
            results[rank] = work(rank, group.member(rank))
        except BaseException as exc:
            errors[rank] = exc

    threads = [threading.Thread(target=one, args=(r,)) for r in (ranks or range(size))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN)
    assert not any(t.is_alive() for t in threads), "a rank hung past the test's bound"
    return results, errors


def settings(rank: int, nodes: int = 1, size: int = 4) -> Settings:
    per_node = max(1, size // nodes)
    return Settings(progress=False, node_id=f"node-{rank // per_node}")


def tree_of(root: pathlib.Path) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for path in sorted(root.rglob("*")):
        name = path.relative_to(root).as_posix()
        if path.is_symlink():
            found[name] = ("link", os.readlink(path))
        elif path.is_dir():
            found[name] = "dir"
        else:
            found[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def rank_tree(base: pathlib.Path, rank: int) -> pathlib.Path:
    """Rank ``rank``'s share: its own shard, a file every rank has alike, and a directory
    the ranks share."""
    root = base / f"rank{rank}"
    (root / "model" / "shards").mkdir(parents=True)
    (root / "model" / "shards" / f"{rank:02d}.bin").write_bytes(os.urandom(20_000 + rank))
    (root / "model" / "config.json").write_text('{"layers": 2}')
    (root / "optim").mkdir()
    (root / "optim" / f"rank{rank}.pt").write_bytes(bytes([rank]) * 5000)
    return root


def union_of(trees: list[pathlib.Path]) -> dict[str, Any]:
    union: dict[str, Any] = {}
    for tree in trees:
        union.update(tree_of(tree))
    return union


def save_all(tmp_path: pathlib.Path, size: int, *, dest: str | None = None,
             data: Callable[[int], Any] | None = None, timeout: float = 20.0,
             wait: bool = True):
    dest = dest or str(tmp_path / "store" / "ckpt.tar.gz")
    trees = [rank_tree(tmp_path / "trees", r) for r in range(size)]

    def work(rank: int, group: Collectives) -> Any:
        helper = Checkpoint(dest, settings=settings(rank, size=size))
        with DistributedCheckpoint(helper, group) as dist:
            given = trees[rank] if data is None else data(rank)
            future = dist.save_sync(given, wait=wait)
            return None if future is None else future.result(JOIN)

    _, errors = run_ranks(size, work, timeout=timeout)
    return dest, trees, errors


def load_plain(dest: str) -> dict[str, Any]:
    with Checkpoint(dest, dest, settings=Settings(progress=False)) as helper:
        restored = helper.load_sync()
        assert restored is not None
        return tree_of(restored)


# ------------------------------------------------------------------------------ the seam


def test_a_thread_group_gathers_broadcasts_and_names_the_silent_rank():
    def work(rank: int, group: Collectives) -> Any:
        assert isinstance(group, Collectives)
        gathered = group.all_gather_object({"rank": rank}, step="gather")
        told = group.broadcast_object(f"from {rank}", src=2, step="tell")
        group.barrier(step="end")
        return gathered, told

    results, errors = run_ranks(3, work)
    assert errors == [None] * 3
    assert all(r == ([{"rank": 0}, {"rank": 1}, {"rank": 2}], "from 2") for r in results)

    started = time.monotonic()
    _, errors = run_ranks(3, work, timeout=0.5, ranks=range(2))
    assert time.monotonic() - started < 10
    for error in errors[:2]:
        assert isinstance(error, CollectiveError) and error.missing == (2,)
        assert str(error).startswith("rank 2 does not answer at step 'gather'")


def test_node_identity_tells_containers_apart_and_takes_an_override():
    assert node_identity("node-7") == "node-7"
    host, boot, namespace = node_identity().split("/")
    assert host and (boot or not os.path.exists("/proc/sys/kernel/random/boot_id"))
    assert namespace == str(os.stat("/proc/self/ns/mnt").st_ino)


def test_a_non_checkpoint_or_a_bad_timeout_is_refused(tmp_path):
    group = ThreadGroup(1).member(0)
    with pytest.raises(TypeError, match=r"wraps a flyte_checkpoint\.Checkpoint"):
        DistributedCheckpoint("s3://b/x", group)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout must be a positive"):
        DistributedCheckpoint(Checkpoint(str(tmp_path / "x")), group, timeout=0)


# ------------------------------------------------------------------------------ saves


def test_the_union_of_every_ranks_tree_is_one_object_a_plain_checkpoint_loads(tmp_path):
    dest, trees, errors = save_all(tmp_path, 4)
    assert errors == [None] * 4
    assert load_plain(dest) == union_of(trees)
    assert sorted(os.listdir(pathlib.Path(dest).parent)) == ["ckpt.tar.gz"]  # no part left


def test_ranks_with_nothing_to_add_pass_none(tmp_path):
    dest, _, errors = save_all(tmp_path, 3, data=lambda r: None if r != 1 else
                                   rank_tree(tmp_path / "only", 1))
    assert errors == [None] * 3
    assert load_plain(dest) == tree_of(tmp_path / "only" / "rank1")


def test_no_rank_with_data_saves_nothing(tmp_path):
    dest, _, errors = save_all(tmp_path, 2, data=lambda r: None)
    for error in errors:
        assert isinstance(error, CheckpointSaveError)
        assert "no rank passed a directory" in str(error)
    assert not os.path.exists(dest)


def _previous(dest: str, tmp_path: pathlib.Path) -> bytes:
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    old = tmp_path / "old"
    old.mkdir()
    (old / "step").write_text("1")
    with Checkpoint(dest, settings=Settings(progress=False)) as helper:
        helper.save_sync(old)
    return pathlib.Path(dest).read_bytes()


def test_different_content_under_one_path_fails_every_rank_naming_path_and_ranks(tmp_path):
    dest = str(tmp_path / "store" / "ckpt")
    before = _previous(dest, tmp_path)

    def clash(rank: int) -> pathlib.Path:
        root = tmp_path / "clash" / str(rank)
        root.mkdir(parents=True)
        (root / "weights.bin").write_bytes(b"rank %d" % rank)
        return root

    _, _, errors = save_all(tmp_path, 3, dest=dest, data=clash)
    for error in errors:
        assert isinstance(error, CheckpointSaveError), error
        assert "weights.bin" in str(error) and "the previous object is unchanged" in str(error)
        assert "0" in str(error) and "1" in str(error)
    assert pathlib.Path(dest).read_bytes() == before
    assert sorted(os.listdir(pathlib.Path(dest).parent)) == ["ckpt"]


def test_a_failing_rank_fails_every_rank_naming_it_and_its_cause(tmp_path):
    dest = str(tmp_path / "store" / "ckpt")
    before = _previous(dest, tmp_path)
    missing = tmp_path / "no-such-dir"
    _, _, errors = save_all(tmp_path, 3, dest=dest,
                            data=lambda r: missing if r == 2 else rank_tree(tmp_path / "t", r))
    for error in errors:
        assert isinstance(error, CheckpointSaveError), error
        assert "rank 2 failed: FileNotFoundError" in str(error)
        assert str(missing) in str(error)
    assert pathlib.Path(dest).read_bytes() == before


def test_a_rank_failing_mid_segment_aborts_the_upload(tmp_path, monkeypatch):
    import checkpoint_format

    dest = str(tmp_path / "store" / "ckpt")
    before = _previous(dest, tmp_path)
    real = checkpoint_format.write_segment

    def failing(directory, manifest, names, sink, **kwargs):
        if "rank1" in str(directory):
            sink.write(b"\0" * 1000)
            raise OSError(28, "No space left on device")
        return real(directory, manifest, names, sink, **kwargs)

    monkeypatch.setattr(checkpoint_format, "write_segment", failing)
    _, _, errors = save_all(tmp_path, 3, dest=dest)
    for error in errors:
        assert isinstance(error, CheckpointSaveError), error
        assert "rank 1 failed: OSError: [Errno 28] No space left on device" in str(error)
    assert pathlib.Path(dest).read_bytes() == before
    assert sorted(os.listdir(pathlib.Path(dest).parent)) == ["ckpt"]  # parts removed


def test_a_silent_rank_fails_the_others_within_the_timeout_naming_it(tmp_path):
    dest = str(tmp_path / "store" / "ckpt")
    before = _previous(dest, tmp_path)
    trees = [rank_tree(tmp_path / "t", r) for r in range(3)]

    def work(rank: int, group: Collectives) -> None:
        helper = Checkpoint(dest, settings=settings(rank, size=3))
        DistributedCheckpoint(helper, group).save_sync(trees[rank])

    started = time.monotonic()
    _, errors = run_ranks(3, work, timeout=1.0, ranks=range(2))
    assert time.monotonic() - started < 15
    for error in errors[:2]:
        assert isinstance(error, CheckpointSaveError), error
        assert "rank 2 does not answer at step 'save: scan'" in str(error)
    assert pathlib.Path(dest).read_bytes() == before


def test_background_saves_return_a_future_on_every_rank(tmp_path):
    dest, trees, errors = save_all(tmp_path, 3, wait=False)
    assert errors == [None] * 3
    assert load_plain(dest) == union_of(trees)


def test_a_background_save_holds_what_the_directory_held_at_the_call(tmp_path):
    dest = str(tmp_path / "store" / "ckpt")
    trees = [rank_tree(tmp_path / "t", r) for r in range(2)]
    frozen = union_of(trees)

    def work(rank: int, group: Collectives) -> None:
        helper = Checkpoint(dest, settings=settings(rank, size=2))
        with DistributedCheckpoint(helper, group) as dist:
            future = dist.save_sync(trees[rank], wait=False)
            (trees[rank] / "optim" / f"rank{rank}.pt").unlink()  # gone after the call
            (trees[rank] / "later.txt").write_text("not in this checkpoint")
            future.result(JOIN)

    _, errors = run_ranks(2, work)
    assert errors == [None, None]
    assert load_plain(dest) == frozen


def test_a_background_failure_reaches_every_ranks_future_and_next_save(tmp_path):
    dest = str(tmp_path / "store" / "ckpt")
    trees = [rank_tree(tmp_path / "t", r) for r in range(2)]

    def work(rank: int, group: Collectives) -> list[str]:
        helper = Checkpoint(dest, settings=settings(rank, size=2))
        dist = DistributedCheckpoint(helper, group)
        given = tmp_path / "missing" if rank == 1 else trees[rank]
        future = dist.save_sync(given, wait=False)
        seen = [str(future.exception(JOIN))]
        try:
            dist.save_sync(trees[rank])
        except CheckpointSaveError as exc:
            seen.append(str(exc))
        dist.save_sync(trees[rank])  # raised once; the next save goes ahead
        dist.close()
        return seen

    results, errors = run_ranks(2, work)
    assert errors == [None, None]
    for seen in results:
        assert "rank 1 failed" in seen[0]
        assert "a new save was not started" in seen[1]
    assert load_plain(dest) == union_of(trees)


def test_background_saves_freeze_files_ranks_of_a_node_share_once(tmp_path, caplog):
    """Rank 1 passes rank 0's directory, rank 2 a tree holding one of its files under the
    same name and one under another, rank 3 the same directory on another node: rank 1
    contributes nothing, rank 2 leaves the first file to rank 0 and copies the second, rank
    3 freezes its own (another node's files). (Between processes a second hard link moved
    the change time under the other's record; the process tests show that failure gone.)"""
    dest = str(tmp_path / "store" / "ckpt")
    trees = [rank_tree(tmp_path / "t", r) for r in range(3)]
    shared = trees[0]
    os.link(shared / "optim" / "rank0.pt", trees[2] / "optim" / "rank0.pt")
    os.link(shared / "model" / "config.json", trees[2] / "settings.json")
    given = [shared, shared, trees[2], shared]
    nodes = ["a", "a", "a", "b"]

    def work(rank: int, group: Collectives) -> None:
        helper = Checkpoint(dest, settings=Settings(progress=False, node_id=nodes[rank]))
        with DistributedCheckpoint(helper, group) as dist:
            dist.save_sync(given[rank], wait=False).result(JOIN)

    with caplog.at_level("INFO", logger="flyte_checkpoint"):
        _, errors = run_ranks(4, work)
    assert errors == [None] * 4
    assert load_plain(dest) == union_of([shared, trees[2]])
    said = caplog.text
    assert "rank 1 passes the directory rank 0 passes on this node" in said
    assert "rank 2 shares 2 file(s) with lower ranks of its node: 1 left to them, 1 copied" in said
    assert "rank 3 passes the directory" not in said and "rank 3 shares" not in said


def test_a_published_commit_whose_outcome_cannot_be_told_says_so(tmp_path):
    """Rank 0 committed, then the broadcast of the outcome failed: rank 0 says the object
    is published, the others that the outcome is unknown (not that nothing changed)."""
    dest = str(tmp_path / "store" / "ckpt")
    _previous(dest, tmp_path)
    trees = [rank_tree(tmp_path / "t", r) for r in range(3)]

    class LostOutcome:
        """Rank 0's collectives, whose broadcast of the commit's outcome never arrives (a
        network fault at that instant; no store can stage it)."""

        def __init__(self, inner: Collectives) -> None:
            self._inner = inner
            self.rank, self.size, self.timeout = inner.rank, inner.size, inner.timeout

        def all_gather_object(self, obj: Any, *, step: str) -> list[Any]:
            return self._inner.all_gather_object(obj, step=step)

        def broadcast_object(self, obj: Any, *, src: int, step: str) -> Any:
            if step == "save: commit":
                raise CollectiveError(step, [], "ConnectionResetError: connections closed")
            return self._inner.broadcast_object(obj, src=src, step=step)

        def barrier(self, *, step: str) -> None:
            self._inner.barrier(step=step)

    def work(rank: int, group: Collectives) -> None:
        helper = Checkpoint(dest, settings=settings(rank, size=3))
        DistributedCheckpoint(helper, LostOutcome(group) if rank == 0 else group).save_sync(
            trees[rank])

    _, errors = run_ranks(3, work, timeout=1.0)
    assert all(isinstance(e, CheckpointSaveError) for e in errors), errors
    assert "the object is published" in str(errors[0]), errors[0]
    assert "unchanged" not in str(errors[0])
    for error in errors[1:]:
        assert "the outcome is unknown" in str(error), error
        assert "rank 0 does not answer at step 'save: commit'" in str(error), error
        assert "unchanged" not in str(error)
    assert load_plain(dest) == union_of(trees)  # it was published, whole


def test_after_a_failed_step_the_helper_fails_at_once_saying_to_build_a_new_one(tmp_path):
    dest = str(tmp_path / "store" / "ckpt")
    trees = [rank_tree(tmp_path / "t", r) for r in range(2)]

    def work(rank: int, group: Collectives) -> list[Any]:
        helper = Checkpoint(dest, settings=settings(rank, size=2))
        dist = DistributedCheckpoint(helper, group)
        with pytest.raises(CheckpointSaveError, match="rank 1 does not answer"):
            dist.save_sync(trees[rank])
        seen: list[Any] = []
        for call in (lambda: dist.save_sync(trees[rank]),
                     lambda: dist.save_sync(trees[rank], wait=False), dist.load_sync):
            started = time.monotonic()
            with pytest.raises((CheckpointSaveError, CheckpointLoadError)) as raised:
                call()
            seen.append((time.monotonic() - started, str(raised.value)))
        started = time.monotonic()
        dist.close()  # no barrier a broken group cannot meet
        seen.append((time.monotonic() - started, ""))
        return seen

    results, errors = run_ranks(2, work, timeout=1.0, ranks=range(1))
    assert errors[0] is None, errors[0]
    for seconds, _message in results[0]:
        assert seconds < 0.5, results[0]  # at once, not after another timeout
    for _, message in results[0][:3]:
        assert "group failed at step 'save: scan'" in message, message
        assert "build a new DistributedCheckpoint on every rank" in message, message


def test_new_collectives_passes_a_collectives_through_and_checks_the_timeout():
    member = ThreadGroup(1).member(0)
    assert new_collectives(member, timeout=5) is member
    with pytest.raises(ValueError, match="timeout"):
        new_collectives(object(), timeout=0)


# ------------------------------------------------------------------------------ loads


def test_each_node_restores_once_and_its_ranks_share_the_path(tmp_path, monkeypatch):
    dest, trees, errors = save_all(tmp_path, 4)
    assert errors == [None] * 4
    restores: list[str] = []
    real = Checkpoint._restore_from

    def counted(self, uri, cancelled):
        restores.append(uri)
        return real(self, uri, cancelled)

    monkeypatch.setattr(Checkpoint, "_restore_from", counted)
    union = union_of(trees)

    def work(rank: int, group: Collectives) -> tuple[str, dict[str, Any]]:
        helper = Checkpoint(dest, dest, settings=settings(rank, nodes=2, size=4))
        with DistributedCheckpoint(helper, group) as dist:
            restored = dist.load_sync()
            assert restored is not None and dist.path == restored
            assert dist.load_sync() == restored  # loaded once
            assert dist.restored_from == dest  # what every rank's errors can name
            tree = tree_of(restored)
            group.barrier(step="test: read")  # no rank closes while another reads
            return str(restored), tree

    results, errors = run_ranks(4, work)
    assert errors == [None] * 4
    assert len(restores) == 2  # one per node
    assert results[0][0] == results[1][0] != results[2][0] == results[3][0]
    assert all(tree == union for _, tree in results)
    assert not any(os.path.exists(path) for path, _ in results)  # close removed them


def test_no_previous_checkpoint_is_none_on_every_rank(tmp_path):
    def work(rank: int, group: Collectives) -> Any:
        helper = Checkpoint(str(tmp_path / "d"), str(tmp_path / "nothing"),
                            settings=settings(rank, nodes=2, size=2))
        with DistributedCheckpoint(helper, group) as dist:
            return dist.load_sync(), dist.restored_from

    results, errors = run_ranks(2, work)
    assert errors == [None, None] and results == [(None, None), (None, None)]


def test_a_failed_restore_raises_on_every_rank(tmp_path):
    damaged = tmp_path / "damaged.tar.gz"
    with Checkpoint(str(damaged), settings=Settings(progress=False)) as helper:
        helper.save_sync(rank_tree(tmp_path / "t", 0))
    data = damaged.read_bytes()
    damaged.write_bytes(data[: len(data) // 2])  # cut short: a broken object, not "none"

    def work(rank: int, group: Collectives) -> Any:
        helper = Checkpoint(str(tmp_path / "d"), str(damaged),
                            settings=settings(rank, nodes=2, size=4))
        with DistributedCheckpoint(helper, group) as dist:
            return dist.load_sync()

    _, errors = run_ranks(4, work)
    for error in errors:
        assert isinstance(error, CheckpointLoadError), error
        assert "was not restored on every node" in str(error)
        assert "rank 0 (restoring for node 'node-0') failed" in str(error)
        assert "rank 2 (restoring for node 'node-1') failed" in str(error)


def test_torch_is_imported_only_for_a_torch_group():
    import subprocess
    import sys

    probe = ("import sys, flyte_checkpoint.distributed as d\n"
             "from flyte_checkpoint import Checkpoint\n"
             "d.DistributedCheckpoint(Checkpoint('/tmp/x'), d.ThreadGroup(1).member(0))\n"
             "print('torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120, check=True)
    assert done.stdout.strip() == "False"


def test_async_save_and_load(tmp_path):
    import asyncio

    dest = str(tmp_path / "store" / "ckpt")
    trees = [rank_tree(tmp_path / "t", r) for r in range(2)]

    def work(rank: int, group: Collectives) -> dict[str, Any]:
        async def main() -> dict[str, Any]:
            helper = Checkpoint(dest, dest, settings=settings(rank, nodes=2, size=2))
            async with DistributedCheckpoint(helper, group) as dist:
                await dist.save(trees[rank])
                future = await dist.save(trees[rank], wait=False)
                await future
                restored = await dist.load()
                tree = tree_of(restored)
                await asyncio.get_running_loop().run_in_executor(
                    None, lambda: group.barrier(step="test: read"))
                return tree

        return asyncio.run(main())

    results, errors = run_ranks(2, work)
    assert errors == [None, None]
    assert results[0] == results[1] == union_of(trees)


def test_ranks_naming_different_locations_are_refused(tmp_path):
    trees = [rank_tree(tmp_path / "t", r) for r in range(2)]

    def work(rank: int, group: Collectives) -> None:
        helper = Checkpoint(str(tmp_path / f"dest-{rank}"), settings=settings(rank, size=2))
        DistributedCheckpoint(helper, group).save_sync(trees[rank])

    _, errors = run_ranks(2, work)
    for error in errors:
        assert isinstance(error, CheckpointSaveError), error
        assert "the ranks' helpers name different locations" in str(error)
        assert "rank 1: " in str(error)
    assert not any(tmp_path.glob("dest-*"))
