"""Where the time of a default run goes: imports, planning, array creation, worker start, units.

    python benchmarks/phases.py DATASET [--rounds 3]

Each round works on a fresh copy of DATASET and times, with wall and CPU
seconds of this process (time.process_time, which other work on a shared
machine disturbs much less than wall time):
- `imports`: a fresh interpreter importing the CLI (what every run pays),
  and `worker start`: a fresh interpreter importing what a Beam worker
  process imports before its first unit (what each worker process pays);
- `load + plan`, `create arrays`: the launcher's steps before the first pass;
- `units`: work.run_unit of every unit, called directly, one after another;
- `pass (Beam, in-process)`: the same units through the pass's Beam pipeline
  on the in-process FnApiRunner, on a second fresh copy; the difference to
  `units` is Beam's overhead;
- `list mags`: NGFF and properties updates and the state clean-up, which
  follow the pass in `run_job`.
Prints the minimum and the median over the rounds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=wrong-import-position
from beam_downsample.core import machine, sizing
from beam_downsample.launch import runners  # noqa: E402
from beam_downsample.plan.job import each_pass, pass_units, plan_job
from beam_downsample.plan.options import JobOptions
from beam_downsample.run import job
from beam_downsample.store import arrays
from beam_downsample.store.properties import load_dataset  # noqa: E402
from beam_downsample.transforms import seeds, work  # noqa: E402


def fresh_interpreter(modules: str) -> tuple[float, float]:
    """(wall, CPU) seconds of `python -c 'import MODULES'`, interpreter start included."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", f"import time; import {modules}; print(time.process_time())"],
                            capture_output=True, text=True, check=True)
    return time.perf_counter() - start, float(result.stdout.split()[-1])


class Clock:
    def __init__(self):
        self.rows: dict[str, list[tuple[float, float]]] = {}

    def time(self, label, function, *args):
        wall, cpu = time.perf_counter(), time.process_time()
        value = function(*args)
        self.rows.setdefault(label, []).append((time.perf_counter() - wall, time.process_time() - cpu))
        return value


def plan(path: str):
    dataset = load_dataset(path)
    here = sizing.Machine(machine.available_cores(), machine.total_memory())
    work_s = sizing.work_seconds((layer.bbox.voxels, layer.dtype.itemsize * layer.num_channels)
                                 for layer in dataset.layers)
    sized = sizing.choose(here, "multiprocessing", None, None, work_s)
    options = JobOptions(memory_budget=sized.budget, jobs=sized.processes)
    return dataset, plan_job(dataset, options), sized


def run_units_directly(plans) -> None:
    import tensorstore as ts  # pylint: disable=import-outside-toplevel

    context = ts.Context(arrays.context_spec())
    scratch = work.Scratch()
    for plan in plans:
        for config, units in zip(plan.configs, plan.units):
            source = arrays.open_array(config.source_spec, context, open=True)
            targets = [arrays.open_array(level.spec, context, open=True) for level in config.levels]
            for unit in units:
                work.run_unit(config, unit, source, targets, scratch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    clock = Clock()
    root = tempfile.mkdtemp(prefix="phases-")
    try:
        for _ in range(args.rounds):
            clock.rows.setdefault("imports (fresh interpreter + CLI)", []).append(
                fresh_interpreter("beam_downsample.launch.cli"))
            clock.rows.setdefault("worker start (fresh interpreter + worker imports)", []).append(
                fresh_interpreter("beam_downsample.launch.worker, apache_beam.runners.worker.sdk_worker_main, "
                                  "beam_downsample.transforms.downsample"))
            direct = os.path.join(root, "direct")
            piped = os.path.join(root, "piped")
            for path in (direct, piped):
                shutil.rmtree(path, ignore_errors=True)
                shutil.copytree(args.dataset, path)
            dataset, plans, _ = clock.time("load + plan", plan, direct)
            clock.time("create arrays", job.create_targets, dataset, plans)
            clock.time("units (work.run_unit, one after another)", run_units_directly, plans)
            dataset, plans, sized = plan(piped)
            job.create_targets(dataset, plans)
            engine = runners.sized(runners.plan_engine("multiprocessing", None, []), sized)
            runner = engine.runner
            for index, active, configs in each_pass(plans):
                grids = [p.grids[index] for p in active]
                planned = pass_units(plans, index)
                pass_seeds = [s for g, i in zip(grids, planned) for s in seeds.make_seeds(g, i)]
                pass_runner, options, configs = runner.for_pass(sum(map(len, planned)), configs)
                result = clock.time("pass (Beam, in-process, same units)", job._run_pass,  # pylint: disable=protected-access
                                    index, pass_seeds, grids, configs, pass_runner, options, True)
                result.wait_until_finish()
            # run_job again: every unit is marked done, so this is the listing and clean-up alone.
            clock.time("list mags + clean up", job.run_job, dataset, plans, runner, None, lambda *a: None,
                       lambda message: None, True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{args.rounds} rounds, {machine.available_cores()} cores, load average {os.getloadavg()[0]:.1f}\n")
    print("| phase | wall s (min) | wall s (median) | CPU s (min) | CPU s (median) |")
    print("|---|---|---|---|---|")
    for label, rows in clock.rows.items():
        walls, cpus = [r[0] for r in rows], [r[1] for r in rows]
        print(f"| {label} | {min(walls):.2f} | {statistics.median(walls):.2f} | {min(cpus):.2f} | "
              f"{statistics.median(cpus):.2f} |")


if __name__ == "__main__":
    main()
