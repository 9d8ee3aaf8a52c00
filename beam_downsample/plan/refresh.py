"""`--bbox`: refresh a layer's mags inside a box after its finest mag was edited.

A voxel of a mag depends only on the finest-mag voxels of its own footprint
(block reductions; border voxels are replicated from inside the same
footprint), so an edit inside a box B changes, in each mag, exactly B
aligned outward to that mag. A refresh recomputes those voxels, each mag
from the one before (chained, as a full run does), and writes nothing else:
the result is what deleting the mags and downsampling again would give.

Pure arithmetic on the plan, no I/O: planning (`passes`, `units`) applies it.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Sequence

from beam_downsample.core.box import Box, region_in_mag
from beam_downsample.core.grid import Pass, UnitGrid, source_region
from beam_downsample.core.mags import Mag, mag_name, sort_mags
from beam_downsample.store.properties import Layer


class RefreshError(ValueError):
    """A `--bbox` refresh cannot be done as asked (a usage error: nothing is touched)."""


def parse_box(text: str) -> Box:
    """`x,y,z,width,height,depth` in mag-1 voxels (the WEBKNOSSOS CLI's convention)."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 6 or not all(re.fullmatch(r"[+-]?\d{1,12}", p) for p in parts):
        raise RefreshError(f"--bbox: {text!r} is not x,y,z,width,height,depth (six integers, mag-1 voxels)")
    x, y, z, width, height, depth = (int(p) for p in parts)
    if min(width, height, depth) <= 0:
        raise RefreshError(f"--bbox: width, height and depth must be positive, got {width},{height},{depth}")
    return Box((x, y, z), (x + width, y + height, z + depth))


def box_text(box: Box) -> str:
    """The box as `--bbox` takes it."""
    return ",".join(str(v) for v in (*box.start, *box.shape))


def finest_mag(layer: Layer) -> Mag:
    """A refresh recomputes from the finest mag, the one that was edited."""
    return sort_mags(layer.mags)[0]


def layer_box(box: Box, layer: Layer) -> Box:
    """The part of the box inside the layer; a box that misses the layer is refused."""
    inside = box.intersect(layer.bbox)
    if inside.empty:
        raise RefreshError(
            f"--bbox {box_text(box)} lies outside layer {layer.name!r} (its bounding box is {box_text(layer.bbox)})"
        )
    return inside


def split_chain(layer: Layer, source: Mag, targets: Sequence[Mag]) -> tuple[tuple[Mag, ...], tuple[Mag, ...]]:
    """(refreshed, made): the planned mags the layer has, up to the first it lacks, are
    refreshed inside the box; from the first missing one on, every mag is made in full
    (replacing any that exists), since it cannot be refreshed from an incomplete mag.

    A mag of the layer that the plan does not make would be left stale: refused.
    """
    planned = set(targets)
    stray = [m for m in sort_mags(layer.mags) if m != source and m not in planned]
    if stray:
        raise RefreshError(
            f"layer {layer.name!r} has mag {mag_name(stray[0])}, which this plan ("
            + ", ".join(mag_name(m) for m in targets)
            + ") does not make, so --bbox would leave it stale; give the --sampling-mode and --coarsest-mag "
            "the pyramid was made with, or delete that mag"
        )
    refreshed: list[Mag] = []
    for mag in targets:
        if mag not in layer.mags:
            break
        refreshed.append(mag)
    return tuple(refreshed), tuple(targets[len(refreshed):])


def write_region(box: Box, layer_bbox: Box, mag: Mag) -> Box:
    """The voxels of `mag` an edit inside `box` (mag 1) changes: the box aligned outward."""
    return region_in_mag(box, mag).intersect(region_in_mag(layer_bbox, mag))


def refresh_grid(grid: UnitGrid, a_pass: Pass, box: Box) -> UnitGrid:
    """The pass's grid cut to the source voxels its refreshed voxels need: the box aligned
    outward to the pass's coarsest mag, in source voxels (aligned, so every level's
    refreshed voxels have their whole footprint in some unit)."""
    return dataclasses.replace(grid, region=source_region(box, a_pass).intersect(grid.region))


def align_with(all_layers: Iterable[Layer], selected: Iterable[str]) -> set[Mag]:
    """The mags a full rerun would align to: every mag of the other layers, and only the
    finest of each refreshed layer (the rest would have been deleted)."""
    names = set(selected)
    mags: set[Mag] = set()
    for layer in all_layers:
        mags.update([finest_mag(layer)] if layer.name in names else layer.mags)
    return mags


SUFFIX = "_refresh_"


def marker_suffix(box: Box) -> str:
    """Markers of a refresh are only reused by a refresh of the same box."""
    return SUFFIX + "_".join(f"{a}-{b}" for a, b in zip(box.start, box.stop))


def interrupted(names: Iterable[str]) -> list[Box]:
    """The boxes of the refreshes whose pass directories `names` (of a layer's state
    directory) are left: refreshes that did not finish."""
    found = set()
    for name in names:
        match = re.search(re.escape(SUFFIX) + r"(-?\d+)-(-?\d+)_(-?\d+)-(-?\d+)_(-?\d+)-(-?\d+)$", name)
        if match:
            v = [int(g) for g in match.groups()]
            found.add(Box((v[0], v[2], v[4]), (v[1], v[3], v[5])))
    return sorted(found, key=lambda b: (b.start, b.stop))
