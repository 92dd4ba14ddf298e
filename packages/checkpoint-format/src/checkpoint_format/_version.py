"""The package's version, written once (RELEASING in the root README): hatchling reads it
from here, ``__init__`` re-exports it, and the writer names itself with it (CF-MARK-01)."""

__version__ = "0.1.0"
