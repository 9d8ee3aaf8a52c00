"""Beam side of a pass: seeds -> ExpandToUnits -> Reshuffle -> DownsampleUnitFn."""

from __future__ import annotations

from typing import Iterable, Sequence

import apache_beam as beam
import tensorstore as ts
from apache_beam.metrics import Metrics

from beam_downsample.core.config import PassConfig
from beam_downsample.core.grid import UnitGrid, WorkUnit
from beam_downsample.state import markers, progress, workerstate
from beam_downsample.store import arrays, stored
from beam_downsample.transforms import seeds as seeds_module
from beam_downsample.transforms import faults, work


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
    """

    def __init__(self, configs: Sequence[PassConfig], record_failures: bool = False):
        self._configs = {(c.layer, c.pass_index): c for c in configs}
        self._record_failures = record_failures

    def setup(self) -> None:
        context = ts.Context(arrays.context_spec())
        self._arrays = {}
        self._probes = {}
        probe_context = stored.probe_context()
        for key, config in self._configs.items():
            source = arrays.open_array(config.source_spec, context, open=True)
            targets = [arrays.open_array(level.spec, context, open=True) for level in config.levels]
            self._arrays[key] = (source, targets)
            # storage statistics go to a second handle that caches shard indices (the reading one caches
            # nothing), never revalidated: the source does not change during the pass (GCS: no request each)
            self._probes[key] = source if config.source_spec["driver"] == "wkw" else arrays.open_array(
                config.source_spec, probe_context, open=True, recheck_cached_data=False)
            work.prepare_kernels(config, arrays.array_dtype(source))  # loads while the first tiles are read
        self._scratch = work.Scratch()  # buffers reused by every unit of this worker
        self._units = Metrics.counter("beam_downsample", "work_units")
        self._read = Metrics.counter("beam_downsample", "voxels_read")
        self._written = Metrics.counter("beam_downsample", "voxels_written")
        self._failed = Metrics.counter("beam_downsample", "work_units_failed")
        self._empty = Metrics.counter("beam_downsample", "work_units_empty")
        first = next(iter(self._configs.values()))
        self._tally = progress.Tally(first.marker_dir)

    def finish_bundle(self):
        self._tally.flush()

    def teardown(self):
        if hasattr(self, "_tally"):
            self._tally.flush()

    def process(self, unit: WorkUnit) -> Iterable[str]:
        config = self._configs[(unit.layer, unit.pass_index)]
        source, targets = self._arrays[(unit.layer, unit.pass_index)]
        workerstate.starting(config, unit)  # a launcher that sees this worker die knows what it ran
        try:
            probe = self._probes[(unit.layer, unit.pass_index)]
            if not config.refresh and stored.box_not_stored(probe, unit.box):
                markers.mark_done(config, unit)
                self._empty.inc()
                self._tally.add()
                yield unit.key
                return
            # not a refresh: the targets hold nothing here but what this unit writes, so its zeros need no writing
            stats = work.run_unit(config, unit, source, targets, self._scratch, probe, skip_zeros=not config.refresh)
        except Exception as error:  # pylint: disable=broad-except
            fault = faults.describe(error, config, unit, source, targets)  # one line naming the object
            if not self._record_failures:
                raise fault from error
            markers.record_failure(config, unit, str(fault))
            self._failed.inc()
            yield unit.key
            return
        markers.mark_done(config, unit)
        self._tally.add()
        self._units.inc()
        self._read.inc(stats.voxels_read)
        self._written.inc(stats.voxels_written)
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
                 record_failures: bool = False):
        super().__init__()
        self._seeds = list(seeds)
        self._grids = list(grids)
        self._configs = list(configs)
        self._record_failures = record_failures

    def expand(self, pbegin):
        return (
            pbegin
            | "Seeds" >> beam.Create(self._seeds, reshuffle=False)
            | "ExpandToUnits" >> beam.ParDo(ExpandToUnits(self._grids))
            | "Spread" >> beam.Reshuffle()
            | "Downsample" >> beam.ParDo(DownsampleUnitFn(self._configs, self._record_failures))
        )
