"""How the framework callbacks tell a single process from one rank of several, without
torch (the multi-rank jobs themselves run in tests/test_integrations.py)."""

from __future__ import annotations

import sys

import pytest
from flyte_checkpoint.integrations._ranks import launched_size, world


@pytest.fixture
def no_torch(monkeypatch):
    """A job that never imported torch (this suite's environment may still hold it)."""
    for name in [name for name in sys.modules if name == "torch" or name.startswith("torch.")]:
        monkeypatch.delitem(sys.modules, name)
    for variable in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(variable, raising=False)
    return monkeypatch


def test_a_single_process_stays_one_and_never_imports_torch(no_torch):
    assert launched_size() == 1
    assert world(start=True) == (0, 1)
    assert "torch" not in sys.modules


def test_a_launched_rank_is_known_from_the_environment(no_torch):
    no_torch.setenv("WORLD_SIZE", "4")
    no_torch.setenv("RANK", "3")
    assert world() == (3, 4)


def test_a_world_size_without_a_rendezvous_goes_on_as_one_process(no_torch, caplog):
    # Lightning's own launcher sets WORLD_SIZE before it has a rendezvous to offer.
    no_torch.setenv("WORLD_SIZE", "2")
    with caplog.at_level("INFO", logger="flyte_checkpoint"):
        assert world(start=True) == (0, 1)
    assert "no RANK or MASTER_ADDR or MASTER_PORT" in caplog.text
    assert "torch" not in sys.modules


@pytest.mark.parametrize("raw", ["two", "0", "-1", "٢"])
def test_a_bad_world_size_names_the_variable(no_torch, raw):
    no_torch.setenv("WORLD_SIZE", raw)
    with pytest.raises(ValueError, match=r"WORLD_SIZE=.* is not a whole number of ranks"):
        launched_size()
