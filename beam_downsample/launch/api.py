"""The library: `prepare` checks and plans a job (touching nothing), `Job.run` runs it,
`downsample` does both. The command line (`launch.cli`) only parses flags into these
calls and prints what they return, so the command and the library cannot disagree.

Nothing here reads global state (no flag values); every call builds its own plan,
engine and runner, so calls can follow each other in one process (a notebook).
Errors are `core.errors`' family, each with the one line the command prints.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import math
import os
import re
import sys
import types
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

from beam_downsample.launch.worker import HarmlessFilter

# Beam warns through the root logger on import that optional GCP clients are missing: not for our users.
_QUIET = HarmlessFilter()
logging.getLogger().addFilter(_QUIET)
try:
    from beam_downsample.launch import runners  # pylint: disable=wrong-import-position
finally:
    logging.getLogger().removeFilter(_QUIET)

# pylint: disable=wrong-import-position
from beam_downsample.core import machine, sizing
from beam_downsample.core.errors import Error, RunError, UsageError
from beam_downsample.kernels import reduce
from beam_downsample.launch.progressbar import ProgressBar, pass_voxels
from beam_downsample import plan as planning
from beam_downsample.plan import cost, refresh
from beam_downsample.plan.options import job_options
from beam_downsample.run import accounting
from beam_downsample.run import job as running
from beam_downsample.run.result import LayerResult, planned_result
from beam_downsample.store import locks, storage, usage
from beam_downsample.store.properties import load_dataset

Progress = Union[bool, Callable[[int, int, str], None]]
Log = Callable[[str], None]
BoxLike = Any  # "x,y,z,w,h,d", six integers, a WEBKNOSSOS BoundingBox or its JSON form (refresh.as_box)
MIN_BUDGET = 256 << 20


@dataclasses.dataclass(frozen=True)
class Result:
    """What `downsample` (or `Job.run`) did.

    Attributes:
        target: the dataset.
        dry_run: True if nothing was run (`dry_run=True`, or Beam's `--dry_run=True` on Dataflow).
        plan: the plan as `beam-downsample --dry-run` prints it.
        layers: per layer name, what was made, refreshed, run and skipped (`LayerResult`).
        warnings: e.g. an interrupted refresh of other boxes that should be rerun.
        metrics: Beam's counters summed by name (empty where the runner reports none).
        requests: storage requests since `prepare` by kind (`reads`, `writes`, `lists`,
            `deletes`, `other`, `total`), this process's and its workers'; all 0 for a local dataset.
    """

    target: str
    dry_run: bool
    plan: str
    layers: dict[str, LayerResult]
    warnings: tuple[str, ...] = ()
    metrics: dict[str, int] = dataclasses.field(default_factory=dict)
    requests: dict[str, int] = dataclasses.field(default_factory=dict)


class Job:
    """A checked and planned job (`prepare`); nothing is touched until `run()`, which may be
    called once. `plan` is the plan as `--dry-run` prints it, `warnings` what the command
    prints before running."""

    def __init__(self, target: str, dataset, plans, engine, sized, warnings: Sequence[str], start=None):
        self.target = target
        self._start = usage.mark() if start is None else start  # requests are counted from here
        self._dataset, self._plans, self._engine, self._sized = dataset, plans, engine, sized
        self.plan: str = planning.describe(plans)
        self.warnings: tuple[str, ...] = tuple(warnings)
        self._ran = False

    def describe_engine(self) -> str:
        """Where the units would run: the sizing (local strategies) and the engine; on an object
        store, the storage requests each pass is estimated to send."""
        lines = [self._sized.describe(planning.pass_sizes(self._plans))] if self._sized is not None else []
        costs = cost.describe(self._plans)
        return "\n".join([*lines, self._engine.describe(), *([costs] if costs else [])])

    def planned(self) -> Result:
        """The result of a dry run: the plan, nothing run."""
        return Result(self.target, True, f"{self.plan}\n{self.describe_engine()}",
                      {p.layer.name: _planned_layer(p) for p in self._plans}, self.warnings)

    def run(self, progress: Progress = True, log: Optional[Log] = None) -> Result:
        """Runs the job: locks the layers, creates the new mags, runs the passes in order and
        lists each pass's mags. Raises RunError (resumable: call again with the same arguments),
        DatasetError (e.g. another run holds a layer); Ctrl-C stops the workers, leaves a
        resumable state and raises KeyboardInterrupt."""
        if self._ran:
            raise UsageError("this job has run already; prepare() a new one")
        self._ran = True
        if not any(p.target_mags for p in self._plans):
            return dataclasses.replace(self.planned(), dry_run=False)
        if self._engine.build_only:  # Dataflow's --dry_run=True: nothing is created, locked or listed
            try:  # what was built is output, like the plan (stdout by default)
                running.build_jobs_only(self._plans, self._engine.runner, self._engine.options, log=log or print)
            except Exception as error:  # pylint: disable=broad-except
                raise UsageError(f"building the Dataflow job failed: {root_cause(error)}") from error
            return self.planned()
        try:
            return self._run(progress, log or _print_to_stderr)
        except (Error, KeyboardInterrupt):
            raise
        except Exception as error:  # pylint: disable=broad-except
            raise RunError(root_cause(error)) from error
        finally:
            reduce.wait_for_loaders()

    def _run(self, progress: Progress, log: Log) -> Result:
        with locks.LayerLocks(self._dataset, [p.layer.name for p in self._plans], log=_prefixed(log)):
            running.create_targets(self._dataset, self._plans)
            with self._engine.started() as (runner, options), \
                    _Reporter(progress, self._plans, log) as (report, say, seconds):
                metrics, layers = running.run_job(self._dataset, self._plans, runner, options, report=report,
                                                  log=say, record_failures=self._engine.record_failures,
                                                  report_seconds=seconds)
        unlisted = running.unlisted_mags(self._dataset.path, self._plans)
        if unlisted:  # a run that returns promises every planned mag listed
            raise RunError(f"the run ended but {', '.join(unlisted)} are not listed in the properties "
                           "(another process changed them?)")
        return Result(self.target, False, self.plan, {layer.layer: layer for layer in layers}, self.warnings,
                      dict(accounting.work_metrics(metrics)), accounting.storage_requests(metrics, self._start))


def prepare(target: Union[str, os.PathLike], **options: Any) -> Job:
    """Checks the arguments and the dataset and plans the job; touches nothing.

    Takes `downsample`'s keywords but `progress`, `dry_run` and `log`. Raises UsageError or
    DatasetError with the line the command prints."""
    unknown = sorted(set(options) - set(_PLANNING))
    if unknown:
        raise TypeError(f"prepare() got an unexpected keyword argument {unknown[0]!r}")
    given = types.SimpleNamespace(**{**_PLANNING, **options})
    start = usage.mark()
    target = os.fspath(target)
    jobs = given.jobs
    if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int)):
        raise UsageError(f"--jobs must be an integer, got {jobs!r}")
    budget = None if given.memory_budget is None else parse_size(given.memory_budget)
    beam_flags = _beam_flags(given.pipeline_options)
    resources = given.job_resources
    resources = json.dumps(dict(resources)) if isinstance(resources, Mapping) else resources
    engine = runners.plan_engine(given.distribution_strategy, jobs, beam_flags, resources, target,
                                 budget or sizing.FLOOR_BUDGET, given.dask_scheduler)
    options = job_options(sampling_mode=given.sampling_mode, layer_name=given.layer_name,
                          coarsest_mag=given.coarsest_mag, interpolation=given.interpolation,
                          ignore_background=given.ignore_background,
                          bboxes=[*_listed(given.bboxes), *_file_boxes(given.bbox_file)])
    dataset = load_dataset(target)
    sized = None
    if engine.worker_memory is None:  # this machine's budget is shared by the launcher and its workers
        sized = _sizing(dataset, given.layer_name, given.distribution_strategy, jobs, budget, options.bboxes)
        engine = runners.sized(engine, sized)
    options = dataclasses.replace(
        options,
        memory_budget=sized.budget if sized else (budget or sizing.FLOOR_BUDGET),
        jobs=sized.processes if sized else (jobs or machine.available_cores()),
        worker_memory=engine.worker_memory,
        worker_cores=engine.worker_cores,
    )
    plans = planning.plan_job(dataset, options)
    return Job(target, dataset, plans, engine, sized, planning.interrupted_refreshes(dataset, plans), start)


def downsample(
    target: Union[str, os.PathLike],
    *,
    layer_name: Optional[str] = None,
    sampling_mode: str = "anisotropic",
    coarsest_mag: Union[None, str, int, Sequence[int]] = None,
    interpolation: Optional[str] = None,
    ignore_background: bool = False,
    bboxes: Optional[Iterable[BoxLike]] = None,
    bbox_file: Optional[str] = None,
    distribution_strategy: str = "multiprocessing",
    jobs: Optional[int] = None,
    memory_budget: Union[None, int, str] = None,
    job_resources: Union[None, str, Mapping[str, Any]] = None,
    dask_scheduler: Optional[str] = None,
    pipeline_options: Union[None, Sequence[str], Mapping[str, Any]] = None,
    progress: Progress = True,
    dry_run: bool = False,
    log: Optional[Log] = None,
) -> Result:
    """Downsamples a WEBKNOSSOS dataset into a mag pyramid, as `beam-downsample TARGET` does.

    Args:
        target: the dataset directory or `gs://bucket/path`.
        layer_name: only this layer (default: every layer).
        sampling_mode: `anisotropic`, `isotropic` or `constant_z`.
        coarsest_mag: stop at this mag: `8`, `"16-16-8"` or `(16, 16, 8)` (default as the command's).
        interpolation: override the per-category default (color: median, segmentation: mode).
        ignore_background: reduce each block over its non-zero voxels only (thin objects stay;
            not what webknossos writes; recorded per layer, and a later refresh must use it too).
        bboxes: after an edit of the finest mag inside these boxes (mag-1 voxels; each
            `"x,y,z,w,h,d"`, six integers or a WEBKNOSSOS BoundingBox), refresh the existing mags
            there; each pass runs the union of the boxes' units once.
        bbox_file: more boxes, from a file (one `x,y,z,w,h,d` per line, or a JSON list).
        distribution_strategy: multiprocessing, sequential, dask, slurm, kubernetes, flink or dataflow.
        jobs: parallel workers (the command's `--jobs`).
        memory_budget: bytes, or a size such as `"2G"`, `"2GB"`, `"1500M"`.
        job_resources: slurm/kubernetes job resources, a dict or the command's text.
        dask_scheduler: with `distribution_strategy="dask"`, a running scheduler's address.
        pipeline_options: Beam pipeline flags (`["--runner=DirectRunner"]`) or a dict of them.
        progress: a progress bar on stderr (True), none (False), or `callback(done, total, label)`.
        dry_run: plan only; the result holds the plan and nothing is touched.
        log: where messages go (resuming, a dead worker, a warning); default: stderr.

    Returns:
        A `Result`: per layer the mags made or refreshed, units run, skipped as empty or
        already done, voxels and bytes read and written.

    Raises:
        UsageError, DatasetError: bad arguments or dataset; nothing was touched.
        RunError: a fault during the run; only complete mags are listed and the same call resumes.
        KeyboardInterrupt: Ctrl-C; the workers are stopped and the same call resumes.
    """
    given = dict(locals())
    job = prepare(target, **{name: value for name, value in given.items() if name in _PLANNING})
    for warning in job.warnings:
        (log or _print_to_stderr)(f"beam-downsample: {warning}")
    return job.planned() if dry_run else job.run(progress=progress, log=log)


# downsample's keywords that `prepare` takes, with their defaults
_PLANNING = {name: parameter.default for name, parameter in inspect.signature(downsample).parameters.items()
             if parameter.kind is inspect.Parameter.KEYWORD_ONLY and name not in ("progress", "dry_run", "log")}


# ---------------------------------------------------------------------------
# arguments


def parse_size(value: Union[int, str]) -> int:
    """Bytes, or `2G`, `2GiB`, `1500M` (powers of 1024) and `2GB`, `1500MB` (powers of 1000);
    at least 256M."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise UsageError(f"--memory-budget: {value!r} is not a size like 2G, 2GB or 1500M")
    if isinstance(value, int):
        amount = value
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?)([bB]?)\s*", value)
        if not match:
            raise UsageError(f"--memory-budget: {value!r} is not a size like 2G, 2GB or 1500M")
        prefix, binary, byte = match.group(2).lower(), match.group(3), match.group(4)
        base = 1000 if prefix and byte and not binary else 1024
        amount = int(float(match.group(1)) * base ** " kmgt".index(prefix or " "))
    if amount < MIN_BUDGET:
        raise UsageError(f"--memory-budget: {value!r} is too small (at least 256M)")
    return amount


def _beam_flags(options: Union[None, Sequence[str], Mapping[str, Any]]) -> list[str]:
    """Beam flags from a list of flags or a dict (as Beam's PipelineOptions.from_dictionary
    reads one); each must be a flag Beam knows."""
    if options is None:
        return []
    if isinstance(options, str):
        raise UsageError(f"pipeline_options: expected a list of Beam flags, got the string {options!r}")
    if isinstance(options, Mapping):
        flags = []
        for key, value in options.items():
            if value is True:
                flags.append(f"--{key}")
            elif isinstance(value, (list, tuple)):
                flags.extend(f"--{key}={item}" for item in value)
            elif isinstance(value, dict):
                flags.append(f"--{key}={json.dumps(value)}")
            elif value is not None and value is not False:
                flags.append(f"--{key}={value}")
    else:
        flags = [str(flag) for flag in options]
    rest, beam_flags = runners.split_beam_flags(flags)
    if rest:
        raise UsageError(f"pipeline_options: {rest[0]!r} is not a Beam flag")
    return beam_flags


def _listed(bboxes: Optional[Iterable[BoxLike]]) -> list:
    return [bboxes] if isinstance(bboxes, str) else list(bboxes or ())


def _file_boxes(bbox_file: Optional[str]) -> list:
    """The boxes of a `--bbox-file` (local or gs://)."""
    if bbox_file is None:
        return []
    try:
        text = storage.read_text(os.fspath(bbox_file))
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"--bbox-file {bbox_file}: cannot be read ({error})") from None
    if text is None:
        raise UsageError(f"--bbox-file {bbox_file}: no such file")
    return refresh.parse_box_file(text, os.fspath(bbox_file))


def _sizing(dataset, layer_name, strategy: str, jobs, budget, boxes) -> sizing.Sizing:
    """Processes, budget and units for this machine (BEAM_DOWNSAMPLE_MACHINE plans for another);
    a refresh is sized for its boxes (each pass is sized again for its units when it starts)."""
    layers = [layer for layer in dataset.layers if layer_name is None or layer.name == layer_name]

    def voxels(layer) -> int:
        inside = [layer.bbox.intersect(box).voxels for box in boxes] if boxes else [layer.bbox.voxels]
        return sum(inside) // max(math.prod(layer.source_mag), 1)

    work = sizing.work_seconds((voxels(layer), layer.dtype.itemsize * layer.num_channels) for layer in layers)
    here = sizing.Machine(machine.available_cores(), machine.total_memory())
    return sizing.choose(here, strategy, jobs, budget, work)


# ---------------------------------------------------------------------------
# results, progress, messages


def _planned_layer(plan) -> LayerResult:
    return planned_result(plan, sum(len(indices) for indices in plan.planned))


def root_cause(error: BaseException) -> str:
    """The innermost message of an error that Beam re-raised through its layers."""
    lines = [re.sub(r"\s*\[while running .*\]$", "", line.strip()) for line in str(error).splitlines()]
    for line in reversed([line for line in lines if line]):
        if not line.startswith(("File ", "Traceback", "raise ", "^", "return ")):
            return line[:500]
    return type(error).__name__


def _print_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _prefixed(log: Log) -> Log:
    return lambda message: log(f"beam-downsample: {message}")


class _Reporter:
    """(report, log) of a run: a ProgressBar's (messages between its lines), a callback's, or none."""

    def __init__(self, progress: Progress, plans, log: Log):
        self._progress, self._plans, self._log = progress, plans, log
        self._bar: Optional[ProgressBar] = None

    def __enter__(self):
        if callable(self._progress):
            return self._progress, self._log, 0.0
        if not self._progress:
            return (lambda done, total, label: None), self._log, 0.0
        self._bar = ProgressBar(pass_voxels(self._plans)).__enter__()
        log = self._log if self._log is not _print_to_stderr else self._bar.write
        return self._bar.update, log, self._bar.seconds

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)

