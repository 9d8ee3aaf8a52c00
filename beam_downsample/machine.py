"""Facts about the machine that size the work."""

import ctypes
import os


def available_cores() -> int:
    """CPU cores this process may use (respects affinity masks, e.g. under SLURM)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


M_ARENA_MAX = -8  # glibc's mallopt parameter number


def limit_malloc_arenas() -> None:
    """One glibc malloc arena per core instead of eight, here and in every child process.

    tensorstore's and our tile threads each get an arena by default, and
    every arena keeps the memory its thread freed: a worker peaked at 940 MB
    against 626 MB with the limit (4096x4096x512 bench, multiprocessing),
    at the same speed. Must run before the threads start; children inherit
    MALLOC_ARENA_MAX. A no-op off glibc.
    """
    arenas = max(available_cores(), 2)
    os.environ.setdefault("MALLOC_ARENA_MAX", str(arenas))
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_ARENA_MAX, int(os.environ["MALLOC_ARENA_MAX"]))
    except (OSError, AttributeError, ValueError):  # pragma: no cover - not glibc
        pass


def live_processes():
    """(pid, parent pid, process group) of every process of this host that is not a
    zombie (a killed process its parent has not reaped yet), read from /proc."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as handle:
                stat = handle.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] not in ("Z", "X"):
            yield int(entry), int(fields[1]), int(fields[2])


def pid_alive(pid) -> bool:
    """A process of this host with that pid exists and is not a zombie."""
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            stat = handle.read()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return stat[stat.rindex(")") + 2:].split()[0] not in ("Z", "X")
