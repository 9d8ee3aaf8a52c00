"""What the caller asks of a job (the CLI's flags as plain data)."""

from __future__ import annotations

import dataclasses
from typing import Optional

from beam_downsample.core.box import Box
from beam_downsample.core.mags import Mag

DEFAULT_MEMORY_BUDGET = 2 << 30


@dataclasses.dataclass(frozen=True)
class JobOptions:
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
    bbox: Optional[Box] = None  # `--bbox` (mag-1 voxels): refresh the existing mags inside it (`refresh`)
