"""Which mags to make (contract section 2) and which work units make them.

Pure functions, no I/O and no Beam: the launcher feeds them the dataset's
properties and hands their output to the pipeline.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Sequence

import numpy as np

from beam_downsample.mags import Mag, factor_between, mag_name

SAMPLING_MODES = ("anisotropic", "isotropic", "constant_z")


class PlanningError(ValueError):
    """The requested pyramid cannot be made (e.g. the coarsest mag is unreachable)."""


def default_coarsest_mag(width: int, height: int) -> Mag:
    """`max(2 ** ceil(log2(max(width, height) / 100)), 4)` on every axis; depth is ignored."""
    largest = max(width, height)
    exponent = math.ceil(math.log2(largest / 100)) if largest > 0 else 0
    value = max(2 ** max(exponent, 0), 4)
    return (value, value, value)


def _anisotropic_step(current: Mag, voxel_size: Sequence[float]) -> Mag:
    size = [m * v for m, v in zip(current, voxel_size)]
    smallest = min(size)
    only_finest = tuple(m * 2 if s == smallest else m for m, s in zip(current, size))
    all_doubled = tuple(m * 2 for m in current)

    def anisotropy(mag: Sequence[int]) -> float:
        sizes = [m * v for m, v in zip(mag, voxel_size)]
        return max(sizes) / min(sizes)

    if anisotropy(all_doubled) < anisotropy(only_finest):
        return all_doubled  # type: ignore[return-value]
    return only_finest  # type: ignore[return-value]


def plan_mags(
    source_mag: Mag,
    coarsest_mag: Mag,
    sampling_mode: str,
    voxel_size: Sequence[float],
    mags_to_align_with: Iterable[Mag] = (),
) -> list[Mag]:
    """The mags to write, finest first, each computed from the one before.

    `mags_to_align_with` are the mags any layer of the dataset already has;
    one whose largest component is twice the current one is always the next
    step, so that layers share mags.
    """
    if sampling_mode not in SAMPLING_MODES:
        raise PlanningError(f"unknown sampling mode {sampling_mode!r}; choose one of {', '.join(SAMPLING_MODES)}")
    if sampling_mode == "constant_z":
        coarsest_mag = (coarsest_mag[0], coarsest_mag[1], source_mag[2])
    if any(s > c for s, c in zip(source_mag, coarsest_mag)):
        raise PlanningError(
            f"the coarsest mag {mag_name(coarsest_mag)} is finer than the source mag {mag_name(source_mag)} on some axis"
        )
    align_by_max = {}
    for mag in sorted(set(mags_to_align_with)):
        align_by_max.setdefault(max(mag), mag)

    planned: list[Mag] = []
    current = source_mag
    while max(current) < max(coarsest_mag):
        aligned = align_by_max.get(2 * max(current))
        if aligned is not None:
            step = aligned
        else:
            if sampling_mode == "anisotropic":
                candidate = _anisotropic_step(current, voxel_size)
            else:
                candidate = tuple(m * 2 for m in current)
            step = tuple(min(c, limit) for c, limit in zip(candidate, coarsest_mag))  # type: ignore[assignment]
        if step == current:
            raise PlanningError(
                f"no progress: the coarsest mag {mag_name(coarsest_mag)} cannot be reached from "
                f"{mag_name(current)} with voxel size {tuple(voxel_size)} in {sampling_mode} mode"
            )
        # Anisotropic steps that only catch up the finest axes are passed
        # through unwritten; the other modes write every step they take.
        if max(step) > max(current) or sampling_mode != "anisotropic":
            planned.append(step)
        current = step
    largest = [max(mag) for mag in planned]
    if len(set(largest)) != len(largest):
        raise PlanningError(
            "the plan " + ", ".join(mag_name(m) for m in planned) + " has several mags with the same largest "
            "component, which WEBKNOSSOS does not support; choose another --coarsest-mag or --sampling-mode"
        )
    return planned


# ---------------------------------------------------------------------------
# Work units


@dataclasses.dataclass(frozen=True)
class Box:
    """Half-open box `[start, stop)` in x, y, z voxels of some mag."""

    start: tuple[int, int, int]
    stop: tuple[int, int, int]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(max(b - a, 0) for a, b in zip(self.start, self.stop))  # type: ignore[return-value]

    @property
    def empty(self) -> bool:
        return any(s <= 0 for s in self.shape)

    @property
    def voxels(self) -> int:
        return math.prod(self.shape)

    def intersect(self, other: "Box") -> "Box":
        return Box(
            tuple(max(a, b) for a, b in zip(self.start, other.start)),  # type: ignore[arg-type]
            tuple(min(a, b) for a, b in zip(self.stop, other.stop)),  # type: ignore[arg-type]
        )

    def scaled_down(self, factor: Sequence[int]) -> "Box":
        """This box in a grid `factor` times coarser, rounded outward."""
        return Box(
            tuple(a // f for a, f in zip(self.start, factor)),  # type: ignore[arg-type]
            tuple(-(-b // f) for b, f in zip(self.stop, factor)),  # type: ignore[arg-type]
        )

    def scaled_up(self, factor: Sequence[int]) -> "Box":
        return Box(
            tuple(a * f for a, f in zip(self.start, factor)),  # type: ignore[arg-type]
            tuple(b * f for b, f in zip(self.stop, factor)),  # type: ignore[arg-type]
        )


def split_box(box: Box, align: Sequence[int], max_voxels: int) -> list[Box]:
    """Splits `box` into tiles on the `align` grid, halving z first, then y,
    then x, until a tile holds at most `max_voxels`.

    Tiles are read in Fortran order (x fastest, as the chunks are stored, so
    tensorstore need not transpose), and keep their full x extent as long as
    possible: the kernels' inner loops run along x.
    """
    shape = [-(-s // a) * a for s, a in zip(box.shape, align)]
    for axis in (2, 1, 0):
        while math.prod(shape) > max_voxels and shape[axis] > align[axis]:
            shape[axis] = max(align[axis], (shape[axis] // 2) // align[axis] * align[axis])
    tiles = []
    starts = [range((a // s) * s, b, s) for a, b, s in zip(box.start, box.stop, shape)]
    for x in starts[0]:
        for y in starts[1]:
            for z in starts[2]:
                tile = Box((x, y, z), (x + shape[0], y + shape[1], z + shape[2])).intersect(box)
                if not tile.empty:
                    tiles.append(tile)
    return tiles


def region_in_mag(bbox_mag1: Box, mag: Mag) -> Box:
    """The layer's bounding box aligned outward to `mag`, in `mag` voxels."""
    return bbox_mag1.scaled_down(mag)


