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

from beam_downsample import io, locks, markers, planning, reduce, sizing, storage, supervise, wkw_io
from beam_downsample.machine import available_cores
from beam_downsample.mags import Mag, factor_between, mag_name
from beam_downsample.planning import Pass, WorkUnit
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


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    layer: Layer
    target_mags: tuple[Mag, ...]
    passes: tuple[Pass, ...]
    units: tuple[tuple[WorkUnit, ...], ...]  # per pass
    configs: tuple[PassConfig, ...]  # per pass


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
        units, configs = [], []
        for index, a_pass in enumerate(passes):
            units.append(tuple(planning.plan_units(layer.name, index, a_pass, layer.bbox, bytes_per_voxel, budget)))
            configs.append(_pass_config(dataset, layer, index, a_pass, interpolation, budget))
        plan = LayerPlan(layer, tuple(targets), tuple(passes), tuple(units), tuple(configs))
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
            f"in {len(units)} work units of up to {_unit_memory(plan, i) / (1 << 20):.1f} MiB"
            for i, (p, units) in enumerate(zip(plan.passes, plan.units))
        )
        lines.append(f"{plan.layer.name}: {passes}")
    return "\n".join(lines)


def pass_sizes(plans: Sequence[LayerPlan]) -> list[tuple[int, float]]:
    """(work units, estimated CPU-s) of each pass, all layers together (a pass runs every layer's units)."""
    return [(len(units), units_work(active, units)) for _, active, units, _ in _passes(plans)]


def units_work(plans: Sequence[LayerPlan], units: Sequence[WorkUnit]) -> float:
    """Estimated CPU-s of `units` (sizing's per-voxel cost of their layers' voxel types)."""
    bytes_per_voxel = {p.layer.name: p.layer.dtype.itemsize * p.layer.num_channels for p in plans}
    return sizing.work_seconds((unit.box.voxels, bytes_per_voxel[unit.layer]) for unit in units)


def _unit_memory(plan: LayerPlan, index: int) -> float:
    """Estimated peak memory of the pass's largest unit (the model that sized the units)."""
    config = plan.configs[index]
    budget = planning.UnitBudget(bytes=0, threads=config.threads, tile_voxels=config.tile_voxels)
    bytes_per_voxel = plan.layer.dtype.itemsize * plan.layer.num_channels
    return max(budget.unit_bytes(plan.passes[index], unit.box.shape, bytes_per_voxel) for unit in plan.units[index])


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
                kept = io.create_mag(io.new_mag_spec(plan.layer, dataset.path, mag), resuming)
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


class UnitFailed(RuntimeError):
    """A work unit failed; the message is one line naming the unit and why."""


def _passes(plans: Sequence[LayerPlan]):
    """(index, active plans, units, configs) of each pass, all layers' units of a pass together."""
    for index in range(max((len(p.passes) for p in plans), default=0)):
        active = [p for p in plans if index < len(p.passes)]
        yield index, active, [u for p in active for u in p.units[index]], [p.configs[index] for p in active]


def _run_pass(index: int, units, configs, runner, pipeline_options, record_failures: bool = False):
    pipeline = beam.Pipeline(runner=runner, options=pipeline_options)
    _ = pipeline | f"Pass{index + 1}" >> DownsamplePass(units, configs, record_failures)
    return pipeline.run()


def build_jobs_only(plans: Sequence[LayerPlan], runner, pipeline_options, log: Callable[[str], None] = print) -> None:
    """Beam's `--dry_run=True` (DataflowRunner): each pass's job is built, nothing submitted or touched."""
    for index, _, units, configs in _passes(plans):
        _run_pass(index, units, configs, runner, pipeline_options)
        log(f"Dataflow job of pass {index + 1} built (--dry_run=True), not submitted: {len(units)} work units")


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
    for index, active, units, configs in _passes(plans):
        for config in configs:
            for stale in markers.failures(config):  # an earlier run's failures: these units run again
                storage.delete(stale)
        todo = [u for p, c in zip(active, configs) for u in markers.not_done(c, p.units[index])]
        if len(todo) < len(units):
            log(f"resuming: {len(units) - len(todo)} of {len(units)} work units of pass {index + 1} already done")
        label = f"pass {index + 1}/{pass_count}: " + ", ".join(
            f"{p.layer.name} {','.join(mag_name(m) for m in p.passes[index].target_mags)}" for p in active
        )
        if todo:
            pass_runner, pass_options = runner, pipeline_options
            if hasattr(runner, "for_pass"):  # our local runner: worker processes and tile threads per pass
                pass_runner, pass_options, configs = runner.for_pass(len(todo), configs, pipeline_options,
                                                                     work=units_work(active, todo))
            with Progress(configs, len(units), label, report):
                result = supervise.run_pass(
                    index, todo, configs,
                    lambda some, i=index, c=configs: _run_pass(i, some, c, pass_runner, pass_options,
                                                               record_failures),
                    functools.partial(_not_done, active, configs, index),
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
        missing = [u.key for p, c in zip(active, configs) for u in markers.not_done(c, p.units[index])]
        if missing:
            raise RuntimeError(f"pass {index + 1} finished but {len(missing)} work units are not done, e.g. {missing[0]}")
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


def _not_done(plans: Sequence[LayerPlan], configs: Sequence[PassConfig], index: int) -> list[WorkUnit]:
    """The pass's units without a done-marker: one listing per layer."""
    return [u for p, c in zip(plans, configs) for u in markers.not_done(c, p.units[index])]


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
