"""Which unit each worker process is running: one small file per worker.

When a worker dies (OOM killer, `kill -9`, `scancel`), the runner only
says that a process is gone. Each worker writes
`.beam-downsample/<layer>/<pass>/workers/<host>-<pid>.json` when it starts a unit,
so the launcher can name the unit a dead worker was running and count how
often one unit killed its worker.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys
import time
from typing import Iterable, Optional

from beam_downsample.core.config import PassConfig
from beam_downsample.core.grid import WorkUnit
from beam_downsample.store import storage

DIR = "workers"


@dataclasses.dataclass(frozen=True)
class WorkerState:
    path: str
    host: str
    pid: int
    layer: str
    unit: str  # the unit's box name, as in its done-marker
    marker_dir: str
    since: float
    address: Optional[str] = None  # the dask worker's address, when the unit runs on dask


def state_dir(config: PassConfig) -> str:
    """Inside the pass's marker directory: one listing of it shows markers and worker states."""
    return os.path.join(config.marker_dir, DIR)


def unit_name(unit: WorkUnit) -> str:
    return "_".join(f"{a}-{b}" for a, b in zip(unit.box.start, unit.box.stop))


def starting(config: PassConfig, unit: WorkUnit) -> None:
    """Called by the worker before it runs `unit`: one small write, overwritten by its next unit."""
    host, pid = socket.gethostname(), os.getpid()
    record = {"host": host, "pid": pid, "layer": config.layer, "unit": unit_name(unit),
              "marker_dir": config.marker_dir, "since": time.time(), "address": _dask_address()}
    storage.makedirs(state_dir(config))
    storage.write_text(os.path.join(state_dir(config), f"{host}-{pid}.json"), json.dumps(record))


def _dask_address() -> Optional[str]:
    """The address of the dask worker running us (how the scheduler knows it), else None."""
    if "distributed" not in sys.modules:  # not on dask: do not import it
        return None
    try:
        return sys.modules["distributed"].get_worker().address
    except (ValueError, AttributeError):
        return None


def read_all(directories: Iterable[str]) -> list[WorkerState]:
    states = []
    for directory in directories:
        for name in storage.list_names(directory):
            if not name.endswith(".json"):
                continue
            path = os.path.join(directory, name)
            state = _parse(path, storage.read_text(path))
            if state is not None:
                states.append(state)
    return states


def _parse(path: str, text: Optional[str]) -> Optional[WorkerState]:
    try:
        raw = json.loads(text or "")
        return WorkerState(path, str(raw["host"]), int(raw["pid"]), str(raw["layer"]), str(raw["unit"]),
                           str(raw["marker_dir"]), float(raw["since"]), raw.get("address"))
    except (ValueError, KeyError, TypeError):
        return None  # being written or foreign: not ours to judge


def clear(directories: Iterable[str]) -> None:
    for directory in directories:
        for name in storage.list_names(directory):
            storage.delete(os.path.join(directory, name))
        storage.remove_dir_if_empty(directory)
