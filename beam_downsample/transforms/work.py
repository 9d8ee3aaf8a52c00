"""One work unit, end to end: read the source box once, reduce level after
level in memory, write each level's part of the layer's region.

Plain Python (no Beam): the DoFn in `transforms` only opens the arrays and
calls `run_unit`; tests call it directly too.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import math
import mmap
import sys
import threading
from typing import Iterator, Sequence

import numpy as np
import tensorstore as ts

from beam_downsample.core.box import Box, disjoint, hull, split_box
from beam_downsample.core.config import PassConfig
from beam_downsample.core.grid import WorkUnit
from beam_downsample.kernels import reduce
from beam_downsample.store import arrays, prefetch, stored, wkw_io


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


def open_pass_arrays(configs: dict) -> tuple[dict, dict, dict]:
    """For each (layer, pass) of `configs`: (source, targets), a probe of the source, and a
    `prefetch.Prefetcher` where the source is remote (else none); every array's metadata is
    read at once (on a bucket one round trip, not one per array).

    The probe answers storage statistics from cached shard indices (the reading handle caches
    nothing), never revalidated: the source does not change during the pass. A remote source
    needs none: its prefetcher reads the indices anyway."""
    context = ts.Context(arrays.context_spec())
    specs = []
    for config in configs.values():
        specs += [config.source_spec, *[level.spec for level in config.levels]]
    opened = iter(arrays.open_arrays(specs, context, open=True))
    pairs, probes, prefetchers = {}, {}, {}
    local = {}
    for key, config in configs.items():
        source = next(opened)
        pairs[key] = (source, [next(opened) for _ in config.levels])
        if prefetch.is_remote(config.source_spec) and config.prefetch_bytes > 0 and prefetch.Prefetcher.supports(source):
            prefetchers[key] = prefetch.Prefetcher(config.source_spec, source)
            probes[key] = source
        elif config.source_spec["driver"] == "wkw":
            probes[key] = source
        else:
            local[key] = config.source_spec
    opened_probes = arrays.open_arrays(list(local.values()), stored.probe_context(), open=True,
                                       recheck_cached_data=False)
    probes.update(zip(local, opened_probes))
    return pairs, probes, prefetchers


def prepare_kernels(config: PassConfig, dtype: np.dtype) -> None:
    """Starts loading the compiled kernels the pass's levels use (see `reduce.prepare`),
    unless the pass has too little work to pay for them (`config.compiled`)."""
    if config.compiled:
        reduce.prepare([(config.reduction, level.factor, dtype) for level in config.levels])


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
        index = arrays.local_index(box, unit_box)
        at = tuple(s.start for s in index[1:])
        reduce.downsample_box(source, source_at, buffer, at, box.shape, level.factor, config.reduction,
                              wait=False, compiled=config.compiled)
        replicate_edges(buffer[index], box, level.region)
        source, source_at = buffer, at


SPLIT_VOXELS = 1 << 18  # a partly stored tile is split down to 64^3 voxels, no further


def halve(box: Box, align: Sequence[int]) -> list[Box]:
    """`box` split in two on the `align` grid across its axis of most aligned cells; [] if it is one cell."""
    cells = [-(-(b - a) // s) for a, b, s in zip(box.start, box.stop, align)]
    axis = max(range(3), key=lambda i: (cells[i], -i))
    if cells[axis] < 2:
        return []
    middle = box.start[axis] + cells[axis] // 2 * align[axis]
    low_stop, high_start = list(box.stop), list(box.start)
    low_stop[axis] = high_start[axis] = middle
    return [Box(box.start, tuple(low_stop)), Box(tuple(high_start), box.stop)]  # type: ignore[arg-type]


def classify_tiles(probe, tiles: Sequence[Box], align: Sequence[int],
                   split_voxels: int = SPLIT_VOXELS) -> Iterator[tuple[Box, bool]]:
    """(tile, stored) pieces covering `tiles` exactly: stored ones are to be read,
    the others hold nothing stored (they read as 0). `probe` is an array (its
    storage statistics are asked) or a `prefetch.Fetched` box (which knows).

    A tile of which only some chunks are stored is halved (on the `align`
    grid, so every piece is still a tile) and its halves asked again, down to
    `split_voxels`: a unit reads the stored chunks of its box and little else,
    however big the unit. The storage statistics of a round are asked at once,
    and its pieces are handed out before the next round is asked, so reading
    starts while the split goes on.
    """
    states = probe.states if isinstance(probe, prefetch.Fetched) else functools.partial(stored.box_states, probe)
    todo = list(tiles)
    while todo:
        split = []
        for tile, state in zip(todo, states(todo)):
            if state == stored.NOTHING:
                yield tile, False
                continue
            halves = halve(tile, align) if state == stored.SOME and tile.voxels > split_voxels else []
            if halves:
                split.extend(halves)
            else:
                yield tile, True
        todo = split


def stored_tiles(probe, tiles: Sequence[Box], align: Sequence[int],
                 split_voxels: int = SPLIT_VOXELS) -> tuple[list[Box], list[Box]]:
    """(tiles to read, tiles with nothing stored) of `classify_tiles`."""
    pieces = list(classify_tiles(probe, tiles, align, split_voxels))
    return [t for t, s in pieces if s], [t for t, s in pieces if not s]


def unit_tiles(config: PassConfig, box: Box) -> list[Box]:
    """The tiles of a unit's `box`: all of it, or for a refresh its disjoint parts inside the
    boxes' source regions (`config.regions`), each level's refreshed voxels having their whole
    footprint there; the level voxels outside are never written."""
    return [tile for part in unit_parts(config, box) for tile in split_box(part, config.tile_alignment,
                                                                           config.tile_voxels)]


def unit_parts(config: PassConfig, box: Box) -> list[Box]:
    """`box`, or for a refresh its disjoint parts inside the boxes' source regions."""
    return disjoint([box.intersect(region) for region in config.regions]) if config.regions else [box]


