"""`verify`: the checks in order, over the layers of one dataset.

1. metadata: every listed mag opens and fits the properties, no mag array is unlisted,
   the OME-NGFF multiscales are in step (`metadata`, `ngff`);
2. decode: every stored shard index and chunk of every mag beyond the finest (`decode`);
3. samples: boxes of every mag beyond the finest recomputed from the mag before
   (`samples` chooses, `recompute` compares);
4. with `preview`, the PNG (`preview`).
"""

from __future__ import annotations

import functools
import zlib
from typing import Optional

import numpy as np
import tensorstore as ts

from beam_downsample.core.box import region_in_mag
from beam_downsample.core.machine import available_cores
from beam_downsample.core.mags import factor_between
from beam_downsample.kernels import reduce
from beam_downsample.store import arrays
from beam_downsample.store.properties import Dataset, Layer, load_dataset
from beam_downsample.verify import decode, metadata, ngff, preview as previews, recompute, samples
from beam_downsample.verify.result import Progress, Sample, VerifyResult, no_progress

DEFAULT_SAMPLE = 32  # boxes per mag


class VerifyUsageError(ValueError):
    """A bad argument to `verify` (exit status 2 on the command line)."""


def verify(target: str, *, layer_name: Optional[str] = None, sample: int = DEFAULT_SAMPLE, seed: int = 0,
           interpolation: Optional[str] = None, preview: Optional[str] = None,
           progress: Progress = no_progress) -> VerifyResult:
    """Checks the mag pyramid of the dataset at `target` (a directory or gs://bucket/path).

    `sample` boxes per mag are recomputed (0: none), chosen with `seed`; `interpolation`
    overrides the layers' default reduction; `preview` is a PNG to write. Nothing in
    the dataset is written. Returns the findings (`.ok` when there are none); raises
    `VerifyUsageError`, or `DatasetError` where the dataset cannot be read at all.
    """
    if isinstance(sample, bool) or not isinstance(sample, int) or sample < 0:
        raise VerifyUsageError(f"--sample must be a whole number of boxes, 0 or more; got {sample!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise VerifyUsageError(f"--seed must be a whole number, 0 or more; got {seed!r}")
    if interpolation is not None and interpolation not in reduce.INTERPOLATIONS:
        raise VerifyUsageError(f"--interpolation: {interpolation!r} is none of {', '.join(reduce.INTERPOLATIONS)}")
    if preview is not None and not str(preview).lower().endswith(".png"):
        raise VerifyUsageError(f"--preview: {preview!r} must be a .png file")
    dataset = load_dataset(target)
    layers = [dataset.layer(layer_name)] if layer_name else list(dataset.layers)
    for layer in layers:
        arrays.check_format(layer, dataset.path)
    result = VerifyResult(target=dataset.path, seed=seed, layers=len(layers))
    context = ts.Context(arrays.context_spec(concurrency=max(available_cores(), 2) * 2))
    chains = _check_metadata(dataset, layers, context, result, progress)
    listings = _decode(layers, chains, result, progress)
    _recompute(layers, chains, listings, sample, seed, interpolation, result, progress)
    if preview is not None:
        rows = [(layer, chains[layer.name]) for layer in layers]
        total = sum(len(mags) for _, mags in rows)
        counter = _Counter(progress, total, "verify: preview")
        previews.render(str(preview), rows, dataset.voxel_size, counter.add)
        result.preview = str(preview)
    return result


def _check_metadata(dataset: Dataset, layers: list[Layer], context, result: VerifyResult,
                    progress: Progress) -> dict[str, list[metadata.MagArray]]:
    chains = {}
    counter = _Counter(progress, len(layers), "verify: metadata")
    for layer in layers:
        chain, findings = metadata.open_mags(dataset, layer, context)
        result.findings.extend(findings)
        result.findings.extend(metadata.unlisted_mags(dataset, layer))
        result.findings.extend(ngff.check(dataset, layer))
        chains[layer.name] = chain
        result.mags += len(chain)
        counter.add(1)
    return chains


def _decode(layers: list[Layer], chains: dict, result: VerifyResult, progress: Progress) -> dict:
    """Lists every mag and decodes all but the finest."""
    listings = {}
    work = []
    for layer in layers:
        for index, mag in enumerate(chains[layer.name]):
            listing = decode.list_mag(layer, mag)
            listings[layer.name, mag.mag] = listing
            if index > 0:
                work.append((layer, listing))
    counter = _Counter(progress, sum(len(listing.objects) for _, listing in work), "verify: decoding")
    for layer, listing in work:
        decoded = decode.decode(listing, region_in_mag(layer.bbox, listing.mag.mag), counter.add)
        result.findings.extend(decoded.findings)
        result.objects_decoded += decoded.objects
        result.chunks_decoded += decoded.chunks
        result.voxels_decoded += decoded.voxels
    return listings


def _recompute(layers: list[Layer], chains: dict, listings: dict, count: int, seed: int,
               interpolation: Optional[str], result: VerifyResult, progress: Progress) -> None:
    planned = []
    for layer in layers:
        chain = chains[layer.name]
        result.interpolations[layer.name] = recompute.interpolation_of(layer, interpolation)
        for source, target in zip(chain, chain[1:]):
            rng = np.random.default_rng([seed, zlib.crc32(layer.name.encode()), *target.mag])
            factor = factor_between(source.mag, target.mag)
            region = region_in_mag(layer.bbox, target.mag)
            source_listing, target_listing = listings[layer.name, source.mag], listings[layer.name, target.mag]
            voxels = samples.StoredVoxels(source_listing, region_in_mag(layer.bbox, source.mag))
            chosen = samples.choose(region, factor, voxels, count, rng)
            missing = samples.missing_objects(region, factor, source_listing, target_listing) if count else []
            extra = samples.coverage(region, factor, voxels, missing, count, rng)
            boxes = dict(chosen)
            for box, why in extra:
                boxes.setdefault(box, why)
            layout = target_listing.layout
            keys = {tuple(a // s for a, s in zip(box.start, layout.object_shape)): layout.key(box.start)
                    for box in missing}
            planned.append((layer, source, target, boxes, functools.partial(_missing_at, keys, layout.object_shape)))
    damaged = {(f.layer, f.mag) for f in result.findings if f.check == "decode"}
    counter = _Counter(progress, sum(len(boxes) for *_, boxes, _ in planned), "verify: recomputing samples")
    for layer, source, target, boxes, missing_at in planned:
        interpolation_used = result.interpolations[layer.name]
        result.samples.extend(Sample(layer.name, target.mag, source.mag, box, why) for box, why in boxes.items())
        findings, compared = recompute.recompute(layer, source, target, list(boxes), interpolation_used, missing_at,
                                                 [mag for name, mag in damaged if name == layer.name])
        result.findings.extend(findings)
        result.voxels_compared += compared
        counter.add(len(boxes))


def _missing_at(keys: dict, object_shape, box) -> Optional[str]:
    """The key of the missing object that holds `box` (a sample box lies in one object), if any."""
    return keys.get(tuple(a // s for a, s in zip(box.start, object_shape)))


class _Counter:
    """Counts one phase's steps into the progress callback."""

    def __init__(self, progress: Progress, total: int, label: str):
        self._progress, self._total, self._label, self._done = progress, total, label, 0
        progress(0, total, label)

    def add(self, steps: int) -> None:
        self._done += steps
        self._progress(self._done, self._total, self._label)

