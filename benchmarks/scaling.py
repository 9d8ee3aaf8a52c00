"""Wall time and CPU utilisation against --jobs and the strategy, on fresh copies of one dataset.

    python benchmarks/scaling.py DATASET [--rounds 3] [--jobs-series 2,4,8] [--strategies ...] [--json OUT]

Runs, each on a fresh copy of DATASET and round-robin over `--rounds`
rounds (so that noise from other work on the machine spreads over all of
them): the default settings, `sequential`, and `multiprocessing --jobs N`
for N in the series derived from this machine (2, 4, 8, ... up to the
cores, and the cores themselves), so the same command measures a 2-, 16- or
64-core machine unchanged. Per configuration it prints the minimum and the
median of: wall seconds; CPU seconds of the whole process tree (the
launcher and every worker process, from the kernel's accounting of reaped
children); utilisation = CPU-s / wall-s / cores; and the peak RSS of the
tree (sampled every 0.1 s with psutil). Every output is compared byte for
byte with the first `sequential` one.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import psutil
from strategies import trees_equal  # benchmarks/strategies.py

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from beam_downsample.core import machine  # noqa: E402  pylint: disable=wrong-import-position


def jobs_series(cores: int) -> list[int]:
    """2, 4, 8, ... below the cores, then the cores (at least 2)."""
    series, jobs = [], 2
    while jobs < cores:
        series.append(jobs)
        jobs *= 2
    series.append(max(cores, 2))
    return series


def configurations(strategies: list[str], series: list[int]) -> list[tuple[str, list[str]]]:
    rows = []
    for strategy in strategies:
        if strategy == "default":
            rows.append(("default", []))
        elif strategy == "sequential":
            rows.append(("sequential", ["--distribution-strategy", "sequential"]))
        else:
            rows += [(f"{strategy} --jobs {n}", ["--distribution-strategy", strategy, "--jobs", str(n)])
                     for n in series]
    return rows


class TreeMemory(threading.Thread):
    """Samples the summed RSS of a process and its descendants until stopped."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.peak = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                tree = [self.root] + self.root.children(recursive=True)
                total = 0
                for proc in tree:
                    try:
                        total += proc.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, total)
            except psutil.Error:
                pass
            self.done.wait(0.1)


def run_once(dataset: str, args: list[str], work: str) -> dict:
    copy = os.path.join(work, "ds")
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(dataset, copy)
    command = [sys.executable, "-m", "beam_downsample", copy, *args]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = TreeMemory(proc.pid)
    sampler.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    sampler.done.set()
    sampler.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}): {err.strip()[-500:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall": wall, "cpu": cpu, "peak_rss": sampler.peak, "stdout": out, "output": copy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs-series", help="comma-separated --jobs values (default: from this machine's cores)")
    parser.add_argument("--strategies", default="default,sequential,multiprocessing",
                        help="comma-separated: default, sequential, multiprocessing, dask")
    parser.add_argument("--json", help="also write the measurements here")
    args = parser.parse_args()
    cores = machine.available_cores()
    series = [int(n) for n in args.jobs_series.split(",")] if args.jobs_series else jobs_series(cores)
    rows = configurations(args.strategies.split(","), series)
    results: dict[str, list[dict]] = {label: [] for label, _ in rows}
    identical: dict[str, bool] = {label: True for label, _ in rows}
    work = tempfile.mkdtemp(prefix="scaling-")
    expected = os.path.join(work, "expected")
    load_before = os.getloadavg()
    try:
        first = run_once(args.dataset, ["--distribution-strategy", "sequential"], work)
        shutil.move(first["output"], expected)
        for round_index in range(args.rounds):
            for label, flags in rows:
                result = run_once(args.dataset, flags, work)
                identical[label] &= trees_equal(expected, result["output"])
                results[label].append(result)
                print(f"round {round_index + 1} {label}: {result['wall']:.2f} s wall, {result['cpu']:.2f} CPU-s, "
                      f"{result['peak_rss'] / 1e9:.2f} GB", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()
    print(f"machine: {cores} cores, {machine.total_memory() / 2**30:.1f} GiB; load average "
          f"{load_before[0]:.1f} before, {load_after[0]:.1f} after; {args.rounds} rounds\n")
    print("| run | wall s (min) | wall s (median) | CPU-s (median) | utilisation (median) | "
          "peak tree RSS GB (max) | identical to sequential |")
    print("|---|---|---|---|---|---|---|")
    summary = []
    for label, _ in rows:
        walls = [r["wall"] for r in results[label]]
        cpus = [r["cpu"] for r in results[label]]
        utilisation = [c / w / cores for c, w in zip(cpus, walls)]
        peak = max(r["peak_rss"] for r in results[label])
        print(f"| {label} | {min(walls):.2f} | {statistics.median(walls):.2f} | {statistics.median(cpus):.2f} | "
              f"{statistics.median(utilisation):.0%} | {peak / 1e9:.2f} | {'yes' if identical[label] else 'NO'} |")
        summary.append({"run": label, "walls": walls, "cpus": cpus, "peak_rss": peak, "identical": identical[label]})
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump({"cores": cores, "load": [load_before, load_after], "runs": summary}, out, indent=2)


if __name__ == "__main__":
    main()
