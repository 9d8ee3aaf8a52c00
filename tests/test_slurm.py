"""`--distribution-strategy slurm` on a real one-node SLURM cluster (tests/slurm_cluster.py):
real sbatch jobs, output byte-identical to sequential, --job-resources in the
jobs as SLURM sees them, and `scancel` of worker jobs mid-pass: each lost job is
submitted again (a bounded number of times, `launch.clusters.JobReplacer`, whose
bound is checked without SLURM below) and the run finishes by itself.
"""

from __future__ import annotations

import asyncio
import glob
import os
import subprocess
import time
import types

import numpy as np
import pytest

from beam_downsample import demo
from conftest import require_module, run_cli, tree_digest
from resilience_helpers import start_cli, wait_until
from test_resilience import BIG_VOXEL_SIZE, cheap_color, copy_dataset
from test_workerdeath import (  # noqa: F401  (fixtures)
    NOTICE_SECONDS,
    STATE_DIR,
    assert_no_traceback,
    base,
    clean,
    finish,
    seconds_until_noticed,
    stderr_text,
    worker_states,
)
import slurm_cluster as slurm_setup

require_module("dask_jobqueue")

# Two single-core jobs of 1G each (a worker process with numba, tensorstore and dask is ~330 MB).
RESOURCES = '{"mem": "1G", "cpus": 1, "time": "00:20:00", "partition": "%s"}' % slurm_setup.PARTITION
ARGS = ("--distribution-strategy", "slurm", "--jobs", "2", "--job-resources", RESOURCES)


def squeue(*args) -> list[str]:
    result = subprocess.run(["squeue", "-h", *args], capture_output=True, text=True, timeout=30, check=False)
    return result.stdout.split()


def scontrol_job(job_id: str) -> str:
    return subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30,
                          check=False).stdout


def running_slurm_worker(dataset, proc, exclude=()) -> dict:
    """The state of a worker that has started a unit, with the SLURM job it runs in (not one of `exclude`)."""
    found = {}

    def running():
        for state in worker_states(dataset):
            job = slurm_setup.job_of_pid(state["pid"])
            if job and job not in exclude:
                found.update(state, job=job)
                return True
        return False

    assert wait_until(running, proc, timeout=180), stderr_text(proc)
    return found


def test_slurm_output_identical_to_sequential_and_job_resources_reach_the_jobs(slurm_cluster, base, clean,
                                                                             tmp_path):
    dataset = copy_dataset(base, tmp_path / "ds")
    proc = start_cli(tmp_path / "logs", "slurm", dataset, *ARGS, cwd=tmp_path)
    jobs: dict[str, str] = {}

    def both_jobs_seen():
        for job in squeue("-o", "%i"):
            jobs.setdefault(job, scontrol_job(job))
        return len(jobs) >= 2

    assert wait_until(both_jobs_seen, proc, timeout=120, interval=0.2), stderr_text(proc)
    result = finish(proc)
    assert result.returncode == 0, result.stderr
    assert tree_digest(dataset) == clean
    for text in jobs.values():
        assert "JobName=beam-downsample" in text
        assert f"Partition={slurm_setup.PARTITION}" in text
        assert "TimeLimit=00:20:00" in text
        assert "MinMemoryNode=1G" in text
        assert "NumCPUs=1" in text
    assert glob.glob(str(tmp_path / "slurm-*.out"))  # sbatch ran in the launcher's directory


def test_slurm_one_worker_job_cancelled_mid_pass_run_finishes_identical(slurm_cluster, base, clean, tmp_path):
    dataset = copy_dataset(base, tmp_path / "ds")
    proc = start_cli(tmp_path / "logs", "slurm", dataset, *ARGS, cwd=tmp_path)
    state = running_slurm_worker(dataset, proc)
    subprocess.run(["scancel", state["job"]], check=True, timeout=30)
    cancelled_at = time.monotonic()
    noticed = seconds_until_noticed(proc, cancelled_at, "SLURM worker job")
    result = finish(proc)
    print(f"\nslurm scancel of one of 2 jobs: noticed after {noticed:.2f} s; stderr:\n{result.stderr}")
    assert noticed < NOTICE_SECONDS
    assert result.returncode == 0, result.stderr
    assert "ended (scancel, time limit, preemption or out of memory?)" in result.stderr
    assert_no_traceback(result.stderr)
    assert tree_digest(dataset) == clean


