"""A box of a zarr array from an object store in one round of requests.

On a bucket every request costs money and tens of milliseconds. Reading a
unit tile by tile made one request per one or two chunks (1,765 GETs for
the 512x512x256 bench). Here the *encoded* chunks of a box are fetched in
one tensorstore batch. Sharded zarr3: the indices of the box's shards are
read first (one ranged GET each, kept in memory for the worker's next
boxes), then the stored chunks' byte ranges, which tensorstore's batch
coalesces into one request per contiguous run within a shard (a box that
covers the shard's stored chunks in their storage order, c-x-y-z with z
fastest as tensorstore writes them, is one request). Unsharded zarr3 and
zarr v2 chunks are one object each (the format's own cost), all requested
at once. (tensorstore's own `zarr3_sharding_indexed` kvstore would do the
same but reads the index again for every read: twice the requests.)
The bytes go into a `memory`
kvstore under the keys of an unsharded array of the same chunks and codecs
(`Fetched.array`), from which the tile threads decode as they would from
the source: the same codecs, so the same voxels, while the next box is
fetched. Memory: the encoded bytes of the box, at most its raw size.

Planning sizes the boxes (`PassConfig.prefetch_bytes`, `core.grid.UnitBudget`);
`transforms.work` uses this for sources whose kvstore is remote (`is_remote`).
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from typing import Iterator, Optional, Sequence

import google_crc32c
import numpy as np
import tensorstore as ts

from beam_downsample.core.box import Box
from beam_downsample.store import arrays, stored

LOCAL_DRIVERS = ("file", "memory")


def is_remote(spec: dict) -> bool:
    """True for arrays behind an object store (gcs, s3, http): reads there pay per request."""
    driver = spec.get("kvstore", {}).get("driver") if isinstance(spec.get("kvstore"), dict) else None
    return driver is not None and driver not in LOCAL_DRIVERS


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a zarr array's encoded chunks are and how to decode them from memory."""

    chunk: tuple[int, ...]  # shape of one encoded chunk (c, x, y, z)
    shard: Optional[tuple[int, ...]]  # shape of one shard, None if every chunk is an object
    prefix: str  # key of a chunk (unsharded) or shard: prefix + separator.join(grid position)
    separator: str
    sharding: dict  # the sharding codec's configuration (index codecs, location)
    virtual: dict  # spec (without kvstore) of an unsharded array of the chunks, codecs and keys


def layout(array) -> Optional[Layout]:
    """The array's chunk layout; None where a box cannot be fetched this way (wkw, a rank other
    than 4, an array-to-array codec in front of the sharding, shards not made of whole chunks)."""
    if not isinstance(array, ts.TensorStore) or array.rank != 4:
        return None
    spec = array.spec().to_json()
    driver, metadata = spec["driver"], spec["metadata"]
    chunk_shape, prefix, separator = stored.chunk_layout(array)
    codecs = metadata.get("codecs") or []
    if driver == "zarr3" and codecs and codecs[0].get("name") == "sharding_indexed":
        configuration = codecs[0]["configuration"]
        inner = tuple(configuration["chunk_shape"])
        if len(inner) != 4 or any(s % c for s, c in zip(chunk_shape, inner)) or not _index_supported(configuration):
            return None
        virtual_metadata = dict(metadata, codecs=configuration["codecs"],
                                chunk_grid={"name": "regular", "configuration": {"chunk_shape": list(inner)}},
                                chunk_key_encoding={"name": "default", "configuration": {"separator": "/"}})
        return Layout(inner, tuple(chunk_shape), prefix, separator, configuration,
                      {"driver": "zarr3", "metadata": virtual_metadata})
    if driver == "zarr3" and any(codec.get("name") == "sharding_indexed" for codec in codecs):
        return None
    if driver not in ("zarr", "zarr3"):
        return None
    return Layout(tuple(chunk_shape), None, prefix, separator, {}, {"driver": driver, "metadata": metadata})


