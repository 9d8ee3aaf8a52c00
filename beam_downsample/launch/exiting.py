"""How a process of ours ends: no thread of ours runs into interpreter shutdown.

A thread still inside numba/LLVM when the interpreter finalizes can abort
or crash the process after its work is done (LLVM assertions, signal 6 or
11), and then the exit status lies. So before exiting, the launcher and its
worker processes stop loading compiled kernels (`reduce.shutdown`: the
kernel being compiled is finished, nothing new starts) and join every
thread named `beam-downsample-*` (the kernel loader, a pass's pipeline, the
progress reporter). A thread that is still blocked after that, or a
pipeline's thread that `run.supervise` abandoned (waiting on workers that
no longer exist), holds no work of ours: the process then leaves with
`os._exit` after flushing its output, without a finalization that could
run into it.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import threading
import time

from beam_downsample.kernels import reduce
from beam_downsample.run import supervise

THREAD_PREFIX = "beam-downsample"
LOADER_SECONDS = 300.0  # a kernel being compiled is finished (~1 CPU-s; minutes on a crowded machine)
OTHER_SECONDS = 5.0


def ours(thread: threading.Thread) -> bool:
    return thread.name.startswith(THREAD_PREFIX)


def finish_threads(loader_seconds: float = LOADER_SECONDS, other_seconds: float = OTHER_SECONDS) -> list[threading.Thread]:
    """Stops the kernel loaders and joins our threads; returns the ones still running."""
    reduce.shutdown(loader_seconds)
    deadline = time.monotonic() + other_seconds
    current = threading.current_thread()
    for thread in threading.enumerate():
        if thread is not current and ours(thread) and not thread.name.endswith(supervise.ABANDONED):
            thread.join(max(deadline - time.monotonic(), 0))
    return [t for t in threading.enumerate() if t is not current and ours(t) and t.is_alive()]


def exit_process(status: int) -> None:
    """Exits with `status` once our threads are done (see the module's doc); never returns."""
    left = finish_threads()
    # The interpreter's last collections at exit would walk every object left (Beam's pipeline,
    # numba's compiler state): 0.4-0.9 s on one core after the work is done. Frozen objects are skipped.
    gc.freeze()
    if left:
        if os.environ.get("BEAM_DOWNSAMPLE_VERBOSE") == "1":
            print(f"beam-downsample: leaving {len(left)} blocked thread(s): {', '.join(t.name for t in left)}",
                  file=sys.stderr)
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(status)  # pylint: disable=protected-access
    sys.exit(status)
