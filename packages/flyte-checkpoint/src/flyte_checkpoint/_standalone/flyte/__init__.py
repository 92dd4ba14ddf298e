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

_MARKER = "FLYTE_CHECKPOINT_FACADE"  # a file beside this one: any copy of the facade has it


def _is_real(spec: importlib.machinery.ModuleSpec | None) -> bool:
    """A regular ``flyte`` package that is not a copy of this facade (a bare ``flyte/``
    directory, which Python would take as a namespace package, does not count)."""
    if spec is None or not spec.origin or not os.path.isfile(spec.origin):
        return False
    return not os.path.exists(os.path.join(os.path.dirname(spec.origin), _MARKER))


def _real_flyte() -> importlib.machinery.ModuleSpec | None:
    """The spec of the first real ``flyte`` package: from any meta-path finder (editable
    installs often serve packages through one), else from any ``sys.path`` entry."""
    for finder in sys.meta_path:
        if finder is importlib.machinery.PathFinder or not hasattr(finder, "find_spec"):
            continue
        try:
            spec = finder.find_spec("flyte", None)
        except Exception:  # a broken third-party finder must not break `import flyte`
            continue
        if _is_real(spec):
            return spec
    for entry in sys.path:
        spec = importlib.machinery.PathFinder.find_spec("flyte", [entry])
        if _is_real(spec):
            return spec
    return None


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
