"""`beam-downsample TARGET [options] [Beam pipeline flags]`.

absl flags for our options; whatever is left must be a Beam pipeline flag
(checked, because Beam ignores typos) and goes to PipelineOptions. Usage
errors print one line and exit with status 2 before anything is written.
"""

from __future__ import annotations

import gc

# No garbage collection while the imports below run (apache_beam, tensorstore, numpy make ~10^6
# objects, nearly all kept for good; the collector walked them over and over: ~0.1 CPU-s).
_COLLECTING = gc.isenabled()
gc.disable()

import logging  # noqa: E402 pylint: disable=wrong-import-position
import math
import os
import re
import sys
import time
from typing import Optional, Sequence

from absl import flags

from beam_downsample.launch.worker import configure_quiet_logging

configure_quiet_logging()  # before Beam is imported: it warns about optional GCP clients

# pylint: disable=wrong-import-position
from beam_downsample.core import machine, sizing
from beam_downsample.core.errors import PlanningError
from beam_downsample.core.machine import limit_malloc_arenas
from beam_downsample.core.mags import MagError, parse_mag
from beam_downsample.kernels import reduce
from beam_downsample.launch import exiting, runners, verify_cli
from beam_downsample import plan
from beam_downsample.plan import cost, refresh
from beam_downsample.plan.pyramid import SAMPLING_MODES
from beam_downsample.run import accounting, job
from beam_downsample.store import locks, storage, usage
from beam_downsample.store.properties import DatasetError, load_dataset

if _COLLECTING:
    gc.enable()

FLAGS = flags.FlagValues()

flags.DEFINE_enum(
    "sampling-mode", "anisotropic", SAMPLING_MODES,
    "How each step grows the mag: anisotropic follows the voxel size, isotropic doubles every axis, "
    "constant_z keeps z.", flag_values=FLAGS)
flags.DEFINE_string("layer-name", None, "Only downsample this layer (default: all layers).", flag_values=FLAGS)
flags.DEFINE_string(
    "coarsest-mag", None,
    "Stop at this mag: one power of two (8) or x-y-z (16-16-8). Default: "
    "max(2**ceil(log2(max(width, height) / 100)), 4).", flag_values=FLAGS)
flags.DEFINE_integer(
    "jobs", None,
    "Parallel workers: worker processes (multiprocessing, dask), SLURM jobs (slurm), "
    "worker pods (kubernetes), parallelism (flink), max workers (dataflow). Default for multiprocessing: none on "
    "machines with at most 2 cores (the units run in this process), else one worker process per 10 CPU-s of "
    "estimated work, at most the CPU cores and what the memory budget holds, at most a "
    "pass's units (fewer than two: the units run in this process); by default otherwise the number of CPU cores.",
    flag_values=FLAGS)
flags.DEFINE_string(
    "distribution-strategy", "multiprocessing",
    "multiprocessing (Beam FnApiRunner, --jobs worker processes), sequential (one process), "
    "dask (Beam DaskRunner on a dask.distributed cluster), slurm (DaskRunner on dask-jobqueue SLURM jobs), "
    "kubernetes (DaskRunner on dask-kubernetes pods), flink (Beam FlinkRunner), "
    "dataflow (Beam DataflowRunner, gs:// TARGET).", flag_values=FLAGS)
flags.DEFINE_string(
    "job-resources", None,
    "Cluster job resources as JSON ('{\"mem\": \"10M\"}') or key=value,key=value; required for slurm "
    "(mem, cpus, time, partition, account, any other #SBATCH option) and kubernetes (mem, cpu, image, namespace).",
    flag_values=FLAGS)
flags.DEFINE_string(
    "dask-scheduler", None,
    "With --distribution-strategy dask: address of a running dask scheduler to use (default: a LocalCluster "
    "of --jobs workers).", flag_values=FLAGS)
flags.DEFINE_enum(
    "interpolation", None, reduce.INTERPOLATIONS,
    "Override the per-category default (color: median, segmentation: mode).", flag_values=FLAGS)
flags.DEFINE_bool(
    "ignore-background", False,
    "Reduce each block over its non-zero voxels only (0 is background; a block without any gives 0): thin "
    "objects stay in the coarse mags and zero margins do not darken color. For mode, median, mean, min and max "
    "(nearest is unchanged); with --layer-name for that layer only. Not what webknossos downsample writes; a later "
    "--bbox refresh must use it too (recorded in LAYER/beam-downsample.json).", flag_values=FLAGS)
