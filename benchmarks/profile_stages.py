"""Where the time goes: decode, reduce, encode and Beam/start-up, per layer.

    python benchmarks/profile_stages.py BENCH_DATASET

Runs each stage of beam-downsample's work on its own, in this process, on a
scratch copy of the dataset's arrays (the dataset itself is not modified):
  decode  - read every mag-1 voxel (Fortran order, as the chunks are stored)
  reduce  - the pass's kernels on those voxels, level after level
  encode  - write the first new level into a fresh array with the reference layout
Prints wall and CPU seconds per stage; CPU seconds are what two cores share,
so `sum(cpu) / 2` is the floor of the wall time on this machine.
"""

from __future__ import annotations

import time

_STARTED = time.perf_counter()

# pylint: disable=wrong-import-position
import argparse
import os
import shutil
import tempfile

import numpy as np
import tensorstore as ts

from beam_downsample import io, job, planning, reduce
from beam_downsample.properties import load_dataset


class Stopwatch:
    def __init__(self):
        self.rows: list[tuple[str, str, float, float]] = []

    def measure(self, layer: str, stage: str, fn):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        self.rows.append((layer, stage, time.perf_counter() - wall, time.process_time() - cpu))
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset")
    args = parser.parse_args()

    import_seconds = time.perf_counter() - _STARTED
    dataset = load_dataset(args.dataset)
    plans = job.plan_job(dataset, job.JobOptions(jobs=1))
    context = ts.Context(io.context_spec())
    watch = Stopwatch()
    scratch = tempfile.mkdtemp(prefix="profile-stages-")
    try:
        for plan in plans:
            layer = plan.layer
            config = plan.configs[0]
            source = io.open_array(config.source_spec, context, open=True)
            align = planning.tile_alignment(plan.passes[0])
            slabs = [tile for unit in plan.units[0] for tile in planning.split_box(unit.box, align, 16 << 20)]
            tiles = watch.measure(
                layer.name, "decode", lambda: [io.read_box(source, tile, layer.num_channels) for tile in slabs]
            )

            def reduce_all():
                firsts = []
                for data in tiles:
                    for index, level in enumerate(config.levels):
                        data = reduce.downsample(data, level.factor, config.interpolation)
                        if index == 0:
                            firsts.append(data)
                return firsts

            firsts = watch.measure(layer.name, "reduce (all levels)", reduce_all)
            level = config.levels[0]
            target = io.open_array(io.new_mag_spec(layer, scratch, level.mag), context, create=True)
            whole = planning.Box(
                tuple(min(t.start[a] for t in slabs) // level.factor[a] for a in range(3)),
                tuple(max(t.stop[a] for t in slabs) // level.factor[a] for a in range(3)),
            )
            buffer = np.zeros((layer.num_channels, *whole.shape), dtype=layer.dtype, order="F")
            for tile, data in zip(slabs, firsts):
                box = tile.scaled_down(level.factor)
                buffer[io.local_index(box, whole)] = data
            watch.measure(layer.name, "encode (first level)", lambda: io.write_region(target, whole, buffer).result())
            tiles = firsts = buffer = None  # free this layer before the next one
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    print("| layer | stage | wall s | CPU s |\n|---|---|---|---|")
    print(f"| - | imports (numpy, tensorstore, apache_beam) | {import_seconds:.2f} | - |")
    for layer, stage, wall, cpu in watch.rows:
        print(f"| {layer} | {stage} | {wall:.2f} | {cpu:.2f} |")
    total_cpu = sum(row[3] for row in watch.rows)
    print(f"\nCPU of the stages: {total_cpu:.1f} s -> floor on {os.cpu_count()} cores: "
          f"{import_seconds + total_cpu / (os.cpu_count() or 1):.1f} s wall (with the import)")


if __name__ == "__main__":
    main()
