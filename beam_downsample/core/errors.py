"""The errors beam_downsample raises on purpose, one family for the command and the library.

Each message is one line naming the problem. The command prints it as
`beam-downsample: error: MESSAGE` and exits with the family's status:
`UsageError` and `DatasetError` 2 (nothing was touched), `RunError` 1 (a
fault during a run; only complete mags are listed, and the same call
resumes). Every specific error below (and in `store`, `plan`, `run`) derives
from one of them.
"""

from __future__ import annotations


class Error(Exception):
    """Base of every error beam_downsample raises on purpose; `str(error)` is one line."""


class UsageError(Error, ValueError):
    """An option or argument that cannot be used (exit status 2; nothing was touched)."""


class DatasetError(Error, ValueError):
    """The dataset cannot be downsampled as it is (exit status 2; nothing was touched)."""


class RunError(Error, RuntimeError):
    """A fault during a run (exit status 1): only complete mags are listed; the same call resumes."""


class PlanningError(UsageError):
    """The requested pyramid cannot be made (e.g. the coarsest mag is unreachable)."""