def test_slurm_every_worker_job_cancelled_at_once_both_are_replaced_and_the_run_finishes(slurm_cluster, base, clean,
                                                                                        tmp_path):
    dataset = copy_dataset(base, tmp_path / "ds")
    proc = start_cli(tmp_path / "logs", "slurm", dataset, *ARGS, cwd=tmp_path)
    running_slurm_worker(dataset, proc)
    subprocess.run(["scancel", "--user", "root"], check=True, timeout=30)
    cancelled_at = time.monotonic()
    result = finish(proc, timeout=240)
    ended = time.monotonic() - cancelled_at
    print(f"\nslurm scancel of every job: launcher ended {ended:.2f} s later; stderr:\n{result.stderr}")
    assert result.returncode == 0, result.stderr
    # the first replacement may finish the pass before the other loss is seen (a job cancelled
    # before its worker joined is found in squeue every 5 s): one replacement is enough
    assert "submitted a replacement SLURM job (1 of at most 4 in this run)" in result.stderr
    assert "no SLURM worker job is left" not in result.stderr
    assert "(3 of at most 4" not in result.stderr  # two jobs lost, each replaced once at most
    assert_no_traceback(result.stderr)
    assert not glob.glob(os.path.join(str(dataset), STATE_DIR, "*.lock"))
    assert wait_until(lambda: not squeue("-o", "%i"), timeout=60)  # the launcher leaves no job behind
    assert tree_digest(dataset) == clean


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory, segmentation):
    """Two color and two segmentation layers of 512x256x128: four units of a few seconds each
    with 1G jobs (a unit never spans shards, so layers are what makes units here)."""
    data = np.ascontiguousarray(segmentation[:, :256, :128])
    color = cheap_color(data)
    path = tmp_path_factory.mktemp("slurm-four") / "base"
    demo.write_dataset(str(path), [
        {"name": "color", "category": "color", "data": color},
        {"name": "color2", "category": "color", "data": color[::-1].copy()},
        {"name": "segmentation", "category": "segmentation", "data": data},
        {"name": "segmentation2", "category": "segmentation", "data": data[::-1].copy()},
    ], BIG_VOXEL_SIZE)
    clean = copy_dataset(path, tmp_path_factory.mktemp("slurm-four-clean") / "ds")
    result = run_cli(clean, "--distribution-strategy", "sequential")
    assert result.returncode == 0, result.stderr
    return path, tree_digest(clean)


def test_slurm_each_job_cancelled_in_turn_is_replaced_and_the_run_finishes_identical(slurm_cluster, four_layers,
                                                                                   tmp_path):
    """scancel of the first job while it runs a unit, then of the second job: each is submitted
    again, and the run finishes by itself with the output of `sequential`. The second job is
    held (`scontrol suspend`) from the first cancel to its own, so the pass cannot end on it
    before both losses are seen: units take a second or two here."""
    base, clean = four_layers
    dataset = copy_dataset(base, tmp_path / "ds")
    proc = start_cli(tmp_path / "logs", "slurm", dataset, *ARGS, cwd=tmp_path)
    assert wait_until(lambda: len(squeue("-o", "%i")) >= 2, proc, timeout=120), stderr_text(proc)
    first = running_slurm_worker(dataset, proc)["job"]
    second = next(j for j in sorted(squeue("-o", "%i")) if j != first)
    assert proc.poll() is None and not pass_done(dataset), "the pass ended before the cancels"
    subprocess.run(["scontrol", "suspend", second], check=True, timeout=30)
    for turn, job in ((1, first), (2, second)):
        subprocess.run(["scancel", job], check=True, timeout=30)
        needle = f"submitted a replacement SLURM job ({turn} of at most 4 in this run)"
        assert wait_until(lambda n=needle: n in stderr_text(proc), proc, timeout=60), stderr_text(proc)
    result = finish(proc, timeout=400)
    print(f"\nslurm jobs {first}, {second} cancelled in turn; stderr:\n{result.stderr}")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("ended (scancel, time limit, preemption or out of memory?)") >= 1
    assert "(3 of at most 4" not in result.stderr  # each of the two replaced once
    assert_no_traceback(result.stderr)
    assert tree_digest(dataset) == clean
    assert wait_until(lambda: not squeue("-o", "%i"), timeout=60)


