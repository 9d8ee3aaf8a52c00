"""Progress of a run on the terminal or in a log: a tqdm bar, or a line now and then."""

from __future__ import annotations

import re
import sys
import time
from typing import Optional, Sequence


class ProgressBar:
    """A tqdm bar on a terminal; in a log (not a terminal: a cluster job, a CI run) a line
    every LOG_SECONDS and when a pass completes, so that a long run is never silent until `done`.

    `pass_voxels[i]` is the source voxels of pass i+1 (all layers): the rate is the voxels
    of the units done in this run, per second.
    """

    LOG_SECONDS = 30.0

    def __init__(self, pass_voxels: Sequence[int] = (), stream=None, interval: Optional[float] = None,
                 clock=time.monotonic):
        self._pass_voxels = list(pass_voxels)
        self._stream = stream
        self._interval = self.LOG_SECONDS if interval is None else interval
        self._clock = clock

    def __enter__(self):
        self._bar = None
        self._label = None
        stream = self._stream or sys.stderr
        self._log = not (hasattr(stream, "isatty") and stream.isatty())
        return self

    @property
    def seconds(self) -> float:
        """How often this display shows progress (0: whenever asked): the bucket is read no more often."""
        return self._interval if self._log else 0.0

    def update(self, done: int, total: int, label: str) -> None:
        if self._log:
            self._log_line(done, total, label)
            return
        from tqdm import tqdm

        if label != self._label:
            if self._bar is not None:
                self._bar.close()
            self._bar = tqdm(total=total, desc=label, unit="unit", disable=None, file=self._stream or sys.stderr)
            self._label = label
        self._bar.n = done
        self._bar.refresh()

    def _log_line(self, done: int, total: int, label: str) -> None:
        now = self._clock()
        if label != self._label:  # a new pass: units done before (a resumed run) do not count for the rate
            self._label, self._start, self._first, self._last, self._ended = label, now, done, now, False
        if self._ended:
            return
        complete = done >= total
        if not complete and now - self._last < self._interval:
            return
        self._last, self._ended = now, complete
        match = re.match(r"pass (\d+)/", label)
        index = int(match.group(1)) - 1 if match else -1
        rate = ""
        if 0 <= index < len(self._pass_voxels) and total and now > self._start:
            voxels = (done - self._first) / total * self._pass_voxels[index]
            rate = f", {voxels / (now - self._start) / 1e6:.1f} Mvoxel/s"
        percent = 100 * done // total if total else 100
        self.write(f"{label}: {done}/{total} work units ({percent}%){rate}, {now - self._start:.0f} s")

    def write(self, message: str) -> None:
        print(message, file=self._stream or sys.stderr, flush=True)

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.close()


def pass_voxels(plans) -> list[int]:
    """Source voxels of each pass, all layers together (what the progress rate counts;
    a refresh counts its boxes' source regions)."""
    voxels: list[int] = []
    for layer_plan in plans:
        for index, config in enumerate(layer_plan.configs):
            voxels.extend([0] * (index + 1 - len(voxels)))
            regions = config.regions or (layer_plan.grids[index].region,)
            voxels[index] += sum(region.voxels for region in regions)
    return voxels
