"""`beam-downsample TARGET [options] [Beam pipeline flags]`.

absl flags for our options; whatever is left must be a Beam pipeline flag
(checked, because Beam ignores typos) and goes to PipelineOptions. The
command is a thin layer over the library (`launch.api`): parse the flags,
call it, print, choose the exit status. Usage and dataset errors print one
line and exit with status 2 before anything is written; a fault during the
run exits with 1, Ctrl-C with 130.
"""

from __future__ import annotations

import gc

# No garbage collection while the imports below run (apache_beam, tensorstore, numpy make ~10^6
# objects, nearly all kept for good; the collector walked them over and over: ~0.1 CPU-s).
_COLLECTING = gc.isenabled()
gc.disable()

import logging  # noqa: E402 pylint: disable=wrong-import-position
import os
import sys
from typing import Sequence

from absl import flags

from beam_downsample.launch.worker import configure_quiet_logging

configure_quiet_logging()  # before Beam is imported: it warns about optional GCP clients

# pylint: disable=wrong-import-position
from beam_downsample.core.errors import Error, RunError, UsageError
from beam_downsample.core.machine import limit_malloc_arenas
from beam_downsample.kernels import reduce
from beam_downsample.launch import api, exiting, runners, verify_cli
from beam_downsample.launch.errors import usage_error
from beam_downsample.plan import refresh
from beam_downsample.run import accounting
from beam_downsample.run.job import UnitFailed
from beam_downsample.plan.options import SAMPLING_MODES

if _COLLECTING:
    gc.enable()

FLAGS = flags.FlagValues()

flags.DEFINE_string(
    "sampling-mode", "anisotropic",
    f"One of {', '.join(SAMPLING_MODES)}: how each step grows the mag: anisotropic follows the voxel size, "
    "isotropic doubles every axis, constant_z keeps z.", flag_values=FLAGS)
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
flags.DEFINE_string(
    "interpolation", None,
    f"One of {', '.join(reduce.INTERPOLATIONS)}: override the per-category default (color: median, "
    "segmentation: mode).", flag_values=FLAGS)
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
flags.DEFINE_multi_string(
    "bbox", None,
    "x,y,z,width,height,depth in mag-1 voxels: after an edit of the finest mag inside this box, refresh the "
    "layer's existing mags there (each mag's part of the box, aligned outward); planned mags the layer lacks "
    "are made in full. May be given several times: one refresh runs the union of the boxes' units once.",
    flag_values=FLAGS)
flags.DEFINE_string(
    "bbox-file", None,
    "More --bbox boxes from a file: one x,y,z,width,height,depth per line (# comments), or a JSON list of "
    "such strings, six-number lists or WEBKNOSSOS bounding boxes.", flag_values=FLAGS)
flags.DEFINE_bool("dry-run", False, "Print the plan and exit without touching the dataset.", flag_values=FLAGS)

USAGE = """usage: beam-downsample TARGET [options] [Beam pipeline flags, e.g. --runner=DirectRunner]

Downsamples a WEBKNOSSOS dataset (zarr3, zarr v2, wkw) into a mag pyramid, voxel-identical to
`webknossos downsample`, as an Apache Beam pipeline. TARGET is a directory or
gs://bucket/path (Application Default Credentials; STORAGE_EMULATOR_HOST for an emulator).
"""


def _flag_value(name: str):
    return FLAGS[name].value


def _refuse_repeated() -> None:
    """absl keeps the last value of a single-valued flag given twice: refused instead."""
    for flag in FLAGS.get_key_flags_for_module(__name__):
        if flag.present > 1 and not isinstance(flag, flags.MultiFlag):
            raise UsageError(f"--{flag.name} was given {flag.present} times; give it once "
                             "(only --bbox may be repeated)")


def _print_help() -> None:
    print(USAGE)
    print("options:")
    for flag in sorted(FLAGS.get_key_flags_for_module(__name__), key=lambda f: f.name):
        default = "" if flag.default is None else f" (default: {flag.default_as_str})"
        print(f"  --{flag.name}: {flag.help}{default}")
    print("  -h, --help: show this help and exit")
    print("\nAny other --flag must be an Apache Beam pipeline option (passed through to PipelineOptions).")


RESUME = "(only complete mags are listed; rerun the same command to resume)"
RETRY = "(only complete mags are listed; a rerun resumes)"  # after a unit's error, which names its remedy
INTERRUPTED = f"beam-downsample: interrupted {RESUME}"


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
        return usage_error(str(error).splitlines()[0])
    try:
        _refuse_repeated()
        target_candidates, beam_flags = runners.split_beam_flags(rest[1:])
        if not target_candidates:
            raise UsageError("missing TARGET (the dataset directory or gs://bucket/path); see --help")
        if len(target_candidates) > 1:
            raise UsageError(f"expected one TARGET, got {len(target_candidates)}: {' '.join(target_candidates)}")
        job = api.prepare(
            target_candidates[0],
            layer_name=_flag_value("layer-name"),
            sampling_mode=_flag_value("sampling-mode"),
            coarsest_mag=_flag_value("coarsest-mag"),
            interpolation=_flag_value("interpolation"),
            ignore_background=_flag_value("ignore-background"),
            bboxes=[refresh.parse_box(text) for text in _flag_value("bbox") or ()],
            bbox_file=_flag_value("bbox-file"),
            distribution_strategy=_flag_value("distribution-strategy"),
            jobs=_flag_value("jobs"),
            memory_budget=_flag_value("memory-budget"),
            job_resources=_flag_value("job-resources"),
            dask_scheduler=_flag_value("dask-scheduler"),
            pipeline_options=beam_flags,
        )
    except Error as error:
        return usage_error(str(error))
    print(job.plan)
    for warning in job.warnings:
        _warn(warning)
    if _flag_value("dry-run"):
        print(job.describe_engine())
        return 0
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    try:
        result = job.run(progress=True)
    except UnitFailed as error:  # names the object and the remedy already
        print(f"beam-downsample: error: {error} {RETRY}", file=sys.stderr)
        return 1
    except RunError as error:
        print(f"beam-downsample: error: {error} {RESUME}", file=sys.stderr)
        return 1
    except Error as error:
        return usage_error(str(error))
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return 130
    if result.dry_run:  # Dataflow's --dry_run=True: built, not run
        return 0
    if any(layer.made or layer.refreshed for layer in result.layers.values()):
        summary = ", ".join(f"{k}={v}" for k, v in sorted(accounting.work_metrics(result.metrics).items()))
        requests = accounting.describe(result.requests)
        print(("done: " + summary if summary else "done") + (f"; {requests}" if requests else ""))
    return 0


def _warn(message: str) -> None:
    print(f"beam-downsample: {message}", file=sys.stderr)


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
        print(f"beam-downsample: error: {type(error).__name__}: {api.root_cause(error)} (rerun the same command; "
              "BEAM_DOWNSAMPLE_VERBOSE=1 shows where it happened)", file=sys.stderr)
        status = 1
    exiting.exit_process(status)
