"""Progress of a pass, counted from its done-markers in a background thread."""

from __future__ import annotations

import threading
from typing import Callable, Sequence

from beam_downsample import storage
from beam_downsample.work import PassConfig


class Progress:
    """Counts done-markers in the background: works for every runner on a shared disk or GCS.

    On GCS each count is a listing (a request per 1,000 markers), so it polls less often.
    """

    def __init__(self, configs: Sequence[PassConfig], total: int, label: str, report: Callable[[int, int, str], None]):
        self._dirs = [c.marker_dir for c in configs]
        self._interval = 5.0 if any(storage.is_gcs(d) for d in self._dirs) else 0.5
        self._total, self._label, self._report = total, label, report
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def count(self) -> int:
        return sum(len([n for n in storage.list_names(d) if n.endswith(".done")]) for d in self._dirs)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self._report(self.count(), self._total, self._label)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._report(self.count(), self._total, self._label)
