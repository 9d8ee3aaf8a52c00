"""Runs one pass's pipeline and survives dying workers.

The pipeline runs in a daemon thread while this module watches the
workers (`run.watch`). When a worker dies, the unit it was running is
read from its state file (`state.workerstate`), the death is reported in one
line, and the units without a done-marker (one listing) run again, a
bounded number of times. A unit that killed its worker KILLS_PER_UNIT times
is reported by name. Multi-process FnApiRunner pipelines never finish after
a death, so they are abandoned (their remaining workers killed, the thread
left blocked and renamed `... (abandoned)`: the process's exit does not wait
for it and leaves without finalizing under it, see `launch.exiting`); dask
reruns the lost tasks itself and we only watch.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from typing import Callable, Optional, Sequence

from beam_downsample.core.config import PassConfig
from beam_downsample.core.errors import RunError
from beam_downsample.core.grid import WorkUnit
from beam_downsample.run import watch
from beam_downsample.state import workerstate
from beam_downsample.store import storage

POLL_SECONDS = 0.25
RUNS_PER_PASS = 4  # the first run and up to three reruns of the units lost with workers
KILLS_PER_UNIT = 3
ABANDON_WAIT_SECONDS = 3.0
MEMORY_HINT = "lower --memory-budget or raise mem"
ABANDONED = " (abandoned)"  # the end of the name of a pass thread left blocked on dead workers


class WorkerDied(RunError):
    """Workers died and the pass cannot finish; the message is one line."""


class _Attempt:
    """One pipeline run in a daemon thread: its result, or the exception it raised.

    The end is an Event, not Thread.is_alive(): a join interrupted by Ctrl-C marks a
    running thread as stopped (CPython's bpo-45274 handling), and then its workers
    would not be stopped.
    """

    def __init__(self, start: Callable[[Sequence[WorkUnit]], object], units: Sequence[WorkUnit]):
        self.result = None
        self.error: Optional[BaseException] = None
        self._ended = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(start, units), daemon=True,
                                        name="beam-downsample-pass")
        self._thread.start()

    def _run(self, start, units) -> None:
        try:
            result = start(units)
            result.wait_until_finish()
            self.result = result
        except BaseException as error:  # pylint: disable=broad-except
            self.error = error
        finally:
            self._ended.set()

    def join(self, timeout: float) -> bool:
        """True when the pipeline has ended."""
        return self._ended.wait(timeout)

    def abandon(self) -> None:
        """The pipeline will never end (its workers are gone): nobody waits for its thread."""
        if not self._ended.is_set():
            self._thread.name += ABANDONED


def run_pass(
    index: int,
    units: Sequence[WorkUnit],
    configs: Sequence[PassConfig],
    start: Callable[[Sequence[WorkUnit]], object],
    missing: Callable[[], list[WorkUnit]],
    runner,
    options,
    log: Callable[[str], None] = print,
    cancel: Optional[Callable[[], None]] = None,
):
    """Runs `start(units)` (a Beam pipeline of the pass), rerunning `missing()` after deaths.

    Returns the last run's PipelineResult (for metrics; None if it was abandoned);
    raises the pipeline's error, or WorkerDied in one line. Interrupted (Ctrl-C), the
    workers are stopped; a pipeline running in this process (`runner.in_process`) is
    told to start no further unit (`cancel`) and waited for, so that nothing writes
    after the call returns (a second Ctrl-C stops waiting).
    """
    label = f"pass {index + 1}"
    state_dirs = sorted({workerstate.state_dir(c) for c in configs})
    kills: collections.Counter = collections.Counter()
    watcher = watch.for_runner(runner, options)
    attempt = None
    ended = False
    try:
        for run in range(1, RUNS_PER_PASS + 1):
            if run > 1:  # (the first run's were deleted with the pass's leftovers: run.job)
                workerstate.clear(state_dirs)
            watcher.begin()
            attempt = _Attempt(start, units)
            deaths = _watch(attempt, watcher, state_dirs, kills, label, log)
            if not deaths:
                if attempt.error is not None:
                    raise attempt.error
                ended = True
                return attempt.result
            if attempt.error is not None and not _lost_worker_error(attempt.error):
                raise attempt.error
            units = missing()
            if not units:
                ended = True
                return attempt.result
            if run == RUNS_PER_PASS:
                break
            log(f"beam-downsample: running the {len(units)} unfinished work unit(s) of {label} again "
                f"(run {run + 1} of at most {RUNS_PER_PASS})")
        raise WorkerDied(f"workers kept dying during {label} ({RUNS_PER_PASS} runs); {len(units)} work unit(s) "
                         f"are not done; {MEMORY_HINT}, then rerun to resume")
    finally:
        if attempt is not None and not attempt.join(0):  # Ctrl-C or giving up: no worker may outlive us
            watcher.stop_workers()
            if cancel is not None:
                cancel()
            if getattr(runner, "in_process", False):
                log(f"beam-downsample: stopping {label}: waiting for the running work unit to finish")
                while not attempt.join(POLL_SECONDS):
                    pass
        watcher.close()
        if not ended:  # (after a pass that ended, they go with the run's state, or when this pass starts again)
            workerstate.clear(state_dirs)


def _watch(attempt: _Attempt, watcher, state_dirs, kills, label, log) -> int:
    """Waits for the attempt; returns the number of worker deaths seen (0: it ran undisturbed)."""
    deaths = 0
    while not attempt.join(POLL_SECONDS):
        new = watcher.poll()
        if new:
            deaths += len(new)
            _attribute(new, watcher, state_dirs, kills, label, log)
            if watcher.abandons_pipeline:
                watcher.stop_workers()
                attempt.join(ABANDON_WAIT_SECONDS)
                attempt.abandon()
                return deaths
        for line in watcher.news():  # after the deaths they answer
            log(f"beam-downsample: {line}")
        reason = watcher.fatal()
        if reason:
            raise WorkerDied(f"{reason} during {label}: the pass cannot finish")
    if attempt.error is not None:  # failed: because workers died (maybe before we polled)?
        new = watcher.poll()
        if new:
            deaths += len(new)
            _attribute(new, watcher, state_dirs, kills, label, log)
        if _lost_worker_error(attempt.error):
            deaths = max(deaths, 1)
        reason = watcher.fatal(now=True) if deaths else None
        if reason:
            raise WorkerDied(f"{reason} during {label}: the pass cannot finish")
        if "KilledWorker" in f"{type(attempt.error).__name__} {attempt.error}":
            # dask gave up on a task whose workers died: name the unit if we know it
            worst = kills.most_common(1)
            if worst:
                (layer, unit), count = worst[0]
                raise WorkerDied(f"unit {unit} of layer {layer} killed its worker {count} times; {MEMORY_HINT}")
            raise WorkerDied(f"dask gave up on a work unit of {label} after its workers died "
                             f"(distributed.scheduler.allowed-failures); {MEMORY_HINT}")
    return deaths


def _attribute(new, watcher, state_dirs, kills, label, log) -> None:
    """One line per death, naming the unit the dead worker was running; raises when a unit
    has killed its worker KILLS_PER_UNIT times."""
    time.sleep(0.1)  # the state file of a worker killed right after starting a unit
    dead = [s for s in workerstate.read_all(state_dirs) if not watcher.alive(s)]
    running = []
    for state in dead:
        storage.delete(state.path)  # counted once
        if not storage.exists(os.path.join(state.marker_dir, state.unit + ".done")):
            kills[(state.layer, state.unit)] += 1
            running.append(state)
    for index, death in enumerate(new):
        state = next((s for s in running if death.address and s.address == death.address),
                     running[index] if index < len(running) else None)
        where = f" while running unit {state.unit} of layer {state.layer} (pid {state.pid})" if state else ""
        log(f"beam-downsample: {death.what}{where} during {label}")
    for (layer, unit), count in kills.items():
        if count >= KILLS_PER_UNIT:
            raise WorkerDied(f"unit {unit} of layer {layer} killed its worker {count} times; {MEMORY_HINT}")


def _lost_worker_error(error: BaseException) -> bool:
    """Errors that mean a worker died, not that a unit failed: dask's KilledWorker,
    Beam's 'Worker subprocess exited'."""
    text = f"{type(error).__name__}: {error}"
    return any(sign in text for sign in ("KilledWorker", "Worker subprocess exited", "CancelledError"))
