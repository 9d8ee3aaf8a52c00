"""Wall time of every strategy that runs on this machine, on fresh copies of one dataset.

    python benchmarks/strategies.py DATASET [--rounds 3] [--jobs 2]

Runs sequential, multiprocessing, dask (LocalCluster), dask on an existing
scheduler (started here: `dask scheduler` + `dask worker --nworkers JOBS`)
and flink's portable path (Beam's local job service, LOOPBACK), each on a
fresh copy of DATASET, and checks every output tree is byte-identical to the
sequential one. slurm, kubernetes and dataflow need their clusters.
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def background(*commands):
    """Starts the commands (one after another) and terminates them all on exit."""
    processes = []
    try:
        for command, ready in commands:
            processes.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            deadline = time.monotonic() + 60
            while not ready():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{command[:4]} did not start")
                time.sleep(0.2)
        yield
    finally:
        for process in reversed(processes):
            process.terminate()
            process.wait(timeout=30)


def port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("localhost", port), timeout=1):
        return True
    return False


def trees_equal(left: str, right: str) -> bool:
    comparison = filecmp.dircmp(left, right)
    if comparison.left_only or comparison.right_only or comparison.funny_files:
        return False
    _, mismatch, errors = filecmp.cmpfiles(left, right, comparison.common_files, shallow=False)
    return not mismatch and not errors and all(
        trees_equal(os.path.join(left, d), os.path.join(right, d)) for d in comparison.common_dirs
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="strategies-")
    job_port = free_port()
    scheduler_file = os.path.join(work, "scheduler.json")
    python = sys.executable
    services = [
        ([python, "-m", "apache_beam.runners.portability.local_job_service_main", "--port", str(job_port)],
         lambda: port_open(job_port)),
        ([python, "-m", "distributed.cli.dask_scheduler", "--port", "0", "--no-dashboard",
          "--scheduler-file", scheduler_file], lambda: os.path.exists(scheduler_file)),
    ]
    with background(*services):
        with open(scheduler_file, encoding="utf-8") as handle:
            address = json.load(handle)["address"]
        workers = ([python, "-m", "distributed.cli.dask_worker", address, "--nworkers", str(args.jobs),
                    "--nthreads", "1", "--no-dashboard"], lambda: True)
        with background(workers):
            time.sleep(5)  # let the workers register
            strategies = {
                "sequential": ["--distribution-strategy", "sequential"],
                "multiprocessing": ["--distribution-strategy", "multiprocessing", "--jobs", str(args.jobs)],
                "dask (LocalCluster)": ["--distribution-strategy", "dask", "--jobs", str(args.jobs)],
                "dask (existing scheduler)": ["--distribution-strategy", "dask", "--dask-scheduler", address],
                "flink (portable, local job service)": [
                    "--distribution-strategy", "flink", f"--job_endpoint=localhost:{job_port}",
                    "--environment_type=LOOPBACK"],
            }
            times: dict = {name: [] for name in strategies}
            identical: dict = {}
            for _ in range(args.rounds):
                for index, (name, flags) in enumerate(strategies.items()):
                    target = os.path.join(work, f"run{index}", os.path.basename(args.dataset.rstrip("/")))
                    shutil.rmtree(os.path.dirname(target), ignore_errors=True)
                    shutil.copytree(args.dataset, target)
                    start = time.monotonic()
                    subprocess.run([python, "-m", "beam_downsample", target, *flags], check=True,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    times[name].append(time.monotonic() - start)
                    reference = os.path.join(work, "run0", os.path.basename(target))
                    identical[name] = identical.get(name, True) and trees_equal(reference, target)
    print("| strategy | wall s (min) | wall s (median) | identical to sequential |")
    print("|---|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {min(values):.1f} | {statistics.median(values):.1f} | {'yes' if identical[name] else 'NO'} |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
