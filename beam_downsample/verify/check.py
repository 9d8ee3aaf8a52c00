"""`verify`: the checks in order, over the layers of one dataset.

1. metadata: every listed mag opens and fits the properties, no mag array is unlisted,
   the OME-NGFF multiscales are in step (`metadata`, `ngff`);
2. decode: every stored shard index and chunk of every mag beyond the finest (`decode`);
3. samples: boxes of every mag beyond the finest recomputed from the mag before
   (`samples` chooses, `recompute` compares);
4. with `preview`, the PNG (`preview`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
import zlib
from typing import Callable, Optional

import numpy as np
import tensorstore as ts

from beam_downsample.core.box import region_in_mag
from beam_downsample.core.machine import available_cores
from beam_downsample.core.mags import factor_between, mag_name
from beam_downsample.kernels import reduce
from beam_downsample.store import arrays, reductions
from beam_downsample.store.properties import Dataset, DatasetError, Layer, load_dataset
from beam_downsample.verify import decode, metadata, ngff, preview as previews, recompute, samples
from beam_downsample.verify.result import Finding, Progress, Sample, VerifyResult, no_progress

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
    listings = {layer.name: [decode.list_mag(layer, mag) for mag in chains[layer.name]] for layer in layers}
    work = [(layer, listing) for layer in layers for listing in listings[layer.name][1:]]
    recorded = _recorded_reductions(dataset, layers, result)
    planned = _plan_samples(layers, chains, listings, sample, seed, interpolation, recorded, result)
    counter = _Counter(progress, sum(len(listing.objects) for _, listing in work) +
                       sum(len(plan.boxes) for plan in planned), "verify: decoding and recomputing samples")
    # The samples are recomputed on a second thread while this one waits for the decoding
    # (tensorstore's threads): the numpy kernels use what the decoding leaves of the cores.
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="beam-downsample-verify") as pool:
        recomputed = pool.submit(_recompute, planned, result, counter.add)
        _decode(work, result, counter.add)
        findings, failed_reads = recomputed.result()
    damaged = {(f.layer, f.mag) for f in result.findings if f.check == "decode"}
    result.findings.extend(findings)  # (after the decoding's, in a fixed order)
    result.findings.extend(f for mag, f in failed_reads if (f.layer, mag) not in damaged)
    if preview is not None:
        rows = [(layer, chains[layer.name]) for layer in layers]
        counter = _Counter(progress, sum(len(mags) for _, mags in rows), "verify: preview")
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


def _decode(work: list, result: VerifyResult, done: Callable[[int], None]) -> None:
    """Decodes the listed mags (all but each layer's finest)."""
    for layer, listing in work:
        decoded = decode.decode(listing, region_in_mag(layer.bbox, listing.mag.mag), done)
        result.findings.extend(decoded.findings)
        result.objects_decoded += decoded.objects
        result.chunks_decoded += decoded.chunks
        result.voxels_decoded += decoded.voxels


@dataclasses.dataclass(frozen=True)
class _Planned:
    """The sample boxes of one mag: recomputed from `source` with `interpolation`."""

    layer: Layer
    source: metadata.MagArray
    target: metadata.MagArray
    interpolation: str
    boxes: dict  # box -> why
    missing: dict  # object cell -> key, of the target's objects that should be stored and are not
    object_shape: tuple  # of the target's objects


def _recorded_reductions(dataset: Dataset, layers: list[Layer], result: VerifyResult) -> dict:
    """Per layer the reductions recorded for its mags (`store.reductions`); an unreadable
    record is a finding, and its mags are checked as plain ones."""
    recorded = {}
    for layer in layers:
        try:
            recorded[layer.name] = reductions.read(dataset.path, layer.name)
        except DatasetError as error:
            result.findings.append(Finding("record", layer.name, str(error)))
            recorded[layer.name] = {}
    return recorded


def _plan_samples(layers: list[Layer], chains: dict, listings: dict, count: int, seed: int,
                  interpolation: Optional[str], recorded: dict, result: VerifyResult) -> list[_Planned]:
    """The sample boxes of every mag beyond each layer's finest (`samples`), each mag
    recomputed with the reduction that made it (`recompute.interpolation_of`)."""
    planned = []
    for layer in layers:
        result.interpolations[layer.name] = recompute.interpolation_of(layer, interpolation)
        chain, listed = chains[layer.name], listings[layer.name]
        for source, target, source_listing, target_listing in zip(chain, chain[1:], listed, listed[1:]):
            used = recompute.interpolation_of(layer, interpolation,
                                              reductions.reduction_of(recorded[layer.name], target.mag))
            if used != result.interpolations[layer.name]:
                result.interpolations[f"{layer.name} {mag_name(target.mag)}"] = used
            rng = np.random.default_rng([seed, zlib.crc32(layer.name.encode()), *target.mag])
            factor = factor_between(source.mag, target.mag)
            region = region_in_mag(layer.bbox, target.mag)
            voxels = samples.StoredVoxels(source_listing, region_in_mag(layer.bbox, source.mag))
            boxes = dict(samples.choose(region, factor, voxels, count, rng))
            missing = samples.missing_objects(region, factor, source_listing, target_listing) if count else []
            for box, why in samples.coverage(region, factor, voxels, missing, count, rng):
                boxes.setdefault(box, why)
            layout = target_listing.layout
            keys = {_cell(box, layout.object_shape): layout.key(box.start) for box in missing}
            planned.append(_Planned(layer, source, target, used, boxes, keys, layout.object_shape))
            result.samples.extend(Sample(layer.name, target.mag, source.mag, box, why) for box, why in boxes.items())
    return planned


def _recompute(planned: list[_Planned], result: VerifyResult, done: Callable[[int], None]) -> tuple[list, list]:
    """(findings, (mag, finding) of boxes that could not be read) of the planned samples."""
    findings, failed_reads = [], []
    for plan in planned:
        found, failed, compared = recompute.recompute(
            plan.layer, plan.source, plan.target, list(plan.boxes), plan.interpolation,
            lambda box, p=plan: p.missing.get(_cell(box, p.object_shape)))
        findings.extend(found)
        failed_reads.extend(failed)
        result.voxels_compared += compared
        done(len(plan.boxes))
    return findings, failed_reads


def _cell(box, object_shape) -> tuple:
    """The cell of the object grid that holds `box` (a sample box lies in one object)."""
    return tuple(a // s for a, s in zip(box.start, object_shape))


class _Counter:
    """Counts one phase's steps into the progress callback (from any thread)."""

    def __init__(self, progress: Progress, total: int, label: str):
        self._progress, self._total, self._label, self._done = progress, total, label, 0
        self._lock = threading.Lock()
        progress(0, total, label)

    def add(self, steps: int) -> None:
        with self._lock:
            self._done += steps
            self._progress(self._done, self._total, self._label)
