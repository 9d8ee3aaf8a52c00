"""The dataset model: `datasource-properties.json` read, checked and rewritten.

The raw JSON is kept as loaded so that keys we do not know survive a rewrite;
the typed views below only read from it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import numpy as np

from beam_downsample import storage
from beam_downsample.mags import Mag, MagError, mag_name, parse_mag, sort_mags
from beam_downsample.planning import Box

PROPERTIES_FILE = "datasource-properties.json"

# elementClass -> (numpy kind, bits of the whole voxel, all channels together):
# WEBKNOSSOS writes uint8 x 2 channels as elementClass uint16, numChannels 2.
ELEMENT_CLASSES: dict[str, tuple[str, int]] = {
    **{f"uint{bits}": ("u", bits) for bits in (8, 16, 24, 32, 48, 64, 96, 128)},
    **{f"int{bits}": ("i", bits) for bits in (8, 16, 24, 32, 48, 64, 96, 128)},
    "float": ("f", 32),
    "double": ("f", 64),
    "float96": ("f", 96),
    "float128": ("f", 128),
}


def channel_dtype(element_class: str, num_channels: int) -> np.dtype:
    """The dtype of one channel; raises DatasetError if the class does not split into channels."""
    kind, bits = ELEMENT_CLASSES[element_class]
    per_channel, rest = divmod(bits, num_channels)
    if rest or per_channel not in ((32, 64) if kind == "f" else (8, 16, 32, 64)):
        raise DatasetError(f"elementClass {element_class} does not split into {num_channels} channels")
    return np.dtype(f"{kind}{per_channel // 8}")


def element_class_for(dtype: np.dtype, num_channels: int) -> str:
    """The elementClass WEBKNOSSOS writes for `num_channels` channels of `dtype`."""
    bits = np.dtype(dtype).itemsize * 8 * num_channels
    kind = np.dtype(dtype).kind
    if kind == "f":
        return {32: "float", 64: "double"}.get(bits, f"float{bits}")
    return f"{'uint' if kind == 'u' else 'int'}{bits}"


AXIS_ORDER = {"c": 0, "x": 1, "y": 2, "z": 3}
WKW_CUBE_LENGTH = 1024  # voxels per wkw file edge: 32 blocks of 32


def mag_entry(layer_name: str, mag: Mag, data_format: str) -> dict:
    """A mag's properties entry as the reference writes it (wkw entries name their file size)."""
    entry: dict = {"mag": list(mag), "path": f"./{layer_name}/{mag_name(mag)}"}
    if data_format == "wkw":
        entry["cubeLength"] = WKW_CUBE_LENGTH
    entry["axisOrder"] = dict(AXIS_ORDER)
    return entry


class DatasetError(ValueError):
    """The dataset on disk is not one we can downsample; the message says why."""


@dataclasses.dataclass(frozen=True)
class Layer:
    name: str
    category: str
    bbox: Box  # in mag-1 voxels
    dtype: np.dtype
    num_channels: int
    data_format: str
    mags: dict[Mag, str]  # mag -> path as written in the properties

    @property
    def source_mag(self) -> Mag:
        """The existing mag with the largest component: downsampling continues there."""
        return sort_mags(self.mags)[-1]

    def mag_path(self, dataset_path: str, mag: Mag) -> str:
        return resolve_path(dataset_path, self.mags[mag])


@dataclasses.dataclass(frozen=True)
class Dataset:
    path: str
    raw: dict
    voxel_size: tuple[float, float, float]
    unit: str
    layers: tuple[Layer, ...]

    def layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise DatasetError(
            f"--layer-name: no layer named {name!r}; the layers are: " + ", ".join(l.name for l in self.layers)
        )

    def all_mags(self) -> set[Mag]:
        return {mag for layer in self.layers for mag in layer.mags}


def resolve_path(dataset_path: str, mag_path: str) -> str:
    if "://" in mag_path or os.path.isabs(mag_path):
        return mag_path
    return storage.normpath(os.path.join(dataset_path, mag_path))


def _require(mapping: dict, key: str, where: str) -> Any:
    if not isinstance(mapping, dict) or key not in mapping:
        raise DatasetError(f"{PROPERTIES_FILE}: {where} has no {key!r}")
    return mapping[key]


def _parse_layer(raw: dict, index: int) -> Layer:
    where = f"dataLayers[{index}]"
    name = _require(raw, "name", where)
    where = f"layer {name!r}"
    category = _require(raw, "category", where)
    if category not in ("color", "segmentation"):
        raise DatasetError(f"{PROPERTIES_FILE}: {where} has unknown category {category!r}")
    element_class = _require(raw, "elementClass", where)
    if element_class not in ELEMENT_CLASSES:
        raise DatasetError(f"{PROPERTIES_FILE}: {where} has unknown elementClass {element_class!r}")
    num_channels = int(raw.get("numChannels", 1))
    if element_class == "uint24" and num_channels == 1:
        num_channels = 3  # older RGB layers leave numChannels at 1
    try:
        dtype = channel_dtype(element_class, num_channels)
    except DatasetError as error:
        raise DatasetError(f"{PROPERTIES_FILE}: {where}: {error}") from None
    bbox_raw = _require(raw, "boundingBox", where)
    try:
        top_left = [int(v) for v in bbox_raw["topLeft"]]
        size = [int(bbox_raw["width"]), int(bbox_raw["height"]), int(bbox_raw["depth"])]
        assert len(top_left) == 3
    except (KeyError, TypeError, ValueError, AssertionError):
        raise DatasetError(f"{PROPERTIES_FILE}: {where} has a malformed boundingBox") from None
    bbox = Box(tuple(top_left), tuple(a + s for a, s in zip(top_left, size)))  # type: ignore[arg-type]
    mags: dict[Mag, str] = {}
    for entry in _require(raw, "mags", where) or []:
        try:
            mag = parse_mag(entry["mag"])
        except (KeyError, TypeError, MagError) as error:
            raise DatasetError(f"{PROPERTIES_FILE}: {where} lists a malformed mag: {error}") from None
        mags[mag] = entry.get("path") or f"./{name}/{mag_name(mag)}"
    if not mags:
        raise DatasetError(f"{PROPERTIES_FILE}: {where} has no mags to downsample from")
    return Layer(
        name=name,
        category=category,
        bbox=bbox,
        dtype=dtype,
        num_channels=num_channels,
        data_format=raw.get("dataFormat", "wkw"),
        mags=mags,
    )


