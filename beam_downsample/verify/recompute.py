"""Sample boxes of a mag recomputed from the mag before, as a run computes them, and
compared bit for bit with what is stored.

A run reduces a level from the level before after replicating that level's
edge voxels outward from the layer's bounding box (`transforms.work.replicate_edges`);
this does the same from the stored mag before (zeros outside its bounding box,
replaced by the replication), with the numpy kernels of `kernels.reduce`, which
are the reference of the compiled ones (bit-identical), so a fault of the
compiled kernels in a run shows here too.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import tensorstore as ts

from beam_downsample.core.box import Box, region_in_mag
from beam_downsample.core.mags import Mag, factor_between, mag_name
from beam_downsample.kernels import reduce
from beam_downsample.store import arrays, reductions, wkw_io
from beam_downsample.store.properties import Layer
from beam_downsample.transforms.work import replicate_edges
from beam_downsample.verify.metadata import MagArray, first_line
from beam_downsample.verify.result import Finding

GROUP_BYTES = 256 << 20  # source bytes read in one batch


def interpolation_of(layer: Layer, override: Optional[str] = None,
                     made_by: reductions.Reduction = reductions.PLAIN) -> str:
    """The kernel a mag is recomputed with: `--interpolation` if given; else the reduction
    recorded for the mag (`made_by`: a run with `--ignore-background` records it in
    `LAYER/beam-downsample.json`, e.g. `mode-nonzero`); else the layer's default
    (color: median, segmentation: mode)."""
    if override:
        return override
    if made_by.ignore_background and made_by.interpolation:
        return reduce.reduction(made_by.interpolation, True)
    return reduce.DEFAULT_INTERPOLATION[layer.category]


def recompute(layer: Layer, source: MagArray, target: MagArray, boxes: Sequence[Box], interpolation: str,
              missing_at: Callable[[Box], Optional[str]] = lambda box: None
              ) -> tuple[list[Finding], list[tuple[Mag, Finding]], int]:
    """Recomputes `boxes` (target-mag voxels, inside the layer's region) of `target` from
    `source`; (findings, (mag, finding) of the boxes that could not be read from that mag,
    voxels compared). `missing_at(box)`: the key of the target's object there if it is not
    stored, named in a finding."""
    factor = factor_between(source.mag, target.mag)
    source_region = region_in_mag(layer.bbox, source.mag)
    channels = layer.num_channels
    findings: list[Finding] = []
    failed: list[tuple[Mag, Finding]] = []
    compared = 0
    for group in _groups(boxes, factor, channels * layer.dtype.itemsize):
        source_boxes = [box.scaled_up(factor) for box in group]
        sources = read_boxes(source.array, source_boxes, channels)
        stored_data = read_boxes(target.array, group, channels)
        for box, source_box, data, actual in zip(group, source_boxes, sources, stored_data):
            where = missing_at(box)
            for error, mag in ((data, source.mag), (actual, target.mag)):
                if isinstance(error, Exception):
                    failed.append((mag, Finding("sample", layer.name, f"reading mag {mag_name(mag)} for this sample "
                                                f"failed: {first_line(error)}", target.mag, box)))
            if isinstance(data, Exception) or isinstance(actual, Exception):
                continue
            replicate_edges(data, source_box, source_region)
            expected = reduce.KERNELS[interpolation](data, factor)
            compared += box.voxels
            finding = compare(layer, target.mag, source.mag, box, expected, actual, interpolation, where)
            if finding is not None:
                findings.append(finding)
    return findings, failed, compared


def compare(layer: Layer, mag: Mag, source_mag: Mag, box: Box, expected: np.ndarray, actual: np.ndarray,
            interpolation: str, missing: Optional[str] = None) -> Optional[Finding]:
    """A finding naming the differing voxels of `box`, or None if every bit agrees."""
    differ = np.any(bit_view(expected) != bit_view(actual), axis=0)
    count = int(differ.sum())
    if not count:
        return None
    first = tuple(int(v) for v in np.argwhere(differ)[0])
    at = tuple(a + v for a, v in zip(box.start, first))
    index = (slice(None), *first)
    stored_value, recomputed = _value(actual[index]), _value(expected[index])
    note = f"; nothing is stored there: {missing} is missing" if missing is not None else ""
    return Finding("sample", layer.name, f"{count} of {box.voxels} voxels differ from mag {mag_name(source_mag)} "
                   f"reduced with {interpolation}; first at {at}: stored {stored_value}, recomputed {recomputed}{note}",
                   mag, box)


def bit_view(data: np.ndarray) -> np.ndarray:
    """The voxels as unsigned integers of the same width: comparing them compares bits
    (NaN equals NaN, -0.0 differs from 0.0), as a run's output is bit-identical."""
    return data.view(f"u{data.dtype.itemsize}") if data.dtype.kind == "f" else data


def _value(values: np.ndarray):
    items = values.tolist()
    return items[0] if len(items) == 1 else items


def _groups(boxes: Sequence[Box], factor: Mag, itemsize: int):
    group: list[Box] = []
    size = 0
    for box in boxes:
        need = box.voxels * int(np.prod(factor)) * itemsize
        if group and size + need > GROUP_BYTES:
            yield group
            group, size = [], 0
        group.append(box)
        size += need
    if group:
        yield group


def read_boxes(array, boxes: Sequence[Box], channels: int) -> list:
    """Each box as a Fortran-order (c, x, y, z) array, 0 outside the array's domain, all
    tensorstore reads in one batch (one read of a shard index, coalesced ranges);
    the exception instead where a read fails."""
    results: list = []
    if isinstance(array, wkw_io.WkwMag):
        for box in boxes:
            try:
                results.append(arrays.read_box(array, box, channels))
            except Exception as error:  # pylint: disable=broad-except  # (the wkw library: WKWException)
                results.append(error)
        return results
    domain = arrays.array_domain(array)
    with ts.Batch() as batch:
        reads = [None if box.intersect(domain).empty else
                 array[arrays.region_index(box.intersect(domain))].read(order="F", batch=batch) for box in boxes]
    for box, read in zip(boxes, reads):
        inside = box.intersect(domain)
        try:
            data = None if read is None else read.result()
        except ValueError as error:
            results.append(error)
            continue
        if inside == box:
            results.append(data)
            continue
        out = np.zeros((channels, *box.shape), dtype=arrays.array_dtype(array), order="F")
        if data is not None:
            out[arrays.local_index(inside, box)] = data
        results.append(out)
    return results
