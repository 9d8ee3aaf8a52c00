"""Done-markers and failure records of work units, next to the dataset.

A unit's marker is written after all its levels are stored, so the markers
say exactly which units are finished. The launcher reads them with one
listing of the pass's directory, never one request per unit.
"""

from __future__ import annotations

import os
import re

import numpy as np

from beam_downsample.core.config import PassConfig
from beam_downsample.core.grid import UnitGrid, WorkUnit
from beam_downsample.store import storage

DONE = ".done"
FAILED = ".failed"


def marker_path(config: PassConfig, unit: WorkUnit) -> str:
    """Named by the box only: the directory names the pass (mags, interpolation),
    so a rerun that numbers its passes differently still finds its markers."""
    return storage.join_inside(config.marker_dir, marker_name(unit))


def marker_name(unit: WorkUnit) -> str:
    return "_".join(f"{a}-{b}" for a, b in zip(unit.box.start, unit.box.stop)) + DONE


def record_failure(config: PassConfig, unit: WorkUnit, message: str) -> None:
    """One line saying why the unit failed, for the launcher to report."""
    path = marker_path(config, unit)[: -len(DONE)] + FAILED
    storage.write_text(path, " ".join(message.split()) + "\n")


def failures(config: PassConfig) -> list[str]:
    """Failure records of this pass's units, oldest run included."""
    names = storage.list_names(config.marker_dir)
    return sorted(storage.join_inside(config.marker_dir, n) for n in names if n.endswith(FAILED))


def is_done(config: PassConfig, unit: WorkUnit) -> bool:
    return storage.exists(marker_path(config, unit))


def mark_done(config: PassConfig, unit: WorkUnit) -> None:
    """Written only after every level of the unit is stored; creation is atomic."""
    storage.write_text(marker_path(config, unit), "done\n")


def done_names(config: PassConfig) -> set[str]:
    """Marker names of the pass's finished units: one listing (a request per 1,000 on GCS)."""
    return {name for name in storage.list_names(config.marker_dir) if name.endswith(DONE)}


_MARKER = re.compile(r"^(\d+)-(\d+)_(\d+)-(\d+)_(\d+)-(\d+)" + re.escape(DONE) + "$", re.M)


def done_indices(config: PassConfig, grid: UnitGrid) -> np.ndarray:
    """Sorted indices of the grid's units that have a marker, from one listing.

    Names are parsed all at once (one regular expression, numpy); a marker
    whose box is not exactly a unit of this grid (another plan's) is ignored.
    """
    found = _MARKER.findall("\n".join(done_names(config)))
    if not found:
        return np.zeros(0, dtype=np.int64)
    bounds = np.array(found, dtype=np.int64).reshape(-1, 3, 2)
    starts, stops = bounds[:, :, 0], bounds[:, :, 1]
    indices = grid.index_of_starts(starts)
    valid = indices >= 0
    unit_starts, unit_stops = grid.boxes(np.where(valid, indices, 0))
    valid &= np.all(unit_starts == starts, axis=1) & np.all(unit_stops == stops, axis=1)
    return np.unique(indices[valid])


def not_done(config: PassConfig, grid: UnitGrid, indices: np.ndarray) -> np.ndarray:
    """The planned unit indices without a marker: one listing, one set difference."""
    return np.setdiff1d(np.asarray(indices, dtype=np.int64), done_indices(config, grid), assume_unique=True)
