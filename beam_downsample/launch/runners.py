"""Distribution strategies as Beam runners and pipeline options."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence

from apache_beam.options.pipeline_options import PipelineOptions

STRATEGIES = ("multiprocessing", "sequential", "slurm", "kubernetes")
NOT_YET = {"slurm", "kubernetes"}


class UsageError(ValueError):
    """A command-line problem: one line naming the option, exit status 2."""


def parse_job_resources(text: str) -> dict:
    """JSON (`{"mem": "10M"}`) or `key=value,key=value`, as the reference accepts."""
    text = text.strip()
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            raise UsageError(f"--job-resources: not valid JSON ({error.msg})") from None
        if not isinstance(value, dict):
            raise UsageError("--job-resources: expected a JSON object")
        return value
    resources = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--job-resources: {item!r} is neither JSON nor key=value")
        resources[key.strip()] = value.strip()
    if not resources:
        raise UsageError("--job-resources: empty")
    return resources


def _beam_option_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)

    def visit(cls: type) -> None:
        for sub in cls.__subclasses__():
            try:
                sub._add_argparse_args(parser)  # pylint: disable=protected-access
            except argparse.ArgumentError:
                pass  # an option two subclasses both declare
            visit(sub)

    visit(PipelineOptions)
    return parser


def split_beam_flags(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """(positional arguments, Beam flags) of what our flags left over.

    Beam ignores misspelt flags silently; we refuse anything Beam does not know,
    before a misspelt flag could swallow TARGET as its value.
    """
    _, unknown = _beam_option_parser().parse_known_args(list(args))
    for arg in unknown:
        if arg.startswith("-"):
            raise UsageError(f"unknown option {arg.split('=')[0]!r} (neither beam-downsample's nor Beam's; see --help)")
    positional = list(unknown)
    beam_flags = list(args)
    for arg in positional:
        beam_flags.remove(arg)
    return positional, beam_flags


def is_local(runner) -> bool:
    """Our own FnApiRunner strategies (not a runner given with --runner)."""
    return not isinstance(runner, str)


def pipeline_setup(strategy: str, jobs: int, beam_flags: Sequence[str]):
    """(runner, PipelineOptions) for a strategy; `--runner=...` in beam_flags wins."""
    if strategy in NOT_YET:
        raise UsageError(f"--distribution-strategy {strategy} is not yet supported (use multiprocessing or sequential)")
    options = PipelineOptions(list(beam_flags))
    user_runner = options.get_all_options().get("runner")
    if user_runner:
        return user_runner, options
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner  # pylint: disable=import-outside-toplevel

    if strategy == "sequential":
        return FnApiRunner(), PipelineOptions(list(beam_flags), direct_num_workers=1)
    # Our own worker command (quiet logs) instead of direct_running_mode=multi_processing,
    # which would replace it with Beam's default one.
    from apache_beam.transforms import environments  # pylint: disable=import-outside-toplevel

    logging.getLogger("apache_beam.runners.portability.fn_api_runner.fn_runner").setLevel(logging.ERROR)
    worker = environments.SubprocessSDKEnvironment.from_command_string(
        f"{sys.executable} -m beam_downsample.launch.worker"
    )
    return FnApiRunner(default_environment=worker), PipelineOptions(list(beam_flags), direct_num_workers=jobs)
