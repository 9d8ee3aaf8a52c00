"""Errors of the launcher: the command line's are `core.errors.UsageError`."""

from beam_downsample.core.errors import UsageError

__all__ = ["UsageError"]