class Prefetcher:
    """Fetches boxes of one source array (opened once per worker). The shard indices it read stay
    in memory (at most INDEX_CACHE_BYTES): a source does not change during a pass, and a worker's
    next box is often in the same shards."""

    def __init__(self, spec: dict, array):
        found = layout(array)
        if found is None:
            raise ValueError(f"{spec.get('driver')} array of rank {getattr(array, 'rank', '?')}: no prefetch")
        self.layout = found
        self._store = ts.KvStore.open(spec["kvstore"], context=ts.Context(arrays.context_spec())).result()
        self._shape = np.array(array.shape, dtype=np.int64)
        self._fill = array.fill_value
        self._index_size = stored.shard_index_bytes(array) or 0
        self._indices: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def supports(array) -> bool:
        return layout(array) is not None

    def cells(self, box: Box) -> tuple[np.ndarray, np.ndarray]:
        """(first, stop) chunk grid positions (c, x, y, z) of the chunks overlapping `box`."""
        chunk = np.array(self.layout.chunk, dtype=np.int64)
        start = np.clip(np.array((0, *box.start), dtype=np.int64), 0, self._shape)
        stop = np.clip(np.array((self._shape[0], *box.stop), dtype=np.int64), 0, self._shape)
        first = start // chunk
        return first, np.where(stop > start, -(-stop // chunk), first)

    def key(self, position: Sequence[int]) -> str:
        """The object key of a chunk (unsharded) or shard at grid `position`."""
        return self.layout.prefix + self.layout.separator.join(str(int(v)) for v in position)

    def fetch(self, box: Box, region: Optional[Box] = None) -> "Fetched":
        """The encoded chunks of `box`, in memory; blocks until they are there.

        Unsharded: every chunk at once (one GET each). Sharded: first the shards whose part
        of `region` (the layer's voxels; default the array's) lies inside `box` whole, index
        and chunks in one GET each, and the indices of the others (those not in memory); then
        the others' stored chunks as byte ranges, which tensorstore's batch coalesces into one
        request per contiguous run of a shard."""
        first, stop = self.cells(box)
        grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(first, stop)], indexing="ij"), axis=-1)
        positions = grid.reshape(-1, 4)
        if self.layout.shard is None:
            with ts.Batch() as batch:
                reads = [self._store.read(self.key(p), batch=batch) for p in positions.tolist()]
            values = (_value(read.result()) for read in reads)
        else:
            values = self._shard_values(positions, box, region)
        return self._in_memory(box, first, stop, positions, values)

    def _shard_values(self, positions: np.ndarray, box: Box, region: Optional[Box]) -> Iterator[Optional[bytes]]:
        """The encoded bytes of each of `positions` (None where not stored), in two rounds of requests."""
        per_shard = np.array(self.layout.shard, dtype=np.int64) // np.array(self.layout.chunk, dtype=np.int64)
        shards = positions // per_shard
        inner = positions % per_shard
        wanted = [tuple(p) for p in np.unique(shards, axis=0).tolist()]
        indices = self._remembered(wanted)
        whole = [s for s in wanted if s not in indices and self._inside(s, box, region)]
        size = self._index_size
        at_end = self.layout.sharding.get("index_location", "end") == "end"
        with ts.Batch() as batch:
            whole_reads = [(s, self._store.read(self.key(s), batch=batch)) for s in whole]
            index_reads = [(s, self._store.read(self.key(s), batch=batch,
                                                byte_range=slice(-size, None) if at_end else slice(0, size)))
                           for s in wanted if s not in indices and s not in whole]
        contents = {}
        for shard, read in whole_reads:
            content = contents[shard] = _value(read.result())
            indices[shard] = None if content is None else self._parse_index(
                shard, content[-size:] if at_end else content[:size])
        for shard, read in index_reads:
            content = _value(read.result())
            indices[shard] = None if content is None else self._parse_index(shard, content)
        self._remember(indices)
        reads: list = []
        with ts.Batch() as batch:
            for shard, within in zip(map(tuple, shards.tolist()), inner):
                index = indices[shard]
                entry = None if index is None else index[tuple(within)]
                if entry is None or entry[0] == MISSING:
                    reads.append(None)
                elif shard in contents:
                    reads.append((shard, int(entry[0]), int(entry[1])))
                else:
                    reads.append(self._store.read(self.key(shard), batch=batch,
                                                  byte_range=slice(int(entry[0]), int(entry[0] + entry[1]))))
        for read in reads:
            if read is None or isinstance(read, tuple):
                yield None if read is None else contents[read[0]][read[1]:read[1] + read[2]]
            else:
                yield _value(read.result())

    def _inside(self, shard: tuple, box: Box, region: Optional[Box]) -> bool:
        """True if the part of `region` (default: the array) in `shard` lies inside `box`."""
        size = np.array(self.layout.shard[1:], dtype=np.int64)  # type: ignore[index]
        start = np.array(shard[1:], dtype=np.int64) * size
        part = Box(tuple(start.tolist()), tuple((start + size).tolist()))  # type: ignore[arg-type]
        part = part.intersect(region if region is not None else Box((0, 0, 0), tuple(self._shape[1:].tolist())))
        return part.empty or (all(a >= b for a, b in zip(part.start, box.start))
                              and all(a <= b for a, b in zip(part.stop, box.stop)))

    def _remembered(self, shards: list[tuple]) -> dict:
        """The indices of `shards` that are in memory (shard position -> index, or None: not stored)."""
        with self._lock:
            found = {s: self._indices[s] for s in shards if s in self._indices}
            for s in found:
                self._indices.move_to_end(s)
        return found

    def _remember(self, indices: dict) -> None:
        with self._lock:
            for shard, index in indices.items():
                self._indices[shard] = index
                self._indices.move_to_end(shard)
            while len(self._indices) * max(self._index_size, 1) > INDEX_CACHE_BYTES:
                self._indices.popitem(last=False)

    def _parse_index(self, shard: tuple, data: bytes) -> np.ndarray:
        """The shard index (zarr v3 sharding: per chunk, C order, offset and length as uint64)."""
        codecs = self.layout.sharding.get("index_codecs", [])
        if len(data) != self._index_size:
            raise ValueError(f"{self.key(shard)}: shard index of {len(data)} bytes, expected {self._index_size}")
        if _index_checksummed(self.layout.sharding):
            data, checksum = data[:-4], int.from_bytes(data[-4:], "little")
            if google_crc32c.value(data) != checksum:
                raise ValueError(f"{self.key(shard)}: shard index checksum mismatch (corrupt shard)")
        endian = (codecs[0].get("configuration") or {}).get("endian", "little")
        grid = tuple(int(v) for v in np.array(self.layout.shard) // np.array(self.layout.chunk))
        return np.frombuffer(data, dtype="<u8" if endian == "little" else ">u8").reshape(*grid, 2)

    def _in_memory(self, box: Box, first: np.ndarray, stop: np.ndarray, positions: np.ndarray,
                   values: Iterator[Optional[bytes]]) -> "Fetched":
        """Copies the chunks read into a fresh memory kvstore and opens the array that decodes them."""
        context = ts.Context(arrays.context_spec())
        memory = ts.KvStore.open({"driver": "memory"}, context=context).result()
        stored_mask = np.zeros(np.maximum(stop - first, 0), dtype=bool)
        sharded = self.layout.shard is not None
        writes, nbytes = [], 0
        for position, value in zip(positions.tolist(), values):  # each value is dropped once copied
            if value is None:
                continue
            stored_mask[tuple(np.subtract(position, first))] = True
            nbytes += len(value)
            key = "c/" + "/".join(map(str, position)) if sharded else self.key(position)
            writes.append(memory.write(key, value))
            del value
        for write in writes:
            write.result()
        array = ts.open(dict(self.layout.virtual, kvstore={"driver": "memory"}), context=context, create=True,
                        open=True).result()
        return Fetched(box, array, first, stored_mask, self.layout.chunk, nbytes, self._fill)


def _value(result) -> Optional[bytes]:
    return result.value if result.state == "value" else None


MISSING = np.uint64(2**64 - 1)  # a shard index entry of a chunk that is not stored
INDEX_CACHE_BYTES = 64 << 20  # 128 indices of 1024^3 shards of 32^3 chunks


def _index_checksummed(sharding: dict) -> bool:
    return [c.get("name") for c in sharding.get("index_codecs", [])][1:] == ["crc32c"]


def _index_supported(sharding: dict) -> bool:
    """Index codecs we can read: `bytes` (either endian), optionally followed by `crc32c`."""
    names = [c.get("name") for c in sharding.get("index_codecs", [])]
    return names in (["bytes"], ["bytes", "crc32c"])


@dataclasses.dataclass(eq=False)
class Fetched:
    """The encoded chunks of `box` in memory; `array` decodes them (what is not there reads as the fill value)."""

    box: Box
    array: ts.TensorStore
    first: np.ndarray  # chunk grid position (c, x, y, z) of stored[0, 0, 0, 0]
    stored: np.ndarray  # per chunk of the box: stored or not
    chunk: Sequence[int]
    nbytes: int  # encoded bytes held
    fill_value: object = None

    def states(self, boxes: Sequence[Box]) -> list[str]:
        """`stored.box_states` of boxes inside `box`, answered from what was fetched (no request)."""
        if self.fill_value is not None and np.any(np.asarray(self.fill_value) != 0):
            return [stored.ALL] * len(boxes)
        chunk = np.array(self.chunk[1:], dtype=np.int64)
        states = []
        for box in boxes:
            low = np.array(box.start, dtype=np.int64) // chunk - self.first[1:]
            high = -(-np.array(box.stop, dtype=np.int64) // chunk) - self.first[1:]
            low = np.clip(low, 0, self.stored.shape[1:])
            high = np.clip(high, low, self.stored.shape[1:])
            cells = self.stored[:, low[0]:high[0], low[1]:high[1], low[2]:high[2]]
            if box.empty or not cells.any():
                states.append(stored.NOTHING)
            else:
                states.append(stored.ALL if cells.all() else stored.SOME)
        return states
