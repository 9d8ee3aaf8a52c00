"""A worker process dies mid-pass (kill -9 as the OOM killer would): the launcher
notices within seconds, says so in one line, reruns what the markers say is
missing, and its output is byte-identical to an undisturbed run. A unit that
keeps killing its worker ends the run in one line naming the unit; a rerun
resumes to the same bytes.

The time from the kill to the launcher's line is printed (pytest -s) for the
issue's note.
"""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import time
import types

import numpy as np
import pytest
from test_resilience import copy_dataset, write_real_dataset

from conftest import require_module, tree_digest
from resilience_helpers import live_group_members, outputs, run_cli_pinned, start_cli, wait_until

STATE_DIR = ".beam-downsample"
# 32 MB units: 20 in pass 1 (4 color, 16 segmentation), a few seconds each on 2 workers.
ARGS = ("--memory-budget", "964M", "--jobs", "2")  # the least that holds 2 workers (sizing)
NOTICE_SECONDS = 10.0


@pytest.fixture(scope="module")
def base(tmp_path_factory, segmentation):
    path = tmp_path_factory.mktemp("wd") / "base"
    write_real_dataset(path, np.ascontiguousarray(segmentation[:, :256, :128]))
    return path


@pytest.fixture(scope="module")
def clean(base, tmp_path_factory):
    path = copy_dataset(base, tmp_path_factory.mktemp("wd-clean") / "ds")
    result = run_cli_pinned(path, "--distribution-strategy", "sequential", "--memory-budget", "400M")
    assert result.returncode == 0, result.stderr
    return tree_digest(path)


def worker_states(dataset) -> list[dict]:
    states = []
    for path in glob.glob(os.path.join(str(dataset), STATE_DIR, "*", "*", "workers", "*.json")):
        try:
            with open(path, encoding="utf-8") as handle:
                states.append(json.load(handle))
        except (OSError, ValueError):
            continue  # being replaced
    return states


def kill_a_running_worker(dataset, proc, unit=None) -> tuple[dict, float]:
    """kill -9 of a worker that has started a unit (`unit`, if given); (its state, time of the kill)."""
    found = {}

    def running():
        for state in worker_states(dataset):
            if os.path.exists(os.path.join(state["marker_dir"], state["unit"] + ".done")):
                continue  # that worker is past its unit: killing it would lose nothing
            if unit is None or state["unit"] == unit:
                found["state"] = state
                return True
        return False

    assert wait_until(running, proc, timeout=120), "no worker started a unit"
    state = found["state"]
    os.kill(state["pid"], signal.SIGKILL)
    return state, time.monotonic()


def stderr_text(proc) -> str:
    with open(proc.log_paths[1], encoding="utf-8") as handle:  # type: ignore[attr-defined]
        return handle.read()


def seconds_until_noticed(proc, killed_at: float, needle: str, count: int = 1) -> float:
    assert wait_until(lambda: stderr_text(proc).count(needle) >= count, proc, timeout=60), stderr_text(proc)
    return time.monotonic() - killed_at


def finish(proc, timeout: float = 240) -> types.SimpleNamespace:
    try:
        proc.wait(timeout=timeout)
    except Exception:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    out, err = outputs(proc)
    return types.SimpleNamespace(returncode=proc.returncode, stdout=out, stderr=err)


def assert_no_traceback(text: str) -> None:
    assert "Traceback" not in text and "RpcError" not in text and "Killed" not in text.replace("killed", ""), text


def test_multiprocessing_worker_killed_mid_pass_run_finishes_identical(base, clean, tmp_path):
    dataset = copy_dataset(base, tmp_path / "ds")
    proc = start_cli(tmp_path / "logs", "mp", dataset, *ARGS, "--distribution-strategy", "multiprocessing")
    state, killed_at = kill_a_running_worker(dataset, proc)
    noticed = seconds_until_noticed(proc, killed_at, "worker process killed by signal 9 (out of memory?)")
    result = finish(proc)
    print(f"\nmultiprocessing kill -9: noticed after {noticed:.2f} s; stderr:\n{result.stderr}")
    assert noticed < NOTICE_SECONDS
    assert result.returncode == 0, result.stderr
    assert f"while running unit {state['unit']} of layer {state['layer']} (pid {state['pid']}) during pass 1" in result.stderr
    assert "again (run 2 of at most 4)" in result.stderr
    # stderr is a file, not a terminal: each pass ends with a progress line (tests/test_progress_log.py)
    assert re.search(r"^pass 1/\d: .*: (\d+)/\1 work units \(100%\), [\d.]+ Mvoxel/s", result.stderr, re.M)
    assert_no_traceback(result.stderr)
    assert tree_digest(dataset) == clean


