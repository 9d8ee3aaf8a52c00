"""Facts about the machine that size the work."""

import os


def available_cores() -> int:
    """CPU cores this process may use (respects affinity masks, e.g. under SLURM)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1
