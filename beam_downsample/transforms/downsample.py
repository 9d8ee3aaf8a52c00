"""Beam side of a pass: seeds -> ExpandToUnits -> Reshuffle -> DownsampleUnitFn."""

from __future__ import annotations

import logging
from typing import Iterable, Optional, Sequence

import apache_beam as beam
import tensorstore as ts
from apache_beam.metrics import Metrics

from beam_downsample.core.config import PassConfig
from beam_downsample.core.grid import UnitGrid, WorkUnit
from beam_downsample.state import markers, progress, workerstate
from beam_downsample.store import arrays, stored
from beam_downsample.transforms import seeds as seeds_module
from beam_downsample.transforms import work

COUNTERS = "beam_downsample"  # counters of a layer are in namespace COUNTERS/<layer name>
_CANCELLED: set[str] = set()  # runs whose in-process DoFns start no further unit (ids, kept: a few bytes each)


class Cancelled(Exception):
    """The run was interrupted: this DoFn, in the launcher's own process, starts no further unit."""


def cancel(run_id: str) -> None:
    """DoFns of run `run_id` in this process finish the unit they are on and start no other
    (Ctrl-C in a notebook must not leave a pipeline writing in the background)."""
    _CANCELLED.add(run_id)
    beam_logger = logging.getLogger("apache_beam.runners.common")
    if _QUIET_CANCELLED not in beam_logger.filters:
        beam_logger.addFilter(_QUIET_CANCELLED)


class _QuietCancelled(logging.Filter):
    """Beam logs the Cancelled exception of a cancelled unit with a traceback: it is no error."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], Cancelled)) and \
            "was interrupted [while running" not in record.getMessage()


_QUIET_CANCELLED = _QuietCancelled()


class DownsampleUnitFn(beam.DoFn):
    """Runs `work.run_unit` for each unit; arrays are opened once per worker in setup().

    Idempotent: a retried or duplicated unit writes the very same bytes
    before marking itself done. The launcher hands a pass only the units
    without a marker (one listing), so there is no per-unit check here.

    With `record_failures` (our local runners) a failing unit leaves a
    one-line failure record for the launcher instead of raising: Beam's
    multi-process FnApiRunner can hang on a failed bundle, and its
    tracebacks bury the one line that matters (e.g. which chunk is corrupt).
    Other runners get the exception, so they can retry the bundle.

    Units whose source box holds nothing stored (tensorstore answers from
    the keys or shard indices, without reading) are marked done without
    running: they would write only the fill value, which is never stored.
    A `--bbox` refresh (`config.refresh`) runs them anyway, so that what the
    target held there is replaced by the fill value (deleted).

    Arrays are opened on a pass's first unit, not in setup(): inside a user's
    pipeline (`run.inline`) a later pass's DoFn may be set up before the
    arrays it writes are created. Counters are per layer (namespace
    `COUNTERS/<layer>`: work_units, work_units_empty, work_units_failed,
    voxels_read, voxels_written); the tally carries the same figures for
    runners that report no counters.
    """

    def __init__(self, configs: Sequence[PassConfig], record_failures: bool = False, run_id: Optional[str] = None):
        self._configs = {(c.layer, c.pass_index): c for c in configs}
        self._record_failures = record_failures
        self._run_id = run_id

    def setup(self) -> None:
        self._context = ts.Context(arrays.context_spec())
        self._probe_context = stored.probe_context()
        self._arrays: dict = {}
        self._probes: dict = {}
        self._scratch = work.Scratch()  # buffers reused by every unit of this worker
        self._counters: dict = {}
        first = next(iter(self._configs.values()))
        self._tally = progress.Tally(first.marker_dir)

    def _open(self, key) -> None:
        config = self._configs[key]
        source = arrays.open_array(config.source_spec, self._context, open=True)
        targets = [arrays.open_array(level.spec, self._context, open=True) for level in config.levels]
        self._arrays[key] = (source, targets)
        # storage statistics go to a second handle that caches shard indices (the reading one caches
        # nothing), never revalidated: the source does not change during the pass (GCS: no request each)
        self._probes[key] = source if config.source_spec["driver"] == "wkw" else arrays.open_array(
            config.source_spec, self._probe_context, open=True, recheck_cached_data=False)
        work.prepare_kernels(config, arrays.array_dtype(source))  # loads while the first tiles are read

    def _count(self, layer: str, name: str, value: int = 1) -> None:
        counter = self._counters.get((layer, name))
        if counter is None:
            counter = self._counters[layer, name] = Metrics.counter(f"{COUNTERS}/{layer}", name)
        counter.inc(value)

    def finish_bundle(self):
        self._tally.flush()

    def teardown(self):
        if hasattr(self, "_tally"):
            self._tally.flush()

    def process(self, unit: WorkUnit) -> Iterable[str]:
        if self._run_id in _CANCELLED:
            raise Cancelled(f"run {self._run_id} was interrupted")
        key = (unit.layer, unit.pass_index)
        config = self._configs[key]
        workerstate.starting(config, unit)  # a launcher that sees this worker die knows what it ran
        try:
            if key not in self._arrays:
                self._open(key)
            source, targets = self._arrays[key]
            probe = self._probes[key]
            if not config.refresh and stored.box_not_stored(probe, unit.box):
                markers.mark_done(config, unit)
                self._count(unit.layer, "work_units_empty")
                self._tally.add(unit.layer, empty=True)
                yield unit.key
                return
            # not a refresh: the targets hold nothing here but what this unit writes, so its zeros need no writing
            stats = work.run_unit(config, unit, source, targets, self._scratch, probe, skip_zeros=not config.refresh)
        except Exception as error:  # pylint: disable=broad-except
            if not self._record_failures:
                raise
            markers.record_failure(config, unit, error)
            self._count(unit.layer, "work_units_failed")
            yield unit.key
            return
        markers.mark_done(config, unit)
        self._tally.add(unit.layer, read=stats.voxels_read, written=stats.voxels_written)
        self._count(unit.layer, "work_units")
        self._count(unit.layer, "voxels_read", stats.voxels_read)
        self._count(unit.layer, "voxels_written", stats.voxels_written)
        yield unit.key


class ExpandToUnits(beam.DoFn):
    """Seed -> its work units, by the grid's arithmetic, on the worker."""

    def __init__(self, grids: Sequence[UnitGrid]):
        self._grids = {(g.layer, g.pass_index): g for g in grids}

    def setup(self) -> None:
        self._expander = seeds_module.Expander()

    def process(self, seed: tuple) -> Iterable[WorkUnit]:
        grid = self._grids[(seed[0], seed[1])]
        for index in self._expander.indices(seed):
            yield grid.unit(index)


