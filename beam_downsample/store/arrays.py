"""Specs of mag arrays (data, built in one place) and array helpers, for every
format we write: zarr3 and zarr v2 through tensorstore, wkw through
`wkw_io` (tensorstore has no wkw driver). Work units see only `open_array`,
`read_box` and `write_region`, whatever the format.

New mags use the reference's layout (contract section 4). zarr3: 32^3
chunks in 1024^3 shards (4096x4096x32 for layers at most 32 deep), Fortran
order, zstd level 5 with checksum, crc32c on the shard index, shape rounded
up to whole shards, dimensions named c, x, y, z. zarr v2: 32^3 chunks, no
shards, order F, "/" separator, zstd level 5, shape rounded up to whole
chunks. wkw: 32^3 blocks in 1024^3 files, LZ4HC. Fill value 0 everywhere.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from typing import Any, Sequence

import numpy as np
import tensorstore as ts

from beam_downsample.core.box import Box
from beam_downsample.core.grid import CHUNK, SHARD
from beam_downsample.core.mags import Mag, mag_name, parse_mag
from beam_downsample.store import storage, wkw_io
from beam_downsample.store.properties import DatasetError, Layer

# dataFormat -> tensorstore driver (None: our wkw adapter)
DRIVERS = {"zarr3": "zarr3", "zarr": "zarr", "wkw": None}
SUPPORTED_FORMATS = tuple(DRIVERS)
READ_ONLY_FORMATS = ("n5", "neuroglancerPrecomputed")  # WEBKNOSSOS reads these, nobody adds mags to them
STATE_DIR = ".beam-downsample"  # markers, locks and wkw staging files of running jobs


def check_format(layer: Layer, dataset_path: str = "") -> None:
    if layer.data_format == "wkw" and storage.is_gcs(dataset_path):
        raise DatasetError(
            f"layer {layer.name!r} is wkw on {dataset_path}: the wkw library reads local files only "
            "(convert the layer to zarr3, or downsample a local copy)"
        )
    if layer.data_format in SUPPORTED_FORMATS:
        return
    if layer.data_format in READ_ONLY_FORMATS:
        raise DatasetError(
            f"layer {layer.name!r} has dataFormat {layer.data_format!r}, which is read-only: new mags "
            f"cannot be written into it (convert the layer to zarr3 first)"
        )
    raise DatasetError(
        f"layer {layer.name!r} has unknown dataFormat {layer.data_format!r}; beam-downsample "
        f"handles {', '.join(SUPPORTED_FORMATS)}"
    )


def kvstore_spec(path: str) -> dict:
    if storage.is_gcs(path):
        storage.configure_emulator()  # before tensorstore's first GCS request
        bucket, prefix = storage.split_gcs(path)
        return {"driver": "gcs", "bucket": bucket, "path": f"{prefix}/" if prefix else ""}
    return {"driver": "file", "path": os.path.abspath(path) + "/"}


def context_spec(concurrency: int = 8) -> dict:
    """No chunk cache: every chunk is decoded once and never read again."""
    return {
        "cache_pool": {"total_bytes_limit": 0},
        "data_copy_concurrency": {"limit": concurrency},
        "file_io_concurrency": {"limit": 32},
    }


def shard_shape(layer: Layer) -> tuple[int, int, int]:
    """The unit of a write: zarr3 shards, zarr v2 chunks."""
    if layer.data_format == "zarr":
        return (CHUNK, CHUNK, CHUNK)
    if layer.bbox.shape[2] <= CHUNK:
        return (4 * SHARD, 4 * SHARD, CHUNK)
    return (SHARD, SHARD, SHARD)


def array_shape(layer: Layer, mag: Mag) -> tuple[int, ...]:
    """Channels, then the bounding box's end in `mag` voxels rounded up to whole shards."""
    end = layer.bbox.scaled_down(mag).stop
    shard = shard_shape(layer)
    return (layer.num_channels,) + tuple(max(-(-e // s), 1) * s for e, s in zip(end, shard))


def new_mag_path(layer: Layer, dataset_path: str, mag: Mag) -> str:
    """Where a new mag is written: always `TARGET/<layer>/<mag>`, checked to stay inside TARGET."""
    return storage.join_inside(dataset_path, layer.name, mag_name(mag))


def wkw_staging_path(layer: Layer, dataset_path: str, mag: Mag) -> str:
    return storage.join_inside(dataset_path, STATE_DIR, layer.name, "wkw-staging", mag_name(mag))


def ngff_files(layer: Layer, dataset_path: str) -> list[str]:
    """The layer-group metadata files `update_ngff` may write (checked before anything runs)."""
    names = {"zarr": [".zattrs", ".zgroup"], "zarr3": ["zarr.json"]}.get(layer.data_format, [])
    return [storage.join_inside(dataset_path, layer.name, name) for name in names]


def mag_spec(layer: Layer, path: str, staging: str | None = None) -> dict:
    """Opens an existing mag array at `path`; wkw writes go to `staging`."""
    driver = DRIVERS[layer.data_format]
    if driver is None:
        return {"driver": "wkw", "path": path, "staging": staging}
    return {"driver": driver, "kvstore": kvstore_spec(path)}


def target_spec(layer: Layer, dataset_path: str, mag: Mag) -> dict:
    """Opens a new (already created) mag for writing; wkw specs also carry the
    region to write (the bounding box in `mag` voxels) for their staging files."""
    path = new_mag_path(layer, dataset_path, mag)
    if layer.data_format != "wkw":
        return mag_spec(layer, path)
    region = layer.bbox.scaled_down(mag)
    return mag_spec(layer, path, wkw_staging_path(layer, dataset_path, mag)) | {
        "region": [list(region.start), list(region.stop)]}


def new_mag_spec(layer: Layer, dataset_path: str, mag: Mag) -> dict:
    """The spec that creates a new mag array with the reference's layout."""
    if layer.data_format == "wkw":
        return target_spec(layer, dataset_path, mag) | {"dtype": layer.dtype.str, "channels": layer.num_channels}
    if layer.data_format == "zarr":
        return {
            "driver": "zarr",
            "kvstore": kvstore_spec(new_mag_path(layer, dataset_path, mag)),
            "metadata": {
                "chunks": [layer.num_channels, CHUNK, CHUNK, CHUNK],
                "compressor": {"id": "zstd", "level": 5},
                "dimension_separator": "/",
                "dtype": layer.dtype.str,
                "fill_value": 0,
                "filters": None,
                "order": "F",
                "shape": list(array_shape(layer, mag)),
                "zarr_format": 2,
            },
        }
    shard = shard_shape(layer)
    channels = layer.num_channels
    bytes_codec: dict[str, Any] = {"name": "bytes"}
    if layer.dtype.itemsize > 1:
        bytes_codec["configuration"] = {"endian": "little"}
    return {
        "driver": "zarr3",
        "kvstore": kvstore_spec(new_mag_path(layer, dataset_path, mag)),
        "metadata": {
            "shape": list(array_shape(layer, mag)),
            "data_type": layer.dtype.name,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [channels, *shard]}},
            "chunk_key_encoding": {"name": "default"},
            "fill_value": 0,
            "dimension_names": ["c", "x", "y", "z"],
            "codecs": [
                {
                    "name": "sharding_indexed",
                    "configuration": {
                        "chunk_shape": [channels, CHUNK, CHUNK, CHUNK],
                        "codecs": [
                            {"name": "transpose", "configuration": {"order": [3, 2, 1, 0]}},
                            bytes_codec,
                            {"name": "zstd", "configuration": {"level": 5, "checksum": True}},
                        ],
                        "index_codecs": [
                            {"name": "bytes", "configuration": {"endian": "little"}},
                            {"name": "crc32c"},
                        ],
                    },
                }
            ],
        },
    }


def create_mag(spec: dict, resume: bool, files=None, exists: bool = True) -> bool:
    """Creates a new mag array; with `resume`, keeps one of the same layout that an
    interrupted run left (returns True), so its finished units need not rerun.
    `files` (wkw): (N, 3) indices of the only files the plan writes (default: the region's).
    `exists` False: nothing is at the path (a listing said so), so there is nothing to delete
    first (on a bucket that deletion lists the path: a round trip)."""
    if spec["driver"] == "wkw":
        return _create_wkw_mag(spec, resume, files)
    if resume:
        try:
            open_array(spec, open=True, create=True)
            remove_stale_write_locks(spec)
            return True
        except ValueError:
            pass  # different layout: start this mag over
    if not exists:
        try:
            open_array(spec, create=True)
            return False
        except ValueError:
            pass  # something appeared there after all
    open_array(spec, create=True, delete_existing=True)
    return False


def _create_wkw_mag(spec: dict, resume: bool, files=None) -> bool:
    """Final mag (header only) plus a staging copy with every file the region needs.

    Kept on resume if the header matches: then either no file was compressed
    yet (all staging files are there) or every unit was done before the
    compression started, so nothing is written into staging any more. Staging
    files are only pre-created in a fresh mag, where none was compressed: a
    file recreated after its compression would overwrite the result with zeros.
    """
    dtype = np.dtype(spec["dtype"])
    if resume:
        try:
            final = wkw_io.WkwMag(spec["path"])
        except ValueError:
            final = None
        if final is not None and final.dtype == dtype and final.channels == spec["channels"]:
            if not os.path.isdir(spec["staging"]):  # all compressed before the crash
                wkw_io.create_staging(spec["staging"], dtype, spec["channels"])
            return True
    for path in (spec["path"], spec["staging"]):
        if os.path.isdir(path):
            shutil.rmtree(path)
    wkw_io.create(spec["path"], dtype, spec["channels"], spec["staging"])
    wkw_io.create_staging_files(spec["staging"], Box(*(tuple(v) for v in spec["region"])), files)
    return False


def open_refreshed_mag(spec: dict, resume: bool, files=None) -> None:
    """Readies an existing mag that a `--bbox` refresh writes into; it is never recreated.

    zarr: tensorstore writes the box into the existing chunks (read-modify-write).
    wkw: the touched `files` are first copied, decompressed, into a fresh staging
    copy (a compressed file can only be written whole), and compressed back after
    the pass. A resumed refresh keeps its staging copy: it holds finished units.
    """
    if spec["driver"] != "wkw":
        open_array(spec, open=True)
        remove_stale_write_locks(spec)
        return
    staging = spec["staging"]
    if resume and os.path.isdir(staging):
        return
    if os.path.isdir(staging):
        shutil.rmtree(staging)
    final = wkw_io.WkwMag(spec["path"])
    wkw_io.create_staging(staging, final.dtype, final.channels)
    if not resume:  # (resumed without staging: every file was compressed, nothing is left to write)
        wkw_io.stage_existing(spec["path"], staging, Box(*(tuple(v) for v in spec["region"])), files)


def check_wkw_layout(layer: Layer, dataset_path: str, mag: Mag) -> None:
    """A refresh stages whole files of 32^3 blocks of 32^3 voxels, the layout we and the reference write."""
    layout = wkw_io.layout(layer.mag_path(dataset_path, mag))
    if layout != (wkw_io.BLOCK_LEN, wkw_io.FILE_LEN):
        raise DatasetError(
            f"layer {layer.name!r} mag {mag_name(mag)}: wkw blocks of {layout[0]} voxels in files of {layout[1]} "
            f"blocks; --bbox can only refresh the reference's layout ({wkw_io.BLOCK_LEN}, {wkw_io.FILE_LEN})"
        )


def finish_mags(specs: Sequence[dict], threads: int = 1) -> None:
    """After a pass: wkw's staged files become the final compressed files
    (all files of all mags at once, on `threads` threads); zarr needs nothing."""
    staged = [(spec["staging"], spec["path"], Box(*(tuple(v) for v in spec["region"]))) for spec in specs
              if spec["driver"] == "wkw" and spec.get("staging") and os.path.isdir(spec["staging"])]
    wkw_io.compress_staged(staged, threads)
    for staging, _, _ in staged:
        shutil.rmtree(staging)
        shutil.rmtree(staging + ".lz4hc")


def remove_stale_write_locks(spec: dict) -> None:
    """Deletes tensorstore's `<shard>.__lock` temp files left by a killed writer.

    tensorstore reuses such a file without truncating it, so a shard written
    after a kill -9 could keep the dead write's tail and be unreadable. Only
    called while we hold the layer's lock, so no live writer owns them.
    """
    kvstore = spec.get("kvstore", {})
    if kvstore.get("driver") != "file":
        return
    for directory, _, files in os.walk(kvstore["path"]):
        for name in files:
            if name.endswith(".__lock"):
                os.unlink(os.path.join(directory, name))


def existing_mag_spec(layer: Layer, dataset_path: str, mag: Mag) -> dict:
    return mag_spec(layer, layer.mag_path(dataset_path, mag))


def open_array(spec: dict, context: ts.Context | None = None, **kwargs: Any):
    """A tensorstore array, or a `wkw_io.WkwMag` for wkw."""
    if spec["driver"] == "wkw":
        return wkw_io.WkwMag(spec["path"], spec.get("staging"))
    return start_open(spec, context, **kwargs).result()


def start_open(spec: dict, context: ts.Context | None = None, **kwargs: Any) -> ts.Future:
    """`ts.open` of a zarr spec; inside `metadata_read_once` a plain open for reading shares its context."""
    if context is None and _READING is not None and kwargs.get("open") and not kwargs.get("create"):
        return ts.open(spec, context=_READING, recheck_cached_metadata=False, **kwargs)
    return ts.open(spec, context=context, **kwargs)


_READING: ts.Context | None = None


@contextlib.contextmanager
def metadata_read_once():
    """Within it, arrays opened to be read (no context given) share one context that keeps their
    metadata: planning checks, lists and refines a source, and on a bucket each open costs a
    round trip. Nothing is read through those handles but metadata and shard indices of arrays
    that do not change during planning."""
    global _READING  # pylint: disable=global-statement
    previous, _READING = _READING, ts.Context({"cache_pool": {"total_bytes_limit": 64 << 20}})
    try:
        yield
    finally:
        _READING = previous


def open_arrays(specs: Sequence[dict], context: ts.Context | None = None, **kwargs: Any) -> list:
    """`open_array` of each spec, the tensorstore ones at once: on a bucket each open reads
    the array's metadata, one round trip for all instead of one each. A spec that carries its
    array's `metadata` (the launcher knew it) is opened without reading it."""
    pending = [None if spec["driver"] == "wkw" else start_open(spec, context, **kwargs) if "metadata" not in spec
               else ts.open(spec, context=context, assume_metadata=True, **kwargs) for spec in specs]
    return [open_array(spec) if future is None else future.result() for spec, future in zip(specs, pending)]


def array_dtype(array) -> np.dtype:
    if isinstance(array, wkw_io.WkwMag):
        return array.dtype
    return array.dtype.numpy_dtype


def array_channels(array) -> int | None:
    """The channel count, or None if the array is not (c, x, y, z)."""
    if isinstance(array, wkw_io.WkwMag):
        return array.channels
    return array.shape[0] if array.rank == 4 else None


def array_domain(array) -> Box:
    if isinstance(array, wkw_io.WkwMag):
        return wkw_io.DOMAIN
    return Box(tuple(array.domain.inclusive_min[1:]), tuple(array.domain.exclusive_max[1:]))


def check_source_array(layer: Layer, dataset_path: str, mag: Mag) -> None:
    """Fails with one line if the listed source mag is missing or disagrees with the properties."""
    check_format(layer, dataset_path)
    try:
        array = open_array(existing_mag_spec(layer, dataset_path, mag), open=True)
    except ValueError as error:
        raise DatasetError(
            f"layer {layer.name!r} lists mag {mag_name(mag)} but its array cannot be opened: "
            f"{str(error).splitlines()[0]}"
        ) from None
    if array_dtype(array) != layer.dtype:
        raise DatasetError(
            f"layer {layer.name!r} mag {mag_name(mag)}: array dtype {array_dtype(array)} "
            f"disagrees with elementClass ({layer.dtype})"
        )
    if array_channels(array) != layer.num_channels:
        shape = array.shape if not isinstance(array, wkw_io.WkwMag) else f"{array.channels} channels"
        raise DatasetError(
            f"layer {layer.name!r} mag {mag_name(mag)}: array shape {shape} is not "
            f"(c={layer.num_channels}, x, y, z)"
        )


def read_box(array, box: Box, channels: int, out: np.ndarray | None = None) -> np.ndarray:
    """Reads `box` (c, x, y, z); parts outside the array's domain read as fill value 0.

    `out` (Fortran order, the box's shape) is filled instead of a new array:
    a reused buffer saves the page faults of fresh memory (a third of the
    decode's CPU time on the bench).
    """
    inside = box.intersect(array_domain(array))
    if out is None:
        out = np.empty((channels, *box.shape), dtype=array_dtype(array), order="F")
    if inside.start != box.start or inside.stop != box.stop:
        out.fill(0)
    if not inside.empty:
        read_region(array, inside, out[local_index(inside, box)])
    return out


def local_index(inner: Box, outer: Box) -> tuple:
    """Index of `inner` within an array (c, x, y, z) that covers `outer`."""
    return (slice(None),) + tuple(slice(a - o, b - o) for a, b, o in zip(inner.start, inner.stop, outer.start))


def region_index(box: Box) -> tuple:
    return (slice(None),) + tuple(slice(a, b) for a, b in zip(box.start, box.stop))


def read_region(array, box: Box, out: np.ndarray | None = None) -> np.ndarray:
    if isinstance(array, wkw_io.WkwMag):
        if out is None:
            return array.read(box)
        out[...] = array.read(box)
        return out
    if out is None:
        return array[region_index(box)].read(order="F").result()
    ts.array(out, copy=False, write=True).write(array[region_index(box)].translate_to[0, 0, 0, 0]).result()
    return out


def write_region(array, box: Box, data: np.ndarray, keep_reference: bool = False):
    """Starts the write; `.result()` of the returned future waits for it.

    `keep_reference`: tensorstore encodes straight from `data` instead of
    copying it first (no second copy of every level in memory, no fresh
    pages for it); `data` must then not change until the write committed,
    and tensorstore may hold a view of it until then.
    """
    if isinstance(array, wkw_io.WkwMag):
        return array.write(box, data)
    if keep_reference:
        return array[region_index(box)].write(data, can_reference_source_data_indefinitely=True)
    return array[region_index(box)].write(data)


# ---------------------------------------------------------------------------
# OME-NGFF multiscales kept in step with the mags


def update_ngff(layer_dir: str, layer: Layer, voxel_size: Sequence[float], unit: str, mags: Sequence[Mag]) -> None:
    """Lists `mags` (finest first) in the layer group's NGFF multiscales, where the
    reference keeps them: zarr3 `zarr.json` -> `attributes.ome` (NGFF 0.5),
    zarr v2 `.zattrs` (NGFF 0.4, with a `.zgroup`). wkw layers have none."""
    if layer.data_format == "wkw":
        return
    if layer.data_format == "zarr":
        group_path = storage.join_inside(layer_dir, ".zattrs")
        attributes = _load_json(group_path, {})
        multiscales = attributes.setdefault("multiscales", [])
        version = "0.4"
        if not storage.exists(storage.join_inside(layer_dir, ".zgroup")):
            storage.write_json_atomically(storage.join_inside(layer_dir, ".zgroup"), {"zarr_format": "2"})
        document = attributes
    else:
        group_path = storage.join_inside(layer_dir, "zarr.json")
        document = _load_json(group_path, {"zarr_format": 3, "node_type": "group"})
        ome = document.setdefault("attributes", {}).setdefault("ome", {"version": "0.5"})
        ome.setdefault("version", "0.5")
        multiscales = ome.setdefault("multiscales", [])
        version = None  # NGFF 0.5 puts the version on the `ome` object
    if not multiscales:
        multiscales.append({"version": version} if version else {})
    scale = multiscales[0]
    scale.setdefault(
        "axes",
        [{"name": "c", "type": "channel"}]
        + [{"name": axis, "type": "space", "unit": unit} for axis in "xyz"],
    )
    datasets = {entry.get("path"): entry for entry in scale.get("datasets", [])}
    for mag in mags:
        datasets.setdefault(
            mag_name(mag),
            {
                "path": mag_name(mag),
                "coordinateTransformations": [
                    {"type": "scale", "scale": [1.0] + [float(v) * m for v, m in zip(voxel_size, mag)]}
                ],
            },
        )

    def order(entry: dict) -> tuple:
        try:
            mag = parse_mag(entry["path"])
            return (0, max(mag), mag)
        except Exception:
            return (1, 0, (0, 0, 0))

    scale["datasets"] = sorted(datasets.values(), key=order)
    storage.write_json_atomically(group_path, document)


def _load_json(path: str, default: dict) -> dict:
    found = storage.read_json(path)
    return default if found is None else found
