"""Plans a job: per layer the mags, the passes, each pass's unit grid and planned units,
from the properties and listings of what is stored. Writes nothing: everything is
checked here before the first byte is written (`job` runs the plan).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

import numpy as np
import tensorstore as ts

from beam_downsample import io, locks, planning, reduce, refresh, sizing, storage, stored
from beam_downsample.machine import available_cores
from beam_downsample.mags import Mag, factor_between, mag_name, sort_mags
from beam_downsample.planning import Box, Pass, UnitGrid, WorkUnit
from beam_downsample.properties import PROPERTIES_FILE, Dataset, DatasetError, Layer
from beam_downsample.work import LevelConfig, PassConfig

STATE_DIR = io.STATE_DIR


WORKER_OVERHEAD_BYTES = sizing.PROCESS_BYTES  # interpreter, Beam, tensorstore and its pools


DEFAULT_MEMORY_BUDGET = 2 << 30


@dataclasses.dataclass(frozen=True)
class JobOptions:
    sampling_mode: str = "anisotropic"
    layer_name: Optional[str] = None
    coarsest_mag: Optional[Mag] = None
    interpolation: Optional[str] = None
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    jobs: int = 1  # worker processes the units are sized for; 0: the launcher runs the units itself
    # Cluster workers (not on this machine) run one unit at a time each, with this much memory and these cores.
    worker_memory: Optional[int] = None
    worker_cores: Optional[int] = None
    bbox: Optional[Box] = None  # `--bbox` (mag-1 voxels): refresh the existing mags inside it (`refresh`)


# Candidate units the launcher checks at planning (a sharded zarr3 array's shard indices, one read
# per stored shard; else storage statistics, ~0.15 ms each locally), so at most ~15 s.
REFINE_LIMIT = 100_000


REFINE_CACHE_BYTES = 256 << 20  # shard indices read once, not once per unit


# A pass reducing fewer source voxels uses the numpy kernels: numba's import and cached-kernel
# load (~0.3-0.5 CPU-s per process) would cost more than they save (numpy's mode: ~200 MVox/s).
COMPILED_MIN_VOXELS = 32 << 20


@dataclasses.dataclass(frozen=True, eq=False)
class LayerPlan:
    """Per pass: the unit grid (arithmetic) and the planned unit indices.

    Pass 1's indices come from a listing of the source mag (the units that
    hold data); a later pass's are an upper bound mapped from the pass
    before, replaced by a listing of its source once that is written.
    """

    layer: Layer
    target_mags: tuple[Mag, ...]
    passes: tuple[Pass, ...]
    grids: tuple[UnitGrid, ...]  # per pass
    planned: tuple[np.ndarray, ...]  # per pass: sorted unit indices
    configs: tuple[PassConfig, ...]  # per pass
    dense_reason: Optional[str] = None  # why pass 1 plans every unit
    refresh_box: Optional[Box] = None  # `--bbox` within the layer; its passes with `config.refresh` refresh it

    @property
    def units(self) -> tuple[tuple[WorkUnit, ...], ...]:
        """The planned units as objects (small layers and tests only: this enumerates them)."""
        return tuple(tuple(grid.units(indices)) for grid, indices in zip(self.grids, self.planned))


def unit_budget(options: JobOptions) -> planning.UnitBudget:
    """What one work unit may hold, so that all workers plus the launcher fit the budget
    (the rules are `sizing`'s).

    Each process reduces tiles on its share of the cores plus one thread, so
    that reading one tile overlaps reducing another. A cluster worker has its
    own memory and cores and runs one unit at a time.
    """
    if options.worker_memory is not None:
        per_worker = max(options.worker_memory - WORKER_OVERHEAD_BYTES, sizing.MIN_UNIT_BYTES)
        threads = (options.worker_cores or 1) + 1
    else:
        workers = max(options.jobs, 0)
        per_worker = sizing.unit_bytes(options.memory_budget, workers)
        threads = sizing.threads(available_cores(), workers)
    return planning.UnitBudget(bytes=per_worker, threads=threads, tile_voxels=sizing.tile_voxels(per_worker, threads))


def check_writable(dataset_path: str, layer_names: Sequence[str]) -> None:
    """The properties and every layer directory must be writable before we start.

    On GCS, permissions show only when writing: the lock is the first write.
    """
    for path in [dataset_path] + [os.path.join(dataset_path, name) for name in layer_names]:
        if os.path.isdir(path) and not os.access(path, os.W_OK | os.X_OK):
            raise DatasetError(f"{path} is not writable: new mags and the properties cannot be written")


def pass_dir_name(a_pass: Pass, interpolation: str) -> str:
    """Markers are only reused by a rerun that would write the same voxels."""
    mags = mag_name(a_pass.source_mag) + "_to_" + "_".join(mag_name(m) for m in a_pass.target_mags)
    return f"{mags}_{interpolation}"


def plan_job(dataset: Dataset, options: JobOptions) -> list[LayerPlan]:
    """Plans every selected layer; raises DatasetError/PlanningError/RefreshError before touching anything."""
    layers = [dataset.layer(options.layer_name)] if options.layer_name else list(dataset.layers)
    check_writable(dataset.path, [layer.name for layer in layers])
    for layer in layers:
        io.check_source_array(layer, dataset.path, _source_mag(layer, options))
    if options.bbox is None:
        align_with = set(dataset.all_mags())
    else:  # as if the refreshed layers' pyramids were deleted and made again
        align_with = refresh.align_with(dataset.layers, [layer.name for layer in layers])
    plans = []
    budget = unit_budget(options)
    for layer in layers:
        source = _source_mag(layer, options)
        sampling_mode = "constant_z" if layer.bbox.shape[2] == 1 else options.sampling_mode
        coarsest = options.coarsest_mag or planning.default_coarsest_mag(*layer.bbox.shape[:2])
        try:
            targets = planning.plan_mags(source, coarsest, sampling_mode, dataset.voxel_size, align_with)
        except planning.PlanningError as error:
            raise planning.PlanningError(f"layer {layer.name!r}: {error}") from None
        align_with.update(targets)  # the reference plans layers one after another
        interpolation = options.interpolation or reduce.DEFAULT_INTERPOLATION[layer.category]
        bytes_per_voxel = layer.dtype.itemsize * layer.num_channels
        box, refreshing = None, 0
        if options.bbox is None:
            passes = planning.group_passes(source, targets, bytes_per_voxel, budget)
        else:
            box = refresh.layer_box(options.bbox, layer)
            kept, made = refresh.split_chain(layer, source, targets)
            _check_refreshable(dataset, layer, source)
            first = planning.group_passes(source, kept, bytes_per_voxel, budget)
            passes = first + planning.group_passes(kept[-1] if kept else source, made, bytes_per_voxel, budget)
            refreshing = len(first)
        grids, planned, configs = [], [], []
        dense_reason = None
        for index, a_pass in enumerate(passes):
            refreshes = index < refreshing
            grid = planning.plan_grid(layer.name, index, a_pass, layer.bbox, bytes_per_voxel, budget)
            if refreshes:
                grid = refresh.refresh_grid(grid, a_pass, box)
            config = _pass_config(dataset, layer, index, a_pass, interpolation, budget, box if refreshes else None)
            if index == 0 or index == refreshing:  # the source is a complete mag: list it
                indices, reason = source_units(config, grid)
                if not refreshes:
                    dense_reason = reason
            else:  # the pass before has not run yet: what it can have written
                indices = map_units(grids[-1], planned[-1], passes[index - 1], grid)
            if refreshes:  # also where the targets hold data, which the edit may have erased
                indices = refresh_units(config, grid, indices)
            grids.append(grid)
            planned.append(indices)
            configs.append(dataclasses.replace(config, compiled=_voxels(grid, indices) >= COMPILED_MIN_VOXELS))
        plan = LayerPlan(layer, tuple(targets), tuple(passes), tuple(grids), tuple(planned), tuple(configs),
                         dense_reason, box)
        _check_worker_memory(plan, options)
        plans.append(plan)
    check_write_paths(dataset, plans)
    return plans


def _source_mag(layer: Layer, options: JobOptions) -> Mag:
    """A run continues from the coarsest mag; a refresh recomputes from the finest (the edited one)."""
    return layer.source_mag if options.bbox is None else refresh.finest_mag(layer)


def _check_refreshable(dataset: Dataset, layer: Layer, source: Mag) -> None:
    """Every mag a refresh writes or replaces is the layer's own `TARGET/<layer>/<mag>`, and
    each one opens with the layer's dtype and channels (wkw: in the layout we write)."""
    for mag in sort_mags(layer.mags):
        if mag == source:
            continue
        path = io.new_mag_path(layer, dataset.path, mag)
        if storage.normpath(layer.mag_path(dataset.path, mag)) != path:
            raise refresh.RefreshError(
                f"layer {layer.name!r} mag {mag_name(mag)} is stored at {layer.mag_path(dataset.path, mag)}, "
                f"not at {path}: --bbox only rewrites mags in the layer's own directory"
            )
        io.check_source_array(layer, dataset.path, mag)
        if layer.data_format == "wkw":
            io.check_wkw_layout(layer, dataset.path, mag)


def _check_worker_memory(plan: LayerPlan, options: JobOptions) -> None:
    """A cluster worker whose memory cannot hold even the smallest unit would be killed
    again and again (SLURM's --mem, the dask nanny): refuse before submitting anything."""
    if options.worker_memory is None:
        return
    for index in range(len(plan.passes)):
        need = WORKER_OVERHEAD_BYTES + _unit_memory(plan, index)
        if need > options.worker_memory:
            raise planning.PlanningError(
                f"layer {plan.layer.name!r} pass {index + 1}: a worker needs about {need / (1 << 20):.0f} MiB "
                f"(~{WORKER_OVERHEAD_BYTES >> 20} MiB for itself plus its work unit), more than the "
                f"{options.worker_memory / (1 << 20):.0f} MiB of one worker; raise mem in --job-resources "
                "(or --memory-budget where there is no mem)"
            )


def source_units(config: PassConfig, grid: UnitGrid, refine: bool = True) -> tuple[np.ndarray, Optional[str]]:
    """The grid's units whose source box holds stored data, from one listing of the
    source mag: (indices, None), or (every index, why) where a listing cannot tell."""
    try:
        return stored_units(config.source_spec, grid, refine=refine), None
    except stored.Dense as reason:
        return grid.all_indices(), str(reason)


def stored_units(spec: dict, grid: UnitGrid, factor=(1, 1, 1), refine: bool = True) -> np.ndarray:
    """The grid's units whose box holds stored data in the array of `spec` (`factor` times
    coarser than the grid's voxels), from one listing of its keys; raises stored.Dense.

    Where a stored key covers several units (a 1024^3 shard, a wkw file) and the
    candidates are few, a sharded zarr3 array lists the chunks each stored shard
    holds (one read of its index), others check each candidate with tensorstore's
    storage statistics (no data read), all at once.
    """
    factor = np.array(factor)
    starts, stops = stored.stored_boxes(spec)
    indices = grid.overlapping(starts * factor, stops * factor)
    if not refine or not 0 < len(indices) <= REFINE_LIMIT or spec["driver"] == "wkw":
        return indices
    chunks = stored.stored_chunk_boxes(spec, starts) if spec["driver"] == "zarr3" else None
    if chunks is not None:
        return grid.overlapping(chunks[0] * factor, chunks[1] * factor)
    return _refine(spec, grid, indices, factor)


def _refine(spec: dict, grid: UnitGrid, indices: np.ndarray, factor) -> np.ndarray:
    """The units `indices` whose box holds something stored, by storage statistics."""
    context = ts.Context({"cache_pool": {"total_bytes_limit": REFINE_CACHE_BYTES}})
    # The array is complete and unchanging: cached shard indices are used without revalidation
    # (on GCS each revalidation is a request: 33,308 GETs to plan 164 units, benchmarks/gcs_requests.py).
    array = io.open_array(spec, context, open=True, recheck_cached_data=False)
    starts, stops = grid.boxes(indices)
    starts, stops = starts // factor, -(-stops // factor)
    futures = [
        array[io.region_index(planning.Box(tuple(a), tuple(b)))].storage_statistics(query_not_stored=True)
        for a, b in zip(starts.tolist(), stops.tolist())
    ]
    try:
        keep = np.array([not future.result().not_stored for future in futures], dtype=bool)
    except ValueError:  # e.g. a corrupt shard index: its units run and fail with the reason, in one line
        return indices
    return indices[keep]


def refresh_units(config: PassConfig, grid: UnitGrid, source: np.ndarray) -> np.ndarray:
    """A refresh pass's units: where its source holds data (`source`), and where its first
    target mag holds data, which must be cleared if the edit erased it (one listing, then
    the shard indices or storage statistics of the candidates), so a big box over a sparse
    layer stays cheap.

    The first target mag suffices: zeros reduce to zeros with every interpolation, so a
    voxel of a coarser mag that is not 0 has a voxel that is not 0 in its footprint in
    each finer mag (outside the box a refresh trusts the existing mags anyway)."""
    level = config.levels[0]
    try:
        target = stored_units(level.spec, grid, level.factor)
    except stored.Dense:
        return grid.all_indices()
    return np.union1d(source, target)


def map_units(previous: UnitGrid, indices: np.ndarray, previous_pass: Pass, grid: UnitGrid) -> np.ndarray:
    """Units of the next pass that the previous pass's units `indices` can have written into
    (an upper bound, by arithmetic: nothing is listed)."""
    starts, stops = previous.boxes(indices)
    factor = np.array(factor_between(previous_pass.source_mag, previous_pass.coarsest))
    return grid.overlapping(starts // factor, -(-stops // factor))


def _pass_config(
    dataset: Dataset, layer: Layer, index: int, a_pass: Pass, interpolation: str, budget: planning.UnitBudget,
    box: Optional[Box] = None,
) -> PassConfig:
    """`box`: this pass refreshes the existing target mags inside it (mag-1 voxels)."""
    if index == 0:
        source_spec = io.existing_mag_spec(layer, dataset.path, a_pass.source_mag)
    else:  # the previous pass's coarsest mag, finished before this pass starts
        source_spec = io.mag_spec(layer, io.new_mag_path(layer, dataset.path, a_pass.source_mag))
    levels = []
    previous = a_pass.source_mag
    for mag in a_pass.target_mags:
        levels.append(
            LevelConfig(
                mag=mag,
                factor=factor_between(previous, mag),
                region=planning.region_in_mag(layer.bbox, mag),
                spec=io.target_spec(layer, dataset.path, mag),
                write=None if box is None else refresh.write_region(box, layer.bbox, mag),
            )
        )
        previous = mag
    return PassConfig(
        layer=layer.name,
        pass_index=index,
        source_mag=a_pass.source_mag,
        source_spec=source_spec,
        source_region=planning.region_in_mag(layer.bbox, a_pass.source_mag),
        channels=layer.num_channels,
        interpolation=interpolation,
        levels=tuple(levels),
        marker_dir=storage.join_inside(dataset.path, STATE_DIR, layer.name, pass_dir_name(a_pass, interpolation)
                                       + ("" if box is None else refresh.marker_suffix(box))),
        tile_alignment=planning.tile_alignment(a_pass),
        threads=budget.threads,
        tile_voxels=budget.tile_voxels,
        refresh=box is not None,
    )


def describe(plans: Sequence[LayerPlan]) -> str:
    lines = []
    for plan in plans:
        if not plan.target_mags:
            lines.append(f"{plan.layer.name}: nothing to do (already at the coarsest mag)")
            continue
        passes = "; ".join(
            f"pass {i + 1}: {mag_name(p.source_mag)} -> {', '.join(mag_name(m) for m in p.target_mags)} "
            f"in {len(indices):,} work units of up to {_unit_memory(plan, i) / (1 << 20):.1f} MiB"
            + _sparse_note(plan, i)
            for i, (p, indices) in enumerate(zip(plan.passes, plan.planned))
        )
        lines.append(f"{plan.layer.name}: {passes}")
    return "\n".join(lines)


def pass_sizes(plans: Sequence[LayerPlan]) -> list[tuple[int, float]]:
    """(work units, estimated CPU-s) of each pass as planned, all layers together (a pass runs every layer's units)."""
    sizes = []
    for index, active, _ in each_pass(plans):
        planned = pass_units(plans, index, listed=False)
        sizes.append((sum(map(len, planned)), units_work(active, index, planned)))
    return sizes


def _voxels(grid: UnitGrid, indices: np.ndarray) -> int:
    starts, stops = grid.boxes(indices)
    return int(np.prod(stops - starts, axis=1).sum()) if len(indices) else 0


def units_work(plans: Sequence[LayerPlan], index: int, indices: Sequence[np.ndarray]) -> float:
    """Estimated CPU-s of pass `index`'s units `indices` (per active layer), from their voxels
    and sizing's per-voxel cost of each layer's voxel type."""
    work = []
    for plan, chosen in zip(plans, indices):
        work.append((_voxels(plan.grids[index], chosen), plan.layer.dtype.itemsize * plan.layer.num_channels))
    return sizing.work_seconds(work)


def _sparse_note(plan: LayerPlan, index: int) -> str:
    """`(6 of 1,048,576 work units hold data)`; later passes are an upper bound until pass 1 ran."""
    if plan.configs[index].refresh:
        return f" (refreshing --bbox {refresh.box_text(plan.refresh_box)} of existing mags)"
    if index == 0 and plan.dense_reason:
        return f" (planned densely: {plan.dense_reason})"
    count, total = len(plan.planned[index]), plan.grids[index].count
    if count == total:
        return ""
    listed = index == 0 or plan.configs[index - 1].refresh  # planned from a listing of a complete mag
    return f" ({'' if listed else 'at most '}{count:,} of {total:,} work units hold data)"


def _unit_memory(plan: LayerPlan, index: int) -> float:
    """Estimated peak memory of the pass's largest unit (the model that sized the units)."""
    config = plan.configs[index]
    budget = planning.UnitBudget(bytes=0, threads=config.threads, tile_voxels=config.tile_voxels)
    bytes_per_voxel = plan.layer.dtype.itemsize * plan.layer.num_channels
    return budget.unit_bytes(plan.passes[index], _largest_unit(plan.grids[index]), bytes_per_voxel)


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


def interrupted_refreshes(dataset: Dataset, plans: Sequence[LayerPlan]) -> list[str]:
    """Warnings for refreshes of these layers that were interrupted and not rerun: their
    mags are partly refreshed until the same `--bbox` runs again (one listing per layer)."""
    warnings = []
    for plan in plans:
        names = storage.list_names(storage.join_inside(dataset.path, STATE_DIR, plan.layer.name))
        for box in refresh.interrupted(names):
            if box != plan.refresh_box:
                warnings.append(
                    f"layer {plan.layer.name!r}: a --bbox {refresh.box_text(box)} refresh was interrupted, so its "
                    f"mags are partly refreshed; rerun it: --bbox {refresh.box_text(box)}"
                )
    return warnings


def check_write_paths(dataset: Dataset, plans: Sequence[LayerPlan]) -> None:
    """Every file the run will create or replace outside the pass configs (which
    already built theirs through `storage.join_inside`) is checked before the
    first write: properties, NGFF metadata, locks, layer directories."""
    storage.join_inside(dataset.path, PROPERTIES_FILE)
    for plan in plans:
        storage.join_inside(dataset.path, plan.layer.name)
        storage.join_inside(dataset.path, STATE_DIR, plan.layer.name)
        locks.lock_path(dataset.path, plan.layer.name)
        io.ngff_files(plan.layer, dataset.path)


def each_pass(plans: Sequence[LayerPlan]):
    """(index, active plans, configs) of each pass, all layers of a pass together."""
    for index in range(max((len(p.passes) for p in plans), default=0)):
        active = [p for p in plans if index < len(p.passes)]
        yield index, active, [p.configs[index] for p in active]


def pass_units(plans: Sequence[LayerPlan], index: int, listed: bool = True) -> list[np.ndarray]:
    """Per active layer, the unit indices pass `index` must have done.

    Pass 1's come from planning. A later pass lists its source, the mag the
    pass before just wrote (`listed`), so it runs only where that pass stored
    data; unlisted (Dataflow's --dry_run, before anything ran) it takes the
    planning's upper bound.
    """
    active = [p for p in plans if index < len(p.passes)]
    return [p.planned[index] if index == 0 or not listed or p.configs[index].refresh
            else source_units(p.configs[index], p.grids[index])[0] for p in active]
