"""Launch to first read: how long `beam-downsample` takes before it decodes a voxel.

    python benchmarks/startup.py DATASET [--strategy sequential] [--jobs N]

Runs the CLI on a scratch copy of DATASET (the dataset itself is not
modified) and logs, in every process of the run, the moment of its first
`io.read_box` call and of its first kernel call (`reduce.downsample_box`),
through a `sitecustomize` hook that patches those two functions when
`beam_downsample.store.arrays` / `beam_downsample.kernels.reduce` are first imported (the
hook imports nothing itself, so the import times stay as they are).
Prints seconds since launch for the launcher's end and each process's
first read and first reduce, and the import profile of the launcher
(`python -X importtime`, top packages by self time).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

HOOK = r'''
import importlib.abc, importlib.util, os, sys, time

_LOG = os.environ["BEAM_DOWNSAMPLE_STARTUP_LOG"]
_WRAP = {"beam_downsample.store.arrays": "read_box", "beam_downsample.kernels.reduce": "downsample_box"}


def _first(module, name):
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        setattr(module, name, real)
        with open(_LOG, "a", encoding="utf-8") as log:
            log.write(f"{os.getpid()} {name} {time.time()}\n")
        return real(*args, **kwargs)

    setattr(module, name, wrapper)


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in _WRAP:
            return None
        index = sys.meta_path.index(self)
        for finder in sys.meta_path[index + 1:]:
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                break
        else:
            return None
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _first(module, _WRAP[fullname])

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _Hook())
'''


def import_profile(top: int = 12) -> list[tuple[str, float]]:
    """The launcher's imports (`python -X importtime`), self time summed per top-level package."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "import beam_downsample.launch.cli"],
                         capture_output=True, text=True, check=True).stderr
    totals: collections.Counter = collections.Counter()
    for line in out.splitlines():
        match = re.match(r"import time:\s+(\d+) \|\s+\d+ \|\s*(\S+)", line)
        if match:
            parts = match[2].split(".")
            totals[".".join(parts[:3] if parts[0] == "google" else parts[:1])] += int(match[1]) / 1e6
    return totals.most_common(top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset")
    parser.add_argument("--strategy", default="sequential")
    parser.add_argument("--jobs", type=int, default=None)
    args = parser.parse_args()

    scratch = tempfile.mkdtemp(prefix="startup-")
    try:
        dataset = os.path.join(scratch, "dataset")
        shutil.copytree(args.dataset, dataset)
        hook_dir = os.path.join(scratch, "hook")
        os.makedirs(hook_dir)
        with open(os.path.join(hook_dir, "sitecustomize.py"), "w", encoding="utf-8") as f:
            f.write(HOOK)
        log = os.path.join(scratch, "log.txt")
        env = dict(os.environ, BEAM_DOWNSAMPLE_STARTUP_LOG=log,
                   PYTHONPATH=os.pathsep.join(filter(None, [hook_dir, os.environ.get("PYTHONPATH")])))
        command = [sys.executable, "-m", "beam_downsample", dataset, "--distribution-strategy", args.strategy]
        if args.jobs:
            command += ["--jobs", str(args.jobs)]
        launched = time.time()
        start_cpu = os.times()
        subprocess.run(command, env=env, check=True, capture_output=True)
        ended = time.time() - launched
        end_cpu = os.times()
        events = []
        with open(log, encoding="utf-8") as f:
            for line in f:
                pid, name, stamp = line.split()
                events.append((float(stamp) - launched, pid, name))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    children_cpu = (end_cpu.children_user - start_cpu.children_user) + (end_cpu.children_system - start_cpu.children_system)
    print(f"| {args.strategy} run | s since launch |\n|---|---|")
    for seconds, pid, name in sorted(events):
        what = "first read" if name == "read_box" else "first kernel call"
        print(f"| process {pid}: {what} | {seconds:.2f} |")
    print(f"| run finished | {ended:.2f} |\n\nCPU of the process tree: {children_cpu:.1f} s")
    print("\n| launcher import, top packages | self s |\n|---|---|")
    for name, seconds in import_profile():
        print(f"| {name} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
