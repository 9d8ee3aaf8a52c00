"""One work unit, end to end: read the source box once, reduce level after
level in memory, write each level's part of the layer's region.

Plain Python (no Beam): the DoFn in `transforms` only opens the arrays and
calls `run_unit`; tests call it directly too.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import math
import mmap
import os
import sys
import threading
from typing import Sequence

import numpy as np

from beam_downsample import io, planning, reduce, storage, stored
from beam_downsample.mags import Mag
from beam_downsample.planning import Box, WorkUnit


@dataclasses.dataclass(frozen=True)
class LevelConfig:
    mag: Mag
    factor: Mag  # from the level before (or the pass's source)
    region: Box  # the layer's bounding box aligned outward, in this mag's voxels
    spec: dict  # tensorstore spec of the (already created) target array


@dataclasses.dataclass(frozen=True)
class PassConfig:
    """Everything a worker needs for one pass of one layer: plain, picklable data."""

    layer: str
    pass_index: int
    source_mag: Mag
    source_spec: dict
    source_region: Box  # the bounding box aligned outward, in source-mag voxels
    channels: int
    interpolation: str
    levels: tuple[LevelConfig, ...]
    marker_dir: str  # done-markers of this pass's units live here
    tile_alignment: tuple[int, int, int] = (32, 32, 32)
    threads: int = 1
    tile_voxels: int = 16 << 20


@dataclasses.dataclass
class UnitStats:
    voxels_read: int = 0
    voxels_written: int = 0


class Scratch:
    """Big buffers lent out again and again, to tiles and to units.

    Fresh memory costs a page fault per 4 KiB page; reading a tile into a
    reused buffer took a third less CPU than into a new one. Holds at most
    as many buffers as were ever borrowed at once, which the memory budget
    already counts for every unit.
    """

    def __init__(self):
        self._free: dict[str, list[np.ndarray]] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def borrow(self, kind: str, shape: Sequence[int], dtype: np.dtype):
        """An uninitialised Fortran-order array of `shape`, returned to the pool on exit."""
        need = math.prod(shape) * np.dtype(dtype).itemsize
        with self._lock:
            free = self._free.setdefault(kind, [])
            flat = None
            while free and flat is None:
                flat = free.pop()
                if sys.getrefcount(flat) > 2:  # (this name, the call's argument) + a view alive somewhere,
                    flat = None  # e.g. a write that references it: never lent again, freed with the last view
        if flat is None or flat.nbytes < need:
            flat = small_page_buffer(need)
        try:
            yield np.ndarray(tuple(shape), dtype=dtype, buffer=flat, order="F")
        finally:
            with self._lock:
                self._free[kind].append(flat)


def small_page_buffer(nbytes: int) -> np.ndarray:
    """A fresh uint8 buffer in 4 KiB pages (anonymous mmap, MADV_NOHUGEPAGE).

    numpy asks for transparent huge pages on large arrays; the first touch of
    each 2 MiB page is zeroed in one go and, on machines short of free
    contiguous memory (VMs, long-running hosts), waits for compaction. On
    the bench that first touch of the level and tile buffers took ~19 % of
    the run's CPU time. Freed (munmap) when the last array on it goes.
    """
    if nbytes < (1 << 20) or not hasattr(mmap, "MADV_NOHUGEPAGE"):
        return np.empty(max(nbytes, 1), dtype=np.uint8)
    memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    memory.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(memory, dtype=np.uint8)


def replicate_edges(data: np.ndarray, box: Box, region: Box) -> None:
    """Overwrites the voxels of `data` (covering `box`) outside `region` with the
    nearest voxel inside it, so border blocks are reduced from the layer's own
    voxels only, as the reference does (no darkened borders)."""
    for axis in range(3):
        low = region.start[axis] - box.start[axis]
        high = region.stop[axis] - box.start[axis]
        size = data.shape[axis + 1]
        if low >= size or high <= 0:
            continue  # no voxel of the region here: nothing to replicate from
        index: list = [slice(None)] * 4
        if low > 0:
            index[axis + 1] = slice(0, low)
            source = [slice(None)] * 4
            source[axis + 1] = slice(low, low + 1)
            data[tuple(index)] = data[tuple(source)]
        if high < size:
            index[axis + 1] = slice(high, None)
            source = [slice(None)] * 4
            source[axis + 1] = slice(high - 1, high)
            data[tuple(index)] = data[tuple(source)]


def prepare_kernels(config: PassConfig, dtype: np.dtype) -> None:
    """Starts loading the compiled kernels the pass's levels use (see `reduce.prepare`)."""
    reduce.prepare([(config.interpolation, level.factor, dtype) for level in config.levels])


