"""What a mag holds, from one listing of its own storage: the boxes of its
stored chunks (zarr v2, unsharded zarr3), shards (sharded zarr3) or files
(wkw), so that a pass plans work only where the source holds data.

The listing goes through tensorstore's kvstore of the mag (file or gcs,
one request per 1,000 keys on GCS) and memory grows with the stored keys,
never with the bounding box. Keys are parsed with one regular expression
over all of them and kept as numpy arrays.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Optional

import numpy as np
import tensorstore as ts

from beam_downsample.core.box import Box
from beam_downsample.store import arrays, wkw_io


class Dense(Exception):
    """The mag cannot be planned sparsely (the message says why); plan every unit."""


def _key_pattern(prefix: str, separator: str, rank: int) -> re.Pattern:
    number = r"(\d+)"
    return re.compile(re.escape(prefix) + re.escape(separator).join([number] * rank) + "$", re.M)


def chunk_layout(array) -> tuple[tuple[int, ...], str, str]:
    """(chunk shape of one stored key, key prefix, separator) of a zarr array opened by tensorstore."""
    metadata = array.spec().to_json()["metadata"]
    if metadata.get("zarr_format", 2) == 3 or "chunk_grid" in metadata:
        shape = tuple(metadata["chunk_grid"]["configuration"]["chunk_shape"])
        encoding = metadata.get("chunk_key_encoding", {"name": "default"})
        name = encoding.get("name", "default")
        if name == "default":
            separator = encoding.get("configuration", {}).get("separator", "/")
            return shape, "c" + separator, separator
        separator = encoding.get("configuration", {}).get("separator", ".")
        return shape, "", separator
    return tuple(metadata["chunks"]), "", metadata.get("dimension_separator", ".")


def _parse(keys: list[str], pattern: re.Pattern, rank: int) -> np.ndarray:
    """(N, rank) chunk grid positions of the keys that name chunks; others (metadata) are skipped."""
    found = pattern.findall("\n".join(keys))
    if not found:
        return np.zeros((0, rank), dtype=np.int64)
    return np.array(found, dtype=np.int64).reshape(-1, rank)


def stored_boxes(spec: dict) -> tuple[np.ndarray, np.ndarray]:
    """(starts, stops), each (N, 3) int64 in the mag's voxels, of the stored chunks/shards/files.

    Raises `Dense` where a listing cannot tell where the data is: a fill
    value other than 0 (empty space would not read as 0, so units over it
    must run), or an array whose axes are not (c, x, y, z).
    """
    if spec["driver"] == "wkw":
        return _wkw_boxes(spec["path"])
    return listed(spec)[1:]


def listed(spec: dict) -> tuple[object, np.ndarray, np.ndarray]:
    """(the opened array, starts, stops) of `stored_boxes` for a zarr spec: the metadata read and
    the listing go out at once (on a bucket one round trip for both)."""
    opening = arrays.start_open(spec, open=True)
    listing = ts.KvStore.open(spec["kvstore"]).result().list()
    array = opening.result()
    fill = np.asarray(array.fill_value) if array.fill_value is not None else np.zeros(())
    if np.any(fill != 0):
        raise Dense(f"its fill value is {fill.tolist()}, not 0")
    if array.rank != 4:
        raise Dense(f"its array has rank {array.rank}, not (c, x, y, z)")
    starts = object_starts(spec, array, listing)
    return array, starts, starts + np.array(chunk_layout(array)[0][1:], dtype=np.int64)


def object_starts(spec: dict, array=None, listing=None) -> np.ndarray:
    """(N, 3) starts, in the mag's voxels, of the stored objects of a (c, x, y, z) mag: its
    shards, chunks (zarr) or files (wkw), from one listing (`listing`: its future, if under
    way), whatever the fill value."""
    if spec["driver"] == "wkw":
        return _wkw_boxes(spec["path"])[0]
    array = array if array is not None else arrays.open_array(spec, open=True)
    shape, prefix, separator = chunk_layout(array)
    listing = listing if listing is not None else ts.KvStore.open(spec["kvstore"]).result().list()
    keys = [key.decode("utf-8", "replace") for key in listing.result()]
    grid = _parse(keys, _key_pattern(prefix, separator, 4), 4)
    return np.unique(grid[:, 1:] * np.array(shape[1:], dtype=np.int64), axis=0).reshape(-1, 3)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a mag's voxels are stored: one object (key or file) per `object_shape` box
    (x, y, z) of the mag's grid, holding chunks of `chunk_shape`. `sharding` is the
    configuration of a zarr3 `sharding_indexed` codec whose shard indices list the
    chunks a shard holds; None where the objects are the chunks (or wkw files)."""

    object_shape: tuple[int, int, int]
    chunk_shape: tuple[int, int, int]
    prefix: str = ""
    separator: str = "/"
    sharding: Optional[dict] = None
    wkw: bool = False

    def key(self, start) -> str:
        """The key (path relative to the mag) of the object whose box starts at `start` (x, y, z)."""
        cell = [int(a) // s for a, s in zip(start, self.object_shape)]
        if self.wkw:
            return f"z{cell[2]}/y{cell[1]}/x{cell[0]}.wkw"
        return self.prefix + self.separator.join(str(v) for v in (0, *cell))


def layout(spec: dict, array=None) -> Layout:
    """The storage layout of the mag that `spec` opens (`array`: that mag, already open)."""
    array = array if array is not None else arrays.open_array(spec, open=True)
    if isinstance(array, wkw_io.WkwMag):
        return Layout((array.file_voxels,) * 3, (array.block_len,) * 3, wkw=True)  # type: ignore[arg-type]
    shape, prefix, separator = chunk_layout(array)
    objects = tuple(int(v) for v in shape[1:])
    metadata = array.spec().to_json()["metadata"]
    codecs = metadata.get("codecs") or []
    zarr3 = metadata.get("zarr_format", 2) == 3 or "chunk_grid" in metadata
    if zarr3 and codecs and codecs[0].get("name") == "sharding_indexed":  # (a codec before it would permute the grid)
        configuration = codecs[0].get("configuration", {})
        chunk = np.array(configuration["chunk_shape"], dtype=np.int64)
        shard = np.array(shape, dtype=np.int64)
        # (channels split over several shards: their keys name more than boxes)
        if len(shard) == 4 and len(chunk) == 4 and not np.any(shard % chunk) and shard[0] >= array.shape[0]:
            return Layout(objects, tuple(int(v) for v in chunk[1:]), prefix, separator,  # type: ignore[arg-type]
                          configuration)
    return Layout(objects, objects, prefix, separator)  # type: ignore[arg-type]


def shard_chunks(spec: dict, shard_layout: Layout, shard_starts: np.ndarray) -> list[tuple[np.ndarray, object]]:
    """For each stored shard whose box starts at a row of `shard_starts` (N, 3): (start,
    (M, 3) starts of the chunks its index lists, or the ValueError that reading or
    decoding the index raised). One ranged read per shard (tensorstore's
    `zarr3_sharding_indexed` kvstore checks the index's crc32c), all at once."""
    configuration = shard_layout.sharding or {}
    shard = np.array(shard_layout.object_shape, dtype=np.int64)
    chunk = np.array(shard_layout.chunk_shape, dtype=np.int64)
    base = spec["kvstore"]
    grid_shape = [1, *(shard // chunk).tolist()]
    opened = []
    for start in np.unique(np.asarray(shard_starts, dtype=np.int64).reshape(-1, 3), axis=0):
        store = {"driver": "zarr3_sharding_indexed", "base": dict(base, path=base["path"] + shard_layout.key(start)),
                 "grid_shape": grid_shape,
                 "index_codecs": configuration.get("index_codecs", []),
                 "index_location": configuration.get("index_location", "end")}
        opened.append((start, ts.KvStore.open(store)))
    listed = []
    for start, future in opened:
        try:
            listed.append((start, future.result().list()))
        except ValueError as error:
            listed.append((start, error))
    found: list[tuple[np.ndarray, object]] = []
    for start, keys in listed:
        if isinstance(keys, ValueError):
            found.append((start, keys))
            continue
        try:
            cells = np.frombuffer(b"".join(keys.result()), dtype=">u4").reshape(-1, 4)[:, 1:].astype(np.int64)
        except ValueError as error:  # e.g. a corrupt shard index
            found.append((start, error))
            continue
        found.append((start, start + cells * chunk))
    return found


def shard_index_bytes(array) -> Optional[int]:
    """Bytes of one shard index of a sharded zarr3 array (16 per chunk, plus a crc32c); None if unsharded."""
    metadata = array.spec().to_json()["metadata"]
    codecs = metadata.get("codecs") or []
    if not codecs or codecs[0].get("name") != "sharding_indexed":
        return None
    configuration = codecs[0].get("configuration", {})
    shard = np.array(metadata["chunk_grid"]["configuration"]["chunk_shape"], dtype=np.int64)
    chunk = np.array(configuration["chunk_shape"], dtype=np.int64)
    checksum = any(codec.get("name") == "crc32c" for codec in configuration.get("index_codecs", []))
    return int(np.prod(shard // chunk)) * 16 + (4 if checksum else 0)


def stored_chunk_boxes(spec: dict, keys_starts: np.ndarray, array=None) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """(starts, stops) of the stored *chunks* of a sharded zarr3 array, from the shard
    indices of the stored shards whose boxes start at `keys_starts` (N, 3) (`shard_chunks`).
    None where the array is not sharded that way, or an index does not decode (the
    caller falls back to storage statistics; units over the shard report the damage).

    On GCS, storage statistics cost thousands of object-metadata requests per shard
    (benchmarks/gcs_requests.py); this costs one GET per stored shard. `array`: the opened
    array of `spec`, if the caller has it.
    """
    shard_layout = layout(spec, array)
    if shard_layout.sharding is None:
        return None
    found = shard_chunks(spec, shard_layout, keys_starts)
    if any(isinstance(chunks, ValueError) for _, chunks in found):
        return None
    parts = [chunks for _, chunks in found if len(chunks)]  # type: ignore[arg-type]
    starts = np.concatenate(parts) if parts else np.zeros((0, 3), dtype=np.int64)
    return starts, starts + np.array(shard_layout.chunk_shape, dtype=np.int64)


def storage_objects(array, spec: dict, box: Box) -> list[tuple[str, Box]]:
    """The stored objects (zarr chunks, sharded zarr3 shards, wkw files) that hold `box` of a
    mag, whether they exist or not: (full path or gs:// URL, the part of `box` they hold)."""
    if spec["driver"] == "wkw":
        side = array.file_voxels
        shape, channel_keys = (side, side, side), [None]
    else:
        chunk, prefix, separator = chunk_layout(array)
        shape = chunk[1:]
        channel_keys = list(range(-(-array.shape[0] // chunk[0])))
    found = []
    cells = [range(a // s, -(-b // s)) for a, b, s in zip(box.start, box.stop, shape)]
    for x in cells[0]:
        for y in cells[1]:
            for z in cells[2]:
                start = (x * shape[0], y * shape[1], z * shape[2])
                part = box.intersect(Box(start, tuple(a + s for a, s in zip(start, shape))))  # type: ignore[arg-type]
                for c in channel_keys:
                    if c is None:
                        found.append((os.path.join(spec["path"], f"z{z}", f"y{y}", f"x{x}.wkw"), part))
                    else:
                        found.append((kvstore_url(spec["kvstore"]) + prefix + separator.join(map(str, (c, x, y, z))),
                                      part))
    return found


def kvstore_url(kvstore: dict) -> str:
    """A kvstore spec's path as users write it (gs://bucket/path/ or a local path/)."""
    if kvstore["driver"] == "gcs":
        return f"gs://{kvstore['bucket']}/{kvstore['path']}"
    return kvstore["path"]


def _wkw_boxes(path: str) -> tuple[np.ndarray, np.ndarray]:
    """wkw data files are `z<z>/y<y>/x<x>.wkw`, each a cube of block_len * file_len voxels."""
    mag = wkw_io.WkwMag(path)
    side = mag.file_voxels
    names = []
    for directory, _, files in os.walk(path):
        relative = os.path.relpath(directory, path)
        names.extend(f"{relative}/{name}" for name in files)
    found = re.findall(r"^z(\d+)/y(\d+)/x(\d+)\.wkw$", "\n".join(names), re.M)
    zyx = np.array(found, dtype=np.int64).reshape(-1, 3)
    starts = zyx[:, ::-1] * side
    return starts, starts + side


NOTHING, SOME, ALL = "nothing", "some", "all"  # of a box: stored chunks


def probe_context() -> ts.Context:
    """For a second handle of a source that only answers storage statistics: its shard
    indices are cached (the reading handle caches nothing, so each of its statistics
    re-read and re-decoded a 512 KiB index: ~7 ms a tile in a busy unit). Statistics
    read no chunk data, so this pool holds indices only."""
    return ts.Context({"cache_pool": {"total_bytes_limit": PROBE_CACHE_BYTES}})


PROBE_CACHE_BYTES = 64 << 20  # 128 shard indices of 32^3 chunks


def box_states(array, boxes: list[Box]) -> list[str]:
    """For each box: NOTHING (reads as the fill value 0, nothing to read), ALL
    (read it whole) or SOME (only some chunks are stored: worth splitting),
    without reading data. All statistics are asked at once (concurrently).

    wkw: NOTHING where no file overlaps the box, else ALL (the library cannot
    say which blocks of a file are stored). A fill value other than 0: ALL.
    """
    if isinstance(array, wkw_io.WkwMag):
        return [NOTHING if box.empty or not array.stored_files(box) else ALL for box in boxes]
    if array.fill_value is not None and np.any(np.asarray(array.fill_value) != 0):
        return [ALL] * len(boxes)
    domain = arrays.array_domain(array)
    futures = []
    for box in boxes:
        inside = box.intersect(domain)
        futures.append(None if inside.empty else array[arrays.region_index(inside)].storage_statistics(
            query_not_stored=True, query_fully_stored=True))
    states = []
    for future in futures:
        if future is None:
            states.append(NOTHING)
            continue
        try:
            statistics = future.result()
        except ValueError:  # e.g. a corrupt shard index: the read that follows reports it, naming the file
            states.append(ALL)
            continue
        states.append(NOTHING if statistics.not_stored else ALL if statistics.fully_stored else SOME)
    return states


def box_not_stored(array, box: Box) -> bool:
    """True if nothing of `box` is stored (it reads as the fill value), without
    reading data: tensorstore looks at the keys or shard indices only, for wkw
    we look for the files. Always False for a fill value other than 0."""
    if isinstance(array, wkw_io.WkwMag):
        return not box.empty and not array.stored_files(box)
    if array.fill_value is not None and np.any(np.asarray(array.fill_value) != 0):
        return False
    inside = box.intersect(arrays.array_domain(array))
    if inside.empty:
        return True
    try:
        statistics = array[arrays.region_index(inside)].storage_statistics(query_not_stored=True).result()
    except ValueError:  # e.g. a corrupt shard index: the read that follows reports it, naming the file
        return False
    return bool(statistics.not_stored)

