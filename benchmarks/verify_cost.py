"""What `beam-downsample verify` costs against the run it checks, paired in one session.

    python benchmarks/make_bench_dataset.py /tmp/bench          # 1024x1024x512, two layers
    python benchmarks/verify_cost.py /tmp/bench --rounds 3 [--verify-args "--sample 64"]

Each round copies DATASET (never modified), runs `beam-downsample COPY` with default
settings, then verifies the result twice, in alternating order: `beam-downsample verify`
as the command runs it (`launch.entry`: verify's own command line, no Apache Beam import)
and through `launch.cli.main`'s dispatch (the same checks after importing the run's
machinery, Beam included), to show what that import costs.
Per run: wall s, CPU-s of the process tree, load average. Then per variant min and
median, and verify's share of the run (each verify against its own round's run).
The first round may compile the numba kernels into their cache: use --rounds 3 or more.
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

VARIANTS = {
    "verify": ["-m", "beam_downsample", "verify"],  # what the `beam-downsample` command runs
    "verify via cli.main": ["-c", "from beam_downsample.launch.cli import run; run()", "verify"],  # imports Beam
}


def timed(arguments: list[str]) -> tuple[float, float, str]:
    """(wall s, CPU-s of the process and its children, last stdout line) of `python ARGUMENTS`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    process = subprocess.run([sys.executable, *arguments], capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    lines = process.stdout.strip().splitlines()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(arguments)} exited {process.returncode}: {process.stderr[-500:]}")
    return wall, cpu, lines[-1] if lines else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", help="a dataset without coarse mags (benchmarks/make_bench_dataset.py)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--verify-args", default="", help="more flags for both verify variants")
    args = parser.parse_args()
    extra = shlex.split(args.verify_args)
    workdir = tempfile.mkdtemp(prefix="beam-downsample-verify-cost-")
    rows: dict[str, list[tuple[float, float]]] = {"run": [], **{name: [] for name in VARIANTS}}
    shares: dict[str, list[tuple[float, float]]] = {name: [] for name in VARIANTS}  # (wall, CPU) / the run's
    try:
        for index in range(args.rounds):
            copy = os.path.join(workdir, "dataset")
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(args.dataset, copy)
            run = timed(["-m", "beam_downsample", copy])
            rows["run"].append(run[:2])
            print(f"round {index} {'run':24s} wall {run[0]:6.2f} cpu {run[1]:6.2f} load {os.getloadavg()[0]:4.1f}",
                  flush=True)
            names = list(VARIANTS) if index % 2 == 0 else list(VARIANTS)[::-1]
            for name in names:
                wall, cpu, last = timed([*VARIANTS[name], copy, *extra])
                rows[name].append((wall, cpu))
                shares[name].append((wall / run[0], cpu / run[1]))
                print(f"round {index} {name:24s} wall {wall:6.2f} cpu {cpu:6.2f} load {os.getloadavg()[0]:4.1f}"
                      f"  ({wall / run[0]:.3f} of the run's wall, {cpu / run[1]:.3f} of its CPU)  {last}", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(f"| {'what':24s} | wall min | wall median | CPU-s median | of the run's wall | of its CPU-s |")
    print(f"|{'-' * 26}|---------:|------------:|-------------:|-----------------:|-------------:|")
    for name, values in rows.items():
        walls, cpus = [v[0] for v in values], [v[1] for v in values]
        wall_share, cpu_share = ("1", "1") if name not in shares else (
            f"{statistics.median(s[0] for s in shares[name]):.3f}", f"{statistics.median(s[1] for s in shares[name]):.3f}")
        print(f"| {name:24s} | {min(walls):8.2f} | {statistics.median(walls):11.2f} | "
              f"{statistics.median(cpus):12.2f} | {wall_share:>16s} | {cpu_share:>12s} |")


if __name__ == "__main__":
    main()
