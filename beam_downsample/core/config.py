"""What a worker needs for one pass of one layer: plain, picklable data built by
planning (`plan.passes`) and read by the unit's work (`transforms.work`)."""

from __future__ import annotations

import dataclasses

from beam_downsample.core.box import Box
from beam_downsample.core.mags import Mag
from beam_downsample.kernels.background import reduction


@dataclasses.dataclass(frozen=True)
class LevelConfig:
    mag: Mag
    factor: Mag  # from the level before (or the pass's source)
    region: Box  # the layer's bounding box aligned outward, in this mag's voxels
    spec: dict  # tensorstore spec of the (already created) target array
    writes: tuple[Box, ...] = ()  # a `--bbox` refresh writes only these voxels (its boxes aligned outward)


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
    tile_alignment: tuple[int, int, int] = (32, 32, 32)
    threads: int = 1
    tile_voxels: int = 16 << 20
    refresh: bool = False  # a `--bbox` refresh: units over empty source run too, to clear what was there
    # a refresh reads and reduces only these source voxels of a unit (its boxes' source regions)
    regions: tuple[Box, ...] = ()
    compiled: bool = True  # numba kernels; a pass with little work uses numpy's (the same bytes, no numba load)
    # > 0: the source is remote; a unit fetches its encoded chunks in boxes of at most this many raw
    # bytes, each in one round of requests (store.prefetch), and decodes them from memory
    prefetch_bytes: int = 0
    ignore_background: bool = False  # reduce each block's non-zero voxels only (`--ignore-background`)

    @property
    def reduction(self) -> str:
        """The kernels' name of the pass's reduction: the interpolation, or e.g. `mode-nonzero`."""
        return reduction(self.interpolation, self.ignore_background)
