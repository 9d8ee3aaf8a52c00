"""Planning step 2: which mags to make (contract section 2).

`plan_mags` is pure; `layer_mags` applies it to one layer of a dataset.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

from beam_downsample.core.errors import PlanningError
from beam_downsample.core.mags import Mag, mag_name
from beam_downsample.plan import refresh
from beam_downsample.plan.options import SAMPLING_MODES, JobOptions
from beam_downsample.store.properties import Dataset, Layer

def default_coarsest_mag(width: int, height: int) -> Mag:
    """`max(2 ** ceil(log2(max(width, height) / 100)), 4)` on every axis; depth is ignored."""
    largest = max(width, height)
    exponent = math.ceil(math.log2(largest / 100)) if largest > 0 else 0
    value = max(2 ** max(exponent, 0), 4)
    return (value, value, value)


def _anisotropic_step(current: Mag, voxel_size: Sequence[float]) -> Mag:
    size = [m * v for m, v in zip(current, voxel_size)]
    smallest = min(size)
    only_finest = tuple(m * 2 if s == smallest else m for m, s in zip(current, size))
    all_doubled = tuple(m * 2 for m in current)

    def anisotropy(mag: Sequence[int]) -> float:
        sizes = [m * v for m, v in zip(mag, voxel_size)]
        return max(sizes) / min(sizes)

    if anisotropy(all_doubled) < anisotropy(only_finest):
        return all_doubled  # type: ignore[return-value]
    return only_finest  # type: ignore[return-value]


def plan_mags(
    source_mag: Mag,
    coarsest_mag: Mag,
    sampling_mode: str,
    voxel_size: Sequence[float],
    mags_to_align_with: Iterable[Mag] = (),
) -> list[Mag]:
    """The mags to write, finest first, each computed from the one before.

    `mags_to_align_with` are the mags any layer of the dataset already has;
    one whose largest component is twice the current one is always the next
    step, so that layers share mags.
    """
    if sampling_mode not in SAMPLING_MODES:
        raise PlanningError(f"unknown sampling mode {sampling_mode!r}; choose one of {', '.join(SAMPLING_MODES)}")
    if sampling_mode == "constant_z":
        coarsest_mag = (coarsest_mag[0], coarsest_mag[1], source_mag[2])
    if any(s > c for s, c in zip(source_mag, coarsest_mag)):
        raise PlanningError(
            f"the coarsest mag {mag_name(coarsest_mag)} is finer than the source mag {mag_name(source_mag)} on some axis"
        )
    align_by_max = {}
    for mag in sorted(set(mags_to_align_with)):
        align_by_max.setdefault(max(mag), mag)

    planned: list[Mag] = []
    current = source_mag
    while max(current) < max(coarsest_mag):
        aligned = align_by_max.get(2 * max(current))
        if aligned is not None:
            step = aligned
        else:
            if sampling_mode == "anisotropic":
                candidate = _anisotropic_step(current, voxel_size)
            else:
                candidate = tuple(m * 2 for m in current)
            step = tuple(min(c, limit) for c, limit in zip(candidate, coarsest_mag))  # type: ignore[assignment]
        if step == current:
            raise PlanningError(
                f"no progress: the coarsest mag {mag_name(coarsest_mag)} cannot be reached from "
                f"{mag_name(current)} with voxel size {tuple(voxel_size)} in {sampling_mode} mode"
            )
        # Anisotropic steps that only catch up the finest axes are passed
        # through unwritten; the other modes write every step they take.
        if max(step) > max(current) or sampling_mode != "anisotropic":
            planned.append(step)
        current = step
    largest = [max(mag) for mag in planned]
    if len(set(largest)) != len(largest):
        raise PlanningError(
            "the plan " + ", ".join(mag_name(m) for m in planned) + " has several mags with the same largest "
            "component, which WEBKNOSSOS does not support; choose another --coarsest-mag or --sampling-mode"
        )
    return planned


def aligned_with(dataset: Dataset, layers: Sequence[Layer], options: JobOptions) -> set[Mag]:
    """The mags that new mags align with, so that layers share mags: the dataset's."""
    if not options.bboxes:
        return set(dataset.all_mags())
    # as if the refreshed layers' pyramids were deleted and made again
    return refresh.align_with(dataset.layers, [layer.name for layer in layers])


def layer_mags(dataset: Dataset, layer: Layer, source: Mag, options: JobOptions, align_with: set[Mag]) -> list[Mag]:
    """The layer's mags to make, finest first; they are added to `align_with`."""
    sampling_mode = "constant_z" if layer.bbox.shape[2] == 1 else options.sampling_mode
    coarsest = options.coarsest_mag or default_coarsest_mag(*layer.bbox.shape[:2])
    try:
        targets = plan_mags(source, coarsest, sampling_mode, dataset.voxel_size, align_with)
    except PlanningError as error:
        raise PlanningError(f"layer {layer.name!r}: {error}") from None
    align_with.update(targets)  # the reference plans layers one after another
    return targets