def pass_done(dataset) -> bool:
    """Whether every unit of the run has its done-marker (4 layers, one unit each)."""
    return len(glob.glob(os.path.join(str(dataset), STATE_DIR, "*", "*", "*.done"))) >= 4


def test_slurm_job_memory_too_small_for_a_unit_is_refused_naming_mem(slurm_cluster, base, tmp_path):
    dataset = copy_dataset(base, tmp_path / "ds")
    before = tree_digest(dataset)
    result = run_cli(dataset, "--distribution-strategy", "slurm", "--job-resources", "mem=300M,cpus=1",
                     cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "more than the 300 MiB of one worker; raise mem in --job-resources" in result.stderr
    assert not squeue("-o", "%i")  # nothing submitted
    assert tree_digest(dataset) == before


# ---------------------------------------------------------------------------
# the bound on replacements, without SLURM


class FakeJob:
    """A dask-jobqueue job as JobReplacer sees it (weakly referenced, like the real ones)."""

    def __init__(self, job_id=None):
        self.job_id = job_id


class FakeCluster:
    """What JobReplacer uses of a dask-jobqueue cluster: jobs planned (worker_spec), jobs
    started (workers), the scheduler's workers, scale() and the event loop."""

    def __init__(self, jobs):
        self.worker_spec = {f"job-{i}": {} for i in range(jobs)}
        self.workers: dict = {}
        self.scheduler_info: dict = {"workers": {}}
        self.scaled: list = []
        self.loop = types.SimpleNamespace(add_callback=lambda callback: None)

    def start(self, name):
        self.workers[name] = FakeJob()
        self.scheduler_info["workers"][f"tcp://{name}"] = {"name": name}

    def lose(self, name):
        del self.workers[name]
        del self.scheduler_info["workers"][f"tcp://{name}"]

    def scale(self, jobs):
        self.scaled.append(jobs)
        for name in self.worker_spec:
            self.workers.setdefault(name, FakeJob())  # submitted again; its worker joins later


def test_lost_jobs_are_submitted_again_at_most_the_bound_in_all():
    from beam_downsample.launch.clusters import JobReplacer  # pylint: disable=import-outside-toplevel

    cluster = FakeCluster(2)
    replacer = JobReplacer(cluster, limit=2)
    asyncio.run(replacer._check())  # pylint: disable=protected-access
    assert replacer.submitted == 0 and not cluster.scaled  # jobs still starting are not lost
    assert replacer.waiting()
    for name in list(cluster.worker_spec):
        cluster.start(name)
    asyncio.run(replacer._check())  # pylint: disable=protected-access
    assert not replacer.waiting() and replacer.news() == []

    cluster.lose("job-0")
    asyncio.run(replacer._check())  # pylint: disable=protected-access
    assert replacer.submitted == 1 and cluster.scaled == [2]
    assert replacer.news() == ["submitted a replacement SLURM job (1 of at most 2 in this run)"]
    assert replacer.waiting()  # its worker has not joined yet
    cluster.start("job-0")
    cluster.lose("job-0")
    cluster.lose("job-1")
    asyncio.run(replacer._check())  # pylint: disable=protected-access
    assert replacer.submitted == 2
    assert replacer.news() == ["submitted a replacement SLURM job (2 of at most 2 in this run)",
                               "no replacement for 1 lost SLURM job(s): all 2 replacements of this run are used"]
    assert len(cluster.worker_spec) == 1  # the job past the bound is given up
    cluster.start(next(iter(cluster.worker_spec)))
    assert not replacer.waiting()


def test_a_job_that_left_the_queue_before_its_worker_joined_is_lost_too(monkeypatch):
    """Cancelled while pending: no worker ever joined, so only squeue can tell it is gone."""
    from beam_downsample.launch.clusters import JobReplacer  # pylint: disable=import-outside-toplevel

    cluster = FakeCluster(2)
    cluster.scale(2)
    cluster.start("job-0")
    cluster.workers["job-1"] = FakeJob("17")  # submitted, never joined
    replacer = JobReplacer(cluster, limit=4)
    queue = {"17"}

    async def queued(ids):
        return {job_id for job_id in ids if job_id in queue}

    monkeypatch.setattr(replacer, "_queued", queued)
    monkeypatch.setattr(replacer, "QUEUE_SECONDS", 0.0)
    asyncio.run(replacer._check())  # pylint: disable=protected-access
    assert replacer.submitted == 0 and replacer.waiting()  # still queued: waiting for it
    queue.clear()  # scancel of the pending job
    asyncio.run(replacer._check())  # pylint: disable=protected-access
    asyncio.run(replacer._check())  # pylint: disable=protected-access
    assert replacer.submitted == 1
    assert replacer.news() == ["submitted a replacement SLURM job (1 of at most 4 in this run)"]


def test_jobs_lost_at_once_are_numbered_in_turn():
    from beam_downsample.launch.clusters import JobReplacer  # pylint: disable=import-outside-toplevel

    cluster = FakeCluster(2)
    replacer = JobReplacer(cluster, limit=4)
    for name in list(cluster.worker_spec):
        cluster.start(name)
    asyncio.run(replacer._check())  # pylint: disable=protected-access
    cluster.lose("job-0")
    cluster.lose("job-1")
    asyncio.run(replacer._check())  # pylint: disable=protected-access
    assert replacer.submitted == 2 and cluster.scaled == [2]
    assert replacer.news() == ["submitted a replacement SLURM job (1 of at most 4 in this run)",
                               "submitted a replacement SLURM job (2 of at most 4 in this run)"]


def test_a_lost_job_is_replaced_once_while_its_replacement_is_being_submitted():
    """scale() starts the new job later on the event loop (sbatch takes a while): checks in
    between do not count the job lost again."""
    from beam_downsample.launch.clusters import JobReplacer  # pylint: disable=import-outside-toplevel

    cluster = FakeCluster(2)
    replacer = JobReplacer(cluster, limit=4)
    for name in list(cluster.worker_spec):
        cluster.start(name)
    asyncio.run(replacer._check())  # pylint: disable=protected-access
    cluster.scale = lambda jobs: cluster.scaled.append(jobs)  # submits; the job starts only later
    cluster.lose("job-0")
    for _ in range(3):
        asyncio.run(replacer._check())  # pylint: disable=protected-access
    assert replacer.submitted == 1 and cluster.scaled == [2]
    cluster.start("job-0")  # the replacement started, then is lost in turn
    asyncio.run(replacer._check())  # pylint: disable=protected-access
    cluster.lose("job-0")
    asyncio.run(replacer._check())  # pylint: disable=protected-access
    assert replacer.submitted == 2


def test_a_replacement_started_while_squeue_runs_is_not_taken_for_the_lost_job(monkeypatch):
    """The lost job left the queue; while squeue says so, its replacement starts under the same
    name: that replacement is kept (dropping it would submit a third job and orphan the second)."""
    from beam_downsample.launch.clusters import JobReplacer  # pylint: disable=import-outside-toplevel

    cluster = FakeCluster(2)
    cluster.scale(2)
    cluster.start("job-0")
    lost = cluster.workers["job-1"] = FakeJob("17")
    replacer = JobReplacer(cluster, limit=4)
    replacement = FakeJob("18")

    async def queued(ids):
        assert cluster.workers["job-1"] is lost
        cluster.workers["job-1"] = replacement  # scale() ran meanwhile
        return set()

    monkeypatch.setattr(replacer, "_queued", queued)
    monkeypatch.setattr(replacer, "QUEUE_SECONDS", 0.0)
    asyncio.run(replacer._check())  # pylint: disable=protected-access
    assert cluster.workers["job-1"] is replacement
    assert replacer.submitted == 0 and replacer.news() == []


def test_no_worker_left_is_fatal_only_once_no_replacement_is_on_its_way():
    from beam_downsample.run.watch import DaskWorkers  # pylint: disable=import-outside-toplevel

    replacer = types.SimpleNamespace(waiting=lambda: True, submitted=2, limit=4, news=lambda: [])
    watcher = DaskWorkers.__new__(DaskWorkers)
    watcher._replacer, watcher._ever, watcher._empty_since = replacer, True, 0.0  # pylint: disable=protected-access
    watcher._what, watcher._known = "SLURM worker job", {}  # pylint: disable=protected-access
    watcher._workers = lambda: {}  # pylint: disable=protected-access
    assert watcher.fatal() is None and watcher.fatal(now=True) is None
    replacer.waiting = lambda: False
    assert watcher.fatal() == "no SLURM worker job is left (2 of at most 4 replacements submitted)"
