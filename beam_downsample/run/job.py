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
import uuid
from typing import Callable, Optional, Sequence

import apache_beam as beam
import numpy as np

from beam_downsample.core.box import region_in_mag
from beam_downsample.core.config import PassConfig
from beam_downsample.core.errors import RunError
from beam_downsample.core.grid import UnitGrid
from beam_downsample.core.machine import available_cores
from beam_downsample.core.mags import Mag, factor_between, mag_name
from beam_downsample.plan import refresh
from beam_downsample.plan.job import LayerPlan, each_pass, pass_units
from beam_downsample.plan.units import units_work
from beam_downsample.run import supervise
from beam_downsample.run.result import LayerResult, add_figures, pass_figures, planned_result
from beam_downsample.state import markers, progress
from beam_downsample.state.progress import Progress
from beam_downsample.store import arrays, reductions, storage, wkw_io
from beam_downsample.store.properties import (Dataset, load_dataset, read_properties_for_update, update_properties,
                                              with_new_mags)
from beam_downsample.transforms import seeds
from beam_downsample.transforms.downsample import COUNTERS, DownsamplePass, cancel

STATE_DIR = arrays.STATE_DIR


def create_targets(dataset: Dataset, plans: Sequence[LayerPlan]) -> None:
    """Creates every new mag array (and marker directories) before any worker starts.

    An array left by an interrupted run of the same plan is kept (its done
    units are skipped); anything else at a new mag's path is replaced. The
    passes' marker directories are listed at once, then every mag is created
    at once (on a bucket each creation is a few requests: none waits for another).
    """
    configs = [(plan, index) for plan in plans for index in range(len(plan.passes))]
    layer_dirs = [storage.join_inside(dataset.path, plan.layer.name) for plan in plans]
    # Only units that finished make an array worth keeping; a mag directory that is not there needs no emptying.
    listed = storage.concurrently([functools.partial(markers.PassListing.of, plan.configs[index])
                                   for plan, index in configs]
                                  + [functools.partial(storage.list_dirs, d) for d in layer_dirs], dataset.path)
    listings, present = listed[:len(configs)], dict(zip(layer_dirs, map(set, listed[len(configs):])))
    resuming = [bool(listing.done) for listing in listings]
    for (plan, index), listing in zip(configs, listings):  # what the pass finds when it starts
        plan.listed[index] = listing
    creations = []
    for (plan, index), resumes in zip(configs, resuming):
        storage.makedirs(plan.configs[index].marker_dir)
        if plan.configs[index].refresh and len(plan.refresh_boxes) > 1:  # which boxes, for a warning if interrupted
            creations.append(functools.partial(storage.write_text, storage.join_inside(
                plan.configs[index].marker_dir, refresh.BOXES_FILE), refresh.boxes_file_text(plan.refresh_boxes)))
        there = present[storage.join_inside(dataset.path, plan.layer.name)]
        for mag in plan.passes[index].target_mags:
            creations.append(functools.partial(_create_mag, dataset, plan, index, mag, resumes,
                                               mag_name(mag) in there))
    made = iter(result for result in storage.concurrently(creations, dataset.path) if result is not None)
    again = []
    for (plan, index), resumes in zip(configs, resuming):
        kept = [next(made) for _ in plan.passes[index].target_mags]
        if resumes and not all(kept) and not plan.configs[index].refresh:
            # a different layout: the pass's markers are worthless, and so is what its other mags hold
            config = plan.configs[index]
            storage.delete_tree(config.marker_dir)
            storage.makedirs(config.marker_dir)
            plan.listed.pop(index, None)
            again += [functools.partial(_create_mag, dataset, plan, index, mag, False)
                      for mag, was_kept in zip(plan.passes[index].target_mags, kept) if was_kept]
    storage.concurrently(again, dataset.path)


def _create_mag(dataset: Dataset, plan: LayerPlan, index: int, mag: Mag, resuming: bool, exists: bool = True) -> bool:
    """Creates (or, resuming, keeps) one new mag of pass `index`; True if an existing one was kept.
    A refresh writes into the existing mag, never recreated. `exists`: False if the listing of the
    layer's directory showed nothing at the mag's path."""
    files = _wkw_files(plan, index, mag) if plan.layer.data_format == "wkw" else None
    spec = arrays.new_mag_spec(plan.layer, dataset.path, mag)
    if plan.configs[index].refresh:
        arrays.open_refreshed_mag(spec, resuming, files)
        return True
    return arrays.create_mag(spec, resuming, files, exists)


