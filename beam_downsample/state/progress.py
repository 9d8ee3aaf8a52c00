"""Progress of a pass: workers keep tallies, the launcher sums them in a background thread.

Counting done-markers would cost a listing of up to a million names per
poll (a request per 1,000 on GCS). Instead each DoFn instance writes one
small tally file (`<marker dir>/progress/<id>`: units done, pid, host; then
per layer the units run and found empty and the voxels read and written) at
most every few seconds, and the launcher lists and reads those: one small
listing plus one read per worker per poll. The markers, not the tallies,
decide what is finished (a retried bundle may count twice; the bar is capped).
The per-layer figures stand in for Beam counters on runners that report none.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Callable, Sequence

from beam_downsample.core.config import PassConfig
from beam_downsample.store import storage

TALLY_DIR = "progress"


def tally_dir(marker_dir: str) -> str:
    return os.path.join(marker_dir, TALLY_DIR)


def _interval(path: str) -> float:
    return 5.0 if storage.is_gcs(path) else 0.5


class Tally:
    """A worker's count of finished units, written to its own file now and then."""

    def __init__(self, marker_dir: str):
        self._path = os.path.join(tally_dir(marker_dir), uuid.uuid4().hex)
        self._interval = _interval(marker_dir)
        self._count = 0
        self._layers: dict[str, list[int]] = {}  # layer -> [units run, units empty, voxels read, voxels written]
        self._written = -1
        self._last = time.monotonic()  # the first write after an interval, or at the end of the bundle
        self._lock = threading.Lock()

    def add(self, layer: str = "", empty: bool = False, read: int = 0, written: int = 0) -> None:
        with self._lock:
            self._count += 1
            figures = self._layers.setdefault(layer, [0, 0, 0, 0])
            figures[1 if empty else 0] += 1
            figures[2] += read
            figures[3] += written
            if time.monotonic() - self._last >= self._interval:
                self._write()

    def flush(self) -> None:
        with self._lock:
            if self._count != self._written:
                self._write()

    def _write(self) -> None:
        """Best effort: a tally that cannot be written only slows the bar, never the unit."""
        try:
            if self._written < 0:
                storage.makedirs(os.path.dirname(self._path))
            storage.write_text(self._path, f"{self._count} {os.getpid()} {socket.gethostname()}\n"
                                           f"{json.dumps(self._layers)}\n")
        except Exception:  # pylint: disable=broad-except
            return
        self._written, self._last = self._count, time.monotonic()


def read_tallies(marker_dir: str) -> list[tuple[int, int, str]]:
    """(count, pid, host) of every worker's tally of this pass."""
    directory = tally_dir(marker_dir)
    tallies = []
    for name in storage.list_names(directory):
        text = (storage.read_text(os.path.join(directory, name)) or "").split("\n")[0].split()
        if len(text) == 3 and text[0].isdigit() and text[1].isdigit():
            tallies.append((int(text[0]), int(text[1]), text[2]))
    return tallies


def layer_tallies(marker_dirs: Sequence[str]) -> dict[str, list[int]]:
    """Per layer, [units run, units empty, voxels read, voxels written] summed over the
    tallies in `marker_dirs` (those the workers flushed; a worker that died took its last
    counts with it, so the caller checks them against the markers)."""
    summed: dict[str, list[int]] = {}
    for marker_dir in marker_dirs:
        directory = tally_dir(marker_dir)
        for name in storage.list_names(directory):
            lines = (storage.read_text(os.path.join(directory, name)) or "").split("\n")
            try:
                layers = json.loads(lines[1]) if len(lines) > 1 else {}
            except ValueError:
                continue
            for layer, figures in layers.items():
                total = summed.setdefault(layer, [0, 0, 0, 0])
                for index, value in enumerate(figures[:4]):
                    total[index] += int(value)
    return summed


class Progress:
    """Reports `done + tallies` of the pass's workers in the background, for every runner.

    Tallies of an interrupted run must be gone before (they are in `done` already: the
    launcher deletes them with the rest of a pass's leftovers, `markers.PassListing`).
    The bucket is asked no more often than the display shows it (`seconds`, e.g. a log
    line every 30 s), nor than every 0.5 s locally and 5 s on GCS; the last count comes
    from the markers (`finish`), not from a last reading of the tallies.
    """

    def __init__(self, configs: Sequence[PassConfig], total: int, label: str,
                 report: Callable[[int, int, str], None], done: int = 0, seconds: float = 0.0):
        self._dirs = [c.marker_dir for c in configs]
        for directory in self._dirs:
            storage.makedirs(tally_dir(directory))
        self._interval = max([_interval(d) for d in self._dirs] + [seconds]) if self._dirs else 0.5
        self._total, self._label, self._report, self._done = total, label, report, done
        self._final: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="beam-downsample-progress")

    def finish(self, done: int) -> None:
        """The pass ended with `done` units done (from the markers): the last report says so."""
        self._final = done

    def rerun(self, todo):
        """Before a pass's units run again (workers died): what is done now comes from the
        markers (`todo` is what is not, anything with a len), not from tallies. A worker
        that was stopped with the abandoned run took its unwritten tally with it, and the
        units it had finished are not run again, so tallies alone would never reach the total.
        Returns `todo`."""
        self._done = self._total - len(todo)
        for directory in self._dirs:
            storage.delete_tree(tally_dir(directory))
            storage.makedirs(tally_dir(directory))
        return todo

    def count(self) -> int:
        counted = sum(count for d in self._dirs for count, _, _ in read_tallies(d))
        return min(self._done + counted, self._total)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self._report(self.count(), self._total, self._label)

    def __enter__(self):
        self._report(self._done, self._total, self._label)  # the pass starts now (its rate counts from here)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._report(self.count() if self._final is None else min(self._final, self._total), self._total, self._label)