flags.DEFINE_string(
    "memory-budget", None,
    "Memory for the whole process tree (2GB = 2*10^9 bytes, 2G = 2GiB, 1500M); sizes the work units. "
    "By default 2G, or what the worker processes need (300 MiB each plus a 1 GiB unit) if more, at most half the "
    "machine's memory.",
    flag_values=FLAGS)
flags.DEFINE_string(
    "bbox", None,
    "x,y,z,width,height,depth in mag-1 voxels: after an edit of the finest mag inside this box, refresh the "
    "layer's existing mags there (each mag's part of the box, aligned outward); planned mags the layer lacks "
    "are made in full.", flag_values=FLAGS)
flags.DEFINE_bool("dry-run", False, "Print the plan and exit without touching the dataset.", flag_values=FLAGS)

USAGE = """usage: beam-downsample TARGET [options] [Beam pipeline flags, e.g. --runner=DirectRunner]
       beam-downsample verify TARGET [options]   (checks a pyramid; verify --help)

Downsamples a WEBKNOSSOS dataset (zarr3, zarr v2, wkw) into a mag pyramid, voxel-identical to
`webknossos downsample`, as an Apache Beam pipeline. TARGET is a directory or
gs://bucket/path (Application Default Credentials; STORAGE_EMULATOR_HOST for an emulator).
"""


INTERRUPTED = "beam-downsample: interrupted (only complete mags are listed; rerun the same command to resume)"


class _Usage(Exception):
    pass


def _fail(message: str) -> int:
    print(f"beam-downsample: error: {message}", file=sys.stderr)
    return 2


