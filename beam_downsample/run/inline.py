"""A downsampling job inside a user's own Beam pipeline: `DownsamplePyramid`.

The command runs one pipeline per pass and plans before the first. Here
the whole job is one composite transform of the user's pipeline, so:

- the pass structure (mags, passes, unit grids, configs) is planned when the
  pipeline is built, from the properties: it does not depend on the data,
  and bad options fail there, before anything runs;
- the units are planned inside the pipeline, after the step the transform
  waits on has written the source mag (`beam.transforms.util.WaitOn`): a
  listing of the source needs the data;
- pass k+1 starts after pass k: its units come from an element that pass
  k's Finish step emits only once every unit of pass k is done (a global
  count as a side input), and it lists what pass k wrote.

It does what `run.job` does for the command (create the mag arrays, done-
markers, finish each pass's mags, NGFF metadata, list them in the
properties, remove the run state), with the same functions, so a run that
fails or is cancelled resumes like the command's. It takes no layer lock:
that is the caller's (`lock_layers`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any, Iterator, Optional, Sequence

import apache_beam as beam
from apache_beam.transforms.util import WaitOn

from beam_downsample.core import sizing
from beam_downsample.core.errors import RunError
from beam_downsample.plan import JobOptions, LayerPlan, interrupted_refreshes, pass_units, plan_job
from beam_downsample.plan.options import job_options
from beam_downsample.plan.units import COMPILED_MIN_VOXELS
from beam_downsample.run import job
from beam_downsample.run.result import LayerResult, add_figures, pass_figures, planned_result
from beam_downsample.state import markers, progress
from beam_downsample.store import locks, storage
from beam_downsample.store.properties import Dataset, load_dataset
from beam_downsample.transforms import seeds
from beam_downsample.transforms.downsample import RunUnits


@dataclasses.dataclass
class _State:
    """What flows from step to step of the job (one element): the dataset, the plans made
    inside the pipeline, the running totals, and the pass's planned and unfinished units."""

    dataset: Dataset
    plans: list
    units: dict
    already: dict
    figures: dict
    planned: list = dataclasses.field(default_factory=list)
    todo: list = dataclasses.field(default_factory=list)


class DownsamplePyramid(beam.PTransform):
    """Downsamples layers of a WEBKNOSSOS dataset inside your own Beam pipeline.

    `pipeline | DownsamplePyramid(target, ...)` starts the job with the pipeline;
    `written | DownsamplePyramid(target, ...)` starts it once the PCollection `written`
    (your step that wrote the finest mag) is complete. The output is a PCollection of one
    `LayerResult` per layer, emitted when the job is done.

    The transform plans the passes when the pipeline is built (the layer must be in the
    properties and its finest mag's array must exist then; it may still be empty), plans
    the units after the wait, creates the new mags, runs the passes in order, finishes
    each pass's mags, writes the NGFF metadata, lists the mags in the properties and
    removes its run state (done-markers under `TARGET/.beam-downsample/`). A run that
    fails resumes when the same pipeline runs again. It takes no layer lock: hold
    `lock_layers(target, layer_name)` around `pipeline.run()` to keep a
    `beam-downsample` of the same layer away.

    Args:
        target: the dataset directory or `gs://bucket/path`.
        layer_name: only this layer (default: every layer).
        sampling_mode: as for `beam_downsample.downsample`.
        coarsest_mag: as for `beam_downsample.downsample`.
        interpolation: as for `beam_downsample.downsample`.
        bboxes: refresh the existing mags inside these boxes, as for `beam_downsample.downsample`.
        memory_budget: memory of one worker of your runner, for sizing the work units
            (bytes; default 2 GiB).
        worker_cores: cores of one worker (tile threads per unit: this plus one; default 1).
    """

    def __init__(self, target: str, layer_name: Optional[str] = None, *, sampling_mode: str = "anisotropic",
                 coarsest_mag: Any = None, interpolation: Optional[str] = None, bboxes: Sequence[Any] = (),
                 memory_budget: int = sizing.FLOOR_BUDGET, worker_cores: int = 1):
        super().__init__()
        self._target = str(target)
        self._options = job_options(
            sampling_mode=sampling_mode, layer_name=layer_name, coarsest_mag=coarsest_mag,
            interpolation=interpolation, bboxes=bboxes, memory_budget=memory_budget, worker_memory=memory_budget,
            worker_cores=worker_cores,
        )
        plans = plan_job(load_dataset(self._target), self._options)  # raises UsageError/DatasetError now
        self._structure = [_structure(p) for p in plans]
        self._passes = max((len(p.passes) for p in plans), default=0)
        self._pass_work = [([p.grids[i] for p in plans if i < len(p.passes)],
                            [_compiled(p, i) for p in plans if i < len(p.passes)]) for i in range(self._passes)]

    def expand(self, pcoll):
        pipeline = pcoll.pipeline
        start = pipeline | "Start" >> beam.Create([None])
        if not isinstance(pcoll, beam.pvalue.PBegin):
            start = start | "WaitForInput" >> WaitOn(pcoll)
        state = start | "Plan" >> beam.Map(_plan, self._target, self._options, self._structure)
        for index, (grids, configs) in enumerate(self._pass_work):
            name = f"Pass{index + 1}"
            listed = state | f"{name}/List" >> beam.Map(_list_units, index)
            done = (listed
                    | f"{name}/Seeds" >> beam.FlatMap(_seeds, index)
                    | f"{name}/Run" >> RunUnits(grids, configs)
                    | f"{name}/Count" >> beam.combiners.Count.Globally())
            state = listed | f"{name}/Finish" >> beam.Map(_finish, index, beam.pvalue.AsSingleton(done))
        return state | "Done" >> beam.FlatMap(_done)


