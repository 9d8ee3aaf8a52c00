"""Boxes of voxels: half-open `[start, stop)` in x, y, z of some mag.

Pure arithmetic, no I/O.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from beam_downsample.core.mags import Mag


@dataclasses.dataclass(frozen=True)
class Box:
    """Half-open box `[start, stop)` in x, y, z voxels of some mag."""

    start: tuple[int, int, int]
    stop: tuple[int, int, int]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(max(b - a, 0) for a, b in zip(self.start, self.stop))  # type: ignore[return-value]

    @property
    def empty(self) -> bool:
        return any(s <= 0 for s in self.shape)

    @property
    def voxels(self) -> int:
        return math.prod(self.shape)

    def intersect(self, other: "Box") -> "Box":
        return Box(
            tuple(max(a, b) for a, b in zip(self.start, other.start)),  # type: ignore[arg-type]
            tuple(min(a, b) for a, b in zip(self.stop, other.stop)),  # type: ignore[arg-type]
        )

    def scaled_down(self, factor: Sequence[int]) -> "Box":
        """This box in a grid `factor` times coarser, rounded outward."""
        return Box(
            tuple(a // f for a, f in zip(self.start, factor)),  # type: ignore[arg-type]
            tuple(-(-b // f) for b, f in zip(self.stop, factor)),  # type: ignore[arg-type]
        )

    def scaled_up(self, factor: Sequence[int]) -> "Box":
        return Box(
            tuple(a * f for a, f in zip(self.start, factor)),  # type: ignore[arg-type]
            tuple(b * f for b, f in zip(self.stop, factor)),  # type: ignore[arg-type]
        )


def split_box(box: Box, align: Sequence[int], max_voxels: int, halve: Sequence[int] = (2, 1, 0)) -> list[Box]:
    """Splits `box` into tiles on the `align` grid, halving z first, then y,
    then x (or the axes in the order `halve`), until a tile holds at most
    `max_voxels`; tiles are listed x slowest, z fastest.

    Tiles are read in Fortran order (x fastest, as the chunks are stored, so
    tensorstore need not transpose), and keep their full x extent as long as
    possible: the kernels' inner loops run along x.
    """
    shape = [-(-s // a) * a for s, a in zip(box.shape, align)]
    for axis in halve:
        while math.prod(shape) > max_voxels and shape[axis] > align[axis]:
            shape[axis] = max(align[axis], (shape[axis] // 2) // align[axis] * align[axis])
    tiles = []
    starts = [range((a // s) * s, b, s) for a, b, s in zip(box.start, box.stop, shape)]
    for x in starts[0]:
        for y in starts[1]:
            for z in starts[2]:
                tile = Box((x, y, z), (x + shape[0], y + shape[1], z + shape[2])).intersect(box)
                if not tile.empty:
                    tiles.append(tile)
    return tiles


def region_in_mag(bbox_mag1: Box, mag: Mag) -> Box:
    """The layer's bounding box aligned outward to `mag`, in `mag` voxels."""
    return bbox_mag1.scaled_down(mag)


def hull(boxes: Sequence[Box]) -> Box:
    """The smallest box holding every box of `boxes` (at least one)."""
    return Box(
        tuple(min(b.start[axis] for b in boxes) for axis in range(3)),  # type: ignore[arg-type]
        tuple(max(b.stop[axis] for b in boxes) for axis in range(3)),  # type: ignore[arg-type]
    )


def subtract(box: Box, other: Box) -> list[Box]:
    """`box` minus `other` as at most six disjoint boxes (slabs cut off axis by axis)."""
    if box.intersect(other).empty:
        return [box]
    pieces = []
    start, stop = list(box.start), list(box.stop)
    for axis in range(3):
        if start[axis] < other.start[axis]:
            low = list(stop)
            low[axis] = other.start[axis]
            pieces.append(Box(tuple(start), tuple(low)))  # type: ignore[arg-type]
            start[axis] = other.start[axis]
        if stop[axis] > other.stop[axis]:
            high = list(start)
            high[axis] = other.stop[axis]
            pieces.append(Box(tuple(high), tuple(stop)))  # type: ignore[arg-type]
            stop[axis] = other.stop[axis]
    return pieces


def disjoint(boxes: Sequence[Box]) -> list[Box]:
    """Disjoint boxes covering exactly the union of `boxes` (empty ones dropped): each
    voxel of overlapping, duplicate or nested boxes is covered once. Pieces keep
    every alignment the boxes share (they are cut only at the boxes' faces)."""
    result: list[Box] = []
    for box in boxes:
        pieces = [] if box.empty else [box]
        for taken in result:
            pieces = [piece for p in pieces for piece in subtract(p, taken)]
        result.extend(pieces)
    return result
