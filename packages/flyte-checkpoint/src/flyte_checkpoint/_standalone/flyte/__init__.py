"""``import flyte`` where the upstream Flyte SDK is not installed.

This directory is put at the *end* of ``sys.path`` by ``flyte_checkpoint_standalone.pth``, so
Python finds it only when no other ``flyte`` package exists. If one does (the upstream SDK in
a site directory that comes later, say), this module steps aside and loads that one in its
place: it can never hide the upstream SDK. Code written against ``flyte.Checkpoint`` then runs
unchanged in the local runner, the demo and non-Flyte jobs.

Inside Flyte tasks, where the upstream SDK is always installed, use
``flyte_checkpoint.install()`` instead.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def _real_flyte() -> importlib.machinery.ModuleSpec | None:
    """The spec of a ``flyte`` package found anywhere on ``sys.path`` but here."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    others = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("flyte", others)
    return spec if spec is not None and spec.origin != os.path.abspath(__file__) else None


_spec = _real_flyte()
if _spec is not None:
    # Become the real SDK: the import statement returns whatever sys.modules holds at the end.
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _module
    _spec.loader.exec_module(_module)
else:
    from flyte_checkpoint import BaseCheckpoint, Checkpoint, latest_checkpoint

    from . import io

    STANDALONE = True  # what tells this facade from the upstream SDK

    __all__ = ["STANDALONE", "BaseCheckpoint", "Checkpoint", "io", "latest_checkpoint"]
