"""What `verify` found: findings with their coordinates, and what it checked."""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

from beam_downsample.core.box import Box
from beam_downsample.core.mags import Mag, mag_name

# (done, total, label): called as the checks advance; a new label starts a new phase.
Progress = Callable[[int, int, str], None]


def no_progress(done: int, total: int, label: str) -> None:  # pylint: disable=unused-argument
    """The default progress callback: says nothing."""


@dataclasses.dataclass(frozen=True)
class Finding:
    """One problem: which check found it, where (layer, mag, box in the mag's voxels), and what."""

    check: str  # "metadata", "ngff", "record", "decode" or "sample"
    layer: str
    message: str
    mag: Optional[Mag] = None
    box: Optional[Box] = None  # in `mag`'s voxels

    def line(self) -> str:
        """One line naming the layer, the mag and the box."""
        where = f"layer {self.layer!r}"
        if self.mag is not None:
            where += f" mag {mag_name(self.mag)}"
        if self.box is not None:
            where += f" box {box_text(self.box)}"
            if self.mag is not None:
                where += f" (mag-1 --bbox {bbox_text(self.box.scaled_up(self.mag))})"
        return f"{where}: {self.message}"


@dataclasses.dataclass(frozen=True)
class Sample:
    """A box of `mag` (its voxels) recomputed from `source`."""

    layer: str
    mag: Mag
    source: Mag
    box: Box
    why: str  # "border", "data" (weighted to stored data), "coverage" (where an object is missing)


@dataclasses.dataclass
class VerifyResult:
    """Everything `verify` found and checked; `ok` when nothing was found."""

    target: str
    findings: list[Finding] = dataclasses.field(default_factory=list)
    samples: list[Sample] = dataclasses.field(default_factory=list)
    layers: int = 0
    mags: int = 0
    objects_decoded: int = 0  # shards, chunks or wkw files whose data was read
    chunks_decoded: int = 0  # chunks (wkw: files) of those, where the listing names them
    voxels_decoded: int = 0
    voxels_compared: int = 0
    seed: int = 0
    interpolations: dict = dataclasses.field(default_factory=dict)  # layer -> interpolation used
    preview: Optional[str] = None

    @property
    def ok(self) -> bool:
        return not self.findings

    def summary(self) -> str:
        """One line: what was checked."""
        return (
            f"{self.layers} layer(s), {self.mags} mag(s); decoded {self.chunks_decoded} chunk(s) in "
            f"{self.objects_decoded} object(s) ({self.voxels_decoded / 1e6:.1f} Mvoxel); recomputed "
            f"{len(self.samples)} sample box(es) ({self.voxels_compared / 1e6:.2f} Mvoxel, seed {self.seed})"
        )


def box_text(box: Box) -> str:
    """`x0-x1,y0-y1,z0-z1` (half-open)."""
    return ",".join(f"{a}-{b}" for a, b in zip(box.start, box.stop))


def bbox_text(box: Box) -> str:
    """`x,y,z,width,height,depth`, as `--bbox` takes it."""
    return ",".join(str(v) for v in (*box.start, *box.shape))
