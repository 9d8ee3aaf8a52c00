"""Noticing dead worker processes, per engine.

Beam's multi-process FnApiRunner waits forever for a bundle whose worker
was killed (its control future is never resolved), and its gRPC threads
print tracebacks. Dask reruns a lost worker's tasks itself but waits
forever once no worker is left (every SLURM job cancelled). A watcher
tells the supervisor (`run.supervise`) within a second what
died, so that it can stop, report in one line and rerun the missing units.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import socket
import threading
import time
from typing import Optional

from beam_downsample.core.machine import live_processes, pid_alive
from beam_downsample.state import workerstate

WORKER_MODULE = "beam_downsample.launch.worker"
NO_WORKER_GRACE_SECONDS = 10.0
STATUS_WAIT_SECONDS = 3.0  # after the gRPC threads noticed a death, for Beam to report the exit status  # a SLURM job may be requeued or a nanny restart its worker meanwhile


@dataclasses.dataclass(frozen=True)
class Death:
    what: str  # e.g. "worker process killed by signal 9 (out of memory?)"
    address: Optional[str] = None  # a dask worker's


def describe_status(code: Optional[int]) -> str:
    """`killed by signal 9 (out of memory?)` for -9 (Popen) and 137 (a shell's 128+9)."""
    if code is None:
        return "died"
    number = -code if code < 0 else (code - 128 if code > 128 else None)
    if number is None:
        return f"exited with status {code}"
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = f"signal {number}"
    hint = {signal.SIGKILL: " (out of memory?)", signal.SIGTERM: " (terminated)"}.get(number, "")
    return f"killed by signal {number} ({name}){hint}" if not hint else f"killed by signal {number}{hint}"


class Watcher:
    """No watcher: the runner retries itself (Flink, Dataflow) or runs in this process (sequential)."""

    abandons_pipeline = False  # True: a death leaves the pipeline blocked, the supervisor must rerun

    def begin(self) -> None:
        """A pipeline of the pass starts."""

    def poll(self) -> list[Death]:
        return []

    def fatal(self, now: bool = False) -> Optional[str]:
        """A reason to give up the pass (no worker left: for a while, or `now`), else None."""
        return None

    def news(self) -> list[str]:
        """Lines for the log since the last call (e.g. a replacement job submitted)."""
        return []

    def alive(self, state: workerstate.WorkerState) -> bool:
        return state.host != socket.gethostname() or pid_alive(state.pid)

    def stop_workers(self) -> None:
        pass

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------
# multiprocessing: FnApiRunner with our SubprocessSDKEnvironment


_THREAD_ERRORS: list[tuple[str, BaseException]] = []
_HOOK_LOCK = threading.Lock()
_QUIET_THREADS = ("run_worker", "beam_control_read", "read_grpc_client_inputs")


def _install_thread_hook() -> None:
    """Beam's worker-handler threads die with a traceback when a worker is killed:
    record their errors (the exit status) instead of printing them."""
    with _HOOK_LOCK:
        if getattr(threading.excepthook, "_beam_downsample", False):
            return
        previous = threading.excepthook

        def hook(args):
            name = getattr(args.thread, "name", "") or ""
            if any(name.startswith(quiet) for quiet in _QUIET_THREADS):
                _THREAD_ERRORS.append((args.thread, args.exc_value))
                return
            previous(args)

        hook._beam_downsample = True  # type: ignore[attr-defined]
        threading.excepthook = hook


class LocalProcesses(Watcher):
    """The FnApiRunner's worker processes, children (via `sh -c`) of this process."""

    abandons_pipeline = True

    def __init__(self):
        _install_thread_hook()
        self._seen = len(_THREAD_ERRORS)
        self._old: set = set()

    def begin(self) -> None:
        """A new pipeline starts: errors of the threads of abandoned ones (whose workers
        we killed) are no news."""
        self._old = {t for t in threading.enumerate() if t.name.startswith(_QUIET_THREADS)}
        self._seen = len(_THREAD_ERRORS)

    def poll(self) -> list[Death]:
        deaths = []
        errors, self._seen = _THREAD_ERRORS[self._seen:], len(_THREAD_ERRORS)
        errors = [(thread, error) for thread, error in errors if thread not in self._old]
        for thread, error in errors:
            match = re.search(r"exited with return code (-?\d+)", str(error))
            if thread.name.startswith("run_worker"):
                code = int(match.group(1)) if match else None
                deaths.append(Death(f"worker process {describe_status(code)}"))
        if not deaths and errors:  # the gRPC threads noticed first: the exit status follows at once
            code = self._exit_status_soon(STATUS_WAIT_SECONDS)
            deaths.append(Death(f"worker process {describe_status(code)}"))
        return deaths

    def _exit_status_soon(self, seconds: float) -> Optional[int]:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for thread, error in _THREAD_ERRORS[self._seen:]:
                match = re.search(r"exited with return code (-?\d+)", str(error))
                if thread.name.startswith("run_worker") and thread not in self._old and match:
                    self._seen = len(_THREAD_ERRORS)
                    return int(match.group(1))
            time.sleep(0.05)
        return None

    def stop_workers(self) -> None:
        """SIGKILL every remaining worker of this process, so that the abandoned pipeline's
        threads end (they wait on the worker processes)."""
        for pid in _worker_descendants(os.getpid()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while _worker_descendants(os.getpid()) and time.monotonic() < deadline:
            time.sleep(0.05)


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for pid, parent, _ in live_processes():
        tree.setdefault(parent, []).append(pid)
    return tree


def _worker_descendants(root: int) -> list[int]:
    """Live worker processes below `root` (and the shells that started them)."""
    tree, found, stack = _children(), [], list(_children().get(root, []))
    while stack:
        pid = stack.pop()
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                command = handle.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if WORKER_MODULE in command:
            found.append(pid)
        stack.extend(tree.get(pid, []))
    return found


# ---------------------------------------------------------------------------
# dask, slurm, kubernetes: the dask scheduler's view


class DaskWorkers(Watcher):
    """Dask reruns the tasks of a lost worker by itself (and gives up on a task after
    `distributed.scheduler.allowed-failures` deaths: KilledWorker). We report each lost
    worker in one line and give up when no worker is left."""

    KINDS = {  # strategy: (what a worker is, what happened to it)
        "dask": ("dask worker", "died"),
        "slurm": ("SLURM worker job", "ended (scancel, time limit, preemption or out of memory?)"),
        "kubernetes": ("worker pod", "ended (evicted, preempted or out of memory?)"),
    }

    def __init__(self, address: str, strategy: str = "dask", replacer=None):
        from distributed import Client  # pylint: disable=import-outside-toplevel

        self._client = Client(address, timeout=30, set_as_default=False)
        self._replacer = replacer  # submits lost SLURM jobs again (launch.clusters.JobReplacer), or None
        self._what, self._verb = self.KINDS.get(strategy, self.KINDS["dask"])
        self._known: dict[str, dict] = {}
        self._empty_since: Optional[float] = None
        self._ever = False

    def _workers(self) -> dict[str, dict]:
        try:
            return dict(self._client.scheduler_info(n_workers=-1).get("workers", {}))
        except Exception:  # pylint: disable=broad-except
            return dict(self._known)  # scheduler busy: judge nothing this time

    def poll(self) -> list[Death]:
        workers = self._workers()
        deaths = [Death(f"{self._what} {address} {self._verb}", address=address)
                  for address in self._known if address not in workers]
        self._known = workers
        if workers:
            self._ever, self._empty_since = True, None
        elif self._ever and self._empty_since is None:
            self._empty_since = time.monotonic()
        return deaths

    def fatal(self, now: bool = False) -> Optional[str]:
        if self._replacer is not None and self._replacer.waiting():
            return None  # a replacement job is on its way (it may wait in the queue)
        if now and self._ever and not self._workers():
            return f"no {self._what} is left" + self._used()
        if self._empty_since is not None and time.monotonic() - self._empty_since > NO_WORKER_GRACE_SECONDS:
            return f"no {self._what} is left" + self._used()
        return None

    def _used(self) -> str:
        if self._replacer is None:
            return ""
        return f" ({self._replacer.submitted} of at most {self._replacer.limit} replacements submitted)"

    def news(self) -> list[str]:
        return self._replacer.news() if self._replacer is not None else []

    def alive(self, state: workerstate.WorkerState) -> bool:
        if state.address:
            return state.address in self._known
        return state.host != socket.gethostname() or pid_alive(state.pid)

    def close(self) -> None:
        try:
            self._client.close(timeout=5)
        except Exception:  # pylint: disable=broad-except
            pass


def for_runner(runner, options) -> Watcher:
    """The watcher that fits `runner`: our multi-process FnApiRunner, a DaskRunner, or none."""
    try:
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner  # pylint: disable=import-outside-toplevel
        from apache_beam.transforms.environments import SubprocessSDKEnvironment  # pylint: disable=import-outside-toplevel
    except ImportError:  # pragma: no cover
        return Watcher()
    if isinstance(runner, FnApiRunner):
        environment = getattr(runner, "_default_environment", None)
        return LocalProcesses() if isinstance(environment, SubprocessSDKEnvironment) else Watcher()
    if type(runner).__name__.endswith("DaskRunner"):
        address = options.get_all_options().get("address") if options is not None else None
        if address:
            return DaskWorkers(address, getattr(runner, "strategy", "dask"), getattr(runner, "replacer", None))
    return Watcher()
