"""What the caller asks of a job (the CLI's flags, the library's keywords) as plain data,
checked once for the command, the library and the Beam transform alike."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Optional

from beam_downsample.core.box import Box
from beam_downsample.core.errors import UsageError
from beam_downsample.core.mags import Mag, MagError, parse_mag
from beam_downsample.kernels.reduce import INTERPOLATIONS
from beam_downsample.plan import refresh

DEFAULT_MEMORY_BUDGET = 2 << 30
SAMPLING_MODES = ("anisotropic", "isotropic", "constant_z")


@dataclasses.dataclass(frozen=True)
class JobOptions:
    """The one options object that flows into planning (`plan_job`)."""

    sampling_mode: str = "anisotropic"
    layer_name: Optional[str] = None
    coarsest_mag: Optional[Mag] = None
    interpolation: Optional[str] = None
    # `--ignore-background`: reduce each block's non-zero voxels only (every layer planned, like `interpolation`)
    ignore_background: bool = False
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    jobs: int = 1  # worker processes the units are sized for; 0: the launcher runs the units itself
    # Cluster workers (not on this machine) run one unit at a time each, with this much memory and these cores.
    worker_memory: Optional[int] = None
    worker_cores: Optional[int] = None
    # `--bbox`/`--bbox-file` (mag-1 voxels, `refresh.normalised`): refresh the existing mags inside them (`refresh`)
    bboxes: tuple[Box, ...] = ()


def job_options(*, sampling_mode: str = "anisotropic", layer_name: Optional[str] = None, coarsest_mag: Any = None,
                interpolation: Optional[str] = None, ignore_background: bool = False, bboxes: Iterable[Any] = (),
                **sizing: Any) -> JobOptions:
    """JobOptions from what a user gave (flags or keywords): `coarsest_mag` as `8`, `"16-16-8"`
    or three numbers, boxes as `refresh.as_box` takes them; `sizing` are the other fields.
    Raises UsageError naming the option."""
    if sampling_mode not in SAMPLING_MODES:
        raise UsageError(f"--sampling-mode: {sampling_mode!r} is not one of {', '.join(SAMPLING_MODES)}")
    if interpolation is not None and interpolation not in INTERPOLATIONS:
        raise UsageError(f"--interpolation: {interpolation!r} is not one of {', '.join(INTERPOLATIONS)}")
    if not isinstance(ignore_background, bool):
        raise UsageError(f"--ignore-background: expected True or False, got {ignore_background!r}")
    if layer_name is not None and not isinstance(layer_name, str):
        raise UsageError(f"--layer-name: expected a layer's name, got {layer_name!r}")
    coarsest = None
    if coarsest_mag is not None:
        try:
            coarsest = parse_mag(coarsest_mag)
        except MagError as error:
            raise UsageError(f"--coarsest-mag: {error}") from None
    if isinstance(bboxes, str):
        bboxes = [bboxes]
    boxes = refresh.normalised(refresh.as_box(box, f"bboxes[{index}]") for index, box in enumerate(bboxes or ()))
    return JobOptions(sampling_mode=sampling_mode, layer_name=layer_name, coarsest_mag=coarsest,
                      interpolation=interpolation, ignore_background=ignore_background, bboxes=boxes, **sizing)
