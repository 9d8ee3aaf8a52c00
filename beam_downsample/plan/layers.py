"""Planning step 1: which layers, from which mag, and may we write them.

Checks the selected layers (writable, a readable source mag, for `--bbox`
mags where we rewrite them) and every path the run will write.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, Sequence

from beam_downsample.core.mags import Mag, mag_name, sort_mags
from beam_downsample.plan import refresh
from beam_downsample.plan.options import JobOptions
from beam_downsample.store import arrays, locks, reductions, storage
from beam_downsample.store.arrays import STATE_DIR
from beam_downsample.store.properties import PROPERTIES_FILE, Dataset, DatasetError, Layer

if TYPE_CHECKING:
    from beam_downsample.plan.job import LayerPlan


def select(dataset: Dataset, options: JobOptions) -> list[Layer]:
    """The layers to plan (all, or `--layer-name`), each checked: writable, and its source mag readable."""
    layers = [dataset.layer(options.layer_name)] if options.layer_name else list(dataset.layers)
    check_writable(dataset.path, [layer.name for layer in layers])
    storage.concurrently([functools.partial(arrays.check_source_array, layer, dataset.path, source_mag(layer, options))
                          for layer in layers], dataset.path)
    return layers


def check_writable(dataset_path: str, layer_names: Sequence[str]) -> None:
    """The properties and every layer directory must be writable before we start.

    On GCS, permissions show only when writing: the lock is the first write.
    """
    for path in [dataset_path] + [os.path.join(dataset_path, name) for name in layer_names]:
        if os.path.isdir(path) and not os.access(path, os.W_OK | os.X_OK):
            raise DatasetError(f"{path} is not writable: new mags and the properties cannot be written")


def source_mag(layer: Layer, options: JobOptions) -> Mag:
    """A run continues from the coarsest mag; a refresh recomputes from the finest (the edited one)."""
    return refresh.finest_mag(layer) if options.bboxes else layer.source_mag


def check_refreshable(dataset: Dataset, layer: Layer, source: Mag) -> None:
    """Every mag a refresh writes or replaces is the layer's own `TARGET/<layer>/<mag>`, and
    each one opens with the layer's dtype and channels (wkw: in the layout we write)."""
    for mag in sort_mags(layer.mags):
        if mag == source:
            continue
        path = arrays.new_mag_path(layer, dataset.path, mag)
        if storage.normpath(layer.mag_path(dataset.path, mag)) != path:
            raise refresh.RefreshError(
                f"layer {layer.name!r} mag {mag_name(mag)} is stored at {layer.mag_path(dataset.path, mag)}, "
                f"not at {path}: --bbox only rewrites mags in the layer's own directory"
            )
        arrays.check_source_array(layer, dataset.path, mag)
        if layer.data_format == "wkw":
            arrays.check_wkw_layout(layer, dataset.path, mag)


def check_same_reduction(dataset: Dataset, layer: Layer, refreshed: Sequence[Mag], interpolation: str,
                         ignore_background: bool) -> None:
    """A refresh must reduce as the mags it refreshes were made (`store.reductions` records
    that), or they would mix two reductions. Unrecorded mags were made plainly."""
    recorded = reductions.read(dataset.path, layer.name)
    wanted = reductions.Reduction.of(interpolation, ignore_background)
    for mag in refreshed:
        made = reductions.reduction_of(recorded, mag)
        same = made.ignore_background == wanted.ignore_background and made.interpolation in (None, interpolation)
        if not same:
            raise refresh.RefreshError(
                f"layer {layer.name!r} mag {mag_name(mag)} was made with {made.describe()}, and this --bbox "
                f"refresh would use {wanted.describe()}; refresh it as it was made ({made.options()})"
            )


def check_write_paths(dataset: Dataset, plans: Sequence[LayerPlan]) -> None:
    """Every file the run will create or replace outside the pass configs (which
    already built theirs through `storage.join_inside`) is checked before the
    first write: properties, NGFF metadata, locks, layer directories."""
    storage.join_inside(dataset.path, PROPERTIES_FILE)
    for plan in plans:
        storage.join_inside(dataset.path, plan.layer.name)
        storage.join_inside(dataset.path, STATE_DIR, plan.layer.name)
        locks.lock_path(dataset.path, plan.layer.name)
        arrays.ngff_files(plan.layer, dataset.path)
        reductions.record_path(dataset.path, plan.layer.name)
