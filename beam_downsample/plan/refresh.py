"""`--bbox`: refresh a layer's mags inside boxes after its finest mag was edited there.

A voxel of a mag depends only on the finest-mag voxels of its own footprint
(block reductions; border voxels are replicated from inside the same
footprint), so an edit inside a box B changes, in each mag, exactly B
aligned outward to that mag. A refresh recomputes those voxels, each mag
from the one before (chained, as a full run does), and writes nothing else:
the result is what deleting the mags and downsampling again would give.

Several boxes (`--bbox` repeated, `--bbox-file`) are one refresh: each pass
runs the units that overlap any box's source region once, a unit reads and
reduces only those regions, and each mag is written only inside the boxes
(aligned outward). Overlapping, adjacent and duplicate boxes are fine.

Pure arithmetic on the plan, no I/O: planning (`passes`, `units`) applies it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from typing import Iterable, Sequence

import numpy as np

from beam_downsample.core.box import Box, hull, region_in_mag
from beam_downsample.core.errors import UsageError
from beam_downsample.core.grid import Pass, UnitGrid, source_region
from beam_downsample.core.mags import Mag, mag_name, sort_mags
from beam_downsample.store.properties import Layer


class RefreshError(UsageError):
    """A `--bbox` refresh cannot be done as asked (a usage error: nothing is touched)."""


def parse_box(text: str, where: str = "--bbox") -> Box:
    """`x,y,z,width,height,depth` in mag-1 voxels (the WEBKNOSSOS CLI's convention)."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 6 or not all(re.fullmatch(r"[+-]?\d{1,12}", p) for p in parts):
        raise RefreshError(f"{where}: {text!r} is not x,y,z,width,height,depth (six integers, mag-1 voxels)")
    return _box(*(int(p) for p in parts), where=where)


def _box(x: int, y: int, z: int, width: int, height: int, depth: int, where: str) -> Box:
    if min(width, height, depth) <= 0:
        raise RefreshError(f"{where}: width, height and depth must be positive, got {width},{height},{depth}")
    return Box((x, y, z), (x + width, y + height, z + depth))


def as_box(value, where: str = "bboxes") -> Box:
    """A box given to the library: `"x,y,z,w,h,d"`, six integers, a `Box`, a WEBKNOSSOS
    `BoundingBox` (`topleft` and `size`) or its JSON form (`topLeft`, `width`, `height`, `depth`)."""
    if isinstance(value, Box):
        return value
    if isinstance(value, str):
        return parse_box(value, where)
    if isinstance(value, dict) and "topLeft" in value:
        value = [*value["topLeft"], *(value.get(k) for k in ("width", "height", "depth"))]
    elif hasattr(value, "topleft") and hasattr(value, "size"):
        value = [*value.topleft, *value.size]
    try:
        numbers = [int(v) for v in value]
        exact = all(int(v) == v and not isinstance(v, bool) for v in value)
    except (TypeError, ValueError):
        numbers, exact = [], False
    if len(numbers) != 6 or not exact:
        raise RefreshError(f"{where}: {value!r} is not x,y,z,width,height,depth (six integers, mag-1 voxels)")
    return _box(*numbers, where=where)


def parse_box_file(text: str, name: str) -> list[Box]:
    """The boxes of a `--bbox-file`: one `x,y,z,width,height,depth` per line (blank lines and
    `#` comments skipped), or a JSON list of such strings, six-number lists or WEBKNOSSOS
    bounding boxes. A bad entry is refused naming its line (or its position in the list)."""
    if text.lstrip().startswith("["):
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as error:
            raise RefreshError(f"--bbox-file {name} line {error.lineno}: not valid JSON ({error.msg})") from None
        if not isinstance(entries, list):
            raise RefreshError(f"--bbox-file {name}: expected a JSON list of boxes")
        return [as_box(entry, f"--bbox-file {name} entry {index + 1}") for index, entry in enumerate(entries)]
    boxes = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if line:
            boxes.append(parse_box(line, f"--bbox-file {name} line {number}"))
    if not boxes:
        raise RefreshError(f"--bbox-file {name}: no boxes in it")
    return boxes


def normalised(boxes: Iterable[Box]) -> tuple[Box, ...]:
    """Boxes without duplicates, in one order: the same set gives the same plan and markers."""
    return tuple(sorted(set(boxes), key=lambda b: (b.start, b.stop)))


def box_text(box: Box) -> str:
    """The box as `--bbox` takes it."""
    return ",".join(str(v) for v in (*box.start, *box.shape))


def boxes_text(boxes: Sequence[Box], limit: int = 3) -> str:
    """`--bbox A --bbox B` (a few boxes), or `N boxes` (many)."""
    if len(boxes) > limit:
        return f"{len(boxes)} boxes"
    return " ".join(f"--bbox {box_text(box)}" for box in boxes)


def finest_mag(layer: Layer) -> Mag:
    """A refresh recomputes from the finest mag, the one that was edited."""
    return sort_mags(layer.mags)[0]


def layer_boxes(boxes: Sequence[Box], layer: Layer) -> tuple[Box, ...]:
    """The parts of the boxes inside the layer; a box that misses the layer is refused."""
    inside = []
    for box in boxes:
        part = box.intersect(layer.bbox)
        if part.empty:
            raise RefreshError(f"--bbox {box_text(box)} lies outside layer {layer.name!r} "
                               f"(its bounding box is {box_text(layer.bbox)})")
        inside.append(part)
    return normalised(inside)


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


def write_regions(boxes: Sequence[Box], layer_bbox: Box, mag: Mag) -> tuple[Box, ...]:
    """The voxels of `mag` an edit inside `boxes` (mag 1) changes: each box aligned outward."""
    region = region_in_mag(layer_bbox, mag)
    return tuple(part for part in (region_in_mag(box, mag).intersect(region) for box in boxes) if not part.empty)


def source_regions(boxes: Sequence[Box], layer_bbox: Box, a_pass: Pass) -> tuple[Box, ...]:
    """The source voxels the pass's refreshed voxels need, per box: the box aligned outward to
    the pass's coarsest mag, in source voxels (aligned, so every level's refreshed voxels have
    their whole footprint in it), inside the pass's region."""
    region = source_region(layer_bbox, a_pass)
    return tuple(part for part in (source_region(box, a_pass).intersect(region) for box in boxes)
                 if not part.empty)


def refresh_grid(grid: UnitGrid, regions: Sequence[Box]) -> UnitGrid:
    """The pass's grid cut to the hull of the boxes' source `regions` (its cells stay the same)."""
    return dataclasses.replace(grid, region=hull(regions).intersect(grid.region))


def box_units(grid: UnitGrid, regions: Sequence[Box]) -> np.ndarray:
    """The units of the (cut) grid that overlap some box's source region: each once, however
    many boxes touch it. Units over the gaps between scattered boxes are not among them."""
    return grid.overlapping(np.array([r.start for r in regions]), np.array([r.stop for r in regions]))


def align_with(all_layers: Iterable[Layer], selected: Iterable[str]) -> set[Mag]:
    """The mags a full rerun would align to: every mag of the other layers, and only the
    finest of each refreshed layer (the rest would have been deleted)."""
    names = set(selected)
    mags: set[Mag] = set()
    for layer in all_layers:
        mags.update([finest_mag(layer)] if layer.name in names else layer.mags)
    return mags


SUFFIX = "_refresh_"
BOXES_FILE = "bboxes.txt"  # in a pass directory of a refresh of several boxes: which boxes


def marker_suffix(boxes: Sequence[Box]) -> str:
    """Markers of a refresh are only reused by a refresh of the same set of boxes: one box is
    named by its corners, several by their number and a digest (the boxes are in BOXES_FILE)."""
    if len(boxes) == 1:
        return SUFFIX + "_".join(f"{a}-{b}" for a, b in zip(boxes[0].start, boxes[0].stop))
    digest = hashlib.sha256(boxes_file_text(boxes).encode()).hexdigest()[:16]
    return f"{SUFFIX}{len(boxes)}-boxes-{digest}"


def boxes_file_text(boxes: Sequence[Box]) -> str:
    """The boxes as a `--bbox-file` reads them."""
    return "".join(box_text(box) + "\n" for box in normalised(boxes))


_ONE_BOX = re.compile(re.escape(SUFFIX) + r"(-?\d+)-(-?\d+)_(-?\d+)-(-?\d+)_(-?\d+)-(-?\d+)$")
_SEVERAL = re.compile(re.escape(SUFFIX) + r"\d+-boxes-[0-9a-f]{16}$")


def refresh_dir(name: str) -> tuple[Box, ...] | None:
    """For the name of a pass directory of a refresh: its box `(box,)`, or `()` for a refresh of
    several boxes (read them from its BOXES_FILE); None for any other directory."""
    match = _ONE_BOX.search(name)
    if match:
        v = [int(g) for g in match.groups()]
        return (Box((v[0], v[2], v[4]), (v[1], v[3], v[5])),)
    return () if _SEVERAL.search(name) else None

