"""The properties against the arrays: every listed mag opens with the layer's dtype
and channels and covers the bounding box, consecutive mags are multiples of each
other, and no mag array on disk is left unlisted."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from beam_downsample.core.box import region_in_mag
from beam_downsample.core.mags import Mag, MagError, factor_between, mag_name, parse_mag, sort_mags
from beam_downsample.store import arrays, locks, storage
from beam_downsample.store.properties import Dataset, Layer
from beam_downsample.verify.result import Finding

ARRAY_FILES = ("zarr.json", ".zarray", "header.wkw")  # one of them marks a directory as an array


@dataclasses.dataclass(frozen=True)
class MagArray:
    """A listed mag that opened and agrees with the properties."""

    mag: Mag
    spec: dict
    array: Any  # a tensorstore array or a `wkw_io.WkwMag`


def open_mags(dataset: Dataset, layer: Layer, context=None) -> tuple[list[MagArray], list[Finding]]:
    """The layer's listed mags that open and agree with the properties (finest first), and findings
    for the others. A mag that is not a multiple of the one before it is kept out of the chain."""
    opened: list[MagArray] = []
    findings: list[Finding] = []
    for mag in sort_mags(layer.mags):
        spec = arrays.existing_mag_spec(layer, dataset.path, mag)
        try:
            array = arrays.open_array(spec, context=context, open=True)
        except ValueError as error:
            findings.append(Finding("metadata", layer.name, "listed in the properties, but its array at "
                                    f"{layer.mag_path(dataset.path, mag)} does not open: {first_line(error)}", mag))
            continue
        problem = disagreement(layer, mag, array)
        if problem:
            findings.append(Finding("metadata", layer.name, problem, mag))
            continue
        if opened:
            try:
                factor_between(opened[-1].mag, mag)
            except MagError:
                findings.append(Finding("metadata", layer.name, f"is not a multiple of mag {mag_name(opened[-1].mag)}, "
                                        "the mag before it: it cannot have been made from it", mag))
                continue
        opened.append(MagArray(mag, spec, array))
    return opened, findings


def disagreement(layer: Layer, mag: Mag, array) -> str:
    """Why the opened array of `mag` does not fit the properties ("" if it does)."""
    dtype = arrays.array_dtype(array)
    if dtype != layer.dtype:
        return f"its array's dtype {dtype} disagrees with elementClass (channels of {layer.dtype})"
    channels = arrays.array_channels(array)
    if channels != layer.num_channels:
        return f"its array is {'not (c, x, y, z)' if channels is None else f'{channels} channel(s)'}, " \
               f"the properties say {layer.num_channels} channel(s)"
    region = region_in_mag(layer.bbox, mag)
    domain = arrays.array_domain(array)
    if domain.intersect(region) != region:
        return (f"its array spans {list(domain.start)}-{list(domain.stop)}, which does not cover the bounding box "
                f"in this mag, {list(region.start)}-{list(region.stop)}")
    return ""


def unlisted_mags(dataset: Dataset, layer: Layer) -> list[Finding]:
    """Mag arrays in the layer's directory that the properties do not list."""
    layer_dir = storage.join_inside(dataset.path, layer.name)
    listed = {storage.normpath(layer.mag_path(dataset.path, mag)) for mag in layer.mags}
    findings = []
    for name in sorted(storage.list_dirs(layer_dir)):
        try:
            mag = parse_mag(name)
        except MagError:
            continue
        path = storage.join_inside(layer_dir, name)
        if storage.normpath(path) in listed or not any(storage.exists(f"{path}/{f}") for f in ARRAY_FILES):
            continue
        running = storage.exists(locks.lock_path(dataset.path, layer.name))
        why = ("a run holds the layer's lock: it lists its mags as they finish" if running else
               "an interrupted beam-downsample run leaves its unfinished mags unlisted: rerun it to finish them")
        findings.append(Finding("metadata", layer.name, f"an array is stored at {path}, but the properties do not "
                                f"list mag {mag_name(mag)}, so WEBKNOSSOS does not show it ({why})", mag))
    return findings


def first_line(error: BaseException, limit: int = 300) -> str:
    """The error's first line, without the spec and source locations tensorstore appends."""
    text = str(error).strip().splitlines()
    line = text[0] if text else type(error).__name__
    line = re.sub(r"\s*\[(tensorstore_spec|source locations)=.*$", "", line)
    return line[:limit]

