"""The dataset model: `datasource-properties.json` read, checked and rewritten.

The raw JSON is kept as loaded so that keys we do not know survive a rewrite;
the typed views below only read from it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Callable

import numpy as np

from beam_downsample.core.box import Box
from beam_downsample.core.errors import DatasetError
from beam_downsample.core.mags import Mag, MagError, mag_name, parse_mag, sort_mags
from beam_downsample.store import storage

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


# dataFormat values WEBKNOSSOS knows (which of them we write is io's business).
DATA_FORMATS = ("zarr3", "zarr", "wkw", "n5", "neuroglancerPrecomputed")

# WEBKNOSSOS's layer-name rule (webknossos 4.3.3 refuses everything else, measured):
# ASCII letters, digits, `_`, `$`, `@`, `-`, and dots after the first character.
# Layer names become directory names under TARGET, so this also keeps every
# layer's files inside the dataset: no `/`, no `..`, no hidden `.beam-downsample`.
LAYER_NAME = re.compile(r"[A-Za-z0-9_$@\-][A-Za-z0-9_$@\-.]*")
LAYER_NAME_RULE = "letters, digits, '_', '$', '@', '-', and dots after the first character"

# Largest exclusive end of an array axis: tensorstore's finite index range is
# [-(2**62 - 2), 2**62 - 2]; shapes are rounded up to whole shards (4096 at most).
TENSORSTORE_MAX_END = 2**62 - 2 - 4096
WKW_MAX_END = 2**31  # wkw addresses voxels with 32-bit offsets (see wkw_io.DOMAIN)

AXIS_ORDER = {"c": 0, "x": 1, "y": 2, "z": 3}
WKW_CUBE_LENGTH = 1024  # voxels per wkw file edge: 32 blocks of 32


def mag_entry(layer_name: str, mag: Mag, data_format: str) -> dict:
    """A mag's properties entry as the reference writes it (wkw entries name their file size)."""
    entry: dict = {"mag": list(mag), "path": f"./{layer_name}/{mag_name(mag)}"}
    if data_format == "wkw":
        entry["cubeLength"] = WKW_CUBE_LENGTH
    entry["axisOrder"] = dict(AXIS_ORDER)
    return entry


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
    """Where a listed mag is read from: URLs and absolute paths as they are (WEBKNOSSOS
    allows mags outside the dataset), relative ones from the dataset. Only read from:
    where we write is decided by `storage.join_inside`."""
    if "://" in mag_path or os.path.isabs(mag_path):
        return mag_path
    return storage.normpath(os.path.join(dataset_path, mag_path))


def _error(where: str, message: str) -> DatasetError:
    return DatasetError(f"{PROPERTIES_FILE}: {where} {message}")


def _require(mapping: dict, key: str, where: str) -> Any:
    if not isinstance(mapping, dict):
        raise _error(where, f"must be a JSON object, got {_short(mapping)}")
    if key not in mapping:
        raise _error(where, f"has no {key!r}")
    return mapping[key]


