"""`beam-downsample verify TARGET [--layer-name NAME] [--sample N] [--seed S]
[--interpolation I] [--preview FILE.png]`: the findings of `beam_downsample.verify`
as lines, exit status 0 (nothing found), 1 (problems found, or a fault while
checking) or 2 (bad usage, or no dataset to check).

Flags of its own (a fresh absl `FlagValues` per call, no global state).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Optional, Sequence

from absl import flags

from beam_downsample.kernels import reduce
from beam_downsample.launch.errors import usage_error
from beam_downsample.store import storage
from beam_downsample.store.properties import DatasetError
from beam_downsample.verify import DEFAULT_SAMPLE, VerifyUsageError, verify

USAGE = """usage: beam-downsample verify TARGET [--layer-name NAME] [--sample N] [--seed S] [--interpolation I]
                              [--preview FILE.png]

Checks a WEBKNOSSOS dataset's mag pyramid without writing to it: the properties against the arrays,
every stored shard index and chunk of every mag beyond the finest, sample boxes of every such mag
recomputed from the mag before, and the OME-NGFF metadata. Exit status 0 if nothing is wrong,
1 if something is (one line each, naming the layer, mag and box), 2 on bad usage.
"""


def _flags() -> flags.FlagValues:
    values = flags.FlagValues()
    flags.DEFINE_string("layer-name", None, "Only verify this layer (default: all layers).", flag_values=values)
    flags.DEFINE_integer(
        "sample", DEFAULT_SAMPLE,
        "Boxes of 32^3 voxels to recompute per mag (a small mag is recomputed whole); 0: none.", lower_bound=0,
        flag_values=values)
    flags.DEFINE_integer("seed", 0, "Seed of the sample boxes' choice; another seed checks other boxes.",
                         lower_bound=0, flag_values=values)
    flags.DEFINE_enum(
        "interpolation", None, reduce.INTERPOLATIONS,
        "The reduction the pyramid was made with, if not the layer's default (color: median, segmentation: mode).",
        flag_values=values)
    flags.DEFINE_string(
        "preview", None,
        "Also write this PNG: the central z-slice of every mag of every layer side by side at the same physical "
        "size (segmentation ids in stable random colours).", flag_values=values)
    return values


def main(argv: Sequence[str]) -> int:
    """`argv`: ["verify", TARGET, options...]; returns the exit status."""
    argv = list(argv)
    values = _flags()
    if any(arg in ("-h", "--help", "-help", "--helpfull") for arg in argv[1:]):
        _print_help(values)
        return 0
    try:
        rest = values(argv)
    except flags.Error as error:
        return usage_error(str(error).splitlines()[0])
    if len(rest) != 2:
        return usage_error("verify needs one TARGET (the dataset directory or gs://bucket/path); see verify --help"
                     if len(rest) < 2 else f"verify takes one TARGET, got {len(rest) - 1}: {' '.join(rest[1:])}")
    preview = values["preview"].value
    problem = _preview_problem(preview)
    if problem:
        return usage_error(problem)
    try:
        with _Progress() as bar:
            result = verify(rest[1], layer_name=values["layer-name"].value, sample=values["sample"].value,
                            seed=values["seed"].value, interpolation=values["interpolation"].value, preview=preview,
                            progress=bar.update)
    except (VerifyUsageError, DatasetError, storage.OutsideTargetError) as error:
        return usage_error(str(error))
    except KeyboardInterrupt:
        print("beam-downsample: verify interrupted (nothing was written)", file=sys.stderr)
        return 130
    except Exception as error:  # pylint: disable=broad-except
        lines = [line for line in str(error).splitlines() if line.strip()]
        print(f"beam-downsample: error: verify failed: {lines[0] if lines else type(error).__name__}",
              file=sys.stderr)
        return 1
    for finding in result.findings:
        print(finding.line())
    if result.preview:
        print(f"preview: {result.preview}")
    if result.ok:
        print(f"verify: ok: {result.summary()}")
        return 0
    print(f"verify: {len(result.findings)} problem(s) found: {result.summary()}")
    return 1


def _preview_problem(path: Optional[str]) -> str:
    """Why `--preview` cannot be written ("" if it can), before anything is read."""
    if path is None:
        return ""
    if storage.is_gcs(path):
        return f"--preview: {path!r}: the preview is written to a local file"
    if not path.lower().endswith(".png"):
        return f"--preview: {path!r} must be a .png file"
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
        return f"--preview: {directory} is not a writable directory"
    if os.path.isdir(path):
        return f"--preview: {path} is a directory"
    return ""


def _print_help(values: flags.FlagValues) -> None:
    """The usage and absl's own rendering of the flags (wrapped, with defaults and bounds)."""
    print(USAGE)
    print("options:" + values.module_help(__name__).split(":", 1)[1])
    print("  -h, --help: show this help and exit")


class _Progress:
    """A tqdm bar per phase on a terminal; in a log, a line per phase when it ends and
    every LOG_SECONDS while it runs."""

    LOG_SECONDS = 30.0

    def __init__(self, stream=None, interval: Optional[float] = None, clock=time.monotonic):
        self._stream = stream or sys.stderr
        self._interval = self.LOG_SECONDS if interval is None else interval
        self._clock = clock
        self._bar = None
        self._label: Optional[str] = None
        self._log = not (hasattr(self._stream, "isatty") and self._stream.isatty())

    def __enter__(self):
        return self

    def update(self, done: int, total: int, label: str) -> None:
        now = self._clock()
        if label != self._label:
            self._close()
            self._label, self._start, self._last, self._ended = label, now, now, False
            if not self._log:
                from tqdm import tqdm  # pylint: disable=import-outside-toplevel

                self._bar = tqdm(total=total, desc=label, file=self._stream, disable=None)
        if self._bar is not None:
            self._bar.n = done
            self._bar.refresh()
        elif not self._ended and (done >= total or now - self._last >= self._interval):
            self._last, self._ended = now, done >= total
            print(f"{label}: {done}/{total} ({100 * done // max(total, 1)}%), {now - self._start:.0f} s",
                  file=self._stream, flush=True)

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __exit__(self, *exc):
        self._close()


if __name__ == "__main__":
    sys.exit(main(["verify", *sys.argv[1:]]))