class DownsamplePass(beam.PTransform):
    """All work units of one pass (any number of layers), made from seeds and spread over workers."""

    def __init__(self, seeds: Sequence[tuple], grids: Sequence[UnitGrid], configs: Sequence[PassConfig],
                 record_failures: bool = False, run_id: Optional[str] = None):
        super().__init__()
        self._seeds = list(seeds)
        self._grids = list(grids)
        self._configs = list(configs)
        self._record_failures = record_failures
        self._run_id = run_id

    def expand(self, pbegin):
        return (
            pbegin
            | "Seeds" >> beam.Create(self._seeds, reshuffle=False)
            | "Units" >> RunUnits(self._grids, self._configs, self._record_failures, self._run_id)
        )


class RunUnits(beam.PTransform):
    """Seeds -> their units, spread over the workers, each run (unit keys out)."""

    def __init__(self, grids: Sequence[UnitGrid], configs: Sequence[PassConfig], record_failures: bool = False,
                 run_id: Optional[str] = None):
        super().__init__()
        self._grids, self._configs = list(grids), list(configs)
        self._record_failures, self._run_id = record_failures, run_id

    def expand(self, seeds):
        return (
            seeds
            | "ExpandToUnits" >> beam.ParDo(ExpandToUnits(self._grids))
            | "Spread" >> beam.Reshuffle()
            | "Downsample" >> beam.ParDo(DownsampleUnitFn(self._configs, self._record_failures, self._run_id))
        )
