"""The `beam-downsample` command: `beam-downsample verify ...` goes straight to its own
command line (`verify_cli`), so that checking a pyramid does not import Apache Beam and
the run's machinery (~0.9 CPU-s, a third of verify's cost on the bench); everything
else is the run's (`cli`)."""

from __future__ import annotations

import sys


def run() -> None:
    if sys.argv[1:2] == ["verify"]:
        from beam_downsample.launch import verify_cli  # pylint: disable=import-outside-toplevel

        sys.exit(verify_cli.main(sys.argv[1:]))
    from beam_downsample.launch import cli  # pylint: disable=import-outside-toplevel

    cli.run()