def _short(value: Any, limit: int = 60) -> str:
    """A value for an error line: its repr, cut short (fuzzed values can be huge)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_layer_name(name: Any) -> str:
    """The layer name, if WEBKNOSSOS would accept it; DatasetError otherwise."""
    if not isinstance(name, str) or not LAYER_NAME.fullmatch(name):
        raise DatasetError(
            f"{PROPERTIES_FILE}: layer name {_short(name, 200)} is invalid: a layer name may only contain "
            f"{LAYER_NAME_RULE}"
        )
    return name


def _parse_bbox(raw: Any, where: str) -> Box:
    """Integer topLeft (no bools, no floats) and positive integer width, height, depth."""
    where = f"{where} boundingBox"
    if not isinstance(raw, dict):
        raise _error(where, f"must be a JSON object, got {_short(raw)}")
    top_left = _require(raw, "topLeft", where)
    if not isinstance(top_left, list) or len(top_left) != 3 or not all(_is_int(v) for v in top_left):
        raise _error(f"{where}.topLeft", f"must be three integers, got {_short(top_left)}")
    if any(v < 0 for v in top_left):
        raise _error(f"{where}.topLeft", f"must not be negative (arrays start at 0), got {_short(top_left)}")
    size = []
    for key in ("width", "height", "depth"):
        value = _require(raw, key, where)
        if not _is_int(value) or value <= 0:
            raise _error(f"{where}.{key}", f"must be a positive integer, got {_short(value)}")
        size.append(value)
    return Box(tuple(top_left), tuple(a + s for a, s in zip(top_left, size)))  # type: ignore[arg-type]


def _parse_mags(raw: Any, name: str, where: str) -> dict[Mag, str]:
    if not isinstance(raw, list):
        raise _error(f"{where} mags", f"must be a list, got {_short(raw)}")
    mags: dict[Mag, str] = {}
    for entry in raw:
        try:
            mag = parse_mag(entry["mag"])
        except (KeyError, TypeError, IndexError, MagError) as error:
            why = error if isinstance(error, MagError) else _short(entry)
            raise _error(where, f"lists a malformed mag: {why}") from None
        path = entry.get("path")
        if path is not None and (not isinstance(path, str) or "\0" in path):
            raise _error(f"{where} mag {mag_name(mag)} path", f"must be a string without NUL, got {_short(path)}")
        mags[mag] = path or f"./{name}/{mag_name(mag)}"
    if not mags:
        raise _error(where, "has no mags to downsample from")
    return mags


def _check_index_range(bbox: Box, mags: dict[Mag, str], data_format: str, where: str) -> None:
    """The bounding box must fit the arrays' index range in every listed mag; the mags we
    plan are coarser than the listed source mag, so they fit too."""
    limit = WKW_MAX_END if data_format == "wkw" else TENSORSTORE_MAX_END
    for mag in mags:
        end = bbox.scaled_down(mag).stop
        if any(e > limit for e in end):
            raise _error(
                f"{where} boundingBox",
                f"ends at {_short(list(end))} in mag {mag_name(mag)}, beyond the {data_format} arrays' index "
                f"range (at most {limit} per axis)",
            )


def _parse_layer(raw: Any, index: int) -> Layer:
    where = f"dataLayers[{index}]"
    name = check_layer_name(_require(raw, "name", where))
    where = f"layer {name!r}"
    category = _require(raw, "category", where)
    if category not in ("color", "segmentation"):
        raise _error(where, f"has unknown category {_short(category)}")
    element_class = _require(raw, "elementClass", where)
    if not isinstance(element_class, str) or element_class not in ELEMENT_CLASSES:
        raise _error(where, f"has unknown elementClass {_short(element_class)}")
    num_channels = raw.get("numChannels", 1)
    if not _is_int(num_channels) or num_channels < 1:
        raise _error(f"{where} numChannels", f"must be a positive integer, got {_short(num_channels)}")
    if element_class == "uint24" and num_channels == 1:
        num_channels = 3  # older RGB layers leave numChannels at 1
    try:
        dtype = channel_dtype(element_class, num_channels)
    except DatasetError as error:
        raise DatasetError(f"{PROPERTIES_FILE}: {where}: {error}") from None
    data_format = raw.get("dataFormat", "wkw")
    if not isinstance(data_format, str) or data_format not in DATA_FORMATS:
        raise _error(where, f"has unknown dataFormat {_short(data_format)}; WEBKNOSSOS knows {', '.join(DATA_FORMATS)}")
    bbox = _parse_bbox(_require(raw, "boundingBox", where), where)
    mags = _parse_mags(_require(raw, "mags", where), name, where)
    _check_index_range(bbox, mags, data_format, where)
    return Layer(
        name=name,
        category=category,
        bbox=bbox,
        dtype=dtype,
        num_channels=num_channels,
        data_format=data_format,
        mags=mags,
    )


MAX_DEPTH = 100  # WEBKNOSSOS writes about 6; json's encoder recurses, so ~1000 would fail our rewrite


def _depth(document: Any) -> int:
    """Nesting depth of a JSON document, counted without recursion."""
    deepest, stack = 0, [(document, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def _parse_voxel_size(scale: Any) -> tuple[tuple[float, float, float], str]:
    """`scale` is `{"factor": [x, y, z], "unit": ...}` or (older) the bare list."""
    factor = scale.get("factor") if isinstance(scale, dict) else scale
    unit = scale.get("unit", "nanometer") if isinstance(scale, dict) else "nanometer"
    if not isinstance(unit, str):
        raise _error("scale.unit", f"must be a string, got {_short(unit)}")
    if not isinstance(factor, list) or len(factor) != 3 or any(isinstance(v, bool) for v in factor):
        raise _error("scale", f"must be three finite positive numbers, got {_short(factor)}")
    try:
        voxel_size = tuple(float(v) for v in factor)
    except (TypeError, ValueError, OverflowError):
        voxel_size = (math.nan,)
    if len(voxel_size) != 3 or not all(math.isfinite(v) and v > 0 for v in voxel_size):
        raise _error("scale", f"must be three finite positive numbers, got {_short(factor)}")
    return voxel_size, unit  # type: ignore[return-value]


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
    with open(properties_path, "rb") as handle:
        content = handle.read()
    try:
        return properties_path, content.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DatasetError(f"{properties_path} is not UTF-8: {error}") from None


def _read_gcs_properties(url: str) -> tuple[str, str]:
    """Like the local checks, one line each: no bucket, no properties, no access."""
    from google.api_core import exceptions  # pylint: disable=import-outside-toplevel
    from google.auth import exceptions as auth_exceptions  # pylint: disable=import-outside-toplevel

    bucket, _ = storage.split_gcs(url)
    if not bucket:
        raise DatasetError(f"TARGET {url!r} names no bucket (expected gs://bucket/path)")
    properties_url = f"{url}/{PROPERTIES_FILE}"
    try:
        content = storage.read_bytes(properties_url)
        text = None if content is None else content.decode("utf-8")
        if text is None and storage.gcs_client().lookup_bucket(bucket) is None:
            raise DatasetError(f"TARGET {url!r}: bucket {bucket!r} does not exist")
    except (exceptions.GoogleAPIError, auth_exceptions.GoogleAuthError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DatasetError(f"TARGET {url!r} cannot be read: {first_line}") from None
    except UnicodeDecodeError as error:
        raise DatasetError(f"{properties_url} is not UTF-8: {error}") from None
    if text is None:
        raise DatasetError(f"TARGET {url!r} has no {PROPERTIES_FILE}; is it a WEBKNOSSOS dataset?")
    return properties_url, text


def load_dataset(path: str) -> Dataset:
    """Reads and checks the properties; every problem is one `DatasetError` line.

    The properties are untrusted input (datasets come from other labs and
    shared buckets): every value we use is checked here, before anything is
    planned or written.
    """
    if storage.is_gcs(path):
        path = storage.normpath(path)
    properties_path, text = _read_properties_text(path)
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as error:
        raise DatasetError(f"{properties_path} is not valid JSON: {error}") from None
    except (ValueError, RecursionError) as error:  # ints beyond Python's digit limit, deep nesting
        raise DatasetError(f"{properties_path} cannot be read: {str(error).splitlines()[0][:200]}") from None
    if not isinstance(raw, dict):
        raise DatasetError(f"{properties_path} must hold a JSON object")
    if _depth(raw) > MAX_DEPTH:  # we rewrite the file after each pass, deeper in the stack than here
        raise DatasetError(f"{properties_path} nests deeper than {MAX_DEPTH} levels; it could not be rewritten")
    voxel_size, unit = _parse_voxel_size(_require(raw, "scale", "the top level"))
    layers_raw = _require(raw, "dataLayers", "the top level")
    if not isinstance(layers_raw, list):
        raise DatasetError(f"{PROPERTIES_FILE}: dataLayers must be a list")
    layers = tuple(_parse_layer(layer, i) for i, layer in enumerate(layers_raw))
    names = [layer.name for layer in layers]
    for name in names:
        if names.count(name) > 1:
            raise DatasetError(f"{PROPERTIES_FILE}: two layers are named {name!r}")
    return Dataset(path=path, raw=raw, voxel_size=voxel_size, unit=unit, layers=layers)


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
    storage.write_json_atomically(storage.join_inside(dataset_path, PROPERTIES_FILE), raw)


def update_properties(dataset_path: str, change: Callable[[dict], dict], read=None) -> dict:
    """Read-modify-write of the properties, safe against a concurrent run on another layer.
    `read`: `read_properties_for_update` made a moment ago, with other requests."""
    return storage.update_json(storage.join_inside(dataset_path, PROPERTIES_FILE), change, read=read)


def read_properties_for_update(dataset_path: str):
    return storage.read_for_update(storage.join_inside(dataset_path, PROPERTIES_FILE))
