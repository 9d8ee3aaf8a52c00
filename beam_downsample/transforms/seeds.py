"""Compact seeds of a pass's work units: runs of consecutive unit indices.

The launcher hands a pipeline seeds, not units, so the job graph stays
small at any size (Beam's Create pickles every element into it; Dataflow
refuses graphs over 10 MB). A seed is `(layer, pass, start, stop)`; when
there are too many runs to embed (a scattered sparse layer), the runs go to
a text file under `.beam-downsample/` and a seed names rows of that file.
Workers expand seeds with the grid's arithmetic (`UnitGrid.unit`).
"""

from __future__ import annotations

import os
from typing import Iterator, Optional

import numpy as np

from beam_downsample.core.grid import UnitGrid, seed_runs
from beam_downsample.store import storage

PIECES = 4096  # seeds per pass at least (where there are units enough): DaskRunner runs a seed in one task
EMBED_RUNS = 8192  # more runs than this go to a spill file
SPILL_NAME = "seeds.txt"


def make_seeds(grid: UnitGrid, indices: np.ndarray, spill_dir: Optional[str] = None,
               pieces: int = PIECES) -> list[tuple]:
    """Seeds covering exactly `indices` (sorted unique) of `grid`.

    `spill_dir` None embeds every run whatever their number (Dataflow's
    --dry_run writes nothing).
    """
    runs = seed_runs(indices, pieces)
    key = (grid.layer, grid.pass_index)
    if spill_dir is None or len(runs) <= EMBED_RUNS:
        return [(*key, int(a), int(b)) for a, b in runs]
    path = os.path.join(spill_dir, SPILL_NAME)
    storage.write_text(path, "".join(f"{a} {b}\n" for a, b in runs))
    rows = max(-(-len(runs) // pieces), 1)
    return [(*key, path, row, min(row + rows, len(runs))) for row in range(0, len(runs), rows)]


class Expander:
    """Turns seeds into unit indices on a worker; reads each spill file once."""

    def __init__(self):
        self._spills: dict[str, np.ndarray] = {}

    def indices(self, seed: tuple) -> Iterator[int]:
        if len(seed) == 4:
            yield from range(seed[2], seed[3])
            return
        _, _, path, first, last = seed
        if path not in self._spills:
            text = storage.read_text(path) or ""
            self._spills[path] = np.array(text.split(), dtype=np.int64).reshape(-1, 2)
        for start, stop in self._spills[path][first:last]:
            yield from range(int(start), int(stop))


def count(seeds: list[tuple], expander: Expander | None = None) -> int:
    expander = expander or Expander()
    return sum(sum(1 for _ in expander.indices(seed)) for seed in seeds)
