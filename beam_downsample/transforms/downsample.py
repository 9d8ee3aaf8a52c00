"""Beam side of a pass: seeds -> ExpandToUnits -> Reshuffle -> DownsampleUnitFn."""

from __future__ import annotations

import concurrent.futures
import logging
from typing import Iterable, Optional, Sequence

import apache_beam as beam
from apache_beam.metrics import Metrics

from beam_downsample.core.config import PassConfig
from beam_downsample.core.grid import UnitGrid, WorkUnit
from beam_downsample.state import markers, progress, workerstate
from beam_downsample.store import arrays, stored, usage
from beam_downsample.transforms import seeds as seeds_module
from beam_downsample.transforms import faults, work


REQUESTS = "requests_"  # Beam counters of storage requests by kind (store.usage), summed by run.accounting

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
    tracebacks bury the one line that matters. Either way the failure is
    one line naming the stored object, its layer, mag and box (`faults`).
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
        self._arrays: dict = {}
        self._probes: dict = {}
        self._prefetchers: dict = {}
        self._scratch = work.Scratch()  # buffers reused by every unit of this worker
        self._counters: dict = {}
        first = next(iter(self._configs.values()))
        self._tally = progress.Tally(first.marker_dir)
        self._requests = {kind: Metrics.counter("beam_downsample", f"{REQUESTS}{kind}") for kind in usage.KINDS}

    def start_bundle(self):
        # small writes (worker state, done-markers) run beside the units instead of before or after them
        self._bookkeeping = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="beam-downsample-state")
        self._marking: list = []

    def _open(self, key) -> None:
        """Opens the arrays of every layer of `key`'s pass at once (their metadata in one round
        of requests); the compiled kernels load while the first tiles are read."""
        wanted = {k: c for k, c in self._configs.items() if k[1] == key[1] and k not in self._arrays}
        pairs, probes, prefetchers = work.open_pass_arrays(wanted)
        self._arrays.update(pairs)
        self._probes.update(probes)
        self._prefetchers.update(prefetchers)
        for opened, config in wanted.items():
            work.prepare_kernels(config, arrays.array_dtype(pairs[opened][0]))

    def _count(self, layer: str, name: str, value: int = 1) -> None:
        counter = self._counters.get((layer, name))
        if counter is None:
            counter = self._counters[layer, name] = Metrics.counter(f"{COUNTERS}/{layer}", name)
        counter.inc(value)

    def finish_bundle(self):
        try:
            for marking in self._marking:  # every marker is stored before the bundle counts as done
                marking.result()
        finally:
            self._marking = []
            self._bookkeeping.shutdown(wait=True)
        self._tally.flush()
        for kind, count in usage.take().items():  # what this process sent since its last report
            if count:
                self._requests[kind].inc(count)

    def teardown(self):
        if hasattr(self, "_bookkeeping"):
            self._abandon_bundle()
        if hasattr(self, "_tally"):
            self._tally.flush()

    def _abandon_bundle(self) -> None:
        """The bundle fails: its small writes end here, so no thread of ours stays behind."""
        self._bookkeeping.shutdown(wait=True, cancel_futures=True)

    def process(self, unit: WorkUnit) -> Iterable[str]:
        if self._run_id in _CANCELLED:
            self._abandon_bundle()
            raise Cancelled(f"run {self._run_id} was interrupted")
        key = (unit.layer, unit.pass_index)
        config = self._configs[key]
        # a launcher that sees this worker die knows what it ran; written while the unit reads
        starting = self._bookkeeping.submit(workerstate.starting, config, unit)
        source = targets = None
        try:
            if key not in self._arrays:
                self._open(key)
            source, targets = self._arrays[key]
            prefetcher = self._prefetchers.get(key)
            probe = self._probes[key]
            if prefetcher is None and not config.refresh and stored.box_not_stored(probe, unit.box):
                empty = True
            else:  # (a remote source's stored chunks are known once its shard indices are read: no probe)
                # not a refresh: the targets hold nothing here but what this unit writes, so its zeros need no writing
                stats = work.run_unit(config, unit, source, targets, self._scratch, probe,
                                      skip_zeros=not config.refresh, prefetcher=prefetcher)
                empty = stats.voxels_read == 0 and prefetcher is not None and not config.refresh
            starting.result()
        except Exception as error:  # pylint: disable=broad-except
            fault = faults.describe(error, config, unit, source, targets)  # one line naming the object
            if not self._record_failures:
                self._abandon_bundle()
                raise fault from error
            markers.record_failure(config, unit, str(fault))
            self._count(unit.layer, "work_units_failed")
            yield unit.key
            return
        except BaseException:  # Ctrl-C, a cancelled run
            self._abandon_bundle()
            raise
        # written after every level is stored; the next unit need not wait for it (finish_bundle does)
        self._marking.append(self._bookkeeping.submit(markers.mark_done, config, unit))
        if empty:
            self._tally.add(unit.layer, empty=True)
            self._count(unit.layer, "work_units_empty")
        else:
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
