"""Compares two WEBKNOSSOS datasets (zarr3, zarr v2 or wkw): properties, every
metadata file (zarr.json, .zarray, .zattrs, .zgroup as parsed JSON; wkw
headers and data files byte for byte), every voxel.

Used by parity.py (reference vs ours on small cases) and compare_reference.py
(benchmark outputs). Reads arrays with tensorstore, whole arrays (the full
shard-rounded shape, not only the bounding box), tile by tile so memory stays
bounded; a tile that holds no stored chunk in either array is fill value in
both and is skipped without reading (after checking the fill values agree).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator

import numpy as np
import tensorstore as ts

PROPERTIES = "datasource-properties.json"
# At most 1024x1024x32 voxels per tile: 128 MB per side for uint32.
TILE = (1024, 1024, 32)


def mag_tuple(mag: Any) -> tuple[int, int, int]:
    if isinstance(mag, (list, tuple)):
        return tuple(int(v) for v in mag)  # type: ignore[return-value]
    parts = [int(v) for v in str(mag).split("-")]
    return (parts[0],) * 3 if len(parts) == 1 else tuple(parts)  # type: ignore[return-value]


def mag_name(mag: tuple[int, int, int]) -> str:
    return str(mag[0]) if mag[0] == mag[1] == mag[2] else "-".join(map(str, mag))


def load_properties(dataset: str) -> dict:
    with open(os.path.join(dataset, PROPERTIES), encoding="utf-8") as handle:
        return json.load(handle)


def layer_mags(properties: dict) -> dict[str, dict[tuple[int, int, int], str]]:
    """{layer name: {mag: path relative to the dataset}} in listed order."""
    result = {}
    for layer in properties.get("dataLayers", []):
        mags = {}
        for entry in layer.get("mags", []):
            mag = mag_tuple(entry["mag"])
            mags[mag] = entry.get("path") or f"./{layer['name']}/{mag_name(mag)}"
        result[layer["name"]] = mags
    return result


def layer_bbox(properties: dict, name: str) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    for layer in properties.get("dataLayers", []):
        if layer["name"] == name:
            box = layer["boundingBox"]
            start = tuple(box["topLeft"])
            return start, tuple(a + s for a, s in zip(start, (box["width"], box["height"], box["depth"])))
    return None


def mag1_voxels(properties: dict) -> int:
    """Voxels in the bounding boxes of all layers (mag-1 voxels; channels not counted)."""
    total = 0
    for layer in properties.get("dataLayers", []):
        box = layer["boundingBox"]
        total += int(box["width"]) * int(box["height"]) * int(box["depth"])
    return total


def json_diff(a: Any, b: Any, path: str = "") -> list[str]:
    """Human-readable differences between two parsed JSON values (first few)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in list(a) + [k for k in b if k not in a]:
            where = f"{path}.{key}" if path else str(key)
            if key not in b:
                out.append(f"{where}: only in reference: {json.dumps(a[key])[:200]}")
            elif key not in a:
                out.append(f"{where}: only in ours: {json.dumps(b[key])[:200]}")
            else:
                out.extend(json_diff(a[key], b[key], where))
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        out = []
        for index, (x, y) in enumerate(zip(a, b)):
            out.extend(json_diff(x, y, f"{path}[{index}]"))
        return out
    # Strict: 28 and 28.0 differ (the files are meant to be identical JSON).
    if a != b or type(a) is not type(b):
        return [f"{path}: reference {json.dumps(a)[:300]} != ours {json.dumps(b)[:300]}"]
    return []


JSON_METADATA = ("zarr.json", ".zarray", ".zattrs", ".zgroup")


def zarr_json_files(dataset: str) -> set[str]:
    """Metadata files compared as parsed JSON."""
    return _files(dataset, lambda name: name in JSON_METADATA)


def wkw_files(dataset: str) -> set[str]:
    """wkw headers and data files, compared byte for byte."""
    return _files(dataset, lambda name: name.endswith(".wkw"))


def _files(dataset: str, wanted) -> set[str]:
    found = set()
    for root, _dirs, files in os.walk(dataset):
        for name in files:
            if wanted(name):
                found.add(os.path.relpath(os.path.join(root, name), dataset))
    return found