def _read_properties_text(path: str) -> tuple[str, str]:
    """(where, text) of the properties; DatasetError if TARGET is no dataset."""
    if storage.is_gcs(path):
        return _read_gcs_properties(path)
    if not os.path.exists(path):
        raise DatasetError(f"TARGET {path!r} does not exist")
    if not os.path.isdir(path):
        raise DatasetError(f"TARGET {path!r} is not a directory (expected a WEBKNOSSOS dataset)")
    properties_path = os.path.join(path, PROPERTIES_FILE)
    if not os.path.isfile(properties_path):
        raise DatasetError(f"TARGET {path!r} has no {PROPERTIES_FILE}; is it a WEBKNOSSOS dataset?")
    with open(properties_path, encoding="utf-8") as handle:
        return properties_path, handle.read()


def _read_gcs_properties(url: str) -> tuple[str, str]:
    """Like the local checks, one line each: no bucket, no properties, no access."""
    from google.api_core import exceptions  # pylint: disable=import-outside-toplevel
    from google.auth import exceptions as auth_exceptions  # pylint: disable=import-outside-toplevel

    bucket, _ = storage.split_gcs(url)
    if not bucket:
        raise DatasetError(f"TARGET {url!r} names no bucket (expected gs://bucket/path)")
    properties_url = f"{url}/{PROPERTIES_FILE}"
    try:
        text = storage.read_text(properties_url)
        if text is None and storage.gcs_client().lookup_bucket(bucket) is None:
            raise DatasetError(f"TARGET {url!r}: bucket {bucket!r} does not exist")
    except (exceptions.GoogleAPIError, auth_exceptions.GoogleAuthError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DatasetError(f"TARGET {url!r} cannot be read: {first_line}") from None
    if text is None:
        raise DatasetError(f"TARGET {url!r} has no {PROPERTIES_FILE}; is it a WEBKNOSSOS dataset?")
    return properties_url, text


def load_dataset(path: str) -> Dataset:
    """Reads and checks the properties; every problem is one `DatasetError` line."""
    if storage.is_gcs(path):
        path = storage.normpath(path)
    properties_path, text = _read_properties_text(path)
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as error:
        raise DatasetError(f"{properties_path} is not valid JSON: {error}") from None
    if not isinstance(raw, dict):
        raise DatasetError(f"{properties_path} must hold a JSON object")
    scale = _require(raw, "scale", "the top level")
    factor = scale.get("factor") if isinstance(scale, dict) else scale
    unit = scale.get("unit", "nanometer") if isinstance(scale, dict) else "nanometer"
    try:
        voxel_size = tuple(float(v) for v in factor)
        assert len(voxel_size) == 3 and all(v > 0 for v in voxel_size)
    except (TypeError, ValueError, AssertionError):
        raise DatasetError(f"{PROPERTIES_FILE}: scale must be three positive numbers, got {factor!r}") from None
    layers_raw = _require(raw, "dataLayers", "the top level")
    if not isinstance(layers_raw, list):
        raise DatasetError(f"{PROPERTIES_FILE}: dataLayers must be a list")
    layers = tuple(_parse_layer(layer, i) for i, layer in enumerate(layers_raw))
    return Dataset(path=path, raw=raw, voxel_size=voxel_size, unit=unit, layers=layers)  # type: ignore[arg-type]


def with_new_mags(raw: dict, layer_name: str, mags: list[Mag]) -> dict:
    """A copy of the properties with `mags` appended to the layer (finest first)."""
    updated = json.loads(json.dumps(raw))
    for layer in updated["dataLayers"]:
        if layer["name"] != layer_name:
            continue
        listed = {parse_mag(entry["mag"]) for entry in layer["mags"]}
        for mag in mags:
            if mag not in listed:
                layer["mags"].append(mag_entry(layer_name, mag, layer.get("dataFormat", "wkw")))
        layer["mags"].sort(key=lambda entry: (max(parse_mag(entry["mag"])), parse_mag(entry["mag"])))
    return updated


def save_properties(dataset_path: str, raw: dict) -> None:
    storage.write_json_atomically(os.path.join(dataset_path, PROPERTIES_FILE), raw)


def update_properties(dataset_path: str, change: Callable[[dict], dict]) -> dict:
    """Read-modify-write of the properties, safe against a concurrent run on another layer."""
    return storage.update_json(os.path.join(dataset_path, PROPERTIES_FILE), change)
