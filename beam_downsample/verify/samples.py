"""Which boxes of a mag to recompute: random but seeded, the borders included,
weighted to where the mag before stores data, plus a box in every object
(shard, chunk, wkw file) that the mag before's data says should be stored
but is not (a deleted shard), up to the sample count.

Boxes are cells of a grid of `EDGE`^3 voxels of the mag (so a box is whole
32^3 chunks), clipped to the layer's bounding box in that mag.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from beam_downsample.core.box import Box
from beam_downsample.core.mags import Mag
from beam_downsample.store import stored
from beam_downsample.verify.decode import MagListing

EDGE = 32  # a sample box's edge in the mag's voxels: one chunk
MAX_COVERAGE_CELLS = 1 << 20  # objects the mag before's data maps to; beyond this the coverage check is left out


class StoredVoxels:
    """Random voxels where a mag stores data: a stored object at random, then (shards)
    a chunk its index lists at random, then a voxel in it, all inside `region`. Shard
    indices not listed yet are read one at a time, only for the shards picked."""

    def __init__(self, listing: MagListing, region: Box):
        self._listing = listing
        self._region = region
        self._indices: dict[tuple, Optional[np.ndarray]] = {}

    def pick(self, rng: np.random.Generator, within: Optional[Box] = None) -> Optional[tuple[int, int, int]]:
        """A stored voxel inside the region (and `within`), or None if nothing is stored there."""
        area = self._region if within is None else self._region.intersect(within)
        if area.empty:
            return None
        listing = self._listing
        objects = _overlapping(listing.objects, listing.layout.object_shape, area)
        if not len(objects):
            return None
        start = objects[rng.integers(len(objects))]
        if listing.layout.sharding is not None:
            chunks = self._shard_chunks(start)
            if chunks is not None:
                chunks = _overlapping(chunks, listing.layout.chunk_shape, area)
                if not len(chunks):
                    return self._voxel_elsewhere(rng, area, start)
                return _voxel(rng, chunks[rng.integers(len(chunks))], listing.layout.chunk_shape, area)
        return _voxel(rng, start, listing.layout.object_shape, area)

    def _voxel_elsewhere(self, rng, area: Box, start) -> Optional[tuple[int, int, int]]:
        """A shard holds no chunk in `area`: try the others (each index is read once)."""
        objects = _overlapping(self._listing.objects, self._listing.layout.object_shape, area)
        for other in objects[rng.permutation(len(objects))]:
            if np.array_equal(other, start):
                continue
            chunks = self._shard_chunks(other)
            chunks = None if chunks is None else _overlapping(chunks, self._listing.layout.chunk_shape, area)
            if chunks is not None and len(chunks):
                return _voxel(rng, chunks[rng.integers(len(chunks))], self._listing.layout.chunk_shape, area)
        return None

    def _shard_chunks(self, start: np.ndarray) -> Optional[np.ndarray]:
        key = tuple(int(v) for v in start)
        if key not in self._indices:
            listing = self._listing
            ((_, chunks),) = stored.shard_chunks(listing.mag.spec, listing.layout, np.array([key]))
            self._indices[key] = None if isinstance(chunks, ValueError) else chunks
        return self._indices[key]


def _overlapping(starts: np.ndarray, shape: Sequence[int], area: Box) -> np.ndarray:
    stops = starts + np.array(shape, dtype=np.int64)
    keep = np.all((starts < np.array(area.stop)) & (stops > np.array(area.start)), axis=1)
    return starts[keep]


def _voxel(rng, start, shape, area: Box) -> Optional[tuple[int, int, int]]:
    box = Box(tuple(int(v) for v in start), tuple(int(v) + s for v, s in zip(start, shape))).intersect(area)
    if box.empty:
        return None
    return tuple(int(rng.integers(a, b)) for a, b in zip(box.start, box.stop))  # type: ignore[return-value]


def cell(voxel: Sequence[int], region: Box) -> Box:
    """The sample box (grid cell of `EDGE`^3, clipped to `region`) holding `voxel`."""
    start = tuple(v // EDGE * EDGE for v in voxel)
    return Box(start, tuple(a + EDGE for a in start)).intersect(region)  # type: ignore[arg-type]


def border_voxel(rng: np.random.Generator, region: Box) -> tuple[int, int, int]:
    """A voxel on a random face of `region`."""
    axis, high = int(rng.integers(3)), bool(rng.integers(2))
    voxel = [int(rng.integers(a, b)) for a, b in zip(region.start, region.stop)]
    voxel[axis] = region.stop[axis] - 1 if high else region.start[axis]
    return tuple(voxel)  # type: ignore[return-value]


def choose(region: Box, factor: Mag, source: StoredVoxels, count: int, rng: np.random.Generator) -> list[tuple[Box, str]]:
    """`count` distinct sample boxes of a mag whose layer region is `region`: the far
    corner (where edge replication acts on every axis), the near corner, more border
    boxes up to a quarter, the rest at stored voxels of the mag before (`source`,
    mapped by `factor`); where nothing is stored, anywhere in the region. A region of
    at most `count` boxes is taken whole."""
    if count <= 0 or region.empty:
        return []
    cells = [range(a // EDGE * EDGE, b, EDGE) for a, b in zip(region.start, region.stop)]
    if math.prod(len(c) for c in cells) <= count:
        return [(cell((x, y, z), region), "all") for z in cells[2] for y in cells[1] for x in cells[0]]
    chosen: dict[Box, str] = {}
    borders = min(count, max(2, math.ceil(count / 4)))
    corners = [tuple(b - 1 for b in region.stop), region.start]
    for attempt in range(20 * count):
        if len(chosen) >= count:
            break
        if attempt < min(borders, 2):
            voxel, why = corners[attempt], "border"
        elif len(chosen) < borders:
            voxel, why = border_voxel(rng, region), "border"
        else:
            picked = source.pick(rng, region.scaled_up(factor))
            why = "data"
            if picked is None:
                voxel = tuple(int(rng.integers(a, b)) for a, b in zip(region.start, region.stop))
            else:
                voxel = tuple(v // f for v, f in zip(picked, factor))
        chosen.setdefault(cell(voxel, region), why)  # type: ignore[arg-type]
    return list(chosen.items())


def missing_objects(region: Box, factor: Mag, source: MagListing, target: MagListing) -> list[Box]:
    """Boxes (in the target mag's voxels) of the target's objects that the source's stored
    objects map into but the target does not store, in a fixed order. Often a deleted
    shard; sometimes legitimately absent (the reduction there is all 0, which is not
    stored), so each is recomputed rather than reported."""
    starts, stops = source.object_boxes()
    factor_array = np.array(factor, dtype=np.int64)
    low = np.maximum(starts // factor_array, region.start)
    high = np.minimum(-(-stops // factor_array), region.stop)
    keep = np.all(high > low, axis=1)
    shape = np.array(target.layout.object_shape, dtype=np.int64)
    first, last = low[keep] // shape, -(-high[keep] // shape)
    if not len(first) or int(np.prod(last - first, axis=1).sum()) > MAX_COVERAGE_CELLS:
        return []
    spans = np.any(last - first > 1, axis=1)  # (a source shard over several target chunks)
    parts = [first[~spans]] + [np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(f, l)], indexing="ij"),
                                        axis=-1).reshape(-1, 3) for f, l in zip(first[spans], last[spans])]
    expected = np.unique(np.concatenate(parts), axis=0)
    have = np.unique(target.objects // shape, axis=0).reshape(-1, 3)
    both = np.concatenate([expected, have])
    _, index, counts = np.unique(both, axis=0, return_index=True, return_counts=True)
    missing = both[np.sort(index[(counts == 1) & (index < len(expected))])]
    return [Box(tuple(int(v) for v in c * shape), tuple(int(v) for v in (c + 1) * shape)).intersect(region)
            for c in missing]


def coverage(region: Box, factor: Mag, source: StoredVoxels, missing: Sequence[Box], count: int,
             rng: np.random.Generator) -> list[tuple[Box, str]]:
    """Up to `count` sample boxes, one in each of (a random choice of) the `missing`
    objects, at a stored voxel of the mag before."""
    chosen: dict[Box, str] = {}
    for index in rng.permutation(len(missing))[:count] if count > 0 else []:
        box = missing[int(index)]
        picked = source.pick(rng, box.scaled_up(factor))
        if picked is not None:
            chosen.setdefault(cell(tuple(v // f for v, f in zip(picked, factor)), region), "coverage")
    return list(chosen.items())
