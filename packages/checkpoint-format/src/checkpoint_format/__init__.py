"""Read, write and validate flyte-checkpoint objects (format spec v1)."""
