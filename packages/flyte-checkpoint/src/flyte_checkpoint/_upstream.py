"""Serve our Checkpoint from inside the upstream Flyte SDK: ``install()`` and ``uninstall()``.

The seam: upstream's ``TaskContext.checkpoint`` (what ``flyte.ctx().checkpoint`` returns)
looks up ``flyte._checkpoint.Checkpoint`` each time it builds a helper, then caches the helper
on the task context. ``install()`` rebinds that one name (and ``flyte.Checkpoint``, its public
alias) to a class that is our :class:`~flyte_checkpoint.Checkpoint` and also a subclass of
upstream's, so everything else stays upstream's own code: when a helper is built, the cache
per context, ``None`` outside a task or without a destination, and the JobSet restart rule.
No function of upstream is wrapped or replaced, and no file of it is touched.

Upstream is imported here only when ``install()`` runs, never at module level.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import re
import sys
import threading
from dataclasses import dataclass
from typing import Any

from ._checkpoint import Checkpoint
from ._resume import Resume

__all__ = ["SUPPORTED_UPSTREAM", "UpstreamNotSupportedError", "install", "installed", "uninstall"]

logger = logging.getLogger("flyte_checkpoint")

#: The upstream SDK versions whose seam ``install()`` relies on (it has been unchanged since
#: 2.6, and CI runs against the newest release); outside it, ``install()`` refuses.
SUPPORTED_UPSTREAM = ">=2.6,<3"
_LOWEST, _BELOW = (2, 6), (3, 0)


class UpstreamNotSupportedError(RuntimeError):
    """The upstream SDK is missing, or lacks what ``install()`` relies on; nothing was changed."""


@dataclass
class _Installed:
    sdk: Any  # the ``flyte`` module
    module: Any  # ``flyte._checkpoint``
    original: type  # upstream's Checkpoint class
    public: Any  # what ``flyte.Checkpoint`` was
    served: type  # the class now served in their place


_lock = threading.Lock()
_state: _Installed | None = None


def install() -> None:
    """Make the upstream Flyte SDK serve our Checkpoint.

    After it, ``flyte.Checkpoint`` and every helper that ``flyte.ctx().checkpoint`` builds
    are :class:`flyte_checkpoint.Checkpoint` (and still instances of upstream's class), in
    sync and async tasks alike. Call it once, at import of the module that defines your
    tasks; calling it again does nothing. :func:`uninstall` undoes it.

    Raises :class:`UpstreamNotSupportedError`, changing nothing, when the upstream SDK is not
    installed or is a version outside :data:`SUPPORTED_UPSTREAM`.
    """
    global _state
    with _lock:
        if _state is not None:
            return
        sdk, module, original = _upstream_seam()
        served = _served_class(original)
        state = _Installed(sdk, module, original, getattr(sdk, "Checkpoint", None), served)
        module.Checkpoint = served
        sdk.Checkpoint = served
        _state = state
    _drop_cached_upstream_helper(module, served)
    logger.debug("flyte_checkpoint.install(): flyte.ctx().checkpoint now serves %s", served)


def uninstall() -> None:
    """Undo :func:`install`: upstream builds its own helpers again. Helpers already built
    stay as they are. Does nothing when not installed."""
    global _state
    with _lock:
        state, _state = _state, None
        if state is None:
            return
        state.module.Checkpoint = state.original
        state.sdk.Checkpoint = state.public


def installed() -> bool:
    """Whether :func:`install` is in effect."""
    return _state is not None


# ---------------------------------------------------------------------- the seam


def _upstream_version() -> str | None:
    try:
        return importlib.metadata.version("flyte")
    except importlib.metadata.PackageNotFoundError:
        return None


def _release(version: str) -> tuple[int, int]:
    """(major, minor) of a version string; (0, 0) when it does not start with them."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else (0, 0)


def _refuse(found: str | None, why: str) -> UpstreamNotSupportedError:
    where = f"flyte {found}" if found else "no upstream Flyte SDK (PyPI `flyte`)"
    return UpstreamNotSupportedError(
        f"flyte_checkpoint.install() needs the upstream Flyte SDK, flyte{SUPPORTED_UPSTREAM};"
        f" found {where}: {why}. Nothing was changed. (Outside Flyte tasks, use"
        " flyte_checkpoint.Checkpoint directly, or `import flyte` with only flyte-checkpoint"
        " installed.)"
    )


def _upstream_seam() -> tuple[Any, Any, type]:
    """Import upstream and check every name ``install()`` relies on, before changing any."""
    version = _upstream_version()
    if version is None:
        raise _refuse(None, "it is not installed")
    if not _LOWEST <= _release(version) < _BELOW:
        raise _refuse(version, "that version is outside the supported range")
    try:
        sdk = importlib.import_module("flyte")
        module = importlib.import_module("flyte._checkpoint")
        models = importlib.import_module("flyte.models")
    except ImportError as exc:
        raise _refuse(version, f"it does not import ({exc})") from exc
    original = getattr(module, "Checkpoint", None)
    if _state is None and isinstance(original, type) and issubclass(original, Checkpoint):
        raise _refuse(version, "flyte._checkpoint.Checkpoint is already ours, set by other code")
    prop = getattr(getattr(models, "TaskContext", None), "checkpoint", None)
    fget = getattr(prop, "fget", None)
    problems = []
    if not isinstance(original, type):
        problems.append("flyte._checkpoint.Checkpoint is not a class")
    if not isinstance(getattr(module, "CHECKPOINT_CACHE_KEY", None), str):
        problems.append("flyte._checkpoint.CHECKPOINT_CACHE_KEY is missing")
    # The property must look the class up by name when it builds a helper; a class bound at
    # import time could not be replaced.
    if fget is None or "Checkpoint" not in fget.__code__.co_names:
        problems.append("flyte.models.TaskContext.checkpoint does not build flyte._checkpoint."
                        "Checkpoint")
    if problems:
        raise _refuse(version, "; ".join(problems))
    return sdk, module, original


_served: dict[type, type] = {}


def _served_class(original: type) -> type:
    """Our Checkpoint, also a subclass of upstream's: upstream's own ``isinstance`` checks on
    cached helpers hold before and after ``uninstall()``. Our methods come first in the MRO;
    upstream's ``__init__`` never runs, and its ``__del__`` finds no workspace of its own.

    It is importable as ``flyte_checkpoint._upstream.FlyteCheckpoint`` (so the class and its
    instances pickle, also into processes that never called ``install()``), and counts
    upstream's own helpers as instances: a helper some context cached before ``install()``
    is still served there, as upstream's property expects, instead of failing its check.
    """
    if original not in _served:
        meta = type(original)
        context_code = _context_builder_code()

        class _ServedMeta(meta):
            def __instancecheck__(cls, instance: object) -> bool:
                return super().__instancecheck__(instance) or isinstance(instance, original)

            def __call__(cls, *args: Any, **kwargs: Any) -> Any:
                helper = super().__call__(*args, **kwargs)
                caller = sys._getframe(1)
                if context_code is not None and caller.f_code is context_code:
                    _resume_for_task(helper, caller.f_locals.get("self"))
                return helper

        _served[original] = _ServedMeta(
            "FlyteCheckpoint",
            (Checkpoint, original),
            {"__module__": __name__, "__qualname__": "FlyteCheckpoint",
             "__doc__": Checkpoint.__doc__},
        )
    return _served[original]


def _context_builder_code() -> Any:
    """The code of upstream's ``TaskContext.checkpoint``: a helper built there is the one
    tasks get (``flyte.ctx().checkpoint``), and takes the resume rule."""
    try:
        models = importlib.import_module("flyte.models")
        return models.TaskContext.checkpoint.fget.__code__
    except Exception:
        return None


def _resume_for_task(helper: Checkpoint, context: Any) -> None:
    """Give the helper of ``flyte.ctx().checkpoint`` the resume rule (``_resume``), with the
    ``prev`` the platform gave (upstream's JobSet rule replaces it by the destination)."""
    paths = getattr(context, "checkpoint_paths", None)
    prev = getattr(paths, "prev_checkpoint_path", None)
    prev = prev.strip() if isinstance(prev, str) and prev.strip() else None
    helper._resume = Resume(helper.remote_destination, prev or helper.remote_source)


def __getattr__(name: str) -> Any:
    if name == "FlyteCheckpoint":  # unpickling in a process that never ran install()
        return _served_class(_state.original if _state else _upstream_seam()[2])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _drop_cached_upstream_helper(module: Any, served: type) -> None:
    """If this task already built an upstream helper (``flyte.ctx().checkpoint`` ran before
    ``install()``), forget it so the next access builds ours; upstream would otherwise fail
    its own type check on the cached object."""
    try:
        sdk = importlib.import_module("flyte")
        context = sdk.ctx()
    except Exception:  # no task context here (import time, a plain script)
        return
    data = getattr(context, "data", None)
    if not isinstance(data, dict):
        return
    cached = data.get(module.CHECKPOINT_CACHE_KEY)
    if cached is not None and not isinstance(cached, served):
        del data[module.CHECKPOINT_CACHE_KEY]
        logger.warning(
            "flyte_checkpoint.install() ran after this task had built upstream's checkpoint"
            " helper; flyte.ctx().checkpoint now returns a new one of ours (call install() at"
            " import time to avoid this)"
        )