def _open(path: str, stop_in_mag: tuple[int, ...] | None = None) -> ts.TensorStore:
    """zarr3 or zarr v2 through tensorstore; a wkw mag is read up to the bounding box's
    end rounded to whole 32^3 blocks (its files are compared byte for byte anyway)."""
    if os.path.exists(os.path.join(path, "header.wkw")):
        import wkw  # pylint: disable=import-outside-toplevel

        if stop_in_mag is None:
            raise ValueError("a wkw mag needs the bounding box to be read")
        return ts.array(wkw.Dataset.open(path).read((0, 0, 0), [-(-e // 32) * 32 for e in stop_in_mag]))
    driver = "zarr3" if os.path.exists(os.path.join(path, "zarr.json")) else "zarr"
    return ts.open(
        {"driver": driver, "kvstore": {"driver": "file", "path": os.path.abspath(path) + "/"}},
        open=True,
        read=True,
        context=ts.Context({"cache_pool": {"total_bytes_limit": 0}}),
    ).result()


def _tiles(shape: tuple[int, ...]) -> Iterator[tuple[slice, ...]]:
    xs, ys, zs = shape[1:]
    for z in range(0, zs, TILE[2]):
        for y in range(0, ys, TILE[1]):
            for x in range(0, xs, TILE[0]):
                yield (
                    slice(None),
                    slice(x, min(x + TILE[0], xs)),
                    slice(y, min(y + TILE[1], ys)),
                    slice(z, min(z + TILE[2], zs)),
                )


@dataclasses.dataclass
class ArrayResult:
    layer: str
    mag: str
    status: str  # identical | differs | missing-in-ours | missing-in-reference | error
    differing: int = 0
    differing_outside_bbox: int = 0
    compared_voxels: int = 0
    note: str = ""
    example: dict | None = None

    @property
    def ok(self) -> bool:
        return self.status == "identical"

    def cell(self) -> str:
        if self.status == "identical":
            return "identical"
        if self.status == "differs":
            return f"{self.differing} differ"
        return self.status


def _stored(array: ts.TensorStore, index: tuple[slice, ...]) -> bool:
    try:
        return not array[index].storage_statistics(query_not_stored=True).result().not_stored
    except (ValueError, NotImplementedError):  # in-memory arrays (wkw) have no storage statistics
        return True


def compare_arrays(
    ref_path: str,
    ours_path: str,
    layer: str,
    mag: tuple[int, int, int],
    bbox: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
    source_block_path: str | None = None,
    source_mag: tuple[int, int, int] | None = None,
) -> ArrayResult:
    """Every voxel of two zarr3 arrays. `bbox` (mag-1) splits the count into inside/outside
    the box aligned outward to `mag`; `source_block_path` (the reference's previous mag) is read
    for the first differing voxel to show the block it was reduced from."""
    result = ArrayResult(layer, mag_name(mag), "identical")
    stop_in_mag = tuple(-(-e // m) for e, m in zip(bbox[1], mag)) if bbox is not None else None
    try:
        ref = _open(ref_path, stop_in_mag)
        ours = _open(ours_path, stop_in_mag)
    except ValueError as error:
        result.status = "error"
        result.note = str(error).splitlines()[0]
        return result
    if ref.dtype != ours.dtype or ref.rank != ours.rank:
        result.status = "differs"
        result.note = f"dtype/rank: reference {ref.dtype} rank {ref.rank}, ours {ours.dtype} rank {ours.rank}"
        result.differing = -1
        return result
    ref_fill = ref.fill_value if ref.fill_value is not None else 0
    ours_fill = ours.fill_value if ours.fill_value is not None else 0
    if tuple(ref.shape) != tuple(ours.shape):
        result.note = f"shape: reference {tuple(ref.shape)}, ours {tuple(ours.shape)}; compared the common part"
    shape = tuple(min(a, b) for a, b in zip(ref.shape, ours.shape))
    if bbox is not None:
        inner_start = tuple(s // m for s, m in zip(bbox[0], mag))
        inner_stop = tuple(-(-e // m) for e, m in zip(bbox[1], mag))
    for index in _tiles(shape):
        if np.asarray(ref_fill) == np.asarray(ours_fill) and not _stored(ref, index) and not _stored(ours, index):
            continue
        a = ref[index].read().result()
        b = ours[index].read().result()
        result.compared_voxels += a.size
        unequal = a != b
        count = int(np.count_nonzero(unequal))
        if not count:
            continue
        result.differing += count
        if bbox is not None:
            lo = [max(i - t.start, 0) for i, t in zip(inner_start, index[1:])]
            hi = [max(min(i - t.start, t.stop - t.start), 0) for i, t in zip(inner_stop, index[1:])]
            inside = int(np.count_nonzero(unequal[:, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]))
            result.differing_outside_bbox += count - inside
        if result.example is None:
            c, x, y, z = (int(v) for v in np.argwhere(unequal)[0])
            pos = (x + index[1].start, y + index[2].start, z + index[3].start)
            example = {
                "channel": c,
                "voxel_in_mag": list(pos),
                "mag1_box": [[p * m for p, m in zip(pos, mag)], [(p + 1) * m for p, m in zip(pos, mag)]],
                "reference": a[c, x, y, z].item(),
                "ours": b[c, x, y, z].item(),
            }
            if source_block_path and source_mag:
                factor = tuple(m // s for m, s in zip(mag, source_mag))
                start = tuple(p * f for p, f in zip(pos, factor))
                try:
                    src = _open(source_block_path, tuple(-(-e // m) for e, m in zip(bbox[1], source_mag)))
                    block = src[(c,) + tuple(slice(s, s + f) for s, f in zip(start, factor))].read().result()
                    example["source_mag"] = mag_name(source_mag)
                    example["source_block_start"] = list(start)
                    example["source_block_xyz"] = block.tolist()
                except Exception as error:  # pylint: disable=broad-except
                    example["source_block_error"] = str(error).splitlines()[0]
            result.example = example
    if result.differing:
        result.status = "differs"
    elif result.note.startswith("shape"):
        result.status = "differs"
    return result


@dataclasses.dataclass
class DatasetComparison:
    properties_equal: bool
    properties_diff: list[str]
    properties_text_equal: bool
    json_diffs: list[str]
    arrays: list[ArrayResult]

    @property
    def ok(self) -> bool:
        return self.properties_equal and not self.json_diffs and all(r.ok for r in self.arrays)

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "properties_equal": self.properties_equal,
            "properties_diff": self.properties_diff,
            "properties_text_equal": self.properties_text_equal,
            "json_diffs": self.json_diffs,
            "arrays": [dataclasses.asdict(r) | {"ok": r.ok} for r in self.arrays],
        }


def _previous_mag(mags: list[tuple[int, int, int]], mag: tuple[int, int, int]) -> tuple[int, int, int] | None:
    finer = [m for m in mags if m != mag and max(m) < max(mag) and all(t % s == 0 for t, s in zip(mag, m))]
    return max(finer, key=lambda m: (max(m), m)) if finer else None


def compare_datasets(ref: str, ours: str, check_json: bool = True) -> DatasetComparison:
    ref_props = load_properties(ref)
    ours_props = load_properties(ours)
    with open(os.path.join(ref, PROPERTIES), encoding="utf-8") as a, open(
        os.path.join(ours, PROPERTIES), encoding="utf-8"
    ) as b:
        text_equal = a.read() == b.read()
    props_diff = json_diff(ref_props, ours_props)
    json_diffs: list[str] = []
    if check_json:
        ref_files = zarr_json_files(ref)
        ours_files = zarr_json_files(ours)
        for rel in sorted(ref_files | ours_files):
            if rel not in ours_files:
                json_diffs.append(f"{rel}: missing in ours")
                continue
            if rel not in ref_files:
                json_diffs.append(f"{rel}: only in ours")
                continue
            with open(os.path.join(ref, rel), encoding="utf-8") as a, open(
                os.path.join(ours, rel), encoding="utf-8"
            ) as b:
                diff = json_diff(json.load(a), json.load(b))
            json_diffs.extend(f"{rel}: {d}" for d in diff)
        ref_wkw, ours_wkw = wkw_files(ref), wkw_files(ours)
        for rel in sorted(ref_wkw | ours_wkw):
            if rel not in ours_wkw or rel not in ref_wkw:
                json_diffs.append(f"{rel}: {'missing in ours' if rel in ref_wkw else 'only in ours'}")
                continue
            with open(os.path.join(ref, rel), "rb") as a, open(os.path.join(ours, rel), "rb") as b:
                if a.read() != b.read():
                    json_diffs.append(f"{rel}: bytes differ")
    arrays: list[ArrayResult] = []
    ref_mags = layer_mags(ref_props)
    ours_mags = layer_mags(ours_props)
    for layer in list(ref_mags) + [name for name in ours_mags if name not in ref_mags]:
        rm = ref_mags.get(layer, {})
        om = ours_mags.get(layer, {})
        bbox = layer_bbox(ref_props, layer)
        for mag in sorted(set(rm) | set(om), key=lambda m: (max(m), m)):
            if mag not in om:
                arrays.append(ArrayResult(layer, mag_name(mag), "missing-in-ours"))
                continue
            if mag not in rm:
                arrays.append(ArrayResult(layer, mag_name(mag), "missing-in-reference"))
                continue
            previous = _previous_mag(list(rm), mag)
            arrays.append(
                compare_arrays(
                    os.path.join(ref, rm[mag]),
                    os.path.join(ours, om[mag]),
                    layer,
                    mag,
                    bbox=bbox,
                    source_block_path=os.path.join(ref, rm[previous]) if previous else None,
                    source_mag=previous,
                )
            )
    return DatasetComparison(not props_diff, props_diff, text_equal, json_diffs, arrays)
