"""The OME-NGFF multiscales of a zarr layer, in step with the properties: one dataset
per listed mag, finest first, scaled by voxel size times mag (contract section 4).
zarr3 keeps them in the layer group's `zarr.json` (`attributes.ome`, NGFF 0.5),
zarr v2 in `.zattrs` (NGFF 0.4, beside a `.zgroup`); wkw layers have none."""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

from beam_downsample.core.mags import Mag, mag_name, sort_mags
from beam_downsample.store import storage
from beam_downsample.store.properties import Dataset, Layer
from beam_downsample.verify.result import Finding

AXES = ("c", "x", "y", "z")


def check(dataset: Dataset, layer: Layer) -> list[Finding]:
    """Findings where the layer's NGFF metadata disagrees with the properties' mags."""
    if layer.data_format not in ("zarr", "zarr3"):
        return []
    layer_dir = storage.join_inside(dataset.path, layer.name)
    name = "zarr.json" if layer.data_format == "zarr3" else ".zattrs"
    path = storage.join_inside(layer_dir, name)
    try:
        document = storage.read_json(path)
    except ValueError as error:  # not JSON
        return [_finding(layer, f"{path} is not valid JSON: {str(error).splitlines()[0]}")]
    scale, version, problem = _multiscale(document, layer.data_format)
    if problem:
        return [_finding(layer, f"{path}: {problem} (NGFF readers such as napari or neuroglancer do not see the "
                                "pyramid)")]
    findings = []
    expected_version = "0.5" if layer.data_format == "zarr3" else "0.4"
    if version != expected_version:
        findings.append(_finding(layer, f"{path}: NGFF version {version!r}, expected {expected_version!r}"))
    if layer.data_format == "zarr" and not storage.exists(storage.join_inside(layer_dir, ".zgroup")):
        findings.append(_finding(layer, f"{layer_dir} has .zattrs but no .zgroup: it is no zarr group"))
    findings.extend(_check_axes(layer, path, scale.get("axes"), dataset.unit))
    findings.extend(_check_datasets(layer, path, scale.get("datasets"), dataset.voxel_size))
    return findings


def _multiscale(document: Any, data_format: str) -> tuple[dict, Optional[str], str]:
    """(first multiscale, its NGFF version, "" or why there is none)."""
    if not isinstance(document, dict):
        return {}, None, "missing" if document is None else "not a JSON object"
    if data_format == "zarr3":
        ome = document.get("attributes", {}).get("ome") if isinstance(document.get("attributes"), dict) else None
        if not isinstance(ome, dict):
            return {}, None, "no OME-NGFF metadata (attributes.ome)"
        version, multiscales = ome.get("version"), ome.get("multiscales")
    else:
        multiscales = document.get("multiscales")
        version = multiscales[0].get("version") if isinstance(multiscales, list) and multiscales and \
            isinstance(multiscales[0], dict) else None
    if not isinstance(multiscales, list) or not multiscales or not isinstance(multiscales[0], dict):
        return {}, version, "no OME-NGFF multiscales"
    return multiscales[0], version, ""


def _check_axes(layer: Layer, path: str, axes: Any, unit: str) -> list[Finding]:
    names = [axis.get("name") for axis in axes] if isinstance(axes, list) and \
        all(isinstance(a, dict) for a in axes) else None
    if names != list(AXES):
        return [_finding(layer, f"{path}: NGFF axes are {names}, expected {list(AXES)}")]
    units = [axis.get("unit") for axis in axes[1:]]
    if any(u != unit for u in units):
        return [_finding(layer, f"{path}: NGFF space axes have units {units}, the properties say {unit!r}")]
    return []


def _check_datasets(layer: Layer, path: str, datasets: Any, voxel_size: Sequence[float]) -> list[Finding]:
    if not isinstance(datasets, list) or not all(isinstance(entry, dict) for entry in datasets):
        return [_finding(layer, f"{path}: NGFF datasets must be a list of objects, got {str(datasets)[:80]}")]
    listed = {mag_name(mag): mag for mag in sort_mags(layer.mags)}
    paths = [entry.get("path") for entry in datasets]
    findings = []
    for name, mag in listed.items():
        if name not in paths:
            findings.append(_finding(layer, f"{path}: NGFF multiscales do not list mag {name}, which the "
                                            "properties list (NGFF readers do not see it)", mag))
    for name in paths:
        if name not in listed:
            findings.append(_finding(layer, f"{path}: NGFF multiscales list {name!r}, which is not a mag the "
                                            "properties list"))
    common = [name for name in paths if name in listed]
    if common != [name for name in listed if name in common]:
        findings.append(_finding(layer, f"{path}: NGFF datasets are not finest first: {common}"))
    for entry in datasets:
        mag = listed.get(entry.get("path"))
        if mag is None:
            continue
        expected = [1.0] + [float(v) * m for v, m in zip(voxel_size, mag)]
        found = _scale(entry)
        if found is None or len(found) != 4 or not all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(found, expected)):
            findings.append(_finding(layer, f"{path}: NGFF scale of mag {mag_name(mag)} is {found}, expected "
                                            f"{expected} (voxel size times mag)", mag))
    return findings


def _scale(entry: dict) -> Optional[list]:
    for transformation in entry.get("coordinateTransformations") or []:
        if isinstance(transformation, dict) and transformation.get("type") == "scale":
            scale = transformation.get("scale")
            if isinstance(scale, list) and all(isinstance(v, (int, float)) for v in scale):
                return [float(v) for v in scale]
    return None


def _finding(layer: Layer, message: str, mag: Optional[Mag] = None) -> Finding:
    return Finding("ngff", layer.name, message, mag)
