"""Every tunable of the checkpoint helper, read from the environment in one place.

The lower packages take their tunables as arguments (``restore(limits=, decode_threads=)``,
``write_tarball(workers=)``, ``File.with_options(...)``) and never read the environment, so a
reader of any call can see all of its inputs. This module is the edge: :meth:`Settings.from_env`
parses every variable of :data:`VARIABLES` the same way, once, when a
:class:`~flyte_checkpoint.Checkpoint` is made (or pass ``Checkpoint(..., settings=Settings(...))``),
and a bad value fails there, at task start, naming the variable and what it allows:

- a blank or unset variable leaves the setting at its default;
- counts are whole numbers of 1 or more (``_`` separators allowed: ``1_000_000``);
- switches are one of ``1 on true yes`` / ``0 off false no`` (any case).

Not settings: the store's endpoint and credentials (``FLYTE_AWS_*``, ``AZURE_*``,
``STORAGE_EMULATOR_HOST``, see :mod:`._storage`), the attempt's locations
(``FLYTE_CHECKPOINT_PATH``, ...) and the test support's ``CHECKPOINT_PROVISION``,
``CHECKPOINT_REQUIRE_*`` and emulator paths.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

from checkpoint_format import Limits

__all__ = ["VARIABLES", "Settings", "SettingsError", "Variable", "readme_table"]

_TRUE = ("1", "on", "true", "yes")
_FALSE = ("0", "off", "false", "no")
_WHOLE = "a whole number of 1 or more"


class SettingsError(ValueError):
    """An environment variable holds a value its setting does not allow."""

    def __init__(self, variable: str, value: str, allowed: str) -> None:
        super().__init__(f"{variable}={value!r}: expected {allowed}")
        self.variable = variable
        self.value = value
        self.allowed = allowed

    def __reduce__(self):  # picklable across processes, with its attributes
        return (type(self), (self.variable, self.value, self.allowed))


def _whole(variable: str, raw: str) -> int:
    text = raw.replace("_", "")
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise SettingsError(variable, raw, _WHOLE)
    return int(text)


def _positive(variable: str, raw: str) -> float:
    try:
        value = float(raw.replace("_", ""))
    except ValueError:
        value = 0.0
    if not (value > 0 and math.isfinite(value)):
        raise SettingsError(variable, raw, "a positive number")
    return value


def _name(variable: str, raw: str) -> str:
    if not raw.isprintable() or len(raw) > 255:
        raise SettingsError(variable, raw, "a printable name of at most 255 characters")
    return raw


def _switch(variable: str, raw: str) -> bool:
    word = raw.lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise SettingsError(variable, raw, f"one of {', '.join(_TRUE + _FALSE)}")


def _auto_switch(variable: str, raw: str) -> bool | None:
    if raw.lower() == "auto":
        return None
    try:
        return _switch(variable, raw)
    except SettingsError:
        raise SettingsError(variable, raw, f"auto or one of {', '.join(_TRUE + _FALSE)}") from None


_DATA_PATHS = ("auto", "obstore", "fsspec")


def _data_path(variable: str, raw: str) -> str:
    word = raw.lower()
    if word not in _DATA_PATHS:
        raise SettingsError(variable, raw, f"one of {', '.join(_DATA_PATHS)}")
    return word


@dataclasses.dataclass(frozen=True)
class Variable:
    """One environment variable: the setting it fills, how it is parsed, what it means."""

    name: str
    #: The :class:`Settings` field, or ``limits.<field>`` for a cap of :class:`Limits`.
    setting: str
    parse: Callable[[str, str], Any]
    default: str
    meaning: str


def _amount(value: int) -> str:
    """1,000,000; 1 MiB (1,048,576); 1 TiB: as a reader of the table would write it."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20)):
        if value >= 1 << shift and value % (1 << shift) == 0:
            return f"{value >> shift:,} {unit} ({value:,})"
    return f"{value:,}"


