"""How many worker processes, how much memory and how big the work units:
from the machine, the flags and the size of the job.

Pure functions (the CLI feeds them the facts), so the rules are tested
for machines we do not have. The memory model counts PROCESS_BYTES for
the launcher and for each worker process, plus one unit in each process
that runs units; the units are sized so that the whole process tree fits
the budget, whatever --jobs is.

Processes versus threads: a worker process costs ~2 CPU-s to start and
import (Beam, tensorstore, numpy) and splits the memory; tile threads in
one process cost nothing to start and already keep 2 cores busy (on the
2-core bench, in-process 10.4 s vs 12.7 s with 2 worker processes; twice the
data 20.5 s vs 29.6 s). So by default, on machines with more than
IN_PROCESS_CORES cores, a worker process is started for every
MIN_WORK_PER_PROCESS CPU-seconds of estimated work, never more than the
cores, than the budget holds at a useful unit size, or than a pass has
units; with fewer than two, the launcher runs the units itself on all
cores' tile threads.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Optional

from beam_downsample.core.errors import UsageError

MIB = 1 << 20
GIB = 1 << 30
PROCESS_BYTES = 300 * MIB  # interpreter, Beam, tensorstore and its pools (launcher and each worker)
MIN_UNIT_BYTES = 32 * MIB  # the smallest unit budget we plan a process for
USEFUL_UNIT_BYTES = 256 * MIB  # a unit of a few CPU-seconds: per-unit costs (open, write, marker) stay small
PREFERRED_UNIT_BYTES = 1 * GIB  # what the default budget gives each worker where the memory allows: fewer units, passes
FLOOR_BUDGET = 2 * GIB  # the default budget is at least this (if the machine has twice as much)
MEMORY_SHARE = 0.5  # the default budget takes at most this share of the machine's memory
WORKER_START_CPU_S = 2.0  # measured: one worker process starting and importing, 2-core machine
MIN_WORK_PER_PROCESS = 5 * WORKER_START_CPU_S  # CPU-s of work that pay for starting one worker process
IN_PROCESS_CORES = 2  # cores one process's tile threads were measured to keep busy (no processes by default)
MAX_TILE_VOXELS = 16 * MIB  # 16 Mi voxels: large tiles keep the kernels' inner loops long
MIN_TILE_VOXELS = 32**3
TILE_OVERHEAD = 3  # core.grid.UnitBudget.TILE_OVERHEAD: a tile in flight holds its data plus temporaries
TILE_BYTES_PER_VOXEL = 4  # tiles are sized for uint32 voxels (the usual segmentation)


class SizingError(UsageError):
    """An explicit --jobs/--memory-budget combination the budget cannot hold."""


@dataclasses.dataclass(frozen=True)
class Machine:
    cores: int
    memory: int  # bytes


def cpu_seconds_per_voxel(bytes_per_voxel: int) -> float:
    """Decode + reduce + encode per source voxel, measured on the 2-core bench with the
    compiled kernels (`benchmarks/profile_stages.py`: color uint8 8.9 ns, segmentation
    uint32 12.4 ns; before them 9.7 and 19 ns)."""
    return (7.5 + 1.25 * bytes_per_voxel) * 1e-9


def work_seconds(layers: Iterable[tuple[int, int]]) -> float:
    """Estimated CPU-seconds of a job from (source voxels, bytes per voxel) per layer."""
    return sum(voxels * cpu_seconds_per_voxel(bpv) for voxels, bpv in layers)


def budget_needed(processes: int, unit_bytes: int = USEFUL_UNIT_BYTES) -> int:
    """Budget that holds the launcher, `processes` worker processes (0: the launcher runs the
    units) and one unit of `unit_bytes` in each process that runs units."""
    return PROCESS_BYTES * (processes + 1) + unit_bytes * max(processes, 1)


def processes_held(budget: int, unit_bytes: int = USEFUL_UNIT_BYTES) -> int:
    """The most worker processes `budget` holds with units of `unit_bytes`."""
    return max(int((budget - PROCESS_BYTES) // (PROCESS_BYTES + unit_bytes)), 0)


def default_budget(machine: Machine, processes: int) -> int:
    """FLOOR_BUDGET, or what `processes` workers need at PREFERRED_UNIT_BYTES each if more,
    but at most MEMORY_SHARE of the machine's memory (and at least 256 MiB)."""
    wanted = max(FLOOR_BUDGET, budget_needed(processes, PREFERRED_UNIT_BYTES))
    return max(min(wanted, int(machine.memory * MEMORY_SHARE)), 256 * MIB)


