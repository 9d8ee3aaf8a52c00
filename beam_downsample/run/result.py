"""What a run did, per layer: mags made or refreshed, units, voxels and bytes.

The units a pass had to do and those already done before it started come
from the done-markers (one listing), on every runner. How many of the units
this run finished were computed or skipped as empty, and the voxels read and
written, come from Beam's counters where the runner reports them and they
add up with the markers; else from the workers' tallies (`state.progress`)
where those add up; else they are None (e.g. after a worker died and its
units ran again: neither source saw every unit exactly once).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence

from beam_downsample.core.mags import mag_name
from beam_downsample.plan.job import LayerPlan

FIGURES = ("work_units", "work_units_empty", "voxels_read", "voxels_written")


@dataclasses.dataclass(frozen=True)
class LayerResult:
    """What one run did to one layer.

    Attributes:
        layer: the layer's name.
        made: mags made in full, finest first (e.g. `("2-2-1", "4-4-2")`).
        refreshed: existing mags refreshed inside the boxes (`bboxes`), finest first.
        units: work units of all passes (after a dry run: as planned, later passes an upper bound).
        units_already_done: units skipped because an interrupted earlier run had finished them.
        units_run: units computed in this run; None where the runner reported no figures (see the docs).
        units_empty: units skipped in this run because their source holds no data; None likewise.
        voxels_read: source voxels read (stored chunks only); None likewise.
        voxels_written: voxels written, all mags; None likewise.
        bytes_read: `voxels_read` times the bytes of one voxel (all channels), uncompressed; None likewise.
        bytes_written: `voxels_written` likewise.
    """

    layer: str
    made: tuple[str, ...] = ()
    refreshed: tuple[str, ...] = ()
    units: int = 0
    units_already_done: int = 0
    units_run: Optional[int] = None
    units_empty: Optional[int] = None
    voxels_read: Optional[int] = None
    voxels_written: Optional[int] = None
    bytes_read: Optional[int] = None
    bytes_written: Optional[int] = None


def planned_result(plan: LayerPlan, units: int = 0, already_done: int = 0,
                   figures: Optional[Sequence[int]] = None) -> LayerResult:
    """A layer's result from its plan and what its passes did; `figures` are [units run,
    units empty, voxels read, voxels written] summed over the passes (None: unknown)."""
    made = tuple(mag_name(m) for c, p in zip(plan.configs, plan.passes) if not c.refresh for m in p.target_mags)
    refreshed = tuple(mag_name(m) for c, p in zip(plan.configs, plan.passes) if c.refresh for m in p.target_mags)
    if figures is None:
        return LayerResult(plan.layer.name, made, refreshed, units, already_done)
    bytes_per_voxel = plan.layer.dtype.itemsize * plan.layer.num_channels
    run, empty, read, written = (int(v) for v in figures)
    return LayerResult(plan.layer.name, made, refreshed, units, already_done, run, empty, read, written,
                       read * bytes_per_voxel, written * bytes_per_voxel)


def pass_figures(finished: int, counters: Optional[Mapping[str, int]],
                 tallies: Optional[Sequence[int]]) -> Optional[list[int]]:
    """[units run, units empty, voxels read, voxels written] of one layer in one pass: the
    counters if they count exactly the `finished` units (the markers' count), else the
    tallies if they do, else None."""
    if counters is not None:
        figures = [int(counters.get(name, 0)) for name in FIGURES]
        if figures[0] + figures[1] == finished:
            return figures
    if tallies is not None and tallies[0] + tallies[1] == finished:
        return [int(v) for v in tallies[:4]]
    return [0, 0, 0, 0] if finished == 0 else None


def add_figures(total: Optional[list[int]], figures: Optional[list[int]]) -> Optional[list[int]]:
    """Sums per-pass figures; unknown in any pass is unknown in total."""
    if total is None or figures is None:
        return None
    return [a + b for a, b in zip(total, figures)]
