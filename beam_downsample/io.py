"""TensorStore specs (data, built in one place) and array helpers.

New mags use the reference's zarr3 layout (contract section 4): 32^3 chunks
in 1024^3 shards (4096x4096x32 for layers at most 32 deep), Fortran order,
zstd level 5 with checksum, crc32c on the shard index, fill value 0, shape
rounded up to whole shards, dimensions named c, x, y, z.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import tensorstore as ts

from beam_downsample import storage
from beam_downsample.mags import Mag, mag_name, parse_mag
from beam_downsample.planning import CHUNK, SHARD, Box
from beam_downsample.properties import DatasetError, Layer, resolve_path

SUPPORTED_FORMATS = ("zarr3",)


def check_format(layer: Layer) -> None:
    if layer.data_format not in SUPPORTED_FORMATS:
        raise DatasetError(
            f"layer {layer.name!r} has dataFormat {layer.data_format!r}; beam-downsample handles "
            f"{', '.join(SUPPORTED_FORMATS)} only so far (convert it with `webknossos convert-zarr3`)"
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
    if layer.bbox.shape[2] <= CHUNK:
        return (4 * SHARD, 4 * SHARD, CHUNK)
    return (SHARD, SHARD, SHARD)


def array_shape(layer: Layer, mag: Mag) -> tuple[int, ...]:
    """Channels, then the bounding box's end in `mag` voxels rounded up to whole shards."""
    end = layer.bbox.scaled_down(mag).stop
    shard = shard_shape(layer)
    return (layer.num_channels,) + tuple(max(-(-e // s), 1) * s for e, s in zip(end, shard))


def new_mag_spec(layer: Layer, dataset_path: str, mag: Mag) -> dict:
    """The spec that creates a new mag array with the reference's layout."""
    shard = shard_shape(layer)
    channels = layer.num_channels
    bytes_codec: dict[str, Any] = {"name": "bytes"}
    if layer.dtype.itemsize > 1:
        bytes_codec["configuration"] = {"endian": "little"}
    path = resolve_path(dataset_path, f"./{layer.name}/{mag_name(mag)}")
    return {
        "driver": "zarr3",
        "kvstore": kvstore_spec(path),
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


def remove_stale_write_locks(spec: dict) -> None:
    """Deletes tensorstore's `<shard>.__lock` temp files left by a killed writer.

    tensorstore reuses such a file without truncating it, so a shard written
    after a kill -9 could keep the dead write's tail and be unreadable. Only
    called while we hold the layer's lock, so no live writer owns them.
    """
    kvstore = spec["kvstore"]
    if kvstore["driver"] != "file":
        return
    for directory, _, files in os.walk(kvstore["path"]):
        for name in files:
            if name.endswith(".__lock"):
                os.unlink(os.path.join(directory, name))


def existing_mag_spec(layer: Layer, dataset_path: str, mag: Mag) -> dict:
    return {"driver": "zarr3", "kvstore": kvstore_spec(layer.mag_path(dataset_path, mag))}


def open_array(spec: dict, context: ts.Context | None = None, **kwargs: Any) -> ts.TensorStore:
    return ts.open(spec, context=context, **kwargs).result()


def check_source_array(layer: Layer, dataset_path: str, mag: Mag) -> None:
    """Fails with one line if the listed source mag is missing or disagrees with the properties."""
    check_format(layer)
    try:
        array = open_array(existing_mag_spec(layer, dataset_path, mag), open=True)
    except ValueError as error:
        raise DatasetError(
            f"layer {layer.name!r} lists mag {mag_name(mag)} but its array cannot be opened: "
            f"{str(error).splitlines()[0]}"
        ) from None
    if array.dtype.numpy_dtype != layer.dtype:
        raise DatasetError(
            f"layer {layer.name!r} mag {mag_name(mag)}: array dtype {array.dtype.numpy_dtype} "
            f"disagrees with elementClass ({layer.dtype})"
        )
    if array.rank != 4 or array.shape[0] != layer.num_channels:
        raise DatasetError(
            f"layer {layer.name!r} mag {mag_name(mag)}: array shape {array.shape} is not "
            f"(c={layer.num_channels}, x, y, z)"
        )


def read_box(array: ts.TensorStore, box: Box, channels: int, out: np.ndarray | None = None) -> np.ndarray:
    """Reads `box` (c, x, y, z); parts outside the array's domain read as fill value 0.

    `out` (Fortran order, the box's shape) is filled instead of a new array:
    a reused buffer saves the page faults of fresh memory (a third of the
    decode's CPU time on the bench).
    """
    domain = Box(tuple(array.domain.inclusive_min[1:]), tuple(array.domain.exclusive_max[1:]))
    inside = box.intersect(domain)
    if out is None:
        out = np.empty((channels, *box.shape), dtype=array.dtype.numpy_dtype, order="F")
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


def read_region(array: ts.TensorStore, box: Box, out: np.ndarray | None = None) -> np.ndarray:
    if out is None:
        return array[region_index(box)].read(order="F").result()
    ts.array(out, copy=False, write=True).write(array[region_index(box)].translate_to[0, 0, 0, 0]).result()
    return out


def write_region(array: ts.TensorStore, box: Box, data: np.ndarray) -> ts.Future:
    return array[region_index(box)].write(data)


# ---------------------------------------------------------------------------
# OME-NGFF multiscales kept in step with the mags


def update_ngff(layer_dir: str, layer: Layer, voxel_size: Sequence[float], unit: str, mags: Sequence[Mag]) -> None:
    """Lists `mags` (finest first) in the layer group's `attributes.ome` (NGFF 0.5)."""
    group_path = os.path.join(layer_dir, "zarr.json")
    group = storage.read_json(group_path)
    if group is None:
        group = {"zarr_format": 3, "node_type": "group"}
    attributes = group.setdefault("attributes", {})
    ome = attributes.setdefault("ome", {"version": "0.5"})
    ome.setdefault("version", "0.5")
    multiscales = ome.setdefault("multiscales", [{}])
    if not multiscales:
        multiscales.append({})
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
    storage.write_json_atomically(group_path, group)
