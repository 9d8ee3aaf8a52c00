"""A downsampling job: create the arrays of a plan (`plan`), run one Beam
pipeline per pass, list the finished mags.

One pipeline per pass is the barrier between passes: pass k+1 reads what
pass k wrote, and after each pass its mags are complete on disk, so they are
listed in the properties right away (a crash later loses nothing).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable, Sequence

import apache_beam as beam
import numpy as np

from beam_downsample.core.box import region_in_mag
from beam_downsample.core.config import PassConfig
from beam_downsample.core.grid import UnitGrid
from beam_downsample.core.machine import available_cores
from beam_downsample.core.mags import Mag, factor_between, mag_name
from beam_downsample.plan.job import LayerPlan, each_pass, pass_units
from beam_downsample.plan.units import units_work
from beam_downsample.run import supervise
from beam_downsample.state import markers
from beam_downsample.state.progress import Progress
from beam_downsample.store import arrays, reductions, storage, wkw_io
from beam_downsample.store.properties import Dataset, load_dataset, update_properties, with_new_mags
from beam_downsample.transforms import seeds
from beam_downsample.transforms.downsample import DownsamplePass

STATE_DIR = arrays.STATE_DIR


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
                if config.refresh:  # an existing mag: written into, never recreated
                    arrays.open_refreshed_mag(arrays.new_mag_spec(plan.layer, dataset.path, mag), resuming, files)
                    continue
                kept = arrays.create_mag(arrays.new_mag_spec(plan.layer, dataset.path, mag), resuming, files)
                if resuming and not kept:  # different layout: its markers are worthless
                    storage.delete_tree(config.marker_dir)
                    storage.makedirs(config.marker_dir)
                    resuming = False


def _wkw_files(plan: LayerPlan, index: int, mag: Mag) -> np.ndarray:
    """(N, 3) indices of the wkw files of `mag` that the pass's planned units write:
    only those get staging files (and so compressed files), never the whole box."""
    grid, a_pass = plan.grids[index], plan.passes[index]
    side = wkw_io.BLOCK_LEN * wkw_io.FILE_LEN
    region = region_in_mag(plan.layer.bbox, mag)
    files = UnitGrid("", 0, region, (side, side, side))
    level = next(level for level in plan.configs[index].levels if level.mag == mag)
    if level.write is not None:  # a refresh stages (and recompresses) only the files it writes into
        touched = files.overlapping(np.array([level.write.start]), np.array([level.write.stop]))
    else:
        starts, stops = grid.boxes(plan.planned[index])
        factor = np.array(factor_between(a_pass.source_mag, mag))
        touched = files.overlapping(starts // factor, -(-stops // factor))
    file_starts, _ = files.boxes(touched)
    return file_starts // side


class UnitFailed(RuntimeError):
    """A work unit failed; the message is one line naming the unit and why."""


@dataclasses.dataclass
class Todo:
    """A pass's unfinished units, per active layer sorted unit indices; its length is their count."""

    indices: list

    def __len__(self) -> int:
        return sum(map(len, self.indices))


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
    for index, active, configs in each_pass(plans):
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
    for index, active, configs in each_pass(plans):
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
            others = f" and {len(failed) - 1} more work unit(s)" if len(failed) > 1 else ""
            raise UnitFailed(f"{reason or f'layer {layer!r} unit {unit} failed'} [pass {index + 1}{others}]")
        missing = [(g, m) for g, m in zip(grids, unfinished(configs, grids, planned)) if len(m)]
        if missing:
            count = sum(len(m) for _, m in missing)
            example = missing[0][0].unit(missing[0][1][0]).key
            raise RuntimeError(f"pass {index + 1} finished but {count} work units are not done, e.g. {example}")
        arrays.finish_mags([level.spec for config in configs for level in config.levels],
                           threads=min(available_cores(), wkw_io.COMPRESS_THREADS))
        for plan in active:  # NGFF first: once the properties list a mag, a rerun has nothing left to do
            listed = sorted({*plan.layer.mags, *[m for p in plan.passes[: index + 1] for m in p.target_mags]},
                            key=lambda m: (max(m), m))
            arrays.update_ngff(
                storage.join_inside(dataset.path, plan.layer.name), plan.layer, dataset.voxel_size, dataset.unit,
                listed,
            )
        for plan, config in zip(active, configs):  # how they were made, for a later --bbox (before they are listed)
            reductions.write(dataset.path, plan.layer.name, plan.passes[index].target_mags,
                             reductions.Reduction.of(config.interpolation, config.ignore_background))
        # Applied to the current properties: another layer's run may have listed its mags.
        update_properties(dataset.path, functools.partial(_with_pass_mags, active, index))
    for plan in plans:  # every marker of these layers, from this plan or an interrupted other one
        storage.remove_stale_temp_files(storage.join_inside(dataset.path, plan.layer.name))
        storage.delete_tree(storage.join_inside(dataset.path, STATE_DIR, plan.layer.name))
    return metrics


def unlisted_mags(dataset_path: str, plans: Sequence[LayerPlan]) -> list[str]:
    """`layer/mag` of every mag the plans make that the properties do not list (read again)."""
    listed = {layer.name: set(layer.mags) for layer in load_dataset(dataset_path).layers}
    return [f"{plan.layer.name}/{mag_name(mag)}" for plan in plans for a_pass in plan.passes
            for mag in a_pass.target_mags if mag not in listed.get(plan.layer.name, set())]


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
