"""Planning step 3: the layer's mags grouped into passes (one read of a source mag
makes each pass's mags), each with the config its workers get.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from beam_downsample.core import sizing
from beam_downsample.core.box import Box, region_in_mag
from beam_downsample.core.config import LevelConfig, PassConfig
from beam_downsample.core.grid import CHUNK, Pass, UnitBudget, tile_alignment
from beam_downsample.core.machine import available_cores
from beam_downsample.core.mags import Mag, factor_between, mag_name
from beam_downsample.kernels import reduce
from beam_downsample.plan import refresh
from beam_downsample.plan.layers import check_refreshable, check_same_reduction
from beam_downsample.plan.options import JobOptions
from beam_downsample.store import arrays, storage
from beam_downsample.store.arrays import STATE_DIR
from beam_downsample.store.properties import Dataset, Layer

WORKER_OVERHEAD_BYTES = sizing.PROCESS_BYTES  # interpreter, Beam, tensorstore and its pools


@dataclasses.dataclass(frozen=True)
class LayerPasses:
    """A layer's passes and their configs; the first `refreshing` passes refresh `boxes` (`--bbox`)."""

    passes: tuple[Pass, ...]
    configs: tuple[PassConfig, ...]
    refreshing: int = 0
    boxes: tuple[Box, ...] = ()  # `--bbox` within the layer


def unit_budget(options: JobOptions) -> UnitBudget:
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
    return UnitBudget(bytes=per_worker, threads=threads, tile_voxels=sizing.tile_voxels(per_worker, threads))


def layer_passes(
    dataset: Dataset, layer: Layer, source: Mag, targets: Sequence[Mag], options: JobOptions, budget: UnitBudget,
) -> LayerPasses:
    """The passes that make `targets` from `source`; a refresh first refreshes the mags the
    layer has, then makes the rest in full."""
    interpolation = options.interpolation or reduce.DEFAULT_INTERPOLATION[layer.category]
    bytes_per_voxel = layer.dtype.itemsize * layer.num_channels
    boxes, refreshing = (), 0
    if not options.bboxes:
        passes = group_passes(source, targets, bytes_per_voxel, budget)
    else:
        boxes = refresh.layer_boxes(options.bboxes, layer)
        kept, made = refresh.split_chain(layer, source, targets)
        check_refreshable(dataset, layer, source)
        check_same_reduction(dataset, layer, kept, interpolation, options.ignore_background)
        first = group_passes(source, kept, bytes_per_voxel, budget)
        passes = first + group_passes(kept[-1] if kept else source, made, bytes_per_voxel, budget)
        refreshing = len(first)
    configs = [pass_config(dataset, layer, index, a_pass, interpolation, budget, boxes if index < refreshing else (),
                           options.ignore_background)
               for index, a_pass in enumerate(passes)]
    return LayerPasses(tuple(passes), tuple(configs), refreshing, boxes)


def group_passes(
    source_mag: Mag,
    target_mags: Sequence[Mag],
    bytes_per_voxel: int,
    budget: UnitBudget,
) -> list[Pass]:
    """Splits the chain of target mags into passes whose smallest unit (one
    32^3 chunk of the pass's coarsest mag) fits the budget."""
    passes: list[Pass] = []
    current_source = source_mag
    levels: list[Mag] = []
    for target in target_mags:
        candidate = Pass(current_source, tuple(levels) + (target,))
        smallest = [CHUNK * f for f in factor_between(current_source, target)]
        if levels and budget.unit_bytes(candidate, smallest, bytes_per_voxel) > budget.bytes:
            passes.append(Pass(current_source, tuple(levels)))
            current_source = levels[-1]
            levels = []
        levels.append(target)
    if levels:
        passes.append(Pass(current_source, tuple(levels)))
    return passes


def pass_dir_name(a_pass: Pass, reduction: str) -> str:
    """Markers are only reused by a rerun that would write the same voxels (the same
    mags, the same reduction: `mode` and `mode-nonzero` differ)."""
    mags = mag_name(a_pass.source_mag) + "_to_" + "_".join(mag_name(m) for m in a_pass.target_mags)
    return f"{mags}_{reduction}"


def pass_config(
    dataset: Dataset, layer: Layer, index: int, a_pass: Pass, interpolation: str, budget: UnitBudget,
    boxes: Sequence[Box] = (), ignore_background: bool = False,
) -> PassConfig:
    """`boxes`: this pass refreshes the existing target mags inside them (mag-1 voxels)."""
    if index == 0:
        source_spec = arrays.existing_mag_spec(layer, dataset.path, a_pass.source_mag)
    else:  # the previous pass's coarsest mag, finished before this pass starts
        source_spec = arrays.mag_spec(layer, arrays.new_mag_path(layer, dataset.path, a_pass.source_mag))
    levels = []
    previous = a_pass.source_mag
    for mag in a_pass.target_mags:
        levels.append(
            LevelConfig(
                mag=mag,
                factor=factor_between(previous, mag),
                region=region_in_mag(layer.bbox, mag),
                spec=arrays.target_spec(layer, dataset.path, mag),
                writes=refresh.write_regions(boxes, layer.bbox, mag),
            )
        )
        previous = mag
    return PassConfig(
        layer=layer.name,
        pass_index=index,
        source_mag=a_pass.source_mag,
        source_spec=source_spec,
        source_region=region_in_mag(layer.bbox, a_pass.source_mag),
        channels=layer.num_channels,
        interpolation=interpolation,
        levels=tuple(levels),
        marker_dir=storage.join_inside(dataset.path, STATE_DIR, layer.name,
                                       pass_dir_name(a_pass, reduce.reduction(interpolation, ignore_background))
                                       + (refresh.marker_suffix(boxes) if boxes else "")),
        tile_alignment=tile_alignment(a_pass),
        threads=budget.threads,
        tile_voxels=budget.tile_voxels,
        refresh=bool(boxes),
        regions=refresh.source_regions(boxes, layer.bbox, a_pass),
        ignore_background=ignore_background,
    )
