"""Beam's DaskRunner, closing the dask client it opens for each pipeline and
stopping cleanly on Ctrl-C.

Imported only for the dask strategies: the DaskRunner module needs dask.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import threading

import distributed
from apache_beam.runners.dask.dask_runner import DaskRunner, DaskRunnerResult

POLL_SECONDS = 0.25


@contextlib.contextmanager
def deferred_interrupts():
    """An Event set by Ctrl-C instead of a KeyboardInterrupt raised wherever the
    main thread happens to be: dask's gc callbacks and its event-loop calls
    swallow it there and the run would go on. Passes check the Event."""
    interrupted = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield interrupted
        return
    previous = signal.signal(signal.SIGINT, lambda *_: interrupted.set())
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous)


@dataclasses.dataclass
class ClientClosingResult(DaskRunnerResult):
    """Waits for the pass; on Ctrl-C cancels its units; always closes the pass's client."""

    interrupted: threading.Event = dataclasses.field(default_factory=threading.Event)

    def wait_until_finish(self, duration=None) -> str:
        try:
            while not self.interrupted.is_set():
                try:
                    distributed.wait(self.futures, timeout=POLL_SECONDS)
                    break
                except TimeoutError:
                    continue
            if self.interrupted.is_set():
                self.cancel()
                raise KeyboardInterrupt
            return super().wait_until_finish(duration)  # raises a unit's error
        finally:
            self.client.close()


class ClosingDaskRunner(DaskRunner):
    """DaskRunner whose run_pipeline leaves no client behind (one pipeline per
    pass) and whose passes stop when `interrupted` is set."""

    def __init__(self, interrupted: threading.Event):
        super().__init__()
        self.interrupted = interrupted

    def run_pipeline(self, pipeline, options):
        result = super().run_pipeline(pipeline, options)
        return ClientClosingResult(result.client, result.futures, self.interrupted)