def _wkw_files(plan: LayerPlan, index: int, mag: Mag) -> np.ndarray:
    """(N, 3) indices of the wkw files of `mag` that the pass's planned units write:
    only those get staging files (and so compressed files), never the whole box."""
    grid, a_pass = plan.grids[index], plan.passes[index]
    side = wkw_io.BLOCK_LEN * wkw_io.FILE_LEN
    region = region_in_mag(plan.layer.bbox, mag)
    files = UnitGrid("", 0, region, (side, side, side))
    level = next(level for level in plan.configs[index].levels if level.mag == mag)
    if level.writes:  # a refresh stages (and recompresses) only the files it writes into
        touched = files.overlapping(np.array([w.start for w in level.writes]), np.array([w.stop for w in level.writes]))
    else:
        starts, stops = grid.boxes(plan.planned[index])
        factor = np.array(factor_between(a_pass.source_mag, mag))
        touched = files.overlapping(starts // factor, -(-stops // factor))
    file_starts, _ = files.boxes(touched)
    return file_starts // side


class UnitFailed(RunError):
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


def _run_pass(index: int, pass_seeds, grids, configs, runner, pipeline_options, record_failures: bool = False,
              run_id: Optional[str] = None):
    pipeline = beam.Pipeline(runner=runner, options=pipeline_options)
    _ = pipeline | f"Pass{index + 1}" >> DownsamplePass(pass_seeds, grids, configs, record_failures, run_id)
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
    report_seconds: float = 0.0,
) -> tuple[dict, list[LayerResult]]:
    """Runs the passes in order; after each, lists its mags in the properties and NGFF metadata.
    Returns (Beam counters summed by name, what the run did per layer).

    Per pass the launcher lists each layer's pass state once at the start (what is done, and
    an earlier run's leftovers) and once at the end (what is done or failed), the layers at
    once; independent writes (leftovers, NGFF) go out together. `report_seconds`: how often
    the display shows progress (the tallies are read no more often)."""
    metrics: dict = {}
    units = {p.layer.name: 0 for p in plans}
    already = dict(units)
    figures: dict[str, Optional[list[int]]] = {p.layer.name: [0, 0, 0, 0] for p in plans}
    run_id = uuid.uuid4().hex
    pass_count = max((len(p.passes) for p in plans), default=0)
    state = [(storage.join_inside(dataset.path, STATE_DIR, plan.layer.name), None) for plan in plans]
    for index, active, configs in each_pass(plans):
        grids = [p.grids[index] for p in active]
        listings = list_passes(dataset.path, configs, [p.listed.pop(index, None) for p in active])
        # an earlier run's failure records (those units run again), tallies (in `done` below) and worker states
        storage.delete_all([path for listing in listings for path in listing.leftovers])
        planned = pass_units(plans, index)
        total = sum(map(len, planned))
        todo = [markers.not_done(c, g, i, listing) for c, g, i, listing in zip(configs, grids, planned, listings)]
        remaining = sum(map(len, todo))
        if remaining < total:
            log(f"resuming: {total - remaining} of {total} work units of pass {index + 1} already done")
        label = f"pass {index + 1}/{pass_count}: " + ", ".join(
            f"{p.layer.name} {','.join(mag_name(m) for m in p.passes[index].target_mags)}" for p in active
        )
        counters: Optional[dict] = {}
        tallies: Optional[dict] = {}
        if remaining:
            pass_runner, pass_options = runner, pipeline_options
            if hasattr(runner, "for_pass"):  # our local runner: worker processes and tile threads per pass
                pass_runner, pass_options, configs = runner.for_pass(remaining, configs, pipeline_options,
                                                                     work=units_work(active, index, todo))

            configs = with_known_metadata(dataset, active, index, configs)

            def start(work: Todo, i=index, c=configs, g=grids) -> object:
                pass_seeds = [s for cf, gr, t in zip(c, g, work.indices) for s in seeds.make_seeds(gr, t, cf.marker_dir)]
                return _run_pass(i, pass_seeds, g, c, pass_runner, pass_options, record_failures, run_id)

            with Progress(configs, total, label, report, done=total - remaining, seconds=report_seconds) as bar:
                result = supervise.run_pass(
                    index, Todo(todo), configs, start,
                    lambda c=configs, g=grids, p=planned, b=bar: b.rerun(Todo(unfinished(c, g, p))),
                    pass_runner, pass_options, log=log, cancel=functools.partial(cancel, run_id),
                )
                listings = list_passes(dataset.path, configs)
                missing = [markers.not_done(c, g, i, listing)
                           for c, g, i, listing in zip(configs, grids, planned, listings)]
                bar.finish(total - sum(map(len, missing)))
            counters = _collect_metrics(result, metrics)
            if counters is None:  # a runner without counters (DaskRunner): the workers' tallies
                tallies = progress.layer_tallies([c.marker_dir for c in configs])
            failed = [(config.layer, path) for config, listing in zip(configs, listings) for path in listing.failures]
        else:  # nothing ran (the failure records listed above were an earlier run's, deleted)
            missing, failed = todo, []
        raise_unfinished(index, failed, grids, missing)
        for plan, indices, left in zip(active, planned, todo):
            name = plan.layer.name
            units[name] += len(indices)
            already[name] += len(indices) - len(left)
            found = pass_figures(len(left), None if counters is None else counters.get(name, {}),
                                 None if tallies is None else tallies.get(name, [0, 0, 0, 0]))
            figures[name] = add_figures(figures[name], found)
        state = finish_pass(dataset, active, index, cleanup=plans if index == pass_count - 1 else [])
    clean_up(dataset, plans, state)
    return metrics, [planned_result(p, units[p.layer.name], already[p.layer.name], figures[p.layer.name])
                     for p in plans]


