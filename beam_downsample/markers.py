"""Done-markers and failure records of work units, next to the dataset.

A unit's marker is written after all its levels are stored, so the markers
say exactly which units are finished. The launcher reads them with one
listing of the pass's directory, never one request per unit.
"""

from __future__ import annotations

from typing import Iterable

from beam_downsample import storage
from beam_downsample.planning import WorkUnit
from beam_downsample.work import PassConfig

DONE = ".done"
FAILED = ".failed"


def marker_path(config: PassConfig, unit: WorkUnit) -> str:
    """Named by the box only: the directory names the pass (mags, interpolation),
    so a rerun that numbers its passes differently still finds its markers."""
    return storage.join_inside(config.marker_dir, marker_name(unit))


def marker_name(unit: WorkUnit) -> str:
    return "_".join(f"{a}-{b}" for a, b in zip(unit.box.start, unit.box.stop)) + DONE


def record_failure(config: PassConfig, unit: WorkUnit, error: BaseException) -> None:
    """One line saying why the unit failed, for the launcher to report."""
    message = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    path = marker_path(config, unit)[: -len(DONE)] + FAILED
    storage.write_text(path, f"{type(error).__name__}: {message}\n")


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


def not_done(config: PassConfig, units: Iterable[WorkUnit]) -> list[WorkUnit]:
    """The units without a marker, from one listing."""
    done = done_names(config)
    return [unit for unit in units if marker_name(unit) not in done]
