"""Plans a job: per layer the mags, the passes, each pass's unit grid and planned units,
from the properties and listings of what is stored. Writes nothing: everything is
checked here before the first byte is written (`run.job` runs the plan).

`plan_job` reads top to bottom: the layers (`layers`), their mags
(`pyramid`), the passes that make them (`passes`), the units of each pass
(`units`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import numpy as np

from beam_downsample.core.box import Box
from beam_downsample.core.config import PassConfig
from beam_downsample.core.errors import PlanningError
from beam_downsample.core.grid import Pass, UnitGrid, WorkUnit
from beam_downsample.core.mags import Mag
from beam_downsample.plan import layers, passes, pyramid, units
from beam_downsample.plan.options import JobOptions
from beam_downsample.plan.passes import WORKER_OVERHEAD_BYTES
from beam_downsample.store import arrays, storage
from beam_downsample.store.properties import Dataset, Layer


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
    refresh_boxes: tuple[Box, ...] = ()  # `--bbox` within the layer; its passes with `config.refresh` refresh them
    exact: tuple[bool, ...] = ()  # per pass: planned units are exactly those holding data (else an upper bound)
    # per pass: a listing of its state the launcher made while holding the layer's lock (`run.job.create_targets`),
    # still current when the pass starts (nothing else writes there), so the pass need not list it again
    listed: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)
    source_metadata: Optional[dict] = None  # pass 1's source array metadata as planning read it (zarr only)
    state_names: Optional[tuple] = None  # the names in the layer's state directory when it was planned

    @property
    def units(self) -> tuple[tuple[WorkUnit, ...], ...]:
        """The planned units as objects (small layers and tests only: this enumerates them)."""
        return tuple(tuple(grid.units(indices)) for grid, indices in zip(self.grids, self.planned))


def plan_job(dataset: Dataset, options: JobOptions) -> list[LayerPlan]:
    """Plans every selected layer; raises DatasetError/PlanningError/RefreshError before touching anything."""
    with arrays.metadata_read_once():
        chosen = layers.select(dataset, options)
        align_with = pyramid.aligned_with(dataset, chosen, options)
        budget = passes.unit_budget(options)
        # the layers at once: on a bucket each one's listings and reads wait on latency, not on the others
        # (and meanwhile each layer's state directory, for the warnings of `describe.interrupted_refreshes`)
        done = storage.concurrently([functools.partial(plan_layer, dataset, layer, options, align_with, budget)
                                     for layer in chosen]
                                    + [functools.partial(storage.list_names, storage.join_inside(
                                        dataset.path, arrays.STATE_DIR, layer.name)) for layer in chosen],
                                    dataset.path)
    plans = [dataclasses.replace(plan, state_names=tuple(names))
             for plan, names in zip(done[:len(chosen)], done[len(chosen):])]
    layers.check_write_paths(dataset, plans)
    return plans


def plan_layer(dataset: Dataset, layer: Layer, options: JobOptions, align_with, budget) -> LayerPlan:
    """One layer's plan: its mags, passes and units (steps 2-4)."""
    source = layers.source_mag(layer, options)
    targets = pyramid.layer_mags(dataset, layer, source, options, align_with)
    chain = passes.layer_passes(dataset, layer, source, targets, options, budget)
    grids, planned, configs, dense_reason, exact = units.layer_units(layer, chain, budget)
    metadata = None
    if configs and configs[0].source_spec["driver"] != "wkw":  # read during planning already: no request
        metadata = arrays.open_array(configs[0].source_spec, open=True).spec().to_json()["metadata"]
    plan = LayerPlan(layer, tuple(targets), chain.passes, grids, planned, configs, dense_reason, chain.boxes, exact,
                     source_metadata=metadata)
    check_worker_memory(plan, options)
    return plan


def check_worker_memory(plan: LayerPlan, options: JobOptions) -> None:
    """A cluster worker whose memory cannot hold even the smallest unit would be killed
    again and again (SLURM's --mem, the dask nanny): refuse before submitting anything."""
    if options.worker_memory is None:
        return
    for index in range(len(plan.passes)):
        need = WORKER_OVERHEAD_BYTES + units.unit_memory(plan, index)
        if need > options.worker_memory:
            raise PlanningError(
                f"layer {plan.layer.name!r} pass {index + 1}: a worker needs about {need / (1 << 20):.0f} MiB "
                f"(~{WORKER_OVERHEAD_BYTES >> 20} MiB for itself plus its work unit), more than the "
                f"{options.worker_memory / (1 << 20):.0f} MiB of one worker; raise mem in --job-resources "
                "(or --memory-budget where there is no mem)"
            )


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
    if index == 0 or not listed or not active:
        return [p.planned[index] for p in active]
    return storage.concurrently([functools.partial(_listed_units, p, index) for p in active],
                                active[0].configs[index].marker_dir)


def _listed_units(plan: LayerPlan, index: int) -> np.ndarray:
    if plan.configs[index].refresh:
        return plan.planned[index]
    return units.source_units(plan.configs[index], plan.grids[index])[0]
