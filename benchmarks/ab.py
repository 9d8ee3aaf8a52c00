"""A/B timing of beam-downsample source trees, round-robin, on a shared machine.

    python benchmarks/ab.py DATASET ROUNDS NAME=SRC[:ENV=V,ENV=V][:ARGS ...] ...

    git archive main | tar -x -C /tmp/src-main
    python benchmarks/ab.py /work/bench/bench-full 3 main=/tmp/src-main branch=.
    python benchmarks/ab.py /work/bench/bench-full 3 default=. seq=.::--distribution-strategy sequential

Each run gets a fresh copy of DATASET (never modified) and runs
`beam-downsample` from SRC (PYTHONPATH=SRC, this interpreter, run in SRC, since `python -c`
puts the working directory first on sys.path), alone; the
variants take turns, so a change of the machine's load hits every variant
alike. Per run: wall s, CPU-s of the whole process tree (user + sys, the
kernel's accounting of reaped children: much less disturbed by other load
than wall time), peak RSS of the tree (sampled every 50 ms) and the load
average. Then min and median per variant. A source tree's first run may
compile the numba kernels into its own cache: do one round first and
discard it.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


def tree_rss(root: int) -> int:
    """RSS of `root` and all its descendants, bytes."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append((int(entry), int(fields[21])))
    try:
        with open(f"/proc/{root}/stat", encoding="ascii") as handle:
            total = int(handle.read().rsplit(")", 1)[1].split()[21])
    except OSError:
        total = 0
    todo = [root]
    while todo:
        for pid, rss in children.get(todo.pop(), []):
            total += rss
            todo.append(pid)
    return total * os.sysconf("SC_PAGE_SIZE")


def parse_variant(text: str) -> tuple[str, str, dict, list]:
    name, _, rest = text.partition("=")
    parts = rest.split(":")
    env = dict(item.split("=", 1) for item in parts[1].split(",")) if len(parts) > 1 and parts[1] else {}
    args = parts[2].split() if len(parts) > 2 else []
    return name, os.path.abspath(parts[0]), env, args


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset")
    parser.add_argument("rounds", type=int)
    parser.add_argument("variants", nargs="+", help="NAME=SRC[:ENV=V,...][:ARGS]")
    args = parser.parse_args()
    variants = [parse_variant(v) for v in args.variants]
    workdir = tempfile.mkdtemp(prefix="beam-downsample-ab-")
    results: dict[str, list[tuple[float, float]]] = {v[0]: [] for v in variants}
    try:
        for round_index in range(args.rounds):
            for name, src, env, extra in variants:
                copy = os.path.join(workdir, "dataset")
                shutil.rmtree(copy, ignore_errors=True)
                shutil.copytree(args.dataset, copy)
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                start = time.perf_counter()
                proc = subprocess.Popen(
                    [sys.executable, "-c", "from beam_downsample.launch.cli import run; run()", copy, *extra],
                    env=dict(os.environ, **env, PYTHONPATH=src), cwd=src, stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE, text=True)
                peak = 0
                while proc.poll() is None:
                    peak = max(peak, tree_rss(proc.pid))
                    time.sleep(0.05)
                wall = time.perf_counter() - start
                error = proc.stderr.read()
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
                results[name].append((wall, cpu))
                status = "ok" if proc.returncode == 0 else f"FAILED {error[-300:]}"
                print(f"round {round_index} {name:12s} wall {wall:6.2f} cpu {cpu:6.2f} "
                      f"(sys {after.ru_stime - before.ru_stime:5.2f}) peak {peak / 1e9:5.2f} GB "
                      f"load {os.getloadavg()[0]:4.1f} {status}", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    for name, rows in results.items():
        walls, cpus = [r[0] for r in rows], [r[1] for r in rows]
        print(f"{name:12s} wall min {min(walls):6.2f} median {statistics.median(walls):6.2f}   "
              f"cpu min {min(cpus):6.2f} median {statistics.median(cpus):6.2f}")


if __name__ == "__main__":
    main()