def check_pass(index: int, configs: Sequence[PassConfig], grids: Sequence[UnitGrid],
               planned: Sequence[np.ndarray]) -> None:
    """Raises UnitFailed (a unit left a failure record) or RunError (a planned unit has no
    marker), from one listing of each layer's pass state."""
    listings = list_passes(configs[0].marker_dir if configs else "", configs)
    failed = [(config.layer, path) for config, listing in zip(configs, listings) for path in listing.failures]
    missing = [markers.not_done(c, g, i, listing) for c, g, i, listing in zip(configs, grids, planned, listings)]
    raise_unfinished(index, failed, grids, missing)


def raise_unfinished(index: int, failed: Sequence[tuple[str, str]], grids: Sequence[UnitGrid],
                     missing: Sequence[np.ndarray]) -> None:
    """UnitFailed for the first of the (layer, failure record) `failed`, or RunError where
    `missing` (per layer, unit indices without a marker) is not empty."""
    if failed:
        layer, path = failed[0]
        reason = (storage.read_text(path) or "").strip()
        unit = os.path.basename(path)[: -len(markers.FAILED)]
        others = f" and {len(failed) - 1} more work unit(s)" if len(failed) > 1 else ""
        raise UnitFailed(f"{reason or f'layer {layer!r} unit {unit} failed'} [pass {index + 1}{others}]")
    if any(len(m) for m in missing):
        count = sum(len(m) for m in missing)
        grid, indices = next((g, m) for g, m in zip(grids, missing) if len(m))
        raise RunError(f"pass {index + 1} finished but {count} work units are not done, "
                       f"e.g. {grid.unit(indices[0]).key}")


def finish_pass(dataset: Dataset, active: Sequence[LayerPlan], index: int,
                cleanup: Sequence[LayerPlan] = ()) -> list[tuple[str, list[str]]]:
    """After pass `index` of the `active` plans: its mags finished (wkw files compressed),
    NGFF metadata and the properties list them (`list_mags`). Idempotent."""
    configs = [plan.configs[index] for plan in active]
    arrays.finish_mags([level.spec for config in configs for level in config.levels],
                       threads=min(available_cores(), wkw_io.COMPRESS_THREADS))
    return list_mags(dataset, active, configs, index, cleanup)


def clean_up(dataset: Dataset, plans: Sequence[LayerPlan], state: Optional[Sequence[tuple[str, list]]] = None) -> None:
    """Every marker of these layers, from this plan or an interrupted other one (`state`: their
    state directories and the names listed in them, else listed here), and stale temp files."""
    for plan in plans:
        storage.remove_stale_temp_files(storage.join_inside(dataset.path, plan.layer.name))
    if state is None or len(state) < len(plans):
        state = [(storage.join_inside(dataset.path, STATE_DIR, plan.layer.name), None) for plan in plans]
    storage.concurrently([functools.partial(storage.delete_tree, directory, names) for directory, names in state],
                         dataset.path)
    storage.remove_dir_if_empty(storage.join_inside(dataset.path, STATE_DIR))  # unless locks are in it