def test_unit_that_keeps_killing_its_worker_is_named_and_rerun_resumes(base, clean, tmp_path):
    dataset = copy_dataset(base, tmp_path / "ds")
    proc = start_cli(tmp_path / "logs", "mp", dataset, *ARGS, "--distribution-strategy", "multiprocessing")
    # Some unit is done first, so that the markers a failed run must keep exist whatever the timing.
    assert wait_until(lambda: glob.glob(os.path.join(str(dataset), STATE_DIR, "*", "*", "*.done")), proc, timeout=120)
    state, killed_at = kill_a_running_worker(dataset, proc)
    times = [seconds_until_noticed(proc, killed_at, "killed by signal 9")]
    for kill in (2, 3):
        _, killed_at = kill_a_running_worker(dataset, proc, unit=state["unit"])
        times.append(seconds_until_noticed(proc, killed_at, "killed by signal 9", count=kill))
    result = finish(proc)
    print(f"\nsame unit killed 3 times: noticed after {', '.join(f'{t:.2f}' for t in times)} s; stderr:\n"
          f"{result.stderr}")
    assert max(times) < NOTICE_SECONDS
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"beam-downsample: error: unit {state['unit']} of layer {state['layer']} "
                           "killed its worker 3 times; lower --memory-budget or raise mem"), last
    assert_no_traceback(result.stderr)
    assert not glob.glob(os.path.join(str(dataset), STATE_DIR, "*.lock"))  # locks released
    assert glob.glob(os.path.join(str(dataset), STATE_DIR, "*", "*", "*.done"))  # markers kept
    assert not glob.glob(os.path.join(str(dataset), STATE_DIR, "*", "*", "workers", "*"))

    rerun = run_cli_pinned(dataset, *ARGS)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming:" in rerun.stderr
    assert tree_digest(dataset) == clean


def test_dask_worker_killed_mid_pass_run_finishes_identical(base, clean, tmp_path):
    require_module("distributed")
    dataset = copy_dataset(base, tmp_path / "ds")
    proc = start_cli(tmp_path / "logs", "dask", dataset, *ARGS, "--distribution-strategy", "dask")
    state, killed_at = kill_a_running_worker(dataset, proc)
    noticed = seconds_until_noticed(proc, killed_at, f"(pid {state['pid']}) during pass 1")
    result = finish(proc)
    print(f"\ndask kill -9: noticed after {noticed:.2f} s; stderr:\n{result.stderr}")
    assert noticed < NOTICE_SECONDS
    assert result.returncode == 0, result.stderr
    assert f"while running unit {state['unit']} of layer {state['layer']} (pid {state['pid']}) during pass 1" in result.stderr
    assert_no_traceback(result.stderr)
    assert tree_digest(dataset) == clean


def test_ctrl_c_of_the_launcher_mid_pass_stops_its_workers_quietly(base, tmp_path):
    """The pass runs in a thread: Ctrl-C still ends the run at once, stops the workers
    (no worker outlives the launcher to print gRPC errors) and keeps the markers."""
    dataset = copy_dataset(base, tmp_path / "ds")
    proc = start_cli(tmp_path / "logs", "mp", dataset, *ARGS, "--distribution-strategy", "multiprocessing")
    assert wait_until(lambda: worker_states(dataset), proc, timeout=120)
    os.kill(proc.pid, signal.SIGINT)
    interrupted_at = time.monotonic()
    result = finish(proc, timeout=60)
    print(f"\nCtrl-C: launcher ended {time.monotonic() - interrupted_at:.2f} s later")
    assert result.returncode == 130, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("beam-downsample: interrupted"), result.stderr
    assert_no_traceback(result.stderr)
    assert not live_group_members(proc.pid)
    assert not glob.glob(os.path.join(str(dataset), STATE_DIR, "*.lock"))


@pytest.mark.parametrize("code, text", [
    (-9, "killed by signal 9 (out of memory?)"),  # Popen's view
    (137, "killed by signal 9 (out of memory?)"),  # a shell's 128 + 9
    (-15, "killed by signal 15 (terminated)"),
    (-11, "killed by signal 11 (SIGSEGV)"),
    (1, "exited with status 1"),
])
def test_exit_status_in_words(code, text):
    from beam_downsample.run.watch import describe_status

    assert describe_status(code) == text