def _limit_variables() -> tuple[Variable, ...]:
    """``CHECKPOINT_MAX_<FIELD>`` for every cap of :class:`checkpoint_format.Limits`."""
    found = []
    for field in dataclasses.fields(Limits):
        if not field.name.startswith("max_"):
            continue
        parse = _positive if field.type in (float, "float") else _whole
        default = f"{field.default:,g}" if parse is _positive else _amount(field.default)
        found.append(Variable(
            f"CHECKPOINT_{field.name.upper()}", f"limits.{field.name}", parse, default,
            f"a load's cap on `{field.name[4:]}` (format spec §5.1, CF-LIMIT-01)"))
    return tuple(found)


#: Every variable :meth:`Settings.from_env` reads, in the order the README's table lists them.
VARIABLES: tuple[Variable, ...] = (
    *_limit_variables(),
    Variable("CHECKPOINT_DECODE_THREADS", "decode_threads", _whole,
             "the cores, at most 4",
             "threads inflating, hashing and writing large restored files during a load"),
    Variable("CHECKPOINT_COMPRESS_THREADS", "compress_threads", _whole,
             "the cores", "threads compressing and hashing during a save"),
    Variable("CHECKPOINT_IO_CONCURRENCY", "io_concurrency", _whole,
             "adaptive on S3, GCS and Azure (from 2, see the memory budget), 2 local",
             "parts a save uploads at once (set: a fixed width)"),
    Variable("CHECKPOINT_IO_READ_CONCURRENCY", "io_read_concurrency", _whole,
             "adaptive on S3, GCS and Azure (from 2, see the memory budget), 1 local",
             "ranged GETs a load keeps in flight (1: one long GET; set: a fixed width)"),
    Variable("CHECKPOINT_IO_MEMORY_BUDGET", "io_memory_budget", _whole,
             "160 MiB (167,772,160)",
             "bytes of buffers a transfer's requests in flight may hold: ranges and parts in"
             " flight widen with the measured throughput up to it"),
    Variable("CHECKPOINT_IO_DIRECT_WRITES", "direct_writes", _switch, "on",
             "saves to local paths write with O_DIRECT (off: through the page cache, say on NFS)"),
    Variable("CHECKPOINT_IO_GCS_COMPOSITE", "gcs_composite", _switch, "off",
             "GCS saves upload parts as temporary objects in parallel, then compose them"),
    Variable("CHECKPOINT_DISTRIBUTED_TIMEOUT", "distributed_timeout", _positive, "1,800",
             "seconds a rank of a multi-rank checkpoint waits for the others at each step"
             " before the operation fails on every rank"),
    Variable("CHECKPOINT_NODE_ID", "node_id", _name, "hostname, boot id and mount namespace",
             "the node a rank counts as for multi-rank loads (one download per node)"),
    Variable("CHECKPOINT_IO_DATA_PATH", "data_path", _data_path, "auto",
             "the client for S3, GCS and Azure: obstore, fsspec, or auto (obstore when "
             "installed and the storage options translate)"),
    Variable("FLYTE_CHECKPOINT_PROGRESS", "progress", _auto_switch, "auto",
             "a progress line on standard error (auto: when it is a terminal)"),
)


