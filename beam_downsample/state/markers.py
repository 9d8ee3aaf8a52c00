"""Done-markers and failure records of work units, next to the dataset.

A unit's marker is written after all its levels are stored, so the markers
say exactly which units are finished. The launcher reads them with one
listing of the pass's directory, never one request per unit.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

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


@dataclasses.dataclass(frozen=True)
class PassListing:
    """Everything a pass's state directory holds, from one listing of it and all below:
    done-markers, failure records, and in subdirectories the progress tallies and worker
    states (`state.progress`, `state.workerstate`). What the launcher reads at the start and
    at the end of a pass, instead of listing each kind on its own."""

    marker_dir: str
    names: tuple[str, ...]  # relative to marker_dir, '/'-separated

    @classmethod
    def of(cls, config: PassConfig) -> "PassListing":
        return cls(config.marker_dir, tuple(storage.list_tree(config.marker_dir)))

    @property
    def done(self) -> set[str]:
        return {name for name in self.names if "/" not in name and name.endswith(DONE)}

    @property
    def failures(self) -> list[str]:
        return sorted(storage.join_inside(self.marker_dir, n) for n in self.names if "/" not in n and n.endswith(FAILED))

    @property
    def leftovers(self) -> list[str]:
        """Failure records, tallies and worker states: an earlier run's, once a pass starts."""
        return self.failures + [storage.join_inside(self.marker_dir, n) for n in self.names
                                if n.split("/")[0] in SUBDIRECTORIES]


SUBDIRECTORIES = ("progress", "workers")  # state.progress.TALLY_DIR, state.workerstate.DIR


_MARKER = re.compile(r"^(\d+)-(\d+)_(\d+)-(\d+)_(\d+)-(\d+)" + re.escape(DONE) + "$", re.M)


def done_indices(config: PassConfig, grid: UnitGrid, listing: Optional[PassListing] = None) -> np.ndarray:
    """Sorted indices of the grid's units that have a marker, from one listing (or `listing`).

    Names are parsed all at once (one regular expression, numpy); a marker
    whose box is not exactly a unit of this grid (another plan's) is ignored.
    """
    found = _MARKER.findall("\n".join(done_names(config) if listing is None else listing.done))
    if not found:
        return np.zeros(0, dtype=np.int64)
    bounds = np.array(found, dtype=np.int64).reshape(-1, 3, 2)
    starts, stops = bounds[:, :, 0], bounds[:, :, 1]
    indices = grid.index_of_starts(starts)
    valid = indices >= 0
    unit_starts, unit_stops = grid.boxes(np.where(valid, indices, 0))
    valid &= np.all(unit_starts == starts, axis=1) & np.all(unit_stops == stops, axis=1)
    return np.unique(indices[valid])


def not_done(config: PassConfig, grid: UnitGrid, indices: np.ndarray,
             listing: Optional[PassListing] = None) -> np.ndarray:
    """The planned unit indices without a marker: one listing (or `listing`), one set difference."""
    return np.setdiff1d(np.asarray(indices, dtype=np.int64), done_indices(config, grid, listing), assume_unique=True)
