"""Passes, work units and the unit grid: which boxes of which mags a pass reads and writes.

Pure arithmetic, no I/O and no Beam: planning (`plan`) builds grids from
the dataset, workers (`transforms`) expand unit indices with them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Optional, Sequence

import numpy as np

from beam_downsample.core.box import Box, region_in_mag
from beam_downsample.core.errors import PlanningError
from beam_downsample.core.mags import Mag, factor_between


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
    remote: bool = False  # the source is behind an object store: encoded chunks are fetched ahead

    # A tile in flight holds its data plus the kernels' temporaries.
    TILE_OVERHEAD = 3
    BUFFER_COPIES = 2
    # A remote unit is fetched in at most this many boxes: a larger unit would leave boxes so small
    # that it saved fewer requests (markers, target shards) than its boxes cost (source ranges).
    MAX_FETCHED_BOXES = 4

    def unit_bytes(self, a_pass: Pass, shape: Sequence[int], bytes_per_voxel: int,
                   prefetch_bytes: Optional[int] = None) -> float:
        """Peak bytes of a unit of `shape` source voxels: level buffers plus tiles in flight, plus
        for a remote source the encoded chunks in memory (`prefetch_bytes`, default one tile's
        worth): one box being decoded and the next being fetched, each counted at its raw size
        (compressed data is never larger, give or take a frame header)."""
        voxels = math.prod(shape)
        buffers = sum(voxels / math.prod(factor_between(a_pass.source_mag, m)) for m in a_pass.target_mags)
        tile = self.tile(a_pass, shape)
        # Level buffers count twice: tensorstore copies what it writes until encoded.
        peak = (self.BUFFER_COPIES * buffers + self.threads * tile * self.TILE_OVERHEAD) * bytes_per_voxel
        if self.remote:
            box = tile * bytes_per_voxel if prefetch_bytes is None else prefetch_bytes
            peak += min(2 * box, voxels * bytes_per_voxel)
        return peak

    def fits(self, a_pass: Pass, shape: Sequence[int], bytes_per_voxel: int) -> bool:
        """A unit of `shape` is in budget (and, remote, fetched in at most MAX_FETCHED_BOXES boxes)."""
        if self.unit_bytes(a_pass, shape, bytes_per_voxel) > self.bytes:
            return False
        raw = math.prod(shape) * bytes_per_voxel
        return not self.remote or self.prefetch_bytes(a_pass, shape, bytes_per_voxel) * self.MAX_FETCHED_BOXES >= raw

    def tile(self, a_pass: Pass, shape: Sequence[int]) -> int:
        """Voxels of the largest tile of a unit of `shape`."""
        return max(min(self.tile_voxels, math.prod(shape)), math.prod(tile_alignment(a_pass)))

    def prefetch_bytes(self, a_pass: Pass, shape: Sequence[int], bytes_per_voxel: int) -> int:
        """Raw bytes per fetched box of a unit of `shape` (the largest of its pass): what the budget
        leaves for two boxes, at least one tile's worth (the model's minimum); 0 for a local source."""
        if not self.remote:
            return 0
        local = dataclasses.replace(self, remote=False).unit_bytes(a_pass, shape, bytes_per_voxel)
        return int(max(self.tile(a_pass, shape) * bytes_per_voxel, (self.bytes - local) // 2))


def tile_alignment(a_pass: Pass) -> tuple[int, int, int]:
    """Tiles start on whole source chunks and whole blocks of the pass's coarsest mag."""
    factor = factor_between(a_pass.source_mag, a_pass.coarsest)
    return tuple(max(CHUNK, f) for f in factor)  # type: ignore[return-value]


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

    def spans_several(self, starts: np.ndarray, stops: np.ndarray) -> bool:
        """True if any of the boxes `[starts, stops)` (clipped to the region) overlaps more than one unit."""
        starts = np.maximum(np.asarray(starts, dtype=np.int64).reshape(-1, 3), np.array(self.region.start))
        stops = np.minimum(np.asarray(stops, dtype=np.int64).reshape(-1, 3), np.array(self.region.stop))
        keep = np.all(stops > starts, axis=1)
        shape = np.array(self.shape)
        return bool(np.any(starts[keep] // shape != (stops[keep] - 1) // shape))

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
