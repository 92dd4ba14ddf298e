"""The errors a checkpoint save or load raises, and the one wording of each.

Where each package's errors sit, and why:

- ``checkpoint_format.CheckpointFormatError`` (an ``Exception``): an object, or a tree to be
  saved, breaks a rule of the spec; ``rule`` and ``member`` say which and where.
- ``checkpoint_io``'s storage errors are ``OSError`` subclasses (a store that failed, or an
  object that changed under a read, is an I/O error, as it would be on a local file);
  ``MissingBackendError`` is an ``ImportError`` (a client library is not installed).
- Here, :class:`CheckpointError` (a ``RuntimeError``: the operation did not happen) wraps
  either kind with the URI of the checkpoint, keeps it as ``__cause__``, and carries the
  spec ``rule`` the data broke, or ``None`` when the failure was not the data's (the store
  failed, or the caller cancelled).
"""

from __future__ import annotations

from checkpoint_format import CheckpointFormatError

__all__ = ["CheckpointError", "CheckpointLoadError", "CheckpointSaveError", "load_error",
           "rule_of", "save_error"]


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved or loaded. ``uri`` names the object; ``rule`` is the
    spec rule ID the data broke (``"CF-EXTRACT-02"``, ...) or ``None``; the cause is chained."""

    def __init__(self, message: str, uri: str, rule: str | None = None) -> None:
        super().__init__(message)
        self.uri = uri
        self.rule = rule

    def __reduce__(self):  # picklable across processes, with its attributes
        return (type(self), (str(self), self.uri, self.rule))


class CheckpointLoadError(CheckpointError):
    """The previous checkpoint exists but could not be restored; nothing was restored."""


class CheckpointSaveError(CheckpointError):
    """The checkpoint could not be saved; the object at the destination is unchanged."""


def rule_of(exc: BaseException | None) -> str | None:
    """The spec rule an error names: a format error's, or one a local refusal carries."""
    rule = getattr(exc, "rule", None)
    return rule if isinstance(rule, str) else None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, CheckpointFormatError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def save_error(uri: str, reason: str | BaseException, *, rule: str | None = None,
               kept: str = "the previous object is unchanged") -> CheckpointSaveError:
    """``checkpoint not saved to URI (the previous object is unchanged): REASON``; an
    exception as ``reason`` gives its text and, for a format error, its rule (chain it with
    ``raise ... from``)."""
    if isinstance(reason, BaseException):
        rule = rule or rule_of(reason)
        reason = _reason(reason)
    return CheckpointSaveError(f"checkpoint not saved to {uri} ({kept}): {reason}", uri, rule)


def load_error(uri: str, exc: BaseException) -> CheckpointLoadError:
    """The previous checkpoint at ``uri`` exists but ``exc`` stopped its restore."""
    if isinstance(exc, CheckpointFormatError):
        reason = f"cannot be restored: {exc}"
    else:
        reason = f"could not be read: {_reason(exc)}"
    # The restorer notes the member a storage error cut short (the error itself is kept).
    reason += "".join(f" ({note})" for note in getattr(exc, "__notes__", ()))
    return CheckpointLoadError(
        f"checkpoint at {uri} {reason}; nothing was restored (not treating this as"
        " 'no checkpoint', which would restart training from scratch)",
        uri, rule_of(exc),
    )
