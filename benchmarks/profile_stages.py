"""Where the time goes: decode, reduce, encode and Beam/start-up, per layer.

    python benchmarks/profile_stages.py BENCH_DATASET [--context JSON]

Runs each stage of beam-downsample's work on its own, in this process, on a
scratch copy of the dataset's arrays (the dataset itself is not modified):
  decode  - read every source voxel into a reused buffer (Fortran order, as stored)
  reduce  - the pass's kernels on those voxels, level after level
  encode  - write every new level into a fresh array with the reference layout
one work unit at a time on one thread, with the work units of a real plan.
Prints wall and CPU seconds per stage; CPU seconds are what two cores share,
so `sum(cpu) / 2` is the floor of the wall time on this machine.
`--context` merges a JSON object into `io.context_spec()` (tensorstore's
context: concurrency limits, cache pool) to compare settings.
"""

from __future__ import annotations

import time

_STARTED = time.perf_counter()
_STARTED_CPU = time.process_time()

# pylint: disable=wrong-import-position
import argparse
import json
import os
import shutil
import tempfile

import tensorstore as ts

from beam_downsample.core.box import split_box
from beam_downsample.plan.job import plan_job
from beam_downsample.plan.options import JobOptions
from beam_downsample.store import arrays
from beam_downsample.store.properties import load_dataset
from beam_downsample.transforms import work


class Stopwatch:
    """Wall and CPU seconds summed per (layer, stage)."""

    def __init__(self):
        self.rows: dict[tuple[str, str], list[float]] = {}

    def measure(self, layer: str, stage: str, fn):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        row = self.rows.setdefault((layer, stage), [0.0, 0.0])
        row[0] += time.perf_counter() - wall
        row[1] += time.process_time() - cpu
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset")
    parser.add_argument("--context", default="{}", help="JSON merged into io.context_spec()")
    args = parser.parse_args()

    import_seconds = time.perf_counter() - _STARTED
    import_cpu = time.process_time() - _STARTED_CPU
    dataset = load_dataset(args.dataset)
    plans = plan_job(dataset, JobOptions(jobs=1))
    spec = {**arrays.context_spec(), **json.loads(args.context)}
    context = ts.Context(spec)
    watch = Stopwatch()
    scratch = work.Scratch()
    out_dir = tempfile.mkdtemp(prefix="profile-stages-")
    try:
        for plan in plans:
            layer = plan.layer
            for config, units in zip(plan.configs, plan.units):
                source = arrays.open_array(config.source_spec, context, open=True)
                targets = [
                    arrays.open_array(arrays.new_mag_spec(layer, out_dir, level.mag), context, create=True, delete_existing=True)
                    for level in config.levels
                ]
                for unit in units:
                    profile_unit(watch, scratch, config, unit, source, targets)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)

    print(f"context: {json.dumps(spec)}\n")
    print("| layer | stage | wall s | CPU s |\n|---|---|---|---|")
    print(f"| - | imports (numpy, tensorstore, apache_beam) | {import_seconds:.2f} | {import_cpu:.2f} |")
    for (layer, stage), (wall, cpu) in watch.rows.items():
        print(f"| {layer} | {stage} | {wall:.2f} | {cpu:.2f} |")
    total_cpu = sum(row[1] for row in watch.rows.values())
    print(f"\nCPU of the stages: {total_cpu:.1f} s -> floor on {os.cpu_count()} cores: "
          f"{import_seconds + total_cpu / (os.cpu_count() or 1):.1f} s wall (with the import)")


def profile_unit(watch, scratch, config, unit, source, targets) -> None:
    """`work.run_unit` on one thread, each stage timed on its own."""
    unit_levels = work.level_boxes(config, unit.box)
    dtype = arrays.array_dtype(source)
    with work.level_buffers(scratch, config, unit_levels, dtype) as buffers:
        for tile in split_box(unit.box, config.tile_alignment, config.tile_voxels):
            with scratch.borrow("tile", (config.channels, *tile.shape), dtype) as data:
                watch.measure(config.layer, "decode", lambda: arrays.read_box(source, tile, config.channels, out=data))
                watch.measure(config.layer, "reduce",
                              lambda: work.reduce_tile(config, tile, data, buffers, unit_levels))

        def encode():
            pending, _ = work.start_level_writes(config, targets, buffers, unit_levels)
            for future in pending:
                future.result()

        watch.measure(config.layer, "encode", encode)


if __name__ == "__main__":
    main()
