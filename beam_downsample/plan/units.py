"""Planning step 4: each pass's unit grid and the units that hold data.

Pass 1's units come from a listing of the source mag; a later pass's are an
upper bound mapped from the pass before (`map_units`), replaced by a
listing of its source once that is written (`plan.job.pass_units`).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import tensorstore as ts

from beam_downsample.core import sizing
from beam_downsample.core.box import Box
from beam_downsample.core.config import PassConfig
from beam_downsample.core.errors import PlanningError
from beam_downsample.core.grid import CHUNK, MAX_GRID_UNITS, SHARD, Pass, UnitBudget, UnitGrid, WorkUnit, source_region
from beam_downsample.core.mags import factor_between
from beam_downsample.plan import refresh
from beam_downsample.plan.passes import LayerPasses
from beam_downsample.store import arrays, prefetch, stored
from beam_downsample.store.properties import Layer

if TYPE_CHECKING:
    from beam_downsample.plan.job import LayerPlan


# Candidate units the launcher checks at planning (a sharded zarr3 array's shard indices, one read
# per stored shard; else storage statistics, ~0.15 ms each locally), so at most ~15 s.
REFINE_LIMIT = 100_000


REFINE_CACHE_BYTES = 256 << 20  # shard indices read once, not once per unit


# A pass reducing fewer source voxels uses the numpy kernels: numba's import and cached-kernel
# load (~0.3-0.5 CPU-s per process) would cost more than they save (numpy's mode: ~200 MVox/s).
COMPILED_MIN_VOXELS = 32 << 20


def layer_units(layer: Layer, chain: LayerPasses,
                budget: UnitBudget) -> tuple[tuple, tuple, tuple, Optional[str], tuple]:
    """Per pass the unit grid, the planned unit indices and the config (whether the pass
    uses the compiled kernels depends on its units); why pass 1 plans every unit, if it does;
    and per pass whether the planned units are exactly those holding data (else an upper bound)."""
    bytes_per_voxel = layer.dtype.itemsize * layer.num_channels
    grids: list[UnitGrid] = []
    planned: list[np.ndarray] = []
    configs: list[PassConfig] = []
    exact: list[bool] = []
    dense_reason = None
    for index, (a_pass, config) in enumerate(zip(chain.passes, chain.configs)):
        refreshes = index < chain.refreshing
        pass_budget = dataclasses.replace(budget, remote=prefetch.is_remote(config.source_spec))
        grid = plan_grid(layer.name, index, a_pass, layer.bbox, bytes_per_voxel, pass_budget)
        if refreshes:
            grid = refresh.refresh_grid(grid, config.regions)
        if index == 0 or index == chain.refreshing:  # the source is a complete mag: list it
            indices, reason, listed_exactly = source_units(config, grid, regions=config.regions)
            if not refreshes:
                dense_reason = reason
        else:  # the pass before has not run yet: what it can have written
            indices, listed_exactly = map_units(grids[-1], planned[-1], chain.passes[index - 1], grid), False
        if refreshes:  # also where the targets hold data, which the edit may have erased; only in the boxes
            indices, target_exactly = refresh_units(config, grid, indices)
            indices = np.intersect1d(indices, refresh.box_units(grid, config.regions))
            listed_exactly = listed_exactly and target_exactly
        grids.append(grid)
        planned.append(indices)
        exact.append(listed_exactly)
        configs.append(dataclasses.replace(
            config, compiled=_voxels(grid, indices, config.regions) >= COMPILED_MIN_VOXELS,
            prefetch_bytes=pass_budget.prefetch_bytes(a_pass, _largest_unit(grid), bytes_per_voxel)))
    return tuple(grids), tuple(planned), tuple(configs), dense_reason, tuple(exact)


def unit_shape(
    a_pass: Pass,
    bytes_per_voxel: int,
    budget: UnitBudget,
    region_shape: Sequence[int],
) -> tuple[int, int, int]:
    """Source-mag voxels per unit: whole coarsest chunks, grown while in budget.

    Units never exceed one shard of the pass's first target mag, so one unit
    writes each level with one call into one shard. The shortest axis grows
    first (of two equally long, x). For a remote source z grows first until
    the unit spans a shard's depth (or the region's), then y, then x: a shard
    stores its chunks x slowest (c, x, y, z), so such a unit is one contiguous
    run of each shard, fetched in one request per box (store.prefetch); and a
    remote unit grows only while it is fetched in at most
    `UnitBudget.MAX_FETCHED_BOXES` boxes.
    """
    if budget.remote:
        def order(axis: int) -> tuple:  # z, y, x, each until it spans a shard; then the same again
            return (shape[axis] >= min(needed[axis], SHARD), -axis)
    else:
        def order(axis: int) -> tuple:
            return (shape[axis],)
    factor = factor_between(a_pass.source_mag, a_pass.coarsest)
    first = factor_between(a_pass.source_mag, a_pass.target_mags[0])
    shape = [CHUNK * f for f in factor]
    limit = [SHARD * f for f in first]
    # Never grow past what the region needs (rounded up to the alignment).
    needed = [max(-(-r // s) * s, s) for r, s in zip(region_shape, shape)]
    grown = True
    while grown:
        grown = False
        for axis in sorted(range(3), key=order):
            candidate = list(shape)
            candidate[axis] *= 2
            if (
                shape[axis] < needed[axis]
                and candidate[axis] <= limit[axis]
                and budget.fits(a_pass, candidate, bytes_per_voxel)
            ):
                shape = candidate
                grown = True
                break
    return tuple(shape)  # type: ignore[return-value]


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


def source_units(config: PassConfig, grid: UnitGrid, refine: bool = True,
                 regions: Sequence[Box] = ()) -> tuple[np.ndarray, Optional[str], bool]:
    """The grid's units whose source box holds stored data, from one listing of the
    source mag: (indices, None, exact), or (every index, why, True) where a listing cannot
    tell; `exact` False: some of them may hold nothing (`stored_units`). With `regions`
    (a refresh's boxes) only data inside them counts."""
    try:
        indices, exact = stored_units(config.source_spec, grid, refine=refine, regions=regions)
        return indices, None, exact
    except stored.Dense as reason:
        return grid.all_indices(), str(reason), True


# Shard indices planning reads to find the units that hold data: at most 64 MiB (128 shards of 32^3
# chunks in 1024^3, the reference layout). Beyond that the workers answer it: each reads the indices
# of its unit's shards anyway and skips a unit over empty space.
PLAN_INDEX_BYTES = 64 << 20


def stored_units(spec: dict, grid: UnitGrid, factor=(1, 1, 1), refine: bool = True,
                 regions: Sequence[Box] = ()) -> tuple[np.ndarray, bool]:
    """The grid's units whose box holds stored data in the array of `spec` (`factor` times
    coarser than the grid's voxels), from one listing of its keys; raises stored.Dense.
    With `regions` (grid voxels) only stored data inside them counts.
    Returns (indices, exact): not exact where some stored keys (a 1024^3 shard, a wkw file)
    cover several units and were not looked into, so that some units may hold nothing.

    Where keys cover several units and the candidates are few, a sharded zarr3 array
    lists the chunks each stored shard holds (one read of its index), if those indices
    are at most PLAN_INDEX_BYTES; a local array of other layouts checks each candidate
    with tensorstore's storage statistics (no data read), all at once (on a bucket they
    cost object-metadata requests per candidate: not done).
    """
    factor = np.array(factor)
    array, starts, stops = (None, *stored.stored_boxes(spec)) if spec["driver"] == "wkw" else stored.listed(spec)
    piece_starts, piece_stops, keys = _inside(starts * factor, stops * factor, regions)
    indices = grid.overlapping(piece_starts, piece_stops)
    if not grid.spans_several(piece_starts, piece_stops):
        return indices, True
    if not refine or not 0 < len(indices) <= REFINE_LIMIT or spec["driver"] == "wkw":
        return indices, False
    index_bytes = stored.shard_index_bytes(array) if spec["driver"] == "zarr3" else None
    if index_bytes is not None:
        shards = starts[np.unique(keys)]
        if len(shards) * index_bytes > PLAN_INDEX_BYTES:
            return indices, False
        chunks = stored.stored_chunk_boxes(spec, shards, array)
        if chunks is not None:
            return grid.overlapping(*_inside(chunks[0] * factor, chunks[1] * factor, regions)[:2]), True
    if prefetch.is_remote(spec):
        return indices, False
    return _refine(spec, grid, indices, factor), True


def _inside(starts: np.ndarray, stops: np.ndarray, regions: Sequence[Box],
            block: int = 1 << 14) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(starts, stops, box index) of the non-empty intersections of the boxes `[starts, stops)`
    (N, 3) with `regions`; every box as it is (index = its row) where there are no regions.
    Vectorised in blocks of boxes, so memory follows the block and the pieces found."""
    starts, stops = np.asarray(starts, dtype=np.int64).reshape(-1, 3), np.asarray(stops, dtype=np.int64).reshape(-1, 3)
    if not regions:
        return starts, stops, np.arange(len(starts))
    low = np.array([r.start for r in regions], dtype=np.int64)[None]
    high = np.array([r.stop for r in regions], dtype=np.int64)[None]
    found: list[tuple] = []
    for first in range(0, len(starts), block):
        a = np.maximum(starts[first:first + block, None], low)
        b = np.minimum(stops[first:first + block, None], high)
        rows, columns = np.nonzero(np.all(b > a, axis=2))
        found.append((a[rows, columns], b[rows, columns], rows + first))
    if not found:
        return np.zeros((0, 3), np.int64), np.zeros((0, 3), np.int64), np.zeros(0, np.int64)
    return tuple(np.concatenate(parts) for parts in zip(*found))  # type: ignore[return-value]


def _refine(spec: dict, grid: UnitGrid, indices: np.ndarray, factor) -> np.ndarray:
    """The units `indices` whose box holds something stored, by storage statistics."""
    context = ts.Context({"cache_pool": {"total_bytes_limit": REFINE_CACHE_BYTES}})
    # The array is complete and unchanging: cached shard indices are used without revalidation
    # (on GCS each revalidation is a request: 33,308 GETs to plan 164 units, benchmarks/gcs_requests.py).
    array = arrays.open_array(spec, context, open=True, recheck_cached_data=False)
    starts, stops = grid.boxes(indices)
    starts, stops = starts // factor, -(-stops // factor)
    futures = [
        array[arrays.region_index(Box(tuple(a), tuple(b)))].storage_statistics(query_not_stored=True)
        for a, b in zip(starts.tolist(), stops.tolist())
    ]
    try:
        keep = np.array([not future.result().not_stored for future in futures], dtype=bool)
    except ValueError:  # e.g. a corrupt shard index: its units run and fail with the reason, in one line
        return indices
    return indices[keep]


def refresh_units(config: PassConfig, grid: UnitGrid, source: np.ndarray) -> tuple[np.ndarray, bool]:
    """A refresh pass's units: where its source holds data (`source`), and where its first
    target mag holds data, which must be cleared if the edit erased it (one listing, then
    the shard indices or storage statistics of the candidates), so a big box over a sparse
    layer stays cheap.

    The first target mag suffices: zeros reduce to zeros with every interpolation, so a
    voxel of a coarser mag that is not 0 has a voxel that is not 0 in its footprint in
    each finer mag (outside the box a refresh trusts the existing mags anyway)."""
    level = config.levels[0]
    try:
        target, exact = stored_units(level.spec, grid, level.factor, regions=config.regions)
    except stored.Dense:
        return grid.all_indices(), True
    return np.union1d(source, target), exact


def map_units(previous: UnitGrid, indices: np.ndarray, previous_pass: Pass, grid: UnitGrid) -> np.ndarray:
    """Units of the next pass that the previous pass's units `indices` can have written into
    (an upper bound, by arithmetic: nothing is listed)."""
    starts, stops = previous.boxes(indices)
    factor = np.array(factor_between(previous_pass.source_mag, previous_pass.coarsest))
    return grid.overlapping(starts // factor, -(-stops // factor))


def _voxels(grid: UnitGrid, indices: np.ndarray, regions: Sequence[Box] = ()) -> int:
    """Source voxels the units read at most: their boxes, or their parts inside `regions` (a refresh)."""
    starts, stops, _ = _inside(*grid.boxes(indices), regions)
    return int(np.prod(stops - starts, axis=1).sum()) if len(starts) else 0


def units_work(plans: Sequence[LayerPlan], index: int, indices: Sequence[np.ndarray]) -> float:
    """Estimated CPU-s of pass `index`'s units `indices` (per active layer), from their voxels
    and sizing's per-voxel cost of each layer's voxel type."""
    work = []
    for plan, chosen in zip(plans, indices):
        voxels = _voxels(plan.grids[index], chosen, plan.configs[index].regions)
        work.append((voxels, plan.layer.dtype.itemsize * plan.layer.num_channels))
    return sizing.work_seconds(work)


def unit_memory(plan: LayerPlan, index: int) -> float:
    """Estimated peak memory of the pass's largest unit (the model that sized the units)."""
    config = plan.configs[index]
    budget = UnitBudget(bytes=0, threads=config.threads, tile_voxels=config.tile_voxels,
                        remote=config.prefetch_bytes > 0)
    bytes_per_voxel = plan.layer.dtype.itemsize * plan.layer.num_channels
    return budget.unit_bytes(plan.passes[index], _largest_unit(plan.grids[index]), bytes_per_voxel,
                             config.prefetch_bytes or None)


def _largest_unit(grid: UnitGrid) -> tuple[int, ...]:
    """Per axis the longest unit (cells clipped to the region); the axes are independent."""
    largest = []
    for axis in range(3):
        size, start, stop = grid.shape[axis], grid.region.start[axis], grid.region.stop[axis]
        first_end = min((start // size + 1) * size, stop)
        last_start = max((-(-stop // size) - 1) * size, start)
        longest = max(first_end - start, stop - last_start)
        if grid.counts[axis] > 2:
            longest = size
        largest.append(longest)
    return tuple(largest)
