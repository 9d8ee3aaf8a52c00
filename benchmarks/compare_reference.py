"""Times `beam-downsample` against the reference `webknossos downsample` (4.3.3).

    python benchmarks/compare_reference.py --size 1024,1024,512          # writes the bench dataset first
    python benchmarks/compare_reference.py /data/bench                   # an existing dataset (never modified)
    python benchmarks/compare_reference.py /data/bench --skip-reference --ours-args "--memory-budget 1G"
    python benchmarks/compare_reference.py /data/bench --ref-multiprocessing --json numbers.json

Every run gets its own fresh copy of the input dataset and runs alone, one
after another:

- reference, `webknossos downsample --distribution-strategy sequential` (the
  reference's fastest setting), unless --skip-reference;
- reference with its default strategy (multiprocessing), if --ref-multiprocessing;
- ours, `beam-downsample` with its default strategy, once per --ours-args
  value (default: one run with no extra flags).

While a run goes, the resident set size summed over its whole process tree
(the command and all its descendants, plus anything left in its session) is
sampled every 0.1 s; the peak is reported. RSS counts pages shared between
forked workers once per process, so a multi-process tree may be over-counted.

The table: tool, wall s, peak tree RSS GB, MVox/s (mag-1 voxels of all
layers / wall), speed relative to the reference's sequential run, and whether
every mag of every layer (whole arrays, every voxel) plus the properties are
identical to the reference's sequential output (or to --reference-output, a
reference output kept from an earlier run with --keep).

The reference venv: $BEAM_DOWNSAMPLE_REF_VENV if set, else a cached venv in
~/.cache/beam-downsample/webknossos-4.3.3 (created on first use).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Sequence

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dscompare  # noqa: E402  pylint: disable=wrong-import-position
import make_bench_dataset  # noqa: E402  pylint: disable=wrong-import-position
import refenv  # noqa: E402  pylint: disable=wrong-import-position

SAMPLE_SECONDS = 0.1


@dataclasses.dataclass
class Run:
    label: str
    command: list[str]
    kind: str  # reference-sequential | reference-multiprocessing | ours
    exit_code: int | None = None
    wall_seconds: float | None = None
    peak_tree_rss_bytes: int = 0
    peak_processes: int = 0
    mvox_per_second: float | None = None
    speed_vs_reference_sequential: float | None = None
    identical: bool | None = None
    identity_note: str = ""
    new_mags: dict = dataclasses.field(default_factory=dict)
    output: str | None = None
    error: str = ""


def _log(message: str) -> None:
    print(f"[compare {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _tree(root: psutil.Process, session: int) -> list[psutil.Process]:
    procs = {root.pid: root}
    try:
        for child in root.children(recursive=True):
            procs[child.pid] = child
    except psutil.NoSuchProcess:
        pass
    # Descendants that were re-parented (double fork) still carry the session id.
    for proc in psutil.process_iter(["pid"]):
        if proc.pid in procs:
            continue
        try:
            if os.getsid(proc.pid) == session:
                procs[proc.pid] = proc
        except (ProcessLookupError, PermissionError, OSError):
            pass
    return list(procs.values())


def run_measured(cmd: Sequence[str], log_path: str, env: dict | None = None,
                 timeout: float | None = None) -> tuple[int, float, int, int]:
    """(exit code, wall seconds, peak RSS summed over the process tree, peak process count)."""
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        start = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
        root = psutil.Process(proc.pid)
        peak = peak_count = 0
        while True:
            total = 0
            tree = _tree(root, proc.pid)
            for member in tree:
                try:
                    total += member.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    pass
            peak = max(peak, total)
            peak_count = max(peak_count, len(tree))
            try:
                code = proc.wait(timeout=SAMPLE_SECONDS)
                break
            except subprocess.TimeoutExpired:
                pass
            if timeout is not None and time.monotonic() - start > timeout:
                for member in reversed(_tree(root, proc.pid)):
                    try:
                        member.kill()
                    except psutil.Error:
                        pass
                code = proc.wait()
                log.write(f"\n[compare] killed after {timeout} s\n")
                break
        wall = time.monotonic() - start
    return code, wall, peak, peak_count


def _new_mags(before: dict, after_dataset: str) -> dict:
    after = dscompare.layer_mags(dscompare.load_properties(after_dataset))
    return {layer: [dscompare.mag_name(m) for m in mags if m not in before.get(layer, {})]
            for layer, mags in after.items()}




def _verify(reference_output: str, output: str) -> tuple[bool, str]:
    comparison = dscompare.compare_datasets(reference_output, output)
    if comparison.ok:
        return True, ""
    parts = []
    if not comparison.properties_equal:
        parts.append(f"properties: {'; '.join(comparison.properties_diff[:3])}")
    if comparison.json_diffs:
        parts.append(f"zarr.json: {'; '.join(comparison.json_diffs[:3])}")
    for array in comparison.arrays:
        if not array.ok:
            text = f"{array.layer} {array.mag}: {array.cell()}"
            if array.example:
                text += f" (e.g. at {array.example['voxel_in_mag']}: reference {array.example['reference']}, " \
                        f"ours {array.example['ours']})"
            parts.append(text)
    return False, "; ".join(parts)


def print_table(runs: Sequence[Run], out=sys.stdout) -> None:
    print("\n| tool | wall s | peak tree RSS GB | MVox/s | speed vs ref sequential | voxel-identical |", file=out)
    print("|---|---|---|---|---|---|", file=out)
    for run in runs:
        if run.exit_code is None:
            print(f"| {run.label} | not run | - | - | - | - |", file=out)
            continue
        if run.exit_code != 0:
            print(f"| {run.label} | failed (exit {run.exit_code}) after {run.wall_seconds:.1f} s | "
                  f"{run.peak_tree_rss_bytes / 1e9:.2f} | - | - | - |", file=out)
            continue
        speed = f"{run.speed_vs_reference_sequential:.2f}x" if run.speed_vs_reference_sequential else "-"
        identical = {True: "yes", False: "NO", None: "n/a"}[run.identical]
        if run.kind == "reference-sequential" and run.identical is None:
            identical = "(reference)"
        print(f"| {run.label} | {run.wall_seconds:.1f} | {run.peak_tree_rss_bytes / 1e9:.2f} | "
              f"{run.mvox_per_second:.1f} | {speed} | {identical} |", file=out)
    for run in runs:
        if run.identical is False:
            print(f"\n{run.label}: differs from the reference: {run.identity_note}", file=out)
        if run.exit_code not in (0, None):
            print(f"\n{run.label}: failed:\n{run.error}", file=out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", nargs="?",
                        help="bench dataset (read only; created here by make_bench_dataset if --size is given and "
                             "it does not exist; default: one in the work dir, which needs --size)")
    parser.add_argument("--size", type=make_bench_dataset.parse_triple,
                        help="X,Y,Z of the bench dataset to create (e.g. 1024,1024,512)")
    parser.add_argument("--fill", choices=("data", "zero"), default="data", help="for a dataset created here")
    parser.add_argument("--skip-reference", action="store_true", help="only run (and time) ours")
    parser.add_argument("--ref-multiprocessing", action="store_true",
                        help="also run the reference with its default strategy (multiprocessing)")
    parser.add_argument("--ours-args", action="append", default=None, metavar="FLAGS",
                        help="extra flags for beam-downsample, one shell-quoted string (write --ours-args=--flag "
                             "for a single flag); repeat for several runs (default: one run, no extra flags)")
    parser.add_argument("--reference-output", metavar="DIR",
                        help="a reference output from an earlier run (--keep) to check ours against")
    parser.add_argument("--workdir", metavar="DIR", help="where the copies go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep every output (in the work dir)")
    parser.add_argument("--timeout", type=float, default=None, help="kill a run after this many seconds")
    parser.add_argument("--json", metavar="OUT", help="save the numbers as JSON")
    args = parser.parse_args(argv)

    workdir = os.path.abspath(args.workdir) if args.workdir else tempfile.mkdtemp(prefix="beam-downsample-bench-")
    os.makedirs(workdir, exist_ok=True)
    dataset = os.path.abspath(args.dataset) if args.dataset else os.path.join(workdir, "input")
    if not os.path.exists(dataset):
        if not args.size:
            parser.error(f"{dataset} does not exist; give --size to create a bench dataset")
        _log(f"writing the bench dataset {dataset} ({'x'.join(map(str, args.size))}) ...")
        make_bench_dataset.make_bench_dataset(dataset, args.size, fill=args.fill, log=lambda m: None)
    elif args.size:
        props = dscompare.load_properties(dataset)
        box = props["dataLayers"][0]["boundingBox"]
        if (box["width"], box["height"], box["depth"]) != tuple(args.size):
            parser.error(f"{dataset} exists with another size; remove it or drop --size")
    properties = dscompare.load_properties(dataset)
    voxels = dscompare.mag1_voxels(properties)
    before = dscompare.layer_mags(properties)

    runs: list[Run] = []
    if not args.skip_reference and not args.reference_output:
        cli = refenv.reference_cli()
        runs.append(Run("webknossos 4.3.3 sequential", [cli, "downsample", "{target}", "--distribution-strategy",
                                                         "sequential"], "reference-sequential"))
    if args.ref_multiprocessing:
        runs.append(Run("webknossos 4.3.3 multiprocessing", [refenv.reference_cli(), "downsample", "{target}"],
                        "reference-multiprocessing"))
    for extra in args.ours_args or [""]:
        label = "beam-downsample" + (f" {extra}" if extra else "")
        runs.append(Run(label, [*refenv.ours_command(), "{target}", *shlex.split(extra)], "ours"))

    reference_output = os.path.abspath(args.reference_output) if args.reference_output else None
    reference_wall = None
    status = 0
    try:
        for number, run in enumerate(runs):
            target = os.path.join(workdir, f"run{number}-{run.kind}")
            if os.path.exists(target):
                shutil.rmtree(target)
            _log(f"copying the input for {run.label} ...")
            shutil.copytree(dataset, target)
            run.output = target
            run.command = [target if part == "{target}" else part for part in run.command]
            env = refenv.reference_env() if run.kind.startswith("reference") else None
            _log(f"running {shlex.join(run.command)}")
            run.exit_code, run.wall_seconds, run.peak_tree_rss_bytes, run.peak_processes = run_measured(
                run.command, target + ".log", env=env, timeout=args.timeout)
            _log(f"{run.label}: exit {run.exit_code}, {run.wall_seconds:.1f} s, "
                 f"peak {run.peak_tree_rss_bytes / 1e9:.2f} GB")
            if run.exit_code != 0:
                run.error = refenv.tail(target + ".log", 6).strip()
                print(run.error, file=sys.stderr)
                status = 1
                continue
            run.mvox_per_second = voxels / 1e6 / run.wall_seconds
            run.new_mags = _new_mags(before, target)
            if run.kind == "reference-sequential":
                reference_wall = run.wall_seconds
                reference_output = target
            if reference_wall:
                run.speed_vs_reference_sequential = reference_wall / run.wall_seconds
            if run.kind != "reference-sequential" and reference_output:
                _log(f"comparing {run.label} with the reference output ...")
                run.identical, run.identity_note = _verify(reference_output, target)
                if not run.identical:
                    status = 1
            if not args.keep and run.kind != "reference-sequential":
                shutil.rmtree(target, ignore_errors=True)
    finally:
        print(f"\ndataset: {dataset} ({voxels / 1e6:.1f} MVox at mag 1 over {len(before)} layers); "
              f"machine: {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB")
        for run in runs:
            if run.new_mags:
                print(f"  {run.label}: new mags " + "; ".join(f"{k}: {', '.join(v) or '-'}"
                                                              for k, v in run.new_mags.items()))
        print_table(runs)
        if args.json:
            with open(args.json, "w", encoding="utf-8") as handle:
                json.dump({
                    "dataset": dataset,
                    "mag1_voxels": voxels,
                    "machine": {"cpus": os.cpu_count(), "memory_bytes": psutil.virtual_memory().total,
                                "python": platform.python_version()},
                    "runs": [dataclasses.asdict(r) for r in runs],
                }, handle, indent=2)
        if args.keep:
            print(f"\noutputs kept in {workdir}")
        elif not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            for run in runs:
                if run.output:
                    shutil.rmtree(run.output, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
