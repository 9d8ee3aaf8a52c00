"""Distribution strategies as Beam runners and pipeline options."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import logging
import os
import sys
from typing import Iterator, Optional, Sequence

from apache_beam.options.pipeline_options import PipelineOptions

from beam_downsample.core import sizing
from beam_downsample.core.machine import available_cores, total_memory
from beam_downsample.launch import clusters
from beam_downsample.launch.errors import UsageError

STRATEGIES = ("multiprocessing", "sequential", "dask", "slurm", "kubernetes", "flink", "dataflow")
LOCAL = ("multiprocessing", "sequential")
DASK_FAMILY = ("dask", "slurm", "kubernetes")
NEEDS_RESOURCES = ("slurm", "kubernetes")
BEAM_RUNNER = {"flink": "FlinkRunner", "dataflow": "DataflowRunner"}
SETUP_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "setup.py")


def parse_job_resources(text: str) -> dict:
    """JSON (`{"mem": "10M"}`) or `key=value,key=value`, as the reference accepts."""
    text = text.strip()
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            raise UsageError(f"--job-resources: not valid JSON ({error.msg})") from None
        if not isinstance(value, dict):
            raise UsageError("--job-resources: expected a JSON object")
        return value
    resources = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--job-resources: {item!r} is neither JSON nor key=value")
        resources[key.strip()] = value.strip()
    if not resources:
        raise UsageError("--job-resources: empty")
    return resources


def _beam_option_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)

    def visit(cls: type) -> None:
        for sub in cls.__subclasses__():
            try:
                sub._add_argparse_args(parser)  # pylint: disable=protected-access
            except argparse.ArgumentError:
                pass  # an option two subclasses both declare
            visit(sub)

    visit(PipelineOptions)
    return parser


def split_beam_flags(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """(positional arguments, Beam flags) of what our flags left over.

    Beam ignores misspelt flags silently; we refuse anything Beam does not know,
    before a misspelt flag could swallow TARGET as its value.
    """
    if any(arg.startswith("--dask_") for arg in args):
        _register_dask_options()
    _, unknown = _beam_option_parser().parse_known_args(list(args))
    for arg in unknown:
        if arg.startswith("-"):
            raise UsageError(f"unknown option {arg.split('=')[0]!r} (neither beam-downsample's nor Beam's; see --help)")
    positional = list(unknown)
    beam_flags = list(args)
    for arg in positional:
        beam_flags.remove(arg)
    return positional, beam_flags


def _local_runner(strategy: str, jobs: int, beam_flags: Sequence[str]) -> tuple[object, dict]:
    """(runner, option overrides) of multiprocessing/sequential, or the runner named by --runner.

    Ours is a LocalPasses: per pass, Beam's FnApiRunner in the launcher or with
    worker processes, as the sizing decides (see `sizing`).
    """
    user_runner = PipelineOptions(list(beam_flags)).get_all_options().get("runner")
    if user_runner:
        return user_runner, {}
    processes = 0 if strategy == "sequential" else jobs
    budget = sizing.budget_needed(processes)
    return LocalPasses(sizing.Sizing(sizing.Machine(available_cores(), total_memory()), budget, processes),
                       beam_flags), {}


class LocalPasses:
    """The multiprocessing and sequential strategies: each pass runs on Beam's FnApiRunner,
    with `Sizing.for_pass` worker processes (our worker command, quiet logs), or in the
    launcher where fewer than two would have work; tile threads follow the process count."""

    def __init__(self, sized: sizing.Sizing, beam_flags: Sequence[str]):
        self.sizing = sized
        self.flags = list(beam_flags)

    def for_pass(self, units: int, configs: Sequence, pipeline_options=None,
                 work: Optional[float] = None) -> tuple[object, PipelineOptions, list]:
        """(Beam runner, pipeline options, configs with this pass's tile threads) of a pass of
        `units` units and `work` estimated CPU-s."""
        del pipeline_options  # ours are built from the flags, with this pass's worker count
        # pylint: disable-next=import-outside-toplevel
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        processes, threads = self.sizing.for_pass(units, work)
        configs = [dataclasses.replace(config, threads=threads) for config in configs]
        if not processes:
            runner = FnApiRunner()
            runner.in_process = True  # the units run in this process's threads (run.supervise waits for them)
            return runner, PipelineOptions(self.flags, direct_num_workers=1), configs
        # Our own worker command (quiet logs) instead of direct_running_mode=multi_processing,
        # which would replace it with Beam's default one.
        from apache_beam.transforms import environments  # pylint: disable=import-outside-toplevel

        logging.getLogger("apache_beam.runners.portability.fn_api_runner.fn_runner").setLevel(logging.ERROR)
        worker = environments.SubprocessSDKEnvironment.from_command_string(
            f"exec {sys.executable} -m beam_downsample.launch.worker"  # exec: no shell between us and the worker
        )
        return FnApiRunner(default_environment=worker), PipelineOptions(self.flags, direct_num_workers=processes), configs

    def describe(self) -> str:
        most = self.sizing.processes
        if most >= 2:
            return f"Beam FnApiRunner, up to {most} worker processes (per pass: see above)"
        return f"Beam FnApiRunner in this process, {self.sizing.threads} tile threads"


def sized(engine: "Engine", sized_as: sizing.Sizing) -> "Engine":
    """The engine with the run's sizing: our local runner's processes, a LocalCluster's workers."""
    if isinstance(engine.runner, LocalPasses):
        runner = LocalPasses(sized_as, engine.flags)
        return dataclasses.replace(engine, runner=runner, summary=f"engine: {runner.describe()}")
    if isinstance(engine.cluster, clusters.LocalDask):
        engine.cluster.workers = max(sized_as.processes, 1)
    return engine


@dataclasses.dataclass
class Engine:
    """Where the passes run: a Beam runner, its options and, for the dask
    strategies, the cluster to start first.

    `worker_memory`/`worker_cores` size the work units for workers that are
    not on this machine (None: the local formula from --memory-budget/--jobs).
    """

    strategy: str
    runner: object  # a runner object, a Beam runner name, or None: DaskRunner once the cluster runs
    flags: list
    overrides: dict
    record_failures: bool
    summary: str
    cluster: Optional[clusters.Cluster] = None
    worker_memory: Optional[int] = None
    worker_cores: Optional[int] = None
    build_only: bool = False  # DataflowRunner's --dry_run=True: build each pass's job, run nothing

    @property
    def options(self) -> PipelineOptions:
        return PipelineOptions(self.flags, **self.overrides)

    def describe(self) -> str:
        """What --dry-run prints about the engine: for slurm/kubernetes the job script / cluster spec."""
        return self.summary + (f"\n{self.cluster.describe()}" if self.cluster else "")

    @contextlib.contextmanager
    def started(self) -> Iterator[tuple[object, PipelineOptions]]:
        """(runner, options) with the cluster running; the cluster is closed on exit, whatever happens."""
        if self.cluster is None:
            yield self.runner, self.options
            return
        # pylint: disable-next=import-outside-toplevel
        from beam_downsample.launch.dask_runner import ClosingDaskRunner, deferred_interrupts

        with deferred_interrupts() as interrupted, self.cluster.started() as address:
            if interrupted.is_set():  # Ctrl-C while the cluster started
                raise KeyboardInterrupt
            runner = ClosingDaskRunner(interrupted)
            runner.strategy = self.strategy  # how a lost worker is described (run.watch)
            runner.replacer = getattr(self.cluster, "replacer", None)  # lost SLURM jobs submitted again
            yield runner, PipelineOptions(self.flags, address=address, **self.overrides)


def plan_engine(
    strategy: str,
    jobs: Optional[int],
    beam_flags: Sequence[str],
    resources_text: Optional[str] = None,
    target: str = "",
    memory_budget: int = 2 << 30,
    dask_scheduler: Optional[str] = None,
) -> Engine:
    """Checks the strategy's options and describes its engine; starts nothing.

    `jobs` is None when --jobs was not given.
    """
    if strategy not in STRATEGIES:
        raise UsageError(f"--distribution-strategy: unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if jobs is not None and jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {jobs}")
    if jobs is not None and strategy == "sequential":
        raise UsageError("--jobs cannot be used with --distribution-strategy sequential")
    if dask_scheduler is not None and strategy != "dask":
        raise UsageError(f"--dask-scheduler is only for --distribution-strategy dask, not {strategy}")
    if dask_scheduler is not None and jobs is not None:
        raise UsageError("--jobs cannot be used with --dask-scheduler (the existing cluster has its own workers)")
    resources = None
    if resources_text is not None:
        if strategy not in NEEDS_RESOURCES:
            raise UsageError(f"--job-resources is only for slurm/kubernetes, not --distribution-strategy {strategy}")
        resources = parse_job_resources(resources_text)
    elif strategy in NEEDS_RESOURCES:
        raise UsageError(f"--job-resources is required with --distribution-strategy {strategy}")
    clusters.require_extra(strategy)
    flags = list(beam_flags)
    given = PipelineOptions(flags).get_all_options(drop_default=True)
    if strategy in LOCAL:
        workers = 1 if strategy == "sequential" else (jobs or available_cores())
        runner, overrides = _local_runner(strategy, workers, flags)
        name = runner if isinstance(runner, str) else runner.describe()
        return Engine(strategy, runner, flags, overrides, record_failures=not isinstance(runner, str),
                      summary=f"engine: {name}")
    if given.get("runner"):
        raise UsageError(f"--runner cannot be combined with --distribution-strategy {strategy}")
    if strategy in DASK_FAMILY:
        _register_dask_options()
        given = PipelineOptions(flags).get_all_options(drop_default=True)
        return _dask_engine(strategy, jobs, flags, given, resources, memory_budget, dask_scheduler)
    return _beam_runner_engine(strategy, jobs, flags, given, target, memory_budget)


def _register_dask_options() -> None:
    """Beam knows the --dask_* flags only once the DaskRunner module is imported (it needs dask)."""
    try:
        importlib.import_module("beam_downsample.launch.dask_runner")
    except ImportError:
        pass  # the flags stay unknown; the dask strategies say which extra to install


def _dask_engine(strategy, jobs, flags, given, resources, memory_budget, dask_scheduler) -> Engine:
    """Beam's DaskRunner. Each unit is its own dask partition (DaskRunner would put 128 in one),
    so the scheduler spreads units over the workers; a failing unit is recorded in one line
    (DaskRunner does not retry)."""
    if given.get("address"):
        raise UsageError("use --dask-scheduler ADDRESS instead of --dask_client_address")
    overrides = {} if given.get("npartitions") or given.get("partition_size") else {"partition_size": 1}
    workers = jobs or available_cores()
    memory, cores = clusters.worker_size(strategy, resources)
    if strategy == "dask":
        cluster = clusters.ExistingDask(dask_scheduler) if dask_scheduler else clusters.LocalDask(workers)
        memory = memory_budget if dask_scheduler else None  # a LocalCluster shares this machine: the local formula
    elif strategy == "slurm":
        cluster = clusters.Slurm(clusters.slurm_settings(resources, memory_budget), workers)
        memory = memory or memory_budget
    else:
        cluster = clusters.Kubernetes(clusters.kubernetes_settings(resources), workers)
        memory = memory or memory_budget
    return Engine(strategy, None, flags, overrides, record_failures=True, summary="engine: Beam DaskRunner",
                  cluster=cluster, worker_memory=memory, worker_cores=cores)


def _beam_runner_engine(strategy, jobs, flags, given, target, memory_budget) -> Engine:
    """FlinkRunner or DataflowRunner; our package is staged with --setup_file unless the workers have it."""
    overrides: dict = {"runner": BEAM_RUNNER[strategy]}
    if strategy == "dataflow":
        if not target.startswith("gs://"):
            raise UsageError(f"--distribution-strategy dataflow needs a gs:// TARGET, got {target!r}")
        missing = [f"--{key}" for key in ("project", "region", "temp_location") if not given.get(key)]
        if missing:
            raise UsageError(f"--distribution-strategy dataflow needs {', '.join(missing)}")
        if jobs is not None:
            overrides["max_num_workers"] = jobs
    elif jobs is not None and given.get("parallelism") is None:
        overrides["parallelism"] = jobs
    in_this_process = (given.get("environment_type") or "").upper() == "LOOPBACK"
    if not (in_this_process or given.get("setup_file") or given.get("sdk_container_image")):
        if not os.path.isfile(SETUP_FILE):
            raise UsageError(
                f"--distribution-strategy {strategy} stages beam-downsample with --setup_file, but there is no "
                "setup.py next to the package: pass --setup_file=PATH/setup.py or --sdk_container_image=IMAGE"
            )
        overrides["setup_file"] = SETUP_FILE
    settings = {**given, **overrides}
    shown = ", ".join(f"{key}={settings[key]}" for key in ("flink_master", "job_endpoint", "project", "region",
                                                           "environment_type", "parallelism", "max_num_workers",
                                                           "setup_file")
                      if settings.get(key) is not None)
    return Engine(strategy, BEAM_RUNNER[strategy], flags, overrides, record_failures=False,
                  summary=f"engine: Beam {BEAM_RUNNER[strategy]} ({shown})",
                  worker_memory=None if in_this_process else memory_budget,
                  build_only=strategy == "dataflow" and bool(given.get("dry_run")))