def _count(name: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"Settings.{name} must be {_WHOLE} or None, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Settings:
    """The tunables of one :class:`~flyte_checkpoint.Checkpoint`; ``None`` means "the
    default of the layer that uses it" (see :data:`VARIABLES` for each default)."""

    #: The reader caps of a load (``restore(limits=)``).
    limits: Limits = dataclasses.field(default_factory=Limits)
    #: ``restore(decode_threads=)``; ``None``: the cores, at most 4.
    decode_threads: int | None = None
    #: ``write_tarball(workers=)``; ``None``: the cores.
    compress_threads: int | None = None
    #: ``File.with_options(concurrency=)``; ``None``: the store's.
    io_concurrency: int | None = None
    #: ``File.with_options(read_concurrency=)``; ``None``: the store's.
    io_read_concurrency: int | None = None
    #: ``File.with_options(memory_budget=)``; ``None``: 160 MiB.
    io_memory_budget: int | None = None
    #: ``File.with_options(direct_writes=)``.
    direct_writes: bool = True
    #: ``File.with_options(gcs_composite=)``.
    gcs_composite: bool = False
    #: ``File.with_options(data_path=)``: ``"auto"``, ``"obstore"`` or ``"fsspec"``.
    data_path: str = "auto"
    #: A progress line on standard error; ``None``: when it is a terminal.
    progress: bool | None = None
    #: Seconds a rank of a :class:`~flyte_checkpoint.distributed.DistributedCheckpoint` waits
    #: for the other ranks at each step of a save or load (and a rank's segment upload may
    #: take) before the operation fails on every rank.
    distributed_timeout: float = 1800.0
    #: The node a rank counts as for multi-rank loads; ``None``: this host's hostname, boot id
    #: and mount namespace (ranks that see the same local files).
    node_id: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.limits, Limits):
            raise ValueError(f"Settings.limits must be a checkpoint_format.Limits, got"
                             f" {self.limits!r}")
        for name in ("decode_threads", "compress_threads", "io_concurrency",
                     "io_read_concurrency", "io_memory_budget"):
            _count(name, getattr(self, name))
        for name in ("direct_writes", "gcs_composite"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"Settings.{name} must be True or False, got"
                                 f" {getattr(self, name)!r}")
        timeout = self.distributed_timeout
        if (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                or not (timeout > 0 and math.isfinite(timeout))):
            raise ValueError(f"Settings.distributed_timeout must be a positive number of"
                             f" seconds, got {timeout!r}")
        if self.node_id is not None and (not isinstance(self.node_id, str) or not self.node_id):
            raise ValueError(f"Settings.node_id must be a non-empty str or None, got"
                             f" {self.node_id!r}")
        if self.data_path not in _DATA_PATHS:
            raise ValueError(f"Settings.data_path must be one of {', '.join(_DATA_PATHS)},"
                             f" got {self.data_path!r}")
        if self.progress not in (None, True, False):
            raise ValueError(f"Settings.progress must be True, False or None, got"
                             f" {self.progress!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """The defaults, overridden by every variable of :data:`VARIABLES` that is set to a
        non-blank value. Raises :class:`SettingsError` for a value a setting does not allow."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        limits: dict[str, Any] = {}
        for variable in VARIABLES:
            raw = env.get(variable.name, "").strip()
            if not raw:
                continue
            value = variable.parse(variable.name, raw)
            scope, _, name = variable.setting.rpartition(".")
            (limits if scope == "limits" else values)[name] = value
        return cls(limits=Limits(**limits), **values)

    def restore_options(self) -> dict[str, Any]:
        """The :func:`checkpoint_format.restore` (and ``validate``) arguments these give."""
        return {"limits": self.limits, "decode_threads": self.decode_threads}

    def write_options(self) -> dict[str, Any]:
        """The :func:`checkpoint_format.write_tarball` arguments these settings give."""
        return {"workers": self.compress_threads}

    def file_options(self) -> dict[str, Any]:
        """The :meth:`checkpoint_io.File.with_options` arguments these settings give."""
        return {
            "concurrency": self.io_concurrency,
            "read_concurrency": self.io_read_concurrency,
            "memory_budget": self.io_memory_budget,
            "direct_writes": self.direct_writes,
            "gcs_composite": self.gcs_composite,
            "data_path": self.data_path,
        }


def readme_table() -> str:
    """The README's table of variables, made from :data:`VARIABLES` (a test keeps the
    README's copy equal to it)."""
    rows = ["| variable | default | what it sets |", "|---|---|---|"]
    rows += [f"| `{v.name}` | {v.default} | {v.meaning} |" for v in VARIABLES]
    return "\n".join(rows)