def unit_bytes(budget: int, processes: int) -> int:
    """What one unit may hold when `processes` workers (0: the launcher) share `budget`."""
    if processes <= 0:
        return max(budget - PROCESS_BYTES, MIN_UNIT_BYTES)
    return max((budget - PROCESS_BYTES * (processes + 1)) // processes, MIN_UNIT_BYTES)


def threads(cores: int, processes: int) -> int:
    """Tile threads per process: its share of the cores plus one, so reading a tile overlaps reducing another."""
    return max(cores // max(processes, 1), 1) + 1


def tile_voxels(unit: int, thread_count: int) -> int:
    """The largest power-of-two tile (at most MAX_TILE_VOXELS) whose `thread_count` tiles in
    flight take at most half of the unit, so that a unit has tiles for every thread.

    Up to 3 threads (2 cores per process, where it was measured) the 16 Mi-voxel tile
    stays; with more, T tiles of 192 MB (uint32) would leave every unit a single tile,
    and all but one thread idle.
    """
    if thread_count <= 3:
        return MAX_TILE_VOXELS
    limit = unit // (2 * thread_count * TILE_OVERHEAD * TILE_BYTES_PER_VOXEL)
    tile = MAX_TILE_VOXELS
    while tile > limit and tile > MIN_TILE_VOXELS:
        tile //= 2
    return tile


def pass_processes(planned: int, units: int) -> int:
    """Worker processes of a pass: never more than it has units; with fewer than two
    the launcher runs them itself (one process either way, and it is already running)."""
    count = min(planned, units)
    return count if count >= 2 else 0


def pass_threads(cores: int, planned: int, processes: int) -> int:
    """Tile threads per process in a pass with fewer processes than planned: more each,
    but no more tiles in flight over the tree than the units were sized for."""
    slots = max(planned, 1) * threads(cores, planned)
    return max(1, min(threads(cores, processes), slots // max(processes, 1)))


@dataclasses.dataclass(frozen=True)
class Sizing:
    """The sizes of one run on one machine."""

    machine: Machine
    budget: int
    processes: int  # worker processes the units are sized for; 0: the launcher runs the units
    work_seconds: float = 0.0
    budget_given: bool = False
    jobs_given: bool = False

    @property
    def unit_bytes(self) -> int:
        return unit_bytes(self.budget, self.processes)

    @property
    def threads(self) -> int:
        return threads(self.machine.cores, self.processes)

    @property
    def tile_voxels(self) -> int:
        return tile_voxels(self.unit_bytes, self.threads)

    def tree_bytes(self, processes: Optional[int] = None) -> int:
        """The memory model's peak for the whole process tree with `processes` workers."""
        count = self.processes if processes is None else processes
        return budget_needed(count, self.unit_bytes)

    def for_pass(self, units: int, work: Optional[float] = None) -> tuple[int, int]:
        """(worker processes, tile threads per process) of a pass of `units` work units
        and `work` estimated CPU-s: by default one process per MIN_WORK_PER_PROCESS of
        the pass's own work too (the last passes of a pyramid are small)."""
        planned = self.processes
        if work is not None and not self.jobs_given:
            planned = min(planned, int(work // MIN_WORK_PER_PROCESS))
        processes = pass_processes(planned, units)
        return processes, pass_threads(self.machine.cores, self.processes, processes)

    def describe(self, passes: Iterable[tuple[int, float]] = ()) -> str:
        """What --dry-run prints: the machine, the budget and, per pass (units, work), who runs the units."""
        budget = f"{self.budget / GIB:.2f} GiB" + ("" if self.budget_given else " (default)")
        lines = [f"machine: {self.machine.cores} cores, {self.machine.memory / GIB:.1f} GiB; memory budget {budget}; "
                 f"estimated work {self.work_seconds:.0f} CPU-s"]
        for index, (units, work) in enumerate(passes):
            processes, thread_count = self.for_pass(units, work)
            where = (f"{processes} worker processes x {thread_count} tile threads" if processes
                     else f"in the launcher, {thread_count} tile threads")
            lines.append(f"pass {index + 1}: {units} work units, {where}")
        return "\n".join(lines)


def _size(text: int) -> str:
    return f"{text / GIB:.2f} GiB" if text >= GIB else f"{text / MIB:.0f} MiB"


def choose(
    machine: Machine,
    strategy: str,
    jobs: Optional[int],
    budget: Optional[int],
    work: float,
) -> Sizing:
    """The sizing of a local run (multiprocessing, sequential, a dask LocalCluster).

    `jobs` and `budget` are None where the flag was not given. Defaults shrink
    to what the budget holds; an explicit combination that cannot hold (each
    worker process needs PROCESS_BYTES plus a unit of at least MIN_UNIT_BYTES)
    raises SizingError, so that neither flag is silently changed.
    """
    if strategy == "sequential":
        processes = 0
    elif jobs is not None:
        processes = jobs
    elif strategy == "dask":  # a LocalCluster: its own start-up rules, one worker per core
        processes = machine.cores
    elif machine.cores <= IN_PROCESS_CORES:
        processes = 0
    else:
        processes = min(machine.cores, int(work // MIN_WORK_PER_PROCESS))
        processes = processes if processes >= 2 else 0
    given = budget is not None
    if budget is None:
        budget = default_budget(machine, processes)
    if jobs is not None:
        least = budget_needed(jobs, MIN_UNIT_BYTES)
        if budget < least:
            where = "--memory-budget" if given else f"the default budget ({MEMORY_SHARE:.0%} of {_size(machine.memory)})"
            raise SizingError(
                f"--jobs {jobs} needs a memory budget of at least {_size(least)} (the launcher and each worker "
                f"process {_size(PROCESS_BYTES)}, each unit at least {_size(MIN_UNIT_BYTES)}), more than "
                f"{where} {_size(budget)}: give a larger --memory-budget or at most "
                f"--jobs {max(processes_held(budget, MIN_UNIT_BYTES), 1)}"
            )
    else:
        held = processes_held(budget)
        if processes > held:
            processes = held if held >= 2 or strategy == "dask" else 0
        if strategy == "dask":
            processes = max(processes, 1)
    return Sizing(machine, budget, processes, work, budget_given=given, jobs_given=jobs is not None)