def source_parts(config: PassConfig, unit: WorkUnit, source, probe=None, prefetcher=None,
                 fetching: concurrent.futures.Executor | None = None) -> Iterator[tuple[object, Iterator]]:
    """The unit's source as (array to read from, its `classify_tiles` pieces), part after part.

    Local source: one part, the source itself, asked tile by tile (`probe`).
    Remote source (`prefetcher`): the unit in boxes of at most
    `config.prefetch_bytes` raw bytes, slabs across x (the slowest axis of a
    shard's storage order, so a box is few byte ranges), each fetched in one
    round of requests on `fetching` while the part before is being decoded
    and reduced. The caller finishes a part's tiles before asking for the
    next, so at most two boxes are in memory.
    """
    if prefetcher is None:
        tiles = unit_tiles(config, unit.box)
        yield source, classify_tiles(probe if probe is not None else source, tiles, config.tile_alignment)
        return
    assert fetching is not None
    parts = [part for part in unit_parts(config, unit.box) if not part.empty]
    if not parts:
        return
    boxes = prefetch_boxes(config, hull(parts), arrays.array_dtype(source))
    pending = fetching.submit(prefetcher.fetch, boxes[0], config.source_region)
    for index, box in enumerate(boxes):
        fetched = pending.result()
        if index + 1 < len(boxes):
            pending = fetching.submit(prefetcher.fetch, boxes[index + 1], config.source_region)
        tiles = unit_tiles(config, box)
        yield fetched.array, classify_tiles(fetched, tiles, config.tile_alignment)
        del fetched


