"""Helpers for test_resilience.py that child processes import.

Kept out of the test module so that a `spawn`ed child imports only
tensorstore and beam_downsample's io/work modules (not Beam or pytest).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import tensorstore as ts

from beam_downsample.core.config import PassConfig
from beam_downsample.core.machine import live_processes
from beam_downsample.store import arrays
from beam_downsample.transforms import work


def open_unit_arrays(config: PassConfig):
    """(source, targets) of a pass, opened with a context of their own (an independent writer)."""
    context = ts.Context(arrays.context_spec())
    source = arrays.open_array(config.source_spec, context, open=True)
    targets = [arrays.open_array(level.spec, context, open=True) for level in config.levels]
    return source, targets


def run_items_in_lockstep(items, barrier) -> None:
    """Runs every (config, unit) of `items`, waiting on `barrier` before each one, so that
    two callers sharing the barrier run the very same unit at the same time."""
    opened = {}
    for config, unit in items:
        key = (config.layer, config.pass_index)
        if key not in opened:
            opened[key] = open_unit_arrays(config)
        source, targets = opened[key]
        barrier.wait()
        work.run_unit(config, unit, source, targets)


# ---------------------------------------------------------------------------
# process groups


# The plan (unit sizes) depends on the cores a run may use; the tests pin runs to this many
# so that their plans are the same on every machine.
PINNED_CORES = 2


def pinned_cpus() -> set[int]:
    return set(sorted(os.sched_getaffinity(0))[:PINNED_CORES])


def _pinned(command: list[str]) -> list[str]:
    """`command` under taskset (not preexec_fn: this process has tensorstore's threads)."""
    if len(os.sched_getaffinity(0)) <= PINNED_CORES or shutil.which("taskset") is None:
        return command
    return ["taskset", "-c", ",".join(map(str, sorted(pinned_cpus())))] + command


def cli_command(*args) -> list[str]:
    return [sys.executable, "-m", "beam_downsample", *map(str, args)]


def run_cli_pinned(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    """conftest.run_cli, on at most PINNED_CORES cores."""
    return subprocess.run(_pinned(cli_command(*args)), capture_output=True, text=True, timeout=timeout)


def start_cli(log_dir, name: str, *args, cwd=None) -> subprocess.Popen:
    """The CLI in its own session (so its Beam workers share its process group), on at most
    PINNED_CORES cores; output to files."""
    os.makedirs(log_dir, exist_ok=True)
    out = open(os.path.join(log_dir, f"{name}.out"), "w", encoding="utf-8")  # pylint: disable=consider-using-with
    err = open(os.path.join(log_dir, f"{name}.err"), "w", encoding="utf-8")  # pylint: disable=consider-using-with
    proc = subprocess.Popen(_pinned(cli_command(*args)), stdout=out, stderr=err, text=True, start_new_session=True,
                            cwd=cwd)
    proc.log_files = (out, err)  # type: ignore[attr-defined]
    proc.log_paths = (out.name, err.name)  # type: ignore[attr-defined]
    return proc


def outputs(proc: subprocess.Popen) -> tuple[str, str]:
    """(stdout, stderr) of a finished `start_cli` process."""
    for handle in proc.log_files:  # type: ignore[attr-defined]
        handle.close()
    texts = []
    for path in proc.log_paths:  # type: ignore[attr-defined]
        with open(path, encoding="utf-8") as handle:
            texts.append(handle.read())
    return texts[0], texts[1]


def live_group_members(pgid: int) -> list[int]:
    """Pids of processes in group `pgid` that are not zombies (zombies write nothing)."""
    return [pid for pid, _, group in live_processes() if group == pgid]


def kill_group(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """kill -9 of the launcher and all its workers at once; returns when none of them runs."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=timeout)
    deadline = time.monotonic() + timeout
    while live_group_members(proc.pid):
        if time.monotonic() > deadline:
            raise AssertionError(f"processes of group {proc.pid} survive kill -9: {live_group_members(proc.pid)}")
        time.sleep(0.02)


def wait_until(predicate, proc: subprocess.Popen | None = None, timeout: float = 120.0, interval: float = 0.02) -> bool:
    """True as soon as `predicate()` holds; False if `proc` ends first (or on timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return bool(predicate())
        time.sleep(interval)
    return False