def level_boxes(config: PassConfig, box: Box) -> list[Box]:
    """`box` in each level's voxels, in the order the pass makes the levels."""
    boxes = []
    for level in config.levels:
        box = box.scaled_down(level.factor)
        boxes.append(box)
    return boxes


def reduce_tile(config: PassConfig, tile: Box, data: np.ndarray, buffers: Sequence[np.ndarray], unit_levels: Sequence[Box]) -> None:
    """Reduces one tile through every level of the pass into the unit's level buffers."""
    replicate_edges(data, tile, config.source_region)
    box, source, source_at = tile, data, (0, 0, 0)
    for level, buffer, unit_box in zip(config.levels, buffers, unit_levels):
        box = box.scaled_down(level.factor)
        # Reduced straight into the level buffer, which is also the next level's
        # input; replicating there is harmless: only voxels inside the region are written.
        index = io.local_index(box, unit_box)
        at = tuple(s.start for s in index[1:])
        reduce.downsample_box(source, source_at, buffer, at, box.shape, level.factor, config.interpolation, wait=False)
        replicate_edges(buffer[index], box, level.region)
        source, source_at = buffer, at


def run_unit(
    config: PassConfig,
    unit: WorkUnit,
    source,
    targets: Sequence,
    scratch: Scratch | None = None,
) -> UnitStats:
    """Computes and writes every level of `unit`. Deterministic, so a retry rewrites the same bytes.

    The source box is read and reduced in chunk-aligned tiles by `threads`
    threads (tensorstore and numpy release the GIL, so reads, kernels and
    the other tiles overlap); each level is gathered in a buffer and written
    with one call, so a shard is never rewritten once per tile. Tiles cover
    the unit, so every voxel of the level buffers is overwritten.
    """
    scratch = scratch or Scratch()
    stats = UnitStats(voxels_read=unit.box.voxels)
    unit_levels = level_boxes(config, unit.box)
    dtype = io.array_dtype(source)
    prepare_kernels(config, dtype)
    tiles = planning.split_box(unit.box, config.tile_alignment, config.tile_voxels)
    with level_buffers(scratch, config, unit_levels, dtype) as buffers:

        def zero_levels(tile: Box) -> None:
            box = tile
            for buffer, level, unit_box in zip(buffers, config.levels, unit_levels):
                box = box.scaled_down(level.factor)
                buffer[io.local_index(box, unit_box)] = 0

        def work_on(tile: Box) -> None:
            # Zeros reduce to zeros with every interpolation (tested): a tile with nothing
            # stored is not read (~10x cheaper), an all-zero one is not reduced.
            if stored.box_not_stored(source, tile):
                zero_levels(tile)
                return
            with scratch.borrow("tile", (config.channels, *tile.shape), dtype) as data:
                io.read_box(source, tile, config.channels, out=data)
                if dtype.kind != "f" and not data.any():  # (floats: -0.0 must stay -0.0)
                    zero_levels(tile)
                    return
                reduce_tile(config, tile, data, buffers, unit_levels)

        if config.threads <= 1 or len(tiles) == 1:
            for tile in tiles:
                work_on(tile)
        else:
            with concurrent.futures.ThreadPoolExecutor(config.threads) as pool:
                for future in [pool.submit(work_on, tile) for tile in tiles]:
                    future.result()
        pending, stats.voxels_written = start_level_writes(config, targets, buffers, unit_levels)
        for future in pending:
            future.result()
    return stats


@contextlib.contextmanager
def level_buffers(scratch: Scratch, config: PassConfig, unit_levels: Sequence[Box], dtype: np.dtype):
    """One borrowed buffer per level of the unit, returned to `scratch` on exit."""
    with contextlib.ExitStack() as stack:
        yield [
            stack.enter_context(scratch.borrow(f"level{i}", (config.channels, *b.shape), dtype))
            for i, b in enumerate(unit_levels)
        ]


def start_level_writes(config: PassConfig, targets: Sequence, buffers: Sequence[np.ndarray],
                       unit_levels: Sequence[Box]) -> tuple[list, int]:
    """Starts one write per level (the unit's part of the layer's region); (futures, voxels written)."""
    pending, voxels = [], 0
    for level, target, buffer, unit_box in zip(config.levels, targets, buffers, unit_levels):
        written = unit_box.intersect(level.region)
        if written.empty:
            continue
        pending.append(io.write_region(target, written, buffer[io.local_index(written, unit_box)], keep_reference=True))
        voxels += written.voxels
    return pending, voxels