def prefetch_boxes(config: PassConfig, box: Box, dtype: np.dtype) -> list[Box]:
    """`box` in slabs across x (then y, z) of at most `config.prefetch_bytes` raw bytes, on the tile grid."""
    voxels = max(config.prefetch_bytes // (np.dtype(dtype).itemsize * config.channels), 1)
    return split_box(box, config.tile_alignment, voxels, halve=(0, 1, 2))


def run_unit(
    config: PassConfig,
    unit: WorkUnit,
    source,
    targets: Sequence,
    scratch: Scratch | None = None,
    probe=None,
    skip_zeros: bool = False,
    prefetcher=None,
) -> UnitStats:
    """Computes and writes every level of `unit`. Deterministic, so a retry rewrites the same bytes.

    The source box is read and reduced in chunk-aligned tiles by `threads`
    threads (tensorstore and numpy release the GIL, so reads, kernels and
    the other tiles overlap); each level is gathered in a buffer and written
    with one call, so a shard is never rewritten once per tile. Tiles cover
    the unit, so every voxel of the level buffers is overwritten.

    Only the source's stored chunks are read (`classify_tiles`, asking `probe`,
    a handle of the source with cached shard indices; default `source`):
    zeros reduce to zeros with every interpolation (tested). A remote
    source comes through `prefetcher` (`store.prefetch`) in a few large
    boxes, each one round of requests (`source_parts`). With
    `skip_zeros` the target is known to hold nothing in the unit's region
    that this unit would not write again (a fresh mag, or one a crashed run
    of the same plan left), so the zero parts of the levels are neither set
    nor written: only the tiles that hold data are written, in one
    transaction per level (each shard still written once). Writing a unit's
    zeros cost tensorstore more than reducing its data (1.2 s for a mostly
    empty 512 Mi-voxel level, 0.03 s for its data alone). Without it (a
    `--bbox` refresh over old data) every voxel is written. A refresh reads
    and reduces only the unit's parts of its boxes' source regions and writes
    only each level's parts of the boxes (`unit_tiles`, `level.writes`).
    """
    scratch = scratch or Scratch()
    stats = UnitStats()
    unit_levels = level_boxes(config, unit.box)
    dtype = arrays.array_dtype(source)
    prepare_kernels(config, dtype)
    live: list[Box] = []  # tiles reduced into the level buffers
    done: list[Box] = []  # every tile read or left out
    lock = threading.Lock()
    with level_buffers(scratch, config, unit_levels, dtype) as buffers:

        def zero_levels(tile: Box) -> None:
            box = tile
            for buffer, level, unit_box in zip(buffers, config.levels, unit_levels):
                box = box.scaled_down(level.factor)
                buffer[arrays.local_index(box, unit_box)] = 0

        def work_on(reader, tile: Box, is_stored: bool) -> None:
            if not is_stored:
                if not skip_zeros:
                    zero_levels(tile)
                return
            with scratch.borrow("tile", (config.channels, *tile.shape), dtype) as data:
                arrays.read_box(reader, tile, config.channels, out=data)
                with lock:
                    stats.voxels_read += tile.voxels
                # all zero: not reduced (floats: a plain reduction keeps -0.0; one over non-zero voxels gives 0.0)
                if (dtype.kind != "f" or config.reduction != config.interpolation) and not data.any():
                    if not skip_zeros:
                        zero_levels(tile)
                    return
                reduce_tile(config, tile, data, buffers, unit_levels)
                with lock:
                    live.append(tile)

        with contextlib.ExitStack() as stack:
            pool = stack.enter_context(concurrent.futures.ThreadPoolExecutor(config.threads)) \
                if config.threads > 1 else None
            fetching = stack.enter_context(concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="beam-downsample-fetch")) if prefetcher is not None else None
            for reader, pieces in source_parts(config, unit, source, probe, prefetcher, fetching):
                futures = []
                for tile, is_stored in pieces:
                    done.append(tile)
                    if pool is None:
                        work_on(reader, tile, is_stored)
                    else:
                        futures.append(pool.submit(work_on, reader, tile, is_stored))
                for future in futures:
                    future.result()
        if skip_zeros and len(live) < len(done):
            pending, stats.voxels_written = start_tile_writes(config, targets, buffers, unit_levels, live)
        else:
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
        # a refresh writes only the level's parts of its boxes
        boxes = disjoint([written.intersect(box) for box in level.writes] if level.writes else [written])
        voxels += sum(box.voxels for box in boxes)
        if len(boxes) == 1:
            box = boxes[0]
            pending.append(arrays.write_region(target, box, buffer[arrays.local_index(box, unit_box)], keep_reference=True))
        else:
            pending.extend(_write_boxes(target, boxes, buffer, unit_box))
    return pending, voxels


def start_tile_writes(config: PassConfig, targets: Sequence, buffers: Sequence[np.ndarray],
                      unit_levels: Sequence[Box], live: Sequence[Box]) -> tuple[list, int]:
    """Starts the writes of the `live` tiles' parts of every level, one tensorstore
    transaction per level (a shard that several tiles touch is written once, at the
    commit); wkw writes go straight into the staging files. (futures, voxels written)."""
    pending, voxels = [], 0
    for index, (level, target, buffer, unit_box) in enumerate(zip(config.levels, targets, buffers, unit_levels)):
        boxes = []
        for tile in live:
            box = tile
            for previous in config.levels[: index + 1]:
                box = box.scaled_down(previous.factor)
            written = box.intersect(level.region)
            if not written.empty:
                boxes.append(written)
        voxels += sum(box.voxels for box in boxes)
        pending.extend(_write_boxes(target, boxes, buffer, unit_box))
    return pending, voxels


def _write_boxes(target, boxes: Sequence[Box], buffer: np.ndarray, unit_box: Box) -> list:
    """Starts the writes of disjoint `boxes` of a level buffer covering `unit_box`, in one
    tensorstore transaction (a shard that several boxes touch is written once, at the
    commit); wkw writes go straight into the staging files. Returns the futures."""
    if not boxes:
        return []
    transaction = None if isinstance(target, wkw_io.WkwMag) else ts.Transaction()
    view = target if transaction is None else target.with_transaction(transaction)
    writes = [arrays.write_region(view, box, buffer[arrays.local_index(box, unit_box)]) for box in boxes]
    if transaction is None:
        return writes
    for write in writes:
        write.result()  # copied into the transaction; nothing is stored before the commit
    return [transaction.commit_async()]
