"""Every stored shard index and chunk of a mag decodes.

One listing of the mag names its objects (shards, chunks or wkw files). Then,
a few shards at a time, the index of every shard is read and checked (crc32c)
and names the shard's chunks, and the stored chunks are read in chunk-aligned
tiles, many tiles per `ts.Batch` (one read of a shard index and coalesced byte
ranges per batch, decoded concurrently by tensorstore), a few batches in
flight; the data is thrown away. Only what is stored is read: decoding costs
the stored data, never the bounding box, and memory holds the listing and the
reads in flight, never all chunks. A tile that fails is read again chunk by
chunk (wkw: block by block) to name every chunk that does not decode.

zarr3 chunks carry a zstd checksum and their shard index a crc32c, so any
changed byte is found. zarr v2 chunks (zstd without checksum) and wkw blocks
(LZ4) have no checksum: a change that still decompresses is found only where
a sample is recomputed (`recompute`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import math
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import tensorstore as ts

from beam_downsample.core.box import Box
from beam_downsample.core.grid import SHARD
from beam_downsample.store import arrays, stored, wkw_io
from beam_downsample.store.properties import Layer
from beam_downsample.verify.metadata import MagArray, first_line
from beam_downsample.verify.result import Finding

TILE_VOXELS = 4 << 20  # voxels of one read: a few chunks' rows of a shard
BATCH_BYTES = 64 << 20  # decoded bytes of the reads in one batch
IN_FLIGHT = 2  # batches read at once (memory: IN_FLIGHT * BATCH_BYTES plus tensorstore's buffers)
GROUP_SHARDS = 16  # shard indices read at once (512 KiB each for 32^3 chunks)
GROUP_CHUNKS = 4096  # unsharded chunks planned into tiles at once
WKW_THREADS = 2  # the wkw library decodes on the calling thread
MAX_FINDINGS = 20  # per mag; the rest are counted in one more finding


@dataclasses.dataclass
class MagListing:
    """What one mag stores: the starts of its stored objects (shards, chunks or wkw
    files), from one listing."""

    layer: str
    mag: MagArray
    layout: stored.Layout
    objects: np.ndarray  # (N, 3) starts, in the mag's voxels

    def object_boxes(self) -> tuple[np.ndarray, np.ndarray]:
        return self.objects, self.objects + np.array(self.layout.object_shape, dtype=np.int64)


@dataclasses.dataclass
class Decoded:
    """What decoding a mag found and read."""

    findings: list[Finding]
    objects: int = 0
    chunks: int = 0  # wkw: files
    voxels: int = 0


def list_mag(layer: Layer, mag: MagArray) -> MagListing:
    return MagListing(layer.name, mag, stored.layout(mag.spec, mag.array), stored.object_starts(mag.spec, mag.array))


def tile_shape(layout: stored.Layout, voxels: int = TILE_VOXELS) -> tuple[int, int, int]:
    """Chunk-aligned tiles (wkw: block-aligned) of at most `voxels` (at least one chunk), grown
    along x, then y, then z (Fortran order: x is contiguous), inside one shard where there are shards."""
    chunk = layout.chunk_shape
    bound = layout.object_shape if layout.sharding is not None else tuple(-(-SHARD // c) * c for c in chunk)
    shape = list(chunk)
    for axis in range(3):
        while shape[axis] * 2 <= bound[axis] and math.prod(shape) * 2 <= voxels and bound[axis] % (shape[axis] * 2) == 0:
            shape[axis] *= 2
    return tuple(shape)  # type: ignore[return-value]


def tiles(starts: np.ndarray, stops: np.ndarray, shape: Sequence[int], within: Box) -> list[Box]:
    """Boxes that cover the boxes (`starts`, `stops`) inside `within`: one per cell of a grid of
    `shape` that they touch, shrunk to their part of the cell."""
    starts, stops = np.maximum(starts, within.start), np.minimum(stops, within.stop)
    keep = np.all(stops > starts, axis=1)
    starts, stops = starts[keep], stops[keep]
    shape = np.array(shape, dtype=np.int64)
    first, last = starts // shape, -(-stops // shape)
    spans = np.any(last - first > 1, axis=1)  # (wkw files: many cells each)
    parts = [(starts[~spans], stops[~spans])]
    for start, stop, low, high in zip(starts[spans], stops[spans], first[spans], last[spans]):
        grid = np.meshgrid(*[np.arange(a, b) for a, b in zip(low, high)], indexing="ij")
        cells = np.stack(grid, axis=-1).reshape(-1, 3)
        parts.append((np.maximum(cells * shape, start), np.minimum((cells + 1) * shape, stop)))
    starts = np.concatenate([p[0] for p in parts])
    stops = np.concatenate([p[1] for p in parts])
    if not len(starts):
        return []
    cells, owner = np.unique(starts // shape, axis=0, return_inverse=True)
    owner = owner.reshape(-1)
    low = np.full(cells.shape, np.iinfo(np.int64).max, dtype=np.int64)
    high = np.full(cells.shape, np.iinfo(np.int64).min, dtype=np.int64)
    np.minimum.at(low, owner, starts)
    np.maximum.at(high, owner, stops)
    order = np.lexsort((cells[:, 0], cells[:, 1], cells[:, 2]))
    return [Box(tuple(int(v) for v in low[i]), tuple(int(v) for v in high[i])) for i in order]


def decode(listing: MagListing, region: Box, done: Callable[[int], None] = lambda n: None) -> Decoded:
    """Reads every stored chunk of the mag (wkw: every block of its files inside `region`, as a
    wkw file cannot say which of its blocks are stored). `done(n)`: n more objects are read."""
    result = Decoded([])
    boxes = _plan(listing, region, result, done)
    for tile, error in read_all(listing.mag.array, boxes):
        result.findings.extend(_name_chunks(listing, tile, error))
    if len(result.findings) > MAX_FINDINGS:
        more = len(result.findings) - MAX_FINDINGS
        result.findings[MAX_FINDINGS:] = [Finding("decode", listing.layer, f"{more} more chunk(s) or shard index(es) "
                                                  "of this mag do not decode", listing.mag.mag)]
    return result


def _plan(listing: MagListing, region: Box, result: Decoded, done: Callable[[int], None]) -> Iterator[Box]:
    """The tiles to read, a group of objects at a time (shards: after reading their indices)."""
    layout, mag = listing.layout, listing.mag
    shape = tile_shape(layout)
    within = region if layout.wkw else arrays.array_domain(mag.array)
    objects = listing.objects
    if layout.sharding is None and not layout.wkw:  # chunks: grouped by tile
        cells = objects // np.array(shape, dtype=np.int64)
        objects = objects[np.lexsort((objects[:, 0], cells[:, 0], cells[:, 1], cells[:, 2]))]
    size = GROUP_SHARDS if layout.sharding is not None else 1 if layout.wkw else GROUP_CHUNKS
    for first in range(0, len(objects), size):
        group = objects[first:first + size]
        if layout.sharding is not None:
            chunks = []
            for start, listed in stored.shard_chunks(mag.spec, layout, group):
                if isinstance(listed, ValueError):
                    box = Box(tuple(int(v) for v in start), tuple(int(v) + s for v, s in zip(start, layout.object_shape)))
                    result.findings.append(Finding("decode", listing.layer, f"the shard index of {layout.key(start)} "
                                                   f"does not decode: {first_line(listed)}", mag.mag, box))
                else:
                    chunks.append(listed)
            starts = np.concatenate(chunks) if chunks else np.zeros((0, 3), dtype=np.int64)
            stops = starts + np.array(layout.chunk_shape, dtype=np.int64)
        else:
            starts, stops = group, group + np.array(layout.object_shape, dtype=np.int64)
        result.objects += len(group)
        result.chunks += len(starts)
        for box in tiles(starts, stops, shape, within):
            result.voxels += box.voxels
            yield box
        done(len(group))


def read_all(array, boxes: Iterable[Box]) -> Iterator[tuple[Box, Exception]]:
    """Reads every box (inside the array's domain) and throws the data away; yields
    (box, error) for each read that fails."""
    if isinstance(array, wkw_io.WkwMag):
        yield from _read_wkw(array, boxes)
        return
    itemsize = arrays.array_dtype(array).itemsize * (arrays.array_channels(array) or 1)
    pending: collections.deque = collections.deque()
    for group in _batches(boxes, itemsize):
        with ts.Batch() as batch:
            pending.append([(box, array[arrays.region_index(box)].read(order="F", batch=batch)) for box in group])
        while len(pending) >= IN_FLIGHT:
            yield from _collect(pending.popleft())
    while pending:
        yield from _collect(pending.popleft())


def _batches(boxes: Iterable[Box], itemsize: int) -> Iterator[list[Box]]:
    group: list[Box] = []
    size = 0
    for box in boxes:
        if group and size + box.voxels * itemsize > BATCH_BYTES:
            yield group
            group, size = [], 0
        group.append(box)
        size += box.voxels * itemsize
    if group:
        yield group


def _collect(reads: list) -> Iterator[tuple[Box, Exception]]:
    for box, future in reads:
        try:
            future.result()
        except Exception as error:  # pylint: disable=broad-except  # (tensorstore: ValueError)
            yield box, error


def _read_wkw(array: wkw_io.WkwMag, boxes: Iterable[Box]) -> Iterator[tuple[Box, Exception]]:
    def read(box: Box) -> Optional[Exception]:
        try:
            array.read(box)
        except Exception as error:  # pylint: disable=broad-except  # (the wkw library: WKWException)
            return error
        return None

    with concurrent.futures.ThreadPoolExecutor(WKW_THREADS) as pool:
        futures: collections.deque = collections.deque()
        for box in boxes:
            futures.append((box, pool.submit(read, box)))
            if len(futures) > 2 * WKW_THREADS:
                yield from _wkw_result(*futures.popleft())
        while futures:
            yield from _wkw_result(*futures.popleft())


def _wkw_result(box: Box, future) -> Iterator[tuple[Box, Exception]]:
    error = future.result()
    if error is not None:
        yield box, error


def _name_chunks(listing: MagListing, tile: Box, error: Exception) -> list[Finding]:
    """Findings for the chunks (wkw: blocks) of a failed tile that do not decode when read alone."""
    layout, mag = listing.layout, listing.mag
    chunk = np.array(layout.chunk_shape, dtype=np.int64)
    if layout.sharding is not None:  # the chunks its shard's index lists (read again: this is rare)
        shard = np.array(tile.start, dtype=np.int64) // layout.object_shape * layout.object_shape
        ((_, starts),) = stored.shard_chunks(mag.spec, layout, shard[None])
        starts = np.zeros((0, 3), dtype=np.int64) if isinstance(starts, ValueError) else starts
    else:  # every chunk (wkw: block) of the tile; unstored zarr chunks read as fill, without error
        first, last = np.array(tile.start) // chunk, -(-np.array(tile.stop) // chunk)
        grid = np.meshgrid(*[np.arange(a, b) for a, b in zip(first, last)], indexing="ij")
        starts = np.stack(grid, axis=-1).reshape(-1, 3) * chunk
    domain = arrays.array_domain(mag.array)
    pieces = [Box(tuple(int(v) for v in s), tuple(int(v) for v in s + chunk)) for s in starts]
    pieces = [p.intersect(domain) for p in pieces if not p.intersect(tile).empty]
    failed = list(read_all(mag.array, [p for p in pieces if not p.empty]))
    if not failed:  # (it failed as a whole only: say so)
        return [Finding("decode", listing.layer, f"reading it failed: {first_line(error)}", mag.mag, tile)]
    where = "block" if layout.wkw else "chunk"
    return [Finding("decode", listing.layer, f"{where} of {layout.key(piece.start)} does not decode: "
                    f"{first_line(piece_error)}", mag.mag, piece) for piece, piece_error in failed]