@contextlib.contextmanager
def lock_layers(target: str, layer_name: Optional[str] = None) -> Iterator[None]:
    """Holds the layer locks `beam-downsample` takes (all layers, or `layer_name`) while the
    block runs; raises DatasetError (LockError) if another run holds one."""
    dataset = load_dataset(str(target))
    names = [dataset.layer(layer_name).name] if layer_name else [layer.name for layer in dataset.layers]
    with locks.LayerLocks(dataset, names):
        yield


def _structure(plan: LayerPlan) -> tuple:
    """What the workers were built with: the same at construction and after the wait."""
    configs = tuple(dataclasses.replace(c, compiled=False) for c in plan.configs)
    return plan.layer.name, plan.target_mags, plan.passes, plan.grids, configs


def _compiled(plan: LayerPlan, index: int):
    """The pass's config for the workers: numba kernels where the pass may reduce many voxels
    (its units are not known when the pipeline is built)."""
    config = plan.configs[index]
    voxels = sum(r.voxels for r in config.regions) if config.regions else plan.grids[index].region.voxels
    return dataclasses.replace(config, compiled=voxels >= COMPILED_MIN_VOXELS)


def _plan(_, target: str, options: JobOptions, structure: list) -> _State:
    """After the wait: plan the units from listings of what is stored, create the new mags."""
    dataset = load_dataset(target)
    plans = plan_job(dataset, options)
    if [_structure(p) for p in plans] != structure:
        raise RunError(f"{target}: the layers changed between building the pipeline and running it "
                       "(their mags or bounding boxes); build the pipeline again")
    for warning in interrupted_refreshes(dataset, plans):
        logging.getLogger(__name__).warning("beam-downsample: %s", warning)
    job.create_targets(dataset, plans)
    names = [p.layer.name for p in plans]
    return _State(dataset, plans, dict.fromkeys(names, 0), dict.fromkeys(names, 0),
                  {name: [0, 0, 0, 0] for name in names})


def _list_units(state: _State, index: int) -> _State:
    """Pass `index`'s planned units (a later pass lists what the pass before wrote) and those
    without a done-marker; stale tallies and failure records of an earlier attempt go."""
    active = [p for p in state.plans if index < len(p.passes)]
    for plan in active:
        config = plan.configs[index]
        storage.delete_tree(progress.tally_dir(config.marker_dir))
        for stale in markers.failures(config):
            storage.delete(stale)
    planned = pass_units(state.plans, index)
    todo = job.unfinished([p.configs[index] for p in active], [p.grids[index] for p in active], planned)
    return dataclasses.replace(state, planned=planned, todo=todo)


def _seeds(state: _State, index: int) -> list[tuple]:
    active = [p for p in state.plans if index < len(p.passes)]
    return [seed for plan, todo in zip(active, state.todo)
            for seed in seeds.make_seeds(plan.grids[index], todo, plan.configs[index].marker_dir)]


def _finish(state: _State, index: int, count: int) -> _State:
    """Once every unit of pass `index` ran (`count` of them): check the markers, finish the
    pass's mags, NGFF metadata and properties, add up what the pass did."""
    active = [p for p in state.plans if index < len(p.passes)]
    configs = [p.configs[index] for p in active]
    job.check_pass(index, configs, [p.grids[index] for p in active], state.planned)
    tallies = progress.layer_tallies([c.marker_dir for c in configs])
    figures = dict(state.figures)
    units, already = dict(state.units), dict(state.already)
    for plan, planned, todo in zip(active, state.planned, state.todo):
        name = plan.layer.name
        units[name] += len(planned)
        already[name] += len(planned) - len(todo)
        figures[name] = add_figures(figures[name], pass_figures(len(todo), None, tallies.get(name, [0, 0, 0, 0])))
    del count  # the side input only orders this step after the pass's units
    job.finish_pass(state.dataset, active, index)
    return dataclasses.replace(state, units=units, already=already, figures=figures, planned=[], todo=[])


def _done(state: _State) -> Iterator[LayerResult]:
    job.clean_up(state.dataset, state.plans)
    for plan in state.plans:
        name = plan.layer.name
        yield planned_result(plan, state.units[name], state.already[name], state.figures[name])
