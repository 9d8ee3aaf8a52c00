"""Dask clusters for the dask, slurm and kubernetes strategies.

The mapping from `--job-resources` to each engine's own settings is kept in
pure functions; the optional packages (dask.distributed, dask-jobqueue,
dask-kubernetes) are imported only when a cluster is described or started,
so that a missing extra is one line naming it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import math
import re
import signal
import threading
import time
import uuid
import weakref
from typing import Iterator, Optional

from beam_downsample.launch.errors import UsageError

EXTRA_MODULES = {
    "dask": ("distributed",),
    "slurm": ("distributed", "dask_jobqueue"),
    "kubernetes": ("distributed", "dask_kubernetes.operator"),
    "gcp": ("apache_beam.runners.dataflow.internal.apiclient",),
}
STRATEGY_EXTRA = {"dask": "dask", "slurm": "slurm", "kubernetes": "kubernetes", "dataflow": "gcp"}

SLURM_NAMED = {"mem": "memory", "cpus": "job_cpu", "cpus-per-task": "job_cpu", "time": "walltime",
               "partition": "queue", "account": "account"}
KUBERNETES_KEYS = ("mem", "cpu", "image", "namespace")
# A dask worker pauses at 80% of its memory limit and waits for memory that only finishing its unit
# frees: a run would hang (seen with SLURM jobs of 400M). Units are sized to the memory; the nanny
# still kills a worker at 95%, which the launcher reports and reruns.
NO_PAUSE = tuple(f"export DASK_DISTRIBUTED__WORKER__MEMORY__{key}=False" for key in ("PAUSE", "SPILL", "TARGET"))


def require_extra(strategy: str) -> None:
    """Raises UsageError naming the pip extra when a strategy's packages are missing."""
    extra = STRATEGY_EXTRA.get(strategy)
    if extra is None:
        return
    for module in EXTRA_MODULES[extra]:
        try:
            import_keeping_sigint(module)
        except ImportError:
            raise UsageError(
                f"--distribution-strategy {strategy} needs the {extra!r} extra: "
                f"pip install 'beam-downsample[{extra}]'"
            ) from None


def import_keeping_sigint(module: str):
    """Imports `module`; dask_jobqueue replaces the SIGINT handler when imported (Ctrl-C would
    then raise SystemExit instead of KeyboardInterrupt, in a notebook too): it is put back."""
    in_main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGINT) if in_main else None
    try:
        return importlib.import_module(module)
    finally:
        if in_main and handler is not None and signal.getsignal(signal.SIGINT) is not handler:
            signal.signal(signal.SIGINT, handler)


