"""Facts about the machine that size the work: cores and memory.

`BEAM_DOWNSAMPLE_MACHINE="cores=16,memory=64G"` overrides what is detected,
for planning a run on another machine (`--dry-run`) and for tests; either
key may be left out. It changes only the plan (and the thread counts), not
the machine.
"""

import ctypes
import os
import re

from beam_downsample.core.errors import UsageError

OVERRIDE_VARIABLE = "BEAM_DOWNSAMPLE_MACHINE"
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(?:i?[bB])?\s*")


class MachineError(UsageError):
    """BEAM_DOWNSAMPLE_MACHINE cannot be read."""


def _override() -> dict:
    text = os.environ.get(OVERRIDE_VARIABLE, "").strip()
    if not text:
        return {}
    values = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, _, value = item.partition("=")
        key = key.strip()
        if key == "cores" and value.strip().isdigit() and int(value) >= 1:
            values["cores"] = int(value)
        elif key == "memory" and _SIZE.fullmatch(value):
            number, prefix = _SIZE.fullmatch(value).groups()
            values["memory"] = int(float(number) * 1024 ** " kmgt".index(prefix.lower() or " "))
        else:
            raise MachineError(f"{OVERRIDE_VARIABLE}: cannot read {item!r} (expected e.g. cores=16,memory=64G)")
    return values


def detected_cores() -> int:
    """CPU cores this process may use (respects affinity masks, e.g. under SLURM or taskset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def detected_memory() -> int:
    """Physical memory, or the cgroup's limit if lower (containers, SLURM jobs)."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        memory = 8 << 30
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path, encoding="ascii") as limit:
                text = limit.read().strip()
        except OSError:
            continue
        if text.isdigit():
            memory = min(memory, int(text))
    return memory


def available_cores() -> int:
    """Cores to plan for: BEAM_DOWNSAMPLE_MACHINE's `cores`, else what this process may use."""
    return _override().get("cores") or detected_cores()


def total_memory() -> int:
    """Memory to plan for: BEAM_DOWNSAMPLE_MACHINE's `memory`, else the machine's (or cgroup's)."""
    return _override().get("memory") or detected_memory()


def overridden() -> bool:
    return bool(_override())


M_ARENA_MAX = -8  # glibc's mallopt parameter number


def limit_malloc_arenas() -> None:
    """One glibc malloc arena per core instead of eight, here and in every child process.

    tensorstore's and our tile threads each get an arena by default, and
    every arena keeps the memory its thread freed: a worker peaked at 940 MB
    against 626 MB with the limit (4096x4096x512 bench, multiprocessing),
    at the same speed. Must run before the threads start; children inherit
    MALLOC_ARENA_MAX. A no-op off glibc.
    """
    try:
        cores = available_cores()
    except MachineError:  # reported by the CLI in one line
        cores = detected_cores()
    os.environ.setdefault("MALLOC_ARENA_MAX", str(max(cores, 2)))
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
