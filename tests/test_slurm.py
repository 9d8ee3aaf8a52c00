"""`--distribution-strategy slurm` on a real one-node SLURM cluster (tests/slurm_cluster.py):
real sbatch jobs, output byte-identical to sequential, --job-resources in the
jobs as SLURM sees them, and `scancel` of worker jobs mid-pass.
"""

from __future__ import annotations

import glob
import os
import subprocess
import time

import pytest

from conftest import run_cli, tree_digest
from resilience_helpers import start_cli, wait_until
from test_resilience import copy_dataset
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

pytest.importorskip("dask_jobqueue")

# Two single-core jobs of 1G each (a worker process with numba, tensorstore and dask is ~330 MB).
RESOURCES = '{"mem": "1G", "cpus": 1, "time": "00:20:00", "partition": "%s"}' % slurm_setup.PARTITION
ARGS = ("--distribution-strategy", "slurm", "--jobs", "2", "--job-resources", RESOURCES)


def squeue(*args) -> list[str]:
    result = subprocess.run(["squeue", "-h", *args], capture_output=True, text=True, timeout=30, check=False)
    return result.stdout.split()


def scontrol_job(job_id: str) -> str:
    return subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30,
                          check=False).stdout


def running_slurm_worker(dataset, proc) -> dict:
    """The state of a worker that has started a unit, with the SLURM job it runs in."""
    found = {}

    def running():
        for state in worker_states(dataset):
            job = slurm_setup.job_of_pid(state["pid"])
            if job:
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


def test_slurm_every_worker_job_cancelled_ends_in_one_line_and_rerun_is_identical(slurm_cluster, base, clean,
                                                                                 tmp_path):
    dataset = copy_dataset(base, tmp_path / "ds")
    proc = start_cli(tmp_path / "logs", "slurm", dataset, *ARGS, cwd=tmp_path)
    running_slurm_worker(dataset, proc)
    subprocess.run(["scancel", "--user", "root"], check=True, timeout=30)
    cancelled_at = time.monotonic()
    result = finish(proc, timeout=120)
    ended = time.monotonic() - cancelled_at
    print(f"\nslurm scancel of every job: launcher ended {ended:.2f} s later; stderr:\n{result.stderr}")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("beam-downsample: error: no SLURM worker job is left during pass 1"), last
    assert_no_traceback(result.stderr)
    assert not glob.glob(os.path.join(str(dataset), STATE_DIR, "*.lock"))
    assert wait_until(lambda: not squeue("-o", "%i"), timeout=60)  # the launcher leaves no job behind

    rerun = run_cli(dataset, *ARGS, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert tree_digest(dataset) == clean


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