@dataclasses.dataclass(frozen=True)
class Pass:
    """Consecutive target mags made from one read of `source_mag`."""

    source_mag: Mag
    target_mags: tuple[Mag, ...]

    @property
    def coarsest(self) -> Mag:
        return self.target_mags[-1]


@dataclasses.dataclass(frozen=True)
class WorkUnit:
    """One box of one pass of one layer: read once, reduce, write every level.

    `box` is in source-mag voxels and aligned to whole 32^3 chunks of the
    pass's coarsest mag, so no two units write the same chunk at any level.
    """

    layer: str
    pass_index: int
    box: Box

    @property
    def key(self) -> str:
        return f"{self.layer}/pass{self.pass_index}/" + "_".join(
            f"{a}-{b}" for a, b in zip(self.box.start, self.box.stop)
        )


CHUNK = 32
SHARD = 1024
# A plan holds every unit in memory (~0.4 KB each, measured) and Beam creates them all:
# 10^7 units hold ~10^15 voxels at the default budget's unit size; more needs a larger budget.
MAX_UNITS_PER_PASS = 10**7  # units listed one by one (a dense plan): an absurd box must not exhaust memory
MAX_GRID_UNITS = 10**12  # the grid is arithmetic, but its indices must stay far inside int64 math


@dataclasses.dataclass(frozen=True)
class UnitBudget:
    """What one worker may spend on one unit."""

    bytes: int
    threads: int = 1  # tiles reduced at once inside a unit
    tile_voxels: int = 16 << 20

    # A tile in flight holds its data plus the kernels' temporaries.
    TILE_OVERHEAD = 3
    BUFFER_COPIES = 2

    def unit_bytes(self, a_pass: Pass, shape: Sequence[int], bytes_per_voxel: int) -> float:
        """Peak bytes of a unit of `shape` source voxels: level buffers plus tiles in flight."""
        voxels = math.prod(shape)
        buffers = sum(voxels / math.prod(factor_between(a_pass.source_mag, m)) for m in a_pass.target_mags)
        tile = max(min(self.tile_voxels, voxels), math.prod(tile_alignment(a_pass)))
        # Level buffers count twice: tensorstore copies what it writes until encoded.
        return (self.BUFFER_COPIES * buffers + self.threads * tile * self.TILE_OVERHEAD) * bytes_per_voxel


def tile_alignment(a_pass: Pass) -> tuple[int, int, int]:
    """Tiles start on whole source chunks and whole blocks of the pass's coarsest mag."""
    factor = factor_between(a_pass.source_mag, a_pass.coarsest)
    return tuple(max(CHUNK, f) for f in factor)  # type: ignore[return-value]