def parse_memory(text, decimal_units: bool = False) -> int:
    """Bytes of a memory size: 10M, 4G, 4GB, 4Gi, or plain bytes.

    SLURM's K/M/G/T are powers of 1024; Kubernetes' (`decimal_units`) are
    powers of 1000 and only Ki/Mi/Gi/Ti are binary.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?)[bB]?\s*", str(text))
    if not match:
        raise UsageError(f"--job-resources: {text!r} is not a memory size like 4G or 4Gi")
    power = " kmgt".index(match.group(2).lower() or " ")
    base = 1000 if decimal_units and not match.group(3) else 1024
    return int(float(match.group(1)) * base**power)


# ---------------------------------------------------------------------------
# job resources -> engine settings (pure)


def slurm_settings(resources: dict, default_memory: int) -> dict:
    """SLURMCluster keyword arguments for `--job-resources`.

    Each SLURM job runs one dask worker with one thread, so it works on one
    unit at a time and the unit may use the whole job: `cpus` books the job's
    CPUs (the unit's tile threads), `mem` is the job's memory and the
    worker's memory limit. Any other key becomes `#SBATCH --key=value`.
    """
    settings: dict = {"cores": 1, "processes": 1, "job_name": "beam-downsample", "memory": None,
                      "job_extra_directives": [], "job_script_prologue": list(NO_PAUSE)}
    for key, value in resources.items():
        name = SLURM_NAMED.get(key.replace("_", "-"))
        if name == "job_cpu":
            settings[name] = _positive_int(key, value)
        elif name:
            settings[name] = str(value)
        elif value is True or value == "":
            settings["job_extra_directives"].append(f"--{key}")
        else:
            settings["job_extra_directives"].append(f"--{key}={value}")
    if settings["memory"] is None:
        settings["memory"] = f"{default_memory // (1 << 20)}MiB"
    else:
        settings["memory"] = f"{parse_memory(settings['memory']) // (1 << 20)}MiB"
    return settings


def kubernetes_settings(resources: dict) -> dict:
    """make_cluster_spec arguments and the namespace for `--job-resources`.

    `mem` and `cpu` become the pods' requests and limits (Kubernetes
    quantities, e.g. 4Gi, 500m); `image` must hold beam-downsample; each
    worker runs one unit at a time.
    """
    unknown = sorted(set(resources) - set(KUBERNETES_KEYS))
    if unknown:
        raise UsageError(
            f"--job-resources: unknown key(s) {', '.join(unknown)} for kubernetes (known: {', '.join(KUBERNETES_KEYS)})"
        )
    if not resources.get("image"):
        raise UsageError("--job-resources: kubernetes needs image=... (a container image with beam-downsample installed)")
    quantities = {}
    if "mem" in resources:
        parse_memory(resources["mem"], decimal_units=True)  # refuse what is no memory size
        quantities["memory"] = str(resources["mem"])
    if "cpu" in resources:
        _cpu_count(resources["cpu"])
        quantities["cpu"] = str(resources["cpu"])
    worker_command = "dask-worker --nthreads 1"
    if "mem" in resources:
        worker_command += f" --memory-limit {parse_memory(resources['mem'], decimal_units=True)}"
    return {
        "image": str(resources["image"]),
        "namespace": str(resources.get("namespace", "default")),
        "resources": {"requests": dict(quantities), "limits": dict(quantities)} if quantities else None,
        "worker_command": worker_command,
    }


def worker_size(strategy: str, resources: Optional[dict]) -> tuple[Optional[int], Optional[int]]:
    """(memory bytes, cores) of one cluster worker as the job resources give them, else None."""
    resources = resources or {}
    if strategy == "slurm":
        cpus = resources.get("cpus", resources.get("cpus-per-task", resources.get("cpus_per_task")))
        return (parse_memory(resources["mem"]) if "mem" in resources else None,
                _positive_int("cpus", cpus) if cpus is not None else None)
    if strategy == "kubernetes":
        return (parse_memory(resources["mem"], decimal_units=True) if "mem" in resources else None,
                _cpu_count(resources["cpu"]) if "cpu" in resources else None)
    return None, None


def _positive_int(key: str, value) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1:
        raise UsageError(f"--job-resources: {key} must be a positive whole number, got {value!r}")
    return number


def _cpu_count(value) -> int:
    """Whole cores of a Kubernetes CPU quantity (2, 1.5, 500m), at least 1."""
    text = str(value).strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(m?)", text)
    if not match:
        raise UsageError(f"--job-resources: cpu {value!r} is not a Kubernetes CPU quantity like 2 or 500m")
    cores = float(match.group(1)) / (1000 if match.group(2) else 1)
    return max(math.ceil(cores), 1)


# ---------------------------------------------------------------------------
# clusters


class Cluster:
    """A dask cluster to start for the run: `describe()` for --dry-run, `started()` for the run."""

    def describe(self) -> str:
        raise NotImplementedError

    @contextlib.contextmanager
    def started(self) -> Iterator[str]:
        """Yields the scheduler address; the cluster is closed on exit, also on errors and Ctrl-C."""
        raise NotImplementedError


class ExistingDask(Cluster):
    def __init__(self, address: str):
        self.address = address

    def describe(self) -> str:
        return f"dask: existing scheduler {self.address}"

    @contextlib.contextmanager
    def started(self) -> Iterator[str]:
        yield self.address


class LocalDask(Cluster):
    """A dask.distributed LocalCluster of `workers` processes with one thread each."""

    def __init__(self, workers: int):
        self.workers = workers

    def describe(self) -> str:
        return f"dask: LocalCluster of {self.workers} worker processes, 1 thread each"

    @contextlib.contextmanager
    def started(self) -> Iterator[str]:
        from distributed import LocalCluster  # pylint: disable=import-outside-toplevel

        cluster = LocalCluster(
            n_workers=self.workers, threads_per_worker=1, processes=True,
            dashboard_address=None, silence_logs=logging.ERROR, preload=["beam_downsample.launch.worker"],
        )
        with contextlib.closing(cluster):
            yield cluster.scheduler_address


class Slurm(Cluster):
    """A dask-jobqueue SLURMCluster scaled to `jobs` SLURM jobs; a job whose worker is lost
    (scancel, preemption, time limit, out of memory) is submitted again, REPLACEMENTS_PER_JOB
    x `jobs` times in all (`JobReplacer`)."""

    def __init__(self, settings: dict, jobs: int):
        self.settings = settings
        self.jobs = jobs
        self.replacer: Optional[JobReplacer] = None

    def job_script(self) -> str:
        """The script each job is submitted with, built by dask-jobqueue without starting a scheduler."""
        SLURMCluster = import_keeping_sigint("dask_jobqueue").SLURMCluster  # pylint: disable=invalid-name

        job = SLURMCluster.job_cls("tcp://<scheduler-address>:8786", name="dummy-name", **self.settings)
        return job.job_script()

    def describe(self) -> str:
        return (f"slurm: {self.jobs} job(s) of this script (sbatch); a lost job is submitted again, at most "
                f"{REPLACEMENTS_PER_JOB * self.jobs} times in all:\n{self.job_script()}")

    @contextlib.contextmanager
    def started(self) -> Iterator[str]:
        SLURMCluster = import_keeping_sigint("dask_jobqueue").SLURMCluster  # pylint: disable=invalid-name
        import dask  # pylint: disable=import-outside-toplevel

        # A lost job's entry is dropped this long after its worker left (then it can be replaced).
        with dask.config.set({"distributed.deploy.lost-worker-timeout": LOST_JOB_SECONDS}), \
                contextlib.closing(SLURMCluster(**self.settings)) as cluster:
            cluster.scale(jobs=self.jobs)
            self.replacer = JobReplacer(cluster, REPLACEMENTS_PER_JOB * self.jobs)
            try:
                yield cluster.scheduler_address
            finally:
                self.replacer.stop()


REPLACEMENTS_PER_JOB = 2
LOST_JOB_SECONDS = "1s"


class JobReplacer:
    """Submits a SLURM job again when it was lost, at most `limit` times in all.

    Runs as a periodic callback on the cluster's own event loop (no thread of ours):
    a job whose worker left is dropped by dask's SpecCluster (after
    `distributed.deploy.lost-worker-timeout`) but stays in its `worker_spec`; a job
    that left the queue before its worker joined (cancelled while pending) is
    dropped here, from `squeue`. `scale` then starts it again under the same name.
    Past the limit the entry is removed instead, so the run goes on with the jobs
    it has (and ends in one line once none is left). `news()` gives the
    launcher's log lines."""

    CHECK_MS = 500
    QUEUE_SECONDS = 5.0  # how often jobs whose worker has not joined are looked up in squeue
    ENDED = ("COMPLETING", "COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "PREEMPTED", "NODE_FAIL",
             "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "REVOKED", "SPECIAL_EXIT")

    def __init__(self, cluster, limit: int):
        from tornado.ioloop import PeriodicCallback  # pylint: disable=import-outside-toplevel

        self._cluster = cluster
        self.limit = limit
        self.submitted = 0
        self._seen: set = set()  # jobs that were started (before: their start is still under way)
        self._replacing: set = set()  # jobs submitted again whose new job has not started yet
        # every job whose worker joined (dask drops them when lost); weak: dask's close asserts that
        # every job still alive was closed, and a lost job is dropped unclosed
        self._joined_jobs: weakref.WeakSet = weakref.WeakSet()
        self._news: list[str] = []
        self._lock = threading.Lock()
        self._queue_checked = time.monotonic()
        self._callback = PeriodicCallback(self._check, self.CHECK_MS)
        cluster.loop.add_callback(self._callback.start)

    async def _check(self) -> None:
        cluster = self._cluster
        self._seen.update(cluster.workers)
        self._replacing.difference_update(cluster.workers)  # their new jobs are started
        joined = self._joined()
        self._joined_jobs.update(job for name, job in list(cluster.workers.items()) if name in joined)
        if time.monotonic() - self._queue_checked > self.QUEUE_SECONDS:
            self._queue_checked = time.monotonic()
            await self._drop_jobs_that_left_the_queue()
        # (scale() starts a replacement on the event loop later, once sbatch answers: not lost twice)
        lost = [name for name in list(cluster.worker_spec)
                if name not in cluster.workers and name in self._seen and name not in self._replacing]
        if not lost:
            return
        room = max(self.limit - self.submitted, 0)
        for name in lost[room:]:
            del cluster.worker_spec[name]
        replaced = lost[:room]
        self.submitted += len(replaced)
        self._replacing.update(replaced)
        with self._lock:
            for number in range(self.submitted - len(replaced) + 1, self.submitted + 1):
                self._news.append(f"submitted a replacement SLURM job ({number} of at most {self.limit} in this run)")
            if lost[room:]:
                self._news.append(f"no replacement for {len(lost) - room} lost SLURM job(s): all {self.limit} "
                                  "replacements of this run are used")
        if replaced:
            cluster.scale(jobs=len(cluster.worker_spec))  # starts the jobs missing from `workers`
            self._replacing.difference_update(cluster.workers)  # (started already)

    async def _drop_jobs_that_left_the_queue(self) -> None:
        """Jobs whose worker never joined and that SLURM no longer runs or queues are lost. (A job
        whose worker joined and left is dask's to drop, after `lost-worker-timeout`: dropping it here
        too could take its replacement for it, started under the same name meanwhile.)"""
        cluster = self._cluster
        jobs = {getattr(job, "job_id", None): (name, job) for name, job in list(cluster.workers.items())
                if job not in self._joined_jobs}
        jobs.pop(None, None)
        if not jobs:
            return
        queued = await self._queued(sorted(jobs))
        if queued is None:  # squeue could not tell: judge nothing
            return
        for job_id, (name, job) in jobs.items():
            # the same job still: not its replacement, started under the same name while squeue ran
            if job_id not in queued and cluster.workers.get(name) is job:
                del cluster.workers[name]

    @classmethod
    async def _queued(cls, job_ids: list) -> Optional[set]:
        """The ids among `job_ids` that SLURM still queues or runs; None if squeue fails."""
        try:
            process = await asyncio.create_subprocess_exec(
                "squeue", "-h", "-o", "%i %T", "-j", ",".join(job_ids),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(process.communicate(), timeout=30)
        except (OSError, asyncio.TimeoutError):
            return None
        if process.returncode != 0:
            return set() if b"Invalid job id" in err else None  # every id unknown: all of them ended long ago
        states = dict(line.split()[:2] for line in out.decode(errors="replace").splitlines() if len(line.split()) >= 2)
        return {job_id for job_id, state in states.items() if state not in cls.ENDED}

    def _joined(self) -> set:
        return {info.get("name") for info in dict(self._cluster.scheduler_info.get("workers", {})).values()}

    def news(self) -> list[str]:
        """Log lines since the last call."""
        with self._lock:
            news, self._news = self._news, []
        return news

    def waiting(self) -> bool:
        """Whether a job is submitted (or about to be) whose worker has not joined yet."""
        joined = self._joined()
        return any(name not in joined for name in list(self._cluster.worker_spec))

    def stop(self) -> None:
        self._cluster.loop.add_callback(self._callback.stop)


class Kubernetes(Cluster):
    """A DaskCluster resource for the dask-kubernetes operator with `workers` worker pods."""

    def __init__(self, settings: dict, workers: int, name: Optional[str] = None):
        self.settings = settings
        self.workers = workers
        self.name = name or f"beam-downsample-{uuid.uuid4().hex[:8]}"

    def spec(self) -> dict:
        from dask_kubernetes.operator import make_cluster_spec  # pylint: disable=import-outside-toplevel

        return make_cluster_spec(
            name=self.name, image=self.settings["image"], n_workers=self.workers,
            resources=self.settings["resources"], worker_command=self.settings["worker_command"],
        )

    def describe(self) -> str:
        return (f"kubernetes: DaskCluster in namespace {self.settings['namespace']} "
                f"(dask-kubernetes operator):\n{json.dumps(self.spec(), indent=2)}")

    @contextlib.contextmanager
    def started(self) -> Iterator[str]:
        from dask_kubernetes.operator import KubeCluster  # pylint: disable=import-outside-toplevel

        cluster = KubeCluster(custom_cluster_spec=self.spec(), namespace=self.settings["namespace"],
                              shutdown_on_close=True)
        with contextlib.closing(cluster):
            yield cluster.scheduler_address
