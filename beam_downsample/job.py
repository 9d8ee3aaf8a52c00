"""A downsampling job: plan every layer, create the arrays, run one Beam
pipeline per pass, list the finished mags.

One pipeline per pass is the barrier between passes: pass k+1 reads what
pass k wrote, and after each pass its mags are complete on disk, so they are
listed in the properties right away (a crash later loses nothing).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable, Optional, Sequence

import apache_beam as beam
import numpy as np
import tensorstore as ts

from beam_downsample import io, locks, markers, planning, reduce, seeds, sizing, storage, stored, supervise, wkw_io
from beam_downsample.machine import available_cores
from beam_downsample.mags import Mag, factor_between, mag_name
from beam_downsample.planning import Pass, UnitGrid, WorkUnit
from beam_downsample.properties import (
    PROPERTIES_FILE,
    Dataset,
    DatasetError,
    Layer,
    update_properties,
    with_new_mags,
)
from beam_downsample.transforms.downsample import DownsamplePass
from beam_downsample.progress import Progress
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


# Candidate units the launcher checks one by one (storage statistics) at planning: ~0.15 ms each
# locally with the shard indices cached (a request per stored shard on GCS), so at most ~15 s.
REFINE_LIMIT = 100_000
REFINE_CACHE_BYTES = 256 << 20  # shard indices read once, not once per unit


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
    """Plans every selected layer; raises DatasetError/PlanningError before touching anything."""
    layers = [dataset.layer(options.layer_name)] if options.layer_name else list(dataset.layers)
    check_writable(dataset.path, [layer.name for layer in layers])
    for layer in layers:
        io.check_source_array(layer, dataset.path, layer.source_mag)
    align_with = set(dataset.all_mags())
    plans = []
    budget = unit_budget(options)
    for layer in layers:
        sampling_mode = "constant_z" if layer.bbox.shape[2] == 1 else options.sampling_mode
        coarsest = options.coarsest_mag or planning.default_coarsest_mag(*layer.bbox.shape[:2])
        try:
            targets = planning.plan_mags(layer.source_mag, coarsest, sampling_mode, dataset.voxel_size, align_with)
        except planning.PlanningError as error:
            raise planning.PlanningError(f"layer {layer.name!r}: {error}") from None
        align_with.update(targets)  # the reference plans layers one after another
        interpolation = options.interpolation or reduce.DEFAULT_INTERPOLATION[layer.category]
        bytes_per_voxel = layer.dtype.itemsize * layer.num_channels
        passes = planning.group_passes(layer.source_mag, targets, bytes_per_voxel, budget)
        grids, planned, configs = [], [], []
        dense_reason = None
        for index, a_pass in enumerate(passes):
            grid = planning.plan_grid(layer.name, index, a_pass, layer.bbox, bytes_per_voxel, budget)
            config = _pass_config(dataset, layer, index, a_pass, interpolation, budget)
            if index == 0:
                indices, dense_reason = source_units(config, grid)
            else:
                indices = map_units(grids[-1], planned[-1], passes[index - 1], grid)
            grids.append(grid)
            planned.append(indices)
            configs.append(config)
        plan = LayerPlan(layer, tuple(targets), tuple(passes), tuple(grids), tuple(planned), tuple(configs),
                         dense_reason)
        _check_worker_memory(plan, options)
        plans.append(plan)
    check_write_paths(dataset, plans)
    return plans


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
    source mag: (indices, None), or (every index, why) where a listing cannot tell.

    Where a stored key covers several units (a 1024^3 shard, a wkw file) and
    the candidates are few, each is checked with tensorstore's storage
    statistics (shard indices only, no data read), all requests at once.
    """
    try:
        starts, stops = stored.stored_boxes(config.source_spec)
    except stored.Dense as reason:
        return grid.all_indices(), str(reason)
    indices = grid.overlapping(starts, stops)
    if refine and 0 < len(indices) <= REFINE_LIMIT and config.source_spec["driver"] != "wkw":
        indices = _refine(config, grid, indices)
    return indices, None


def _refine(config: PassConfig, grid: UnitGrid, indices: np.ndarray) -> np.ndarray:
    context = ts.Context({"cache_pool": {"total_bytes_limit": REFINE_CACHE_BYTES}})
    array = io.open_array(config.source_spec, context, open=True)
    starts, stops = grid.boxes(indices)
    futures = [
        array[io.region_index(planning.Box(tuple(a), tuple(b)))].storage_statistics(query_not_stored=True)
        for a, b in zip(starts.tolist(), stops.tolist())
    ]
    try:
        keep = np.array([not future.result().not_stored for future in futures], dtype=bool)
    except ValueError:  # e.g. a corrupt shard index: its units run and fail with the reason, in one line
        return indices
    return indices[keep]