def group_passes(
    source_mag: Mag,
    target_mags: Sequence[Mag],
    bytes_per_voxel: int,
    budget: UnitBudget,
) -> list[Pass]:
    """Splits the chain of target mags into passes whose smallest unit (one
    32^3 chunk of the pass's coarsest mag) fits the budget."""
    passes: list[Pass] = []
    current_source = source_mag
    levels: list[Mag] = []
    for target in target_mags:
        candidate = Pass(current_source, tuple(levels) + (target,))
        smallest = [CHUNK * f for f in factor_between(current_source, target)]
        if levels and budget.unit_bytes(candidate, smallest, bytes_per_voxel) > budget.bytes:
            passes.append(Pass(current_source, tuple(levels)))
            current_source = levels[-1]
            levels = []
        levels.append(target)
    if levels:
        passes.append(Pass(current_source, tuple(levels)))
    return passes


def unit_shape(
    a_pass: Pass,
    bytes_per_voxel: int,
    budget: UnitBudget,
    region_shape: Sequence[int],
) -> tuple[int, int, int]:
    """Source-mag voxels per unit: whole coarsest chunks, grown while in budget.

    Units never exceed one shard of the pass's first target mag, so one unit
    writes each level with one call into one shard.
    """
    factor = factor_between(a_pass.source_mag, a_pass.coarsest)
    first = factor_between(a_pass.source_mag, a_pass.target_mags[0])
    shape = [CHUNK * f for f in factor]
    limit = [SHARD * f for f in first]
    # Never grow past what the region needs (rounded up to the alignment).
    needed = [max(-(-r // s) * s, s) for r, s in zip(region_shape, shape)]
    grown = True
    while grown:
        grown = False
        for axis in sorted(range(3), key=lambda a: shape[a]):
            candidate = list(shape)
            candidate[axis] *= 2
            if (
                shape[axis] < needed[axis]
                and candidate[axis] <= limit[axis]
                and budget.unit_bytes(a_pass, candidate, bytes_per_voxel) <= budget.bytes
            ):
                shape = candidate
                grown = True
                break
    return tuple(shape)  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class UnitGrid:
    """The work units of one pass of one layer as arithmetic, never as a list.

    Units are the cells of a grid of `shape` (source-mag voxels, from the
    origin) that overlap `region` (the source region the pass needs), each
    clipped to the region. Cells are numbered from the region's first cell,
    z fastest, so an index is a few bytes and a run of indices is a seed.
    A 10^15-voxel layer's grid is a handful of integers.
    """

    layer: str
    pass_index: int
    region: Box
    shape: tuple[int, int, int]

    @property
    def first(self) -> tuple[int, int, int]:
        return tuple(a // s for a, s in zip(self.region.start, self.shape))  # type: ignore[return-value]

    @property
    def counts(self) -> tuple[int, int, int]:
        return tuple(-(-b // s) - f for b, s, f in zip(self.region.stop, self.shape, self.first))  # type: ignore

    @property
    def count(self) -> int:
        return math.prod(self.counts) if not self.region.empty else 0

    def unit(self, index: int) -> WorkUnit:
        _, cy, cz = self.counts
        ix, rest = divmod(int(index), cy * cz)
        iy, iz = divmod(rest, cz)
        start = tuple((f + i) * s for f, i, s in zip(self.first, (ix, iy, iz), self.shape))
        stop = tuple(a + s for a, s in zip(start, self.shape))
        return WorkUnit(self.layer, self.pass_index, Box(start, stop).intersect(self.region))  # type: ignore[arg-type]

    def units(self, indices: Iterable[int]) -> list[WorkUnit]:
        return [self.unit(i) for i in indices]

    def all_indices(self) -> np.ndarray:
        """Every unit (a dense plan): refused past MAX_UNITS_PER_PASS before any is listed."""
        if self.count > MAX_UNITS_PER_PASS:
            raise PlanningError(
                f"layer {self.layer!r}: pass {self.pass_index + 1} would need {self.count} work units "
                f"(at most {MAX_UNITS_PER_PASS} in a dense plan); is the boundingBox right? Otherwise raise "
                "--memory-budget for larger units"
            )
        return np.arange(self.count, dtype=np.int64)

    def index_of_starts(self, starts: np.ndarray) -> np.ndarray:
        """Index of the unit holding each voxel of `starts` (N, 3); -1 outside the grid."""
        cell = np.floor_divide(np.asarray(starts, dtype=np.int64), np.array(self.shape)) - np.array(self.first)
        counts = np.array(self.counts)
        inside = np.all((cell >= 0) & (cell < counts), axis=1)
        flat = (cell[:, 0] * counts[1] + cell[:, 1]) * counts[2] + cell[:, 2]
        return np.where(inside, flat, -1)

    def overlapping(self, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
        """Sorted unique indices of the units that overlap any of the boxes
        `[starts, stops)` (each (N, 3), source-mag voxels). Vectorised: memory
        grows with the boxes and the units they touch, not with the grid."""
        starts = np.maximum(np.asarray(starts, dtype=np.int64).reshape(-1, 3), np.array(self.region.start))
        stops = np.minimum(np.asarray(stops, dtype=np.int64).reshape(-1, 3), np.array(self.region.stop))
        keep = np.all(stops > starts, axis=1)
        starts, stops = starts[keep], stops[keep]
        shape, first, counts = np.array(self.shape), np.array(self.first), np.array(self.counts)
        low = starts // shape - first
        high = -(-stops // shape) - first
        extent = high - low
        sizes = np.prod(extent, axis=1)
        total = int(sizes.sum())
        if total == 0:
            return np.zeros(0, dtype=np.int64)
        owner = np.repeat(np.arange(len(sizes)), sizes)
        offset = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        ext = extent[owner]
        dz = offset % ext[:, 2]
        dy = (offset // ext[:, 2]) % ext[:, 1]
        dx = offset // (ext[:, 2] * ext[:, 1])
        cells = low[owner] + np.stack([dx, dy, dz], axis=1)
        flat = (cells[:, 0] * counts[1] + cells[:, 1]) * counts[2] + cells[:, 2]
        return np.unique(flat)

    def boxes(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(starts, stops) of the units `indices`, clipped to the region, vectorised."""
        indices = np.asarray(indices, dtype=np.int64)
        _, cy, cz = self.counts
        cells = np.stack([indices // (cy * cz), (indices // cz) % cy, indices % cz], axis=1)
        starts = (cells + np.array(self.first)) * np.array(self.shape)
        stops = starts + np.array(self.shape)
        return (np.maximum(starts, np.array(self.region.start)), np.minimum(stops, np.array(self.region.stop)))


def source_region(box_mag1: Box, a_pass: Pass) -> Box:
    """The source voxels that make `box_mag1` aligned outward to the pass's coarsest mag:
    whole coarsest voxels, so every level's part of it has its footprint inside."""
    return region_in_mag(box_mag1, a_pass.coarsest).scaled_up(factor_between(a_pass.source_mag, a_pass.coarsest))


def plan_grid(
    layer: str,
    pass_index: int,
    a_pass: Pass,
    bbox_mag1: Box,
    bytes_per_voxel: int,
    budget: UnitBudget,
) -> UnitGrid:
    """The pass's source region (its coarsest mag's region, in source voxels) and unit shape."""
    needed = source_region(bbox_mag1, a_pass)
    shape = unit_shape(a_pass, bytes_per_voxel, budget, needed.shape)
    grid = UnitGrid(layer, pass_index, needed, shape)
    if grid.count > MAX_GRID_UNITS:
        raise PlanningError(
            f"layer {layer!r}: pass {pass_index + 1} would need {grid.count} work units (at most {MAX_GRID_UNITS}); "
            "is the boundingBox right? Otherwise raise --memory-budget for larger units"
        )
    return grid


def plan_units(
    layer: str,
    pass_index: int,
    a_pass: Pass,
    bbox_mag1: Box,
    bytes_per_voxel: int,
    budget: UnitBudget,
) -> list[WorkUnit]:
    """Every unit of the pass (a dense plan), in index order; for small layers and tests."""
    grid = plan_grid(layer, pass_index, a_pass, bbox_mag1, bytes_per_voxel, budget)
    return grid.units(grid.all_indices())


def seed_runs(indices: np.ndarray, pieces: int) -> np.ndarray:
    """(R, 2) half-open runs `[start, stop)` of consecutive unit indices, long runs
    split so that there are about `pieces` runs or more: compact seeds that still
    spread over the workers (DaskRunner runs one seed's units in one task)."""
    indices = np.asarray(indices, dtype=np.int64)
    if indices.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    run_starts = indices[np.concatenate([[0], breaks])]
    run_stops = indices[np.concatenate([breaks - 1, [indices.size - 1]])] + 1
    longest = max(-(-indices.size // max(pieces, 1)), 1)
    lengths = run_stops - run_starts
    parts = -(-lengths // longest)
    owner = np.repeat(np.arange(len(parts)), parts)
    within = np.arange(int(parts.sum())) - np.repeat(np.cumsum(parts) - parts, parts)
    starts = run_starts[owner] + within * longest
    stops = np.minimum(starts + longest, run_stops[owner])
    return np.stack([starts, stops], axis=1)
