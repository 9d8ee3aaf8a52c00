"""Beam SDK worker process for the multiprocessing strategy, with quiet logs.

Beam's own worker bootstraps its root logger at INFO and prints a dozen
start-up lines per process; our handler lets only warnings and errors
through, minus the harmless ones every worker emits.
"""

import logging
import os
import sys

from beam_downsample.core.machine import limit_malloc_arenas

_HARMLESS = ("No semi_persistent_directory found", "apitools not found")


class HarmlessFilter(logging.Filter):
    """Drops start-up chatter, and Beam's own error tracebacks: a failing unit
    reaches the launcher as the pipeline's exception, which it prints in one
    line. BEAM_DOWNSAMPLE_VERBOSE=1 shows everything."""

    def filter(self, record: logging.LogRecord) -> bool:
        if os.environ.get("BEAM_DOWNSAMPLE_VERBOSE") == "1":
            return True
        if record.name.startswith("apache_beam") and record.levelno >= logging.ERROR:
            return False
        if record.name.startswith("distributed.nanny") and "Restarting worker" in record.getMessage():
            return False  # a lost worker: the launcher says so in one line
        return not any(text in record.getMessage() for text in _HARMLESS)


def configure_quiet_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.addFilter(HarmlessFilter())
    handler.setFormatter(logging.Formatter("worker %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)


def main() -> None:
    limit_malloc_arenas()
    configure_quiet_logging()
    from apache_beam.runners.worker import sdk_worker_main  # pylint: disable=import-outside-toplevel

    sdk_worker_main.main(sys.argv)
    from beam_downsample.launch import exiting  # pylint: disable=import-outside-toplevel

    exiting.exit_process(0)  # no kernel loader or other thread of ours runs into the interpreter's exit


if __name__ == "__main__":
    main()


def dask_setup(worker=None) -> None:  # pylint: disable=unused-argument
    """dask preload hook: the same quiet logs in the dask workers we start."""
    logging.getLogger().addFilter(HarmlessFilter())