def _parse_size(text: str) -> int:
    """`2G`, `2GiB`, `1500M`: powers of 1024; `2GB`, `1500MB`: powers of 1000."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?)([bB]?)\s*", text)
    if not match:
        raise runners.UsageError(f"--memory-budget: {text!r} is not a size like 2G, 2GB or 1500M")
    prefix, binary, byte = match.group(2).lower(), match.group(3), match.group(4)
    base = 1000 if prefix and byte and not binary else 1024
    value = int(float(match.group(1)) * base ** " kmgt".index(prefix or " "))
    if value < 256 << 20:
        raise runners.UsageError(f"--memory-budget: {text!r} is too small (at least 256M)")
    return value


def _flag_value(name: str):
    return FLAGS[name].value


def _print_help() -> None:
    print(USAGE)
    print("options:")
    for flag in sorted(FLAGS.get_key_flags_for_module(__name__), key=lambda f: f.name):
        default = "" if flag.default is None else f" (default: {flag.default_as_str})"
        print(f"  --{flag.name}: {flag.help}{default}")
    print("  -h, --help: show this help and exit")
    print("\nAny other --flag must be an Apache Beam pipeline option (passed through to PipelineOptions).")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    if argv[1:2] == ["verify"]:  # `beam-downsample verify TARGET ...`: its own flags
        return verify_cli.main(argv[1:])
    if any(arg in ("-h", "--help", "-help", "--helpfull") for arg in argv[1:]):
        _print_help()
        return 0
    try:
        FLAGS.unparse_flags()
        rest = FLAGS(argv, known_only=True)
    except flags.Error as error:
        return _fail(str(error).splitlines()[0])
    start = usage.mark()  # the done line counts this run's storage requests from here
    try:
        target_candidates, beam_flags = runners.split_beam_flags(rest[1:])
    except runners.UsageError as error:
        return _fail(str(error))
    try:
        if not target_candidates:
            raise runners.UsageError("missing TARGET (the dataset directory or gs://bucket/path); see --help")
        if len(target_candidates) > 1:
            raise runners.UsageError(f"expected one TARGET, got {len(target_candidates)}: {' '.join(target_candidates)}")
        target = target_candidates[0]
        strategy = _flag_value("distribution-strategy")
        jobs = _flag_value("jobs")
        given_budget = None if _flag_value("memory-budget") is None else _parse_size(_flag_value("memory-budget"))
        engine = runners.plan_engine(
            strategy, jobs, beam_flags, _flag_value("job-resources"), target, given_budget or sizing.FLOOR_BUDGET,
            _flag_value("dask-scheduler"),
        )
        coarsest = None
        if _flag_value("coarsest-mag") is not None:
            try:
                coarsest = parse_mag(_flag_value("coarsest-mag"))
            except MagError as error:
                raise runners.UsageError(f"--coarsest-mag: {error}") from None
        box = None if _flag_value("bbox") is None else refresh.parse_box(_flag_value("bbox"))
        dataset = load_dataset(target)
        local = engine.worker_memory is None  # this machine's budget is shared by the launcher and its workers
        sized = _sizing(dataset, strategy, jobs, given_budget, box) if local else None
        if sized is not None:
            engine = runners.sized(engine, sized)
        options = plan.JobOptions(
            sampling_mode=_flag_value("sampling-mode"),
            layer_name=_flag_value("layer-name"),
            coarsest_mag=coarsest,
            interpolation=_flag_value("interpolation"),
            ignore_background=_flag_value("ignore-background"),
            memory_budget=sized.budget if sized else (given_budget or sizing.FLOOR_BUDGET),
            jobs=sized.processes if sized else (jobs or machine.available_cores()),
            worker_memory=engine.worker_memory,
            worker_cores=engine.worker_cores,
            bbox=box,
        )
        plans = plan.plan_job(dataset, options)
    except (runners.UsageError, DatasetError, PlanningError, storage.OutsideTargetError, sizing.SizingError,
            machine.MachineError, refresh.RefreshError) as error:
        return _fail(str(error))
    print(plan.describe(plans))
    for warning in plan.interrupted_refreshes(dataset, plans):
        _warn(warning)
    if _flag_value("dry-run"):
        if sized is not None:
            print(sized.describe(plan.pass_sizes(plans)))
        print(engine.describe())
        costs = cost.describe(plans)
        if costs:
            print(costs)
        return 0
    if not any(p.target_mags for p in plans):
        return 0
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    if engine.build_only:  # nothing is created, locked or listed
        try:
            job.build_jobs_only(plans, engine.runner, engine.options)
        except Exception as error:  # pylint: disable=broad-except
            return _fail(f"building the Dataflow job failed: {_root_cause(error)}")
        return 0
    try:
        with locks.LayerLocks(dataset, [p.layer.name for p in plans], log=_warn):
            job.create_targets(dataset, plans)
            with engine.started() as (runner, pipeline_options), _ProgressBar(_pass_voxels(plans)) as bar:
                metrics = job.run_job(
                    dataset, plans, runner, pipeline_options, report=bar.update, log=bar.write,
                    record_failures=engine.record_failures, report_seconds=bar.seconds,
                )
    except locks.LockError as error:
        return _fail(str(error))
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return 130
    except job.UnitFailed as error:  # names the object and the remedy already
        print(f"beam-downsample: error: {error} (only complete mags are listed; a rerun resumes)", file=sys.stderr)
        return 1
    except Exception as error:  # pylint: disable=broad-except
        print(
            f"beam-downsample: error: {_root_cause(error)} (only complete mags are listed; "
            "rerun the same command to resume)",
            file=sys.stderr,
        )
        return 1
    unlisted = job.unlisted_mags(dataset.path, plans)
    if unlisted:  # exit status 0 promises every planned mag listed
        print(f"beam-downsample: error: the run ended but {', '.join(unlisted)} are not listed in the properties "
              "(another process changed them?); rerun the same command to resume", file=sys.stderr)
        return 1
    summary = ", ".join(f"{k}={v}" for k, v in sorted(accounting.work_metrics(metrics).items()))
    requests = accounting.describe(accounting.storage_requests(metrics, start))
    print(("done: " + summary if summary else "done") + (f"; {requests}" if requests else ""))
    return 0


def _sizing(dataset, strategy: str, jobs, budget, box=None) -> sizing.Sizing:
    """Processes, budget and units for this machine (BEAM_DOWNSAMPLE_MACHINE plans for another);
    a refresh is sized for its box (each pass is sized again for its units when it starts)."""
    layer_name = _flag_value("layer-name")
    layers = [layer for layer in dataset.layers if layer_name is None or layer.name == layer_name]
    work = sizing.work_seconds(
        ((layer.bbox if box is None else layer.bbox.intersect(box)).voxels // max(math.prod(layer.source_mag), 1),
         layer.dtype.itemsize * layer.num_channels)
        for layer in layers
    )
    here = sizing.Machine(machine.available_cores(), machine.total_memory())
    return sizing.choose(here, strategy, jobs, budget, work)


def _warn(message: str) -> None:
    print(f"beam-downsample: {message}", file=sys.stderr)


def _root_cause(error: BaseException) -> str:
    """The innermost message of an error that Beam re-raised through its layers."""
    lines = [re.sub(r"\s*\[while running .*\]$", "", line.strip()) for line in str(error).splitlines()]
    for line in reversed([line for line in lines if line]):
        if not line.startswith(("File ", "Traceback", "raise ", "^", "return ")):
            return line[:500]
    return type(error).__name__


class _ProgressBar:
    """A tqdm bar on a terminal; in a log (not a terminal: a cluster job, a CI run) a line
    every LOG_SECONDS and when a pass completes, so that a long run is never silent until `done`.

    `pass_voxels[i]` is the source voxels of pass i+1 (all layers): the rate is the voxels
    of the units done in this run, per second.
    """

    LOG_SECONDS = 30.0

    def __init__(self, pass_voxels: Sequence[int] = (), stream=None, interval: Optional[float] = None,
                 clock=time.monotonic):
        self._pass_voxels = list(pass_voxels)
        self._stream = stream
        self._interval = self.LOG_SECONDS if interval is None else interval
        self._clock = clock

    def __enter__(self):
        self._bar = None
        self._label = None
        stream = self._stream or sys.stderr
        self._log = not (hasattr(stream, "isatty") and stream.isatty())
        return self

    @property
    def seconds(self) -> float:
        """How often this display shows progress (0: whenever asked): the bucket is read no more often."""
        return self._interval if self._log else 0.0

    def update(self, done: int, total: int, label: str) -> None:
        if self._log:
            self._log_line(done, total, label)
            return
        from tqdm import tqdm

        if label != self._label:
            if self._bar is not None:
                self._bar.close()
            self._bar = tqdm(total=total, desc=label, unit="unit", disable=None, file=self._stream or sys.stderr)
            self._label = label
        self._bar.n = done
        self._bar.refresh()

    def _log_line(self, done: int, total: int, label: str) -> None:
        now = self._clock()
        if label != self._label:  # a new pass: units done before (a resumed run) do not count for the rate
            self._label, self._start, self._first, self._last, self._ended = label, now, done, now, False
        if self._ended:
            return
        complete = done >= total
        if not complete and now - self._last < self._interval:
            return
        self._last, self._ended = now, complete
        match = re.match(r"pass (\d+)/", label)
        index = int(match.group(1)) - 1 if match else -1
        rate = ""
        if 0 <= index < len(self._pass_voxels) and total and now > self._start:
            voxels = (done - self._first) / total * self._pass_voxels[index]
            rate = f", {voxels / (now - self._start) / 1e6:.1f} Mvoxel/s"
        percent = 100 * done // total if total else 100
        self.write(f"{label}: {done}/{total} work units ({percent}%){rate}, {now - self._start:.0f} s")

    def write(self, message: str) -> None:
        print(message, file=self._stream or sys.stderr, flush=True)

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.close()


def _pass_voxels(plans) -> list[int]:
    """Source voxels of each pass, all layers together (what the progress rate counts)."""
    voxels: list[int] = []
    for layer_plan in plans:
        for index, a_pass in enumerate(layer_plan.passes):
            voxels.extend([0] * (index + 1 - len(voxels)))
            voxels[index] += layer_plan.grids[index].region.voxels
    return voxels


def run() -> None:
    """The console script: `main`, then the exit status of the contract (docs/exit-status.md):
    0 every planned mag listed, 1 a fault during the run, 2 bad usage or dataset, 130 Ctrl-C;
    no thread of ours outlives it (`exiting`)."""
    limit_malloc_arenas()
    try:
        status = main()
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        status = 130
    except Exception as error:  # pylint: disable=broad-except
        if os.environ.get("BEAM_DOWNSAMPLE_VERBOSE") == "1":
            raise
        print(f"beam-downsample: error: {type(error).__name__}: {_root_cause(error)} (rerun the same command; "
              "BEAM_DOWNSAMPLE_VERBOSE=1 shows where it happened)", file=sys.stderr)
        status = 1
    exiting.exit_process(status)