def list_mags(dataset: Dataset, active: Sequence[LayerPlan], configs: Sequence[PassConfig], index: int,
              cleanup: Sequence[LayerPlan] = ()) -> list[tuple[str, list[str]]]:
    """After pass `index`: NGFF metadata and the record of how the mags were made (for a later
    `--bbox`), then the properties list its mags (the properties are read while the others are
    written, and written once those are: once the properties list a mag, a rerun has nothing
    left to do). With `cleanup` (the last pass) the state directories of those layers are
    listed meanwhile too; returns (directory, names) of each."""
    states = [storage.join_inside(dataset.path, STATE_DIR, plan.layer.name) for plan in cleanup]
    calls = [functools.partial(read_properties_for_update, dataset.path)]
    calls += [functools.partial(_update_ngff, dataset, plan, index) for plan in active]
    calls += [functools.partial(reductions.write, dataset.path, plan.layer.name, plan.passes[index].target_mags,
                                reductions.Reduction.of(config.interpolation, config.ignore_background))
              for plan, config in zip(active, configs)]
    calls += [functools.partial(storage.list_tree, directory) for directory in states]
    done = storage.concurrently(calls, dataset.path)
    # Applied to the current properties: another layer's run may have listed its mags.
    update_properties(dataset.path, functools.partial(_with_pass_mags, active, index), read=done[0])
    return list(zip(states, done[1 + 2 * len(active):]))


def with_known_metadata(dataset: Dataset, plans: Sequence[LayerPlan], index: int,
                        configs: Sequence[PassConfig]) -> list[PassConfig]:
    """The pass's configs with the metadata of the arrays the launcher knows: the new mags it
    created (the reference layout) and pass 1's source (read when planning). Workers open those
    without reading it (on a bucket: no round trip, 1 + levels fewer GETs per worker and pass).
    A refresh writes into existing mags: theirs is read."""
    known = []
    for plan, config in zip(plans, configs):
        if config.refresh or config.source_spec["driver"] == "wkw":
            known.append(config)
            continue
        previous = plan.configs[index - 1] if index else None
        if index == 0:
            source = plan.source_metadata
        else:
            source = None if previous.refresh else _new_metadata(dataset, plan, config.source_mag)
        levels = tuple(dataclasses.replace(level, spec=dict(level.spec, metadata=_new_metadata(dataset, plan, level.mag)))
                       for level in config.levels)
        source_spec = config.source_spec if source is None else dict(config.source_spec, metadata=source)
        known.append(dataclasses.replace(config, source_spec=source_spec, levels=levels))
    return known


def _new_metadata(dataset: Dataset, plan: LayerPlan, mag: Mag) -> dict:
    return arrays.new_mag_spec(plan.layer, dataset.path, mag)["metadata"]


def list_passes(dataset_path: str, configs: Sequence[PassConfig],
                known: Sequence = ()) -> list[markers.PassListing]:
    """One listing of each layer's pass state, the layers at once; `known[i]`, if given, is
    a listing of config i that is still current (no request)."""
    known = list(known) + [None] * (len(configs) - len(known))
    return storage.concurrently([(lambda listing=listing: listing) if listing is not None
                                 else functools.partial(markers.PassListing.of, c)
                                 for c, listing in zip(configs, known)], dataset_path)


def _update_ngff(dataset: Dataset, plan: LayerPlan, index: int) -> None:
    listed = sorted({*plan.layer.mags, *[m for p in plan.passes[: index + 1] for m in p.target_mags]},
                    key=lambda m: (max(m), m))
    arrays.update_ngff(storage.join_inside(dataset.path, plan.layer.name), plan.layer, dataset.voxel_size,
                       dataset.unit, listed)


def _with_pass_mags(plans: Sequence[LayerPlan], index: int, raw: dict) -> dict:
    for plan in plans:
        raw = with_new_mags(raw, plan.layer.name, list(plan.passes[index].target_mags))
    return raw


def _collect_metrics(result, metrics: dict) -> Optional[dict]:
    """Adds the pass's counters to `metrics` (by name); returns them per layer, or None
    where the runner reports none (DaskRunner) or the pipeline was abandoned."""
    try:
        counters = result.metrics().query()["counters"]
    except Exception:  # some runners report no metrics
        return None
    layers: dict = {}
    for counter in counters:
        name, namespace = counter.key.metric.name, counter.key.metric.namespace
        value = counter.committed or counter.attempted or 0
        metrics[name] = metrics.get(name, 0) + value
        if namespace.startswith(COUNTERS + "/"):
            per_layer = layers.setdefault(namespace[len(COUNTERS) + 1:], {})
            per_layer[name] = per_layer.get(name, 0) + value
    return layers


def unlisted_mags(dataset_path: str, plans: Sequence[LayerPlan]) -> list[str]:
    """`layer/mag` of every mag the plans make that the properties do not list (read again)."""
    listed = {layer.name: set(layer.mags) for layer in load_dataset(dataset_path).layers}
    return [f"{plan.layer.name}/{mag_name(mag)}" for plan in plans for a_pass in plan.passes
            for mag in a_pass.target_mags if mag not in listed.get(plan.layer.name, set())]
