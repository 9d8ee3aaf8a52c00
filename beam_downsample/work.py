"""One work unit, end to end: read the source box once, reduce level after
level in memory, write each level's part of the layer's region.

Plain Python (no Beam): the DoFn in `transforms` only opens the arrays and
calls `run_unit`; tests call it directly too.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np
import tensorstore as ts

from beam_downsample import io, reduce
from beam_downsample.mags import Mag
from beam_downsample.planning import Box, WorkUnit


@dataclasses.dataclass(frozen=True)
class LevelConfig:
    mag: Mag
    factor: Mag  # from the level before (or the pass's source)
    region: Box  # the layer's bounding box aligned outward, in this mag's voxels
    spec: dict  # tensorstore spec of the (already created) target array


@dataclasses.dataclass(frozen=True)
class PassConfig:
    """Everything a worker needs for one pass of one layer: plain, picklable data."""

    layer: str
    pass_index: int
    source_mag: Mag
    source_spec: dict
    source_region: Box  # the bounding box aligned outward, in source-mag voxels
    channels: int
    interpolation: str
    levels: tuple[LevelConfig, ...]
    marker_dir: str  # done-markers of this pass's units live here


@dataclasses.dataclass
class UnitStats:
    voxels_read: int = 0
    voxels_written: int = 0


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


def marker_path(config: PassConfig, unit: WorkUnit) -> str:
    return os.path.join(config.marker_dir, unit.key.replace("/", "__") + ".done")


def is_done(config: PassConfig, unit: WorkUnit) -> bool:
    return os.path.exists(marker_path(config, unit))


def mark_done(config: PassConfig, unit: WorkUnit) -> None:
    """Written only after every level of the unit is on disk; creation is atomic."""
    path = marker_path(config, unit)
    temp = f"{path}.{os.getpid()}.tmp"
    with open(temp, "w", encoding="utf-8") as handle:
        handle.write("done\n")
    os.replace(temp, path)


def run_unit(
    config: PassConfig,
    unit: WorkUnit,
    source: ts.TensorStore,
    targets: Sequence[ts.TensorStore],
) -> UnitStats:
    """Computes and writes every level of `unit`. Deterministic, so a retry rewrites the same bytes."""
    stats = UnitStats()
    box = unit.box
    data = io.read_box(source, box, config.channels)
    stats.voxels_read = box.voxels
    replicate_edges(data, box, config.source_region)
    pending = []
    for level, target in zip(config.levels, targets):
        data = reduce.downsample(data, level.factor, config.interpolation)
        box = Box(
            tuple(a // f for a, f in zip(box.start, level.factor)),  # type: ignore[arg-type]
            tuple(b // f for b, f in zip(box.stop, level.factor)),  # type: ignore[arg-type]
        )
        written = box.intersect(level.region)
        if written.empty:
            continue
        offset = [a - b for a, b in zip(written.start, box.start)]
        part = data[(slice(None),) + tuple(slice(o, o + s) for o, s in zip(offset, written.shape))]
        pending.append(io.write_region(target, written, part))
        stats.voxels_written += written.voxels
        replicate_edges(data, box, level.region)
    for future in pending:
        future.result()
    return stats
