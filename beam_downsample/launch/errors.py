"""Errors of the launcher: the command line's are `core.errors.UsageError`; `usage_error`
prints one in the commands' form."""

import sys

from beam_downsample.core.errors import UsageError

__all__ = ["UsageError", "usage_error"]


def usage_error(message: str) -> int:
    """`beam-downsample: error: MESSAGE` on stderr (bad usage or a bad dataset); returns the exit status, 2."""
    print(f"beam-downsample: error: {message}", file=sys.stderr)
    return 2
