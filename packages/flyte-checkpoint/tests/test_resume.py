"""The resume rule of the helper tasks get (``from_env()``; ``flyte.ctx().checkpoint`` after
``install()`` is covered by tests/test_in_task.py): this attempt's own destination first when
it holds an object, then ``prev``, then the newest earlier attempt of Flyte's
``.../<attempt>/_flytecheckpoints`` layout. A plain ``Checkpoint(dest, src)`` restores
``src``, as upstream's does."""

from __future__ import annotations

import logging
import pickle

import pytest
from flyte_checkpoint import Checkpoint, Settings
from flyte_checkpoint._resume import MAX_EARLIER_ATTEMPTS, Resume, earlier_attempts

QUIET = Settings(progress=False)


def _save(uri: str, step: int, tmp_path) -> None:
    tree = tmp_path / f"tree-{step}"
    tree.mkdir()
    (tree / "step.txt").write_text(str(step))
    with Checkpoint(uri, settings=QUIET) as helper:
        helper.save_sync(tree)


def _env(dest: str, prev: str | None = None) -> dict[str, str]:
    return {"FLYTE_CHECKPOINT_PATH": dest, "FLYTE_PREV_CHECKPOINT_PATH": prev or "",
            "FLYTE_CHECKPOINT_PROGRESS": "off"}


def _step(restored) -> int:
    return int((restored / "step.txt").read_text())


def _attempt(root, n: int, label: str = "") -> str:
    return f"{root}/run/{label}{n}/_flytecheckpoints"


def test_earlier_attempts_follow_flytes_layout_and_the_runners():
    assert earlier_attempts("s3://b/x/a0/3/_flytecheckpoints") == [
        "s3://b/x/a0/2/_flytecheckpoints", "s3://b/x/a0/1/_flytecheckpoints",
        "s3://b/x/a0/0/_flytecheckpoints"]
    assert earlier_attempts("/store/run-1/attempt-2/_flytecheckpoints") == [
        "/store/run-1/attempt-1/_flytecheckpoints", "/store/run-1/attempt-0/_flytecheckpoints"]
    assert earlier_attempts("s3://b/x/0/_flytecheckpoints") == []
    assert earlier_attempts("s3://b/x/3/other") == []  # not the layout: no guessing
    assert len(earlier_attempts("s3://b/x/999/_flytecheckpoints")) == MAX_EARLIER_ATTEMPTS


def test_candidates_are_dest_prev_then_earlier_each_once():
    found = [uri for uri, _ in Resume("s3://b/r/2/_flytecheckpoints",
                                      "s3://b/r/1/_flytecheckpoints").candidates()]
    assert found == ["s3://b/r/2/_flytecheckpoints", "s3://b/r/1/_flytecheckpoints",
                     "s3://b/r/0/_flytecheckpoints"]
    # upstream's JobSet rule passes dest as prev: still each location once
    assert [u for u, _ in Resume("s3://b/o", "s3://b/o").candidates()] == ["s3://b/o"]


def test_a_restart_within_the_attempt_resumes_from_its_own_destination(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="flyte_checkpoint")
    prev, dest = _attempt(tmp_path, 1), _attempt(tmp_path, 2)
    _save(prev, 10, tmp_path)
    _save(dest, 20, tmp_path)  # this attempt saved, then torchrun restarted it
    with Checkpoint.from_env(_env(dest, prev)) as helper:
        assert _step(helper.load_sync()) == 20
        assert helper.remote_source == prev  # upstream's meaning of the property
    assert f"restoring {dest}: this attempt's own destination holds an object" in caplog.text


def test_prev_when_this_attempt_has_saved_nothing(tmp_path):
    prev, dest = _attempt(tmp_path, 1), _attempt(tmp_path, 2)
    _save(prev, 10, tmp_path)
    with Checkpoint.from_env(_env(dest, prev)) as helper:
        assert _step(helper.load_sync()) == 10


def test_an_attempt_that_died_before_saving_does_not_hide_its_predecessor(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="flyte_checkpoint")
    _save(_attempt(tmp_path, 0), 5, tmp_path)  # attempt 0 saved; attempt 1 died first
    dest, prev = _attempt(tmp_path, 2), _attempt(tmp_path, 1)
    with Checkpoint.from_env(_env(dest, prev)) as helper:
        assert _step(helper.load_sync()) == 5
    assert "the newest earlier attempt that saved one" in caplog.text


def test_nothing_anywhere_is_no_checkpoint(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="flyte_checkpoint")
    with Checkpoint.from_env(_env(_attempt(tmp_path, 1), _attempt(tmp_path, 0))) as helper:
        assert helper.load_sync() is None
    assert "no checkpoint at" in caplog.text


def test_a_plain_checkpoint_keeps_upstreams_meaning(tmp_path):
    prev, dest = _attempt(tmp_path, 1), _attempt(tmp_path, 2)
    _save(dest, 20, tmp_path)
    _save(_attempt(tmp_path, 0), 5, tmp_path)
    with Checkpoint(dest, prev, settings=QUIET) as helper:  # prev holds nothing
        assert helper.load_sync() is None
    with Checkpoint(dest, None, settings=QUIET) as helper:
        assert helper.load_sync() is None


def test_the_rule_survives_a_pickle(tmp_path):
    dest = _attempt(tmp_path, 2)
    _save(dest, 20, tmp_path)
    helper = Checkpoint.from_env(_env(dest, _attempt(tmp_path, 1)))
    again = pickle.loads(pickle.dumps(helper))
    with again:
        assert _step(again.load_sync()) == 20
    helper.close()


@pytest.mark.parametrize("broken", ["prefix"])
def test_a_prev_that_is_a_prefix_still_fails_loudly(tmp_path, broken):
    from flyte_checkpoint import CheckpointLoadError

    store = tmp_path / "store"
    (store / "run" / "1" / "_flytecheckpoints").mkdir(parents=True)  # a directory, not an object
    dest, prev = _attempt(store, 2), _attempt(store, 1)
    with Checkpoint.from_env(_env(dest, prev)) as helper, pytest.raises(CheckpointLoadError):
        helper.load_sync()
