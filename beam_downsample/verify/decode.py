"""Every stored shard index and chunk of a mag decodes.

One listing of the mag names its objects (shards, chunks or wkw files); the
index of every shard is read and checked (crc32c) and names the shard's
chunks. The stored chunks are then read in chunk-aligned tiles, many tiles
per `ts.Batch` (one read of a shard index and coalesced byte ranges per
batch, decoded concurrently by tensorstore), a few batches in flight; the
data is thrown away. Only what is stored is read: decoding costs the stored
data, never the bounding box. A tile that fails is read again chunk by chunk
(wkw: block by block) to name every chunk that does not decode.

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
from typing import Callable, Iterator, Optional, Sequence

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
WKW_THREADS = 2  # the wkw library decodes on the calling thread
MAX_FINDINGS = 20  # per mag; the rest are counted in one more finding


@dataclasses.dataclass
class MagListing:
    """What one mag stores, from its listing and shard indices."""

    layer: str
    mag: MagArray
    layout: stored.Layout
    objects: np.ndarray  # (N, 3) starts of the stored objects that can be read
    chunks: np.ndarray  # (M, 3) starts of their chunks (= `objects` where the listing names no chunks)
    chunk_shape: tuple[int, int, int]  # of the boxes that `chunks` start
    findings: list[Finding]

    @property
    def chunks_listed(self) -> bool:
        """The shard indices were read: `chunks` are the chunks, not the shards."""
        return self.chunk_shape != self.layout.object_shape

    def chunk_boxes(self) -> tuple[np.ndarray, np.ndarray]:
        return self.chunks, self.chunks + np.array(self.chunk_shape, dtype=np.int64)


def list_mag(layer: Layer, mag: MagArray, with_chunks: bool = True) -> MagListing:
    """The stored objects of `mag`; with `with_chunks` the index of every shard is read
    (a shard whose index does not decode is a finding and is left out)."""
    layout = stored.layout(mag.spec, mag.array)
    objects = stored.object_starts(mag.spec, mag.array)
    findings: list[Finding] = []
    if layout.sharding is None or not with_chunks or not len(objects):
        return MagListing(layer.name, mag, layout, objects, objects, layout.object_shape, findings)
    readable, parts = [], []
    for start, chunks in stored.shard_chunks(mag.spec, layout, objects):
        if isinstance(chunks, ValueError):
            box = Box(tuple(int(v) for v in start), tuple(int(v) + s for v, s in zip(start, layout.object_shape)))
            findings.append(Finding("decode", layer.name, f"the shard index of {layout.key(start)} does not decode: "
                                    f"{first_line(chunks)}", mag.mag, box))
            continue
        readable.append(start)
        parts.append(chunks)
    objects = np.array(readable, dtype=np.int64).reshape(-1, 3)
    chunks = np.concatenate(parts) if parts else np.zeros((0, 3), dtype=np.int64)
    return MagListing(layer.name, mag, layout, objects, chunks, layout.chunk_shape, findings)


def tile_shape(layout: stored.Layout, chunk: Sequence[int], voxels: int = TILE_VOXELS) -> tuple[int, int, int]:
    """Chunk-aligned tiles of at most `voxels` (at least one chunk), grown along x, then y,
    then z (Fortran order: x is contiguous), inside one shard where there are shards."""
    bound = layout.object_shape if layout.sharding is not None else tuple(-(-SHARD // c) * c for c in chunk)
    shape = list(chunk)
    for axis in range(3):
        while shape[axis] * 2 <= bound[axis] and math.prod(shape) * 2 <= voxels and bound[axis] % (shape[axis] * 2) == 0:
            shape[axis] *= 2
    return tuple(shape)  # type: ignore[return-value]


def tiles(listing: MagListing, region: Box, voxels: int = TILE_VOXELS) -> list[Box]:
    """Boxes that cover every stored chunk, each inside one cell of a grid of `tile_shape`
    and shrunk to the chunks it holds, clipped to the array's domain (wkw: to the
    bounding box, as a wkw file cannot say which of its blocks are stored)."""
    wkw = listing.layout.wkw
    shape = np.array(tile_shape(listing.layout, listing.layout.chunk_shape if wkw else listing.chunk_shape, voxels),
                     dtype=np.int64)
    starts, stops = listing.chunk_boxes()
    domain = region if wkw else arrays.array_domain(listing.mag.array)
    starts, stops = np.maximum(starts, domain.start), np.minimum(stops, domain.stop)
    keep = np.all(stops > starts, axis=1)
    starts, stops = starts[keep], stops[keep]
    if wkw:  # a file spans many tiles: its part in each
        parts = []
        for start, stop in zip(starts, stops):
            grid = np.meshgrid(*[np.arange(a, b) for a, b in zip(start // shape, -(-stop // shape))], indexing="ij")
            cells = np.stack(grid, axis=-1).reshape(-1, 3)
            parts.append((np.maximum(cells * shape, start), np.minimum((cells + 1) * shape, stop)))
        starts = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, 3), dtype=np.int64)
        stops = np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, 3), dtype=np.int64)
    cells, owner = np.unique(starts // shape, axis=0, return_inverse=True)
    owner = owner.reshape(-1)
    low = np.full(cells.shape, np.iinfo(np.int64).max, dtype=np.int64)
    high = np.full(cells.shape, np.iinfo(np.int64).min, dtype=np.int64)
    np.minimum.at(low, owner, starts)
    np.maximum.at(high, owner, stops)
    order = np.lexsort((cells[:, 0], cells[:, 1], cells[:, 2]))
    return [Box(tuple(int(v) for v in low[i]), tuple(int(v) for v in high[i])) for i in order]


def decode(listing: MagListing, boxes: Sequence[Box], done: Callable[[int], None] = lambda n: None
           ) -> tuple[list[Finding], int]:
    """Reads the mag's `tiles` (`boxes`), which hold every stored chunk; (findings, voxels read).
    `done(n)` is called as tiles finish."""
    failed = list(read_all(listing.mag.array, boxes, done))
    findings = list(listing.findings)
    for tile, error in failed:
        findings.extend(_name_chunks(listing, tile, error))
    if len(findings) > MAX_FINDINGS:
        more = len(findings) - MAX_FINDINGS
        findings = findings[:MAX_FINDINGS] + [Finding("decode", listing.layer, f"{more} more chunk(s) or shard "
                                                      "index(es) of this mag do not decode", listing.mag.mag)]
    return findings, sum(box.voxels for box in boxes)


def read_all(array, boxes: Sequence[Box], done: Callable[[int], None] = lambda n: None
             ) -> Iterator[tuple[Box, Exception]]:
    """Reads every box (inside the array's domain) and throws the data away; yields
    (box, error) for each read that fails. `done(n)`: n more boxes are read."""
    if isinstance(array, wkw_io.WkwMag):
        yield from _read_wkw(array, boxes, done)
        return
    itemsize = arrays.array_dtype(array).itemsize * (arrays.array_channels(array) or 1)
    pending: collections.deque = collections.deque()
    for group in _batches(boxes, itemsize):
        with ts.Batch() as batch:
            pending.append([(box, array[arrays.region_index(box)].read(order="F", batch=batch)) for box in group])
        while len(pending) >= IN_FLIGHT:
            yield from _collect(pending.popleft(), done)
    while pending:
        yield from _collect(pending.popleft(), done)


def _batches(boxes: Sequence[Box], itemsize: int) -> Iterator[list[Box]]:
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


def _collect(reads: list, done: Callable[[int], None]) -> Iterator[tuple[Box, Exception]]:
    for box, future in reads:
        try:
            future.result()
        except Exception as error:  # pylint: disable=broad-except  # (tensorstore: ValueError)
            yield box, error
    done(len(reads))


def _read_wkw(array: wkw_io.WkwMag, boxes: Sequence[Box], done: Callable[[int], None]
              ) -> Iterator[tuple[Box, Exception]]:
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
                yield from _wkw_result(*futures.popleft(), done)
        while futures:
            yield from _wkw_result(*futures.popleft(), done)


def _wkw_result(box: Box, future, done: Callable[[int], None]) -> Iterator[tuple[Box, Exception]]:
    error = future.result()
    done(1)
    if error is not None:
        yield box, error


def _name_chunks(listing: MagListing, tile: Box, error: Exception) -> list[Finding]:
    """Findings for the chunks of a failed tile that do not decode when read alone."""
    layout, mag = listing.layout, listing.mag
    if layout.wkw:  # files: their blocks
        chunk = np.array(layout.chunk_shape, dtype=np.int64)
        first, last = np.array(tile.start) // chunk, -(-np.array(tile.stop) // chunk)
        starts = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(first, last)], indexing="ij"),
                          axis=-1).reshape(-1, 3) * chunk
    else:
        chunk = np.array(listing.chunk_shape, dtype=np.int64)
        starts = listing.chunks[np.all((listing.chunks >= tile.start) & (listing.chunks < tile.stop), axis=1)]
    domain = arrays.array_domain(mag.array)
    pieces = [Box(tuple(int(v) for v in s), tuple(int(v) for v in s + chunk)).intersect(domain) for s in starts]
    failed = list(read_all(mag.array, [p for p in pieces if not p.empty]))
    if not failed:  # (it failed as a whole only: say so)
        return [Finding("decode", listing.layer, f"reading it failed: {first_line(error)}", mag.mag, tile)]
    where = "block" if layout.wkw else "chunk"
    return [Finding("decode", listing.layer, f"{where} of {layout.key(piece.start)} does not decode: "
                    f"{first_line(piece_error)}", mag.mag, piece) for piece, piece_error in failed]