def map_units(previous: UnitGrid, indices: np.ndarray, previous_pass: Pass, grid: UnitGrid) -> np.ndarray:
    """Units of the next pass that the previous pass's units `indices` can have written into
    (an upper bound, by arithmetic: nothing is listed)."""
    starts, stops = previous.boxes(indices)
    factor = np.array(factor_between(previous_pass.source_mag, previous_pass.coarsest))
    return grid.overlapping(starts // factor, -(-stops // factor))


def _pass_config(
    dataset: Dataset, layer: Layer, index: int, a_pass: Pass, interpolation: str, budget: planning.UnitBudget
) -> PassConfig:
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
        marker_dir=storage.join_inside(dataset.path, STATE_DIR, layer.name, pass_dir_name(a_pass, interpolation)),
        tile_alignment=planning.tile_alignment(a_pass),
        threads=budget.threads,
        tile_voxels=budget.tile_voxels,
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
    for index, active, _ in _passes(plans):
        planned = pass_units(plans, index, listed=False)
        sizes.append((sum(map(len, planned)), units_work(active, index, planned)))
    return sizes


def units_work(plans: Sequence[LayerPlan], index: int, indices: Sequence[np.ndarray]) -> float:
    """Estimated CPU-s of pass `index`'s units `indices` (per active layer), from their voxels
    and sizing's per-voxel cost of each layer's voxel type."""
    work = []
    for plan, chosen in zip(plans, indices):
        starts, stops = plan.grids[index].boxes(chosen)
        voxels = int(np.prod(stops - starts, axis=1).sum()) if len(chosen) else 0
        work.append((voxels, plan.layer.dtype.itemsize * plan.layer.num_channels))
    return sizing.work_seconds(work)


def _sparse_note(plan: LayerPlan, index: int) -> str:
    """`(6 of 1,048,576 work units hold data)`; later passes are an upper bound until pass 1 ran."""
    if index == 0 and plan.dense_reason:
        return f" (planned densely: {plan.dense_reason})"
    count, total = len(plan.planned[index]), plan.grids[index].count
    if count == total:
        return ""
    return f" ({'' if index == 0 else 'at most '}{count:,} of {total:,} work units hold data)"


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


def create_targets(dataset: Dataset, plans: Sequence[LayerPlan]) -> None:
    """Creates every new mag array (and marker directories) before any worker starts.

    An array left by an interrupted run of the same plan is kept (its done
    units are skipped); anything else at a new mag's path is replaced.
    """
    for plan in plans:
        for index, a_pass in enumerate(plan.passes):
            config = plan.configs[index]
            # Only units that finished make an array worth keeping.
            resuming = any(name.endswith(".done") for name in storage.list_names(config.marker_dir))
            storage.makedirs(config.marker_dir)
            for mag in a_pass.target_mags:
                files = _wkw_files(plan, index, mag) if plan.layer.data_format == "wkw" else None
                kept = io.create_mag(io.new_mag_spec(plan.layer, dataset.path, mag), resuming, files)
                if resuming and not kept:  # different layout: its markers are worthless
                    storage.delete_tree(config.marker_dir)
                    storage.makedirs(config.marker_dir)
                    resuming = False


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


def _wkw_files(plan: LayerPlan, index: int, mag: Mag) -> np.ndarray:
    """(N, 3) indices of the wkw files of `mag` that the pass's planned units write:
    only those get staging files (and so compressed files), never the whole box."""
    grid, a_pass = plan.grids[index], plan.passes[index]
    starts, stops = grid.boxes(plan.planned[index])
    factor = np.array(factor_between(a_pass.source_mag, mag))
    side = wkw_io.BLOCK_LEN * wkw_io.FILE_LEN
    region = planning.region_in_mag(plan.layer.bbox, mag)
    files = UnitGrid("", 0, region, (side, side, side))
    file_starts, _ = files.boxes(files.overlapping(starts // factor, -(-stops // factor)))
    return file_starts // side


class UnitFailed(RuntimeError):
    """A work unit failed; the message is one line naming the unit and why."""


@dataclasses.dataclass
class Todo:
    """A pass's unfinished units, per active layer sorted unit indices; its length is their count."""

    indices: list

    def __len__(self) -> int:
        return sum(map(len, self.indices))


def _passes(plans: Sequence[LayerPlan]):
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
    if index == 0 or not listed:
        return [p.planned[index] for p in active]
    return [source_units(p.configs[index], p.grids[index])[0] for p in active]


def unfinished(configs: Sequence[PassConfig], grids: Sequence[UnitGrid],
               planned: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The pass's unfinished work, from the markers: one listing per layer, no per-unit request."""
    return [markers.not_done(c, g, i) for c, g, i in zip(configs, grids, planned)]


def _run_pass(index: int, pass_seeds, grids, configs, runner, pipeline_options, record_failures: bool = False):
    pipeline = beam.Pipeline(runner=runner, options=pipeline_options)
    _ = pipeline | f"Pass{index + 1}" >> DownsamplePass(pass_seeds, grids, configs, record_failures)
    return pipeline.run()


def build_jobs_only(plans: Sequence[LayerPlan], runner, pipeline_options, log: Callable[[str], None] = print) -> None:
    """Beam's `--dry_run=True` (DataflowRunner): each pass's job is built, nothing submitted or touched."""
    for index, active, configs in _passes(plans):
        grids = [p.grids[index] for p in active]
        planned = pass_units(plans, index, listed=False)
        pass_seeds = [s for g, i in zip(grids, planned) for s in seeds.make_seeds(g, i)]
        _run_pass(index, pass_seeds, grids, configs, runner, pipeline_options)
        log(f"Dataflow job of pass {index + 1} built (--dry_run=True), not submitted: "
            f"{sum(map(len, planned))} work units in {len(pass_seeds)} seeds")


def run_job(
    dataset: Dataset,
    plans: Sequence[LayerPlan],
    runner,
    pipeline_options,
    report: Callable[[int, int, str], None] = lambda done, total, label: None,
    log: Callable[[str], None] = print,
    record_failures: bool = False,
) -> dict:
    """Runs the passes in order; after each, lists its mags in the properties and NGFF metadata."""
    metrics: dict = {}
    pass_count = max((len(p.passes) for p in plans), default=0)
    for index, active, configs in _passes(plans):
        for config in configs:
            for stale in markers.failures(config):  # an earlier run's failures: these units run again
                storage.delete(stale)
        grids = [p.grids[index] for p in active]
        planned = pass_units(plans, index)
        total = sum(map(len, planned))
        todo = unfinished(configs, grids, planned)
        remaining = sum(map(len, todo))
        if remaining < total:
            log(f"resuming: {total - remaining} of {total} work units of pass {index + 1} already done")
        label = f"pass {index + 1}/{pass_count}: " + ", ".join(
            f"{p.layer.name} {','.join(mag_name(m) for m in p.passes[index].target_mags)}" for p in active
        )
        if remaining:
            pass_runner, pass_options = runner, pipeline_options
            if hasattr(runner, "for_pass"):  # our local runner: worker processes and tile threads per pass
                pass_runner, pass_options, configs = runner.for_pass(remaining, configs, pipeline_options,
                                                                     work=units_work(active, index, todo))

            def start(work: Todo, i=index, c=configs, g=grids) -> object:
                pass_seeds = [s for cf, gr, t in zip(c, g, work.indices) for s in seeds.make_seeds(gr, t, cf.marker_dir)]
                return _run_pass(i, pass_seeds, g, c, pass_runner, pass_options, record_failures)

            with Progress(configs, total, label, report, done=total - remaining) as bar:
                result = supervise.run_pass(
                    index, Todo(todo), configs, start,
                    lambda c=configs, g=grids, p=planned, b=bar: b.rerun(Todo(unfinished(c, g, p))),
                    pass_runner, pass_options, log=log,
                )
            _collect_metrics(result, metrics)
        failed = [(config.layer, path) for config in configs for path in markers.failures(config)]
        if failed:
            layer, path = failed[0]
            reason = (storage.read_text(path) or "").strip()
            unit = os.path.basename(path)[: -len(markers.FAILED)]
            raise UnitFailed(
                f"{len(failed)} work unit(s) of pass {index + 1} failed; layer {layer!r} unit {unit}: {reason}"
            )
        missing = [(g, m) for g, m in zip(grids, unfinished(configs, grids, planned)) if len(m)]
        if missing:
            count = sum(len(m) for _, m in missing)
            example = missing[0][0].unit(missing[0][1][0]).key
            raise RuntimeError(f"pass {index + 1} finished but {count} work units are not done, e.g. {example}")
        io.finish_mags([level.spec for config in configs for level in config.levels],
                       threads=min(available_cores(), wkw_io.COMPRESS_THREADS))
        for plan in active:  # NGFF first: once the properties list a mag, a rerun has nothing left to do
            listed = sorted({*plan.layer.mags, *[m for p in plan.passes[: index + 1] for m in p.target_mags]},
                            key=lambda m: (max(m), m))
            io.update_ngff(
                storage.join_inside(dataset.path, plan.layer.name), plan.layer, dataset.voxel_size, dataset.unit,
                listed,
            )
        # Applied to the current properties: another layer's run may have listed its mags.
        update_properties(dataset.path, functools.partial(_with_pass_mags, active, index))
    for plan in plans:  # every marker of these layers, from this plan or an interrupted other one
        storage.remove_stale_temp_files(storage.join_inside(dataset.path, plan.layer.name))
        storage.delete_tree(storage.join_inside(dataset.path, STATE_DIR, plan.layer.name))
    return metrics


def _with_pass_mags(plans: Sequence[LayerPlan], index: int, raw: dict) -> dict:
    for plan in plans:
        raw = with_new_mags(raw, plan.layer.name, list(plan.passes[index].target_mags))
    return raw


def _collect_metrics(result, metrics: dict) -> None:
    try:
        counters = result.metrics().query()["counters"]
    except Exception:  # some runners report no metrics
        return
    for counter in counters:
        name = counter.key.metric.name
        metrics[name] = metrics.get(name, 0) + (counter.committed or counter.attempted or 0)
