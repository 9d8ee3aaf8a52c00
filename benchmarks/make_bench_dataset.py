"""Writes the benchmark dataset: zarr3 in the reference layout, two layers.

    python benchmarks/make_bench_dataset.py PATH [--size 1024,1024,512] [--fill data|zero]

- voxel size 11.24, 11.24, 28 nm (settable with --voxel-size), bounding boxes
  at (0, 0, 0) of --size;
- `color`: uint8 smooth noise, deterministic for a given --seed and size: two
  octaves of trilinearly interpolated random lattices (spacing 32 and 8
  voxels) plus per-voxel noise of +-12 around 128;
- `segmentation`: uint32, the bundled real 512^3 segmentation (pinky40, see
  beam_downsample/data/README.md) *mirrored* to the size: along each axis the
  source is repeated as forward, reversed, forward, ... (index i reads
  source[i % 1024] if that is < 512, else source[1023 - i % 1024]), so labels
  continue across the seams instead of being cut. largestSegmentId is the
  largest label actually written.
- `--fill zero` writes only the properties and the (empty) mag-1 arrays, so
  every voxel reads as 0 (largestSegmentId 0): for peak-memory checks at
  sizes whose data would take long to write.

Memory stays bounded: the data is written box by box (at most 1024x1024x64
voxels, chunk-aligned), so at most the 512^3 source segmentation (512 MB) plus
one box of each layer and its temporaries are held at once.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from typing import Sequence

import numpy as np

from beam_downsample.core.box import Box
from beam_downsample.demo import layer_properties, load_segmentation
from beam_downsample.store import arrays
from beam_downsample.store.properties import load_dataset, save_properties
from beam_downsample.store.storage import write_json_atomically

VOXEL_SIZE = (11.24, 11.24, 28.0)
DEFAULT_SIZE = (1024, 1024, 512)
BOX_XY = 1024  # boxes (and the per-voxel noise tiles) are 1024x1024 in x, y
BOX_Z = 64
NOISE_Z = 32  # per-voxel noise generated per chunk-deep slab
NOISE_AMPLITUDE = 12


def parse_triple(text: str, kind=int) -> tuple:
    parts = [kind(p) for p in text.replace("x", ",").split(",")]
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated values, got {text!r}")
    return tuple(parts)


# ---------------------------------------------------------------------------
# Data


def mirror_runs(start: int, stop: int, period: int):
    """The positions start..stop of a mirrored tiling of a length-`period` axis as runs:
    (out slice, source slice) pairs; position i reads source[i % (2 period)] if that is
    < period, else source[2 period - 1 - i % (2 period)]."""
    runs = []
    position = start
    while position < stop:
        phase = position % (2 * period)
        if phase < period:
            length = min(period - phase, stop - position)
            source = slice(phase, phase + length)
        else:
            first = 2 * period - 1 - phase  # decreasing from here
            length = min(first + 1, stop - position)
            source = slice(first, first - length if first - length >= 0 else None, -1)
        runs.append((slice(position - start, position - start + length), source))
        position += length
    return runs


def segmentation_box(source: np.ndarray, box: Box) -> np.ndarray:
    out = np.empty(box.shape, dtype=source.dtype)
    runs = [mirror_runs(a, b, n) for a, b, n in zip(box.start, box.stop, source.shape)]
    for ox, sx in runs[0]:
        for oy, sy in runs[1]:
            for oz, sz in runs[2]:
                out[ox, oy, oz] = source[sx, sy, sz]
    return out


class SmoothNoise:
    """Deterministic uint8 smooth noise over a whole volume, evaluated box by box."""

    def __init__(self, size: Sequence[int], seed: int):
        self.seed = seed
        rng = np.random.default_rng([seed, 0])
        self.octaves = []
        for spacing, amplitude in ((32, 70.0), (8, 35.0)):
            lattice_shape = tuple(s // spacing + 2 for s in size)
            lattice = rng.uniform(-1.0, 1.0, size=lattice_shape).astype(np.float32)
            self.octaves.append((spacing, amplitude, lattice))

    @staticmethod
    def _interp(values: np.ndarray, axis: int, start: int, stop: int, spacing: int) -> np.ndarray:
        coords = np.arange(start, stop)
        i0 = coords // spacing
        weight = ((coords % spacing) / spacing).astype(np.float32)
        shape = [1, 1, 1]
        shape[axis] = len(coords)
        weight = weight.reshape(shape)
        low = np.take(values, i0, axis=axis)
        high = np.take(values, i0 + 1, axis=axis)
        high -= low
        high *= weight
        high += low
        return high

    def box(self, box: Box) -> np.ndarray:
        out = np.empty(box.shape, dtype=np.uint8)
        # z sub-slabs of one chunk (32) keep the float temporaries small.
        for z0 in range(box.start[2], box.stop[2], NOISE_Z):
            z1 = min(z0 - z0 % NOISE_Z + NOISE_Z, box.stop[2])
            part = Box((box.start[0], box.start[1], z0), (box.stop[0], box.stop[1], z1))
            out[:, :, z0 - box.start[2]:z1 - box.start[2]] = self._part(part)
        return out

    def _part(self, part: Box) -> np.ndarray:
        smooth = None
        for spacing, amplitude, lattice in self.octaves:
            values = lattice
            for axis in (2, 1, 0):  # smallest result first, the full-size step last
                values = self._interp(values, axis, part.start[axis], part.stop[axis], spacing)
            values *= amplitude
            smooth = values if smooth is None else np.add(smooth, values, out=smooth)
        # Per-voxel noise: one generator per (x tile, y tile, z chunk), so the values do not
        # depend on how the volume is cut into boxes.
        tx, ty, tz = part.start[0] // BOX_XY, part.start[1] // BOX_XY, part.start[2] // NOISE_Z
        rng = np.random.default_rng([self.seed, 1, tx, ty, tz])
        noise = rng.integers(-NOISE_AMPLITUDE, NOISE_AMPLITUDE + 1, size=part.shape[:2] + (NOISE_Z,), dtype=np.int8)
        offset = part.start[2] - tz * NOISE_Z
        smooth += noise[:, :, offset:offset + part.shape[2]]
        smooth += 128.0
        np.clip(smooth, 0, 255, out=smooth)
        return smooth.astype(np.uint8)


def boxes(size: Sequence[int]):
    for x in range(0, size[0], BOX_XY):
        for y in range(0, size[1], BOX_XY):
            for z in range(0, size[2], BOX_Z):
                yield Box((x, y, z), (min(x + BOX_XY, size[0]), min(y + BOX_XY, size[1]), min(z + BOX_Z, size[2])))


# ---------------------------------------------------------------------------
# Dataset


def make_bench_dataset(
    path: str,
    size: Sequence[int] = DEFAULT_SIZE,
    voxel_size: Sequence[float] = VOXEL_SIZE,
    fill: str = "data",
    seed: int = 0,
    log=None,
) -> dict:
    """Writes the dataset; returns a small summary."""
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    start_time = time.monotonic()
    os.makedirs(path)
    raw = {
        "id": {"name": os.path.basename(os.path.abspath(path)), "team": ""},
        "scale": {"factor": [float(v) for v in voxel_size], "unit": "nanometer"},
        "dataLayers": [
            layer_properties("color", "color", "uint8", (0, 0, 0), size),
            layer_properties("segmentation", "segmentation", "uint32", (0, 0, 0), size, largest_segment_id=0),
        ],
        "version": 1,
    }
    write_json_atomically(os.path.join(path, "zarr.json"), {"zarr_format": 3, "node_type": "group"})
    save_properties(path, raw)
    dataset = load_dataset(path)
    opened = {}
    for layer in dataset.layers:
        opened[layer.name] = arrays.open_array(arrays.new_mag_spec(layer, path, (1, 1, 1)), create=True, delete_existing=True)
        arrays.update_ngff(os.path.join(path, layer.name), layer, dataset.voxel_size, dataset.unit, [(1, 1, 1)])
    largest = 0
    if fill == "data":
        source = load_segmentation()
        noise = SmoothNoise(size, seed)
        all_boxes = list(boxes(size))
        for number, box in enumerate(all_boxes, 1):
            color = noise.box(box)
            pending = arrays.write_region(opened["color"], box, color[None])
            seg = segmentation_box(source, box)
            largest = max(largest, int(seg.max()))
            pending.result()
            arrays.write_region(opened["segmentation"], box, seg[None]).result()
            del color, seg
            log(f"make_bench_dataset: box {number}/{len(all_boxes)} {box.start}..{box.stop}")
        del source
        raw["dataLayers"][1]["largestSegmentId"] = largest
        save_properties(path, raw)
    elif fill != "zero":
        raise ValueError(f"fill must be 'data' or 'zero', not {fill!r}")
    seconds = time.monotonic() - start_time
    log(f"make_bench_dataset: wrote {path} ({'x'.join(map(str, size))}, fill {fill}) in {seconds:.1f} s")
    return {"path": path, "size": list(size), "fill": fill, "largest_segment_id": largest, "seconds": seconds}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="dataset directory to create")
    parser.add_argument("--size", type=parse_triple, default=DEFAULT_SIZE, help="X,Y,Z (default 1024,1024,512)")
    parser.add_argument("--voxel-size", type=lambda t: parse_triple(t, float), default=VOXEL_SIZE,
                        help="nm per voxel (default 11.24,11.24,28)")
    parser.add_argument("--fill", choices=("data", "zero"), default="data",
                        help="data (default) or zero: properties and empty arrays only")
    parser.add_argument("--seed", type=int, default=0, help="seed of the color noise (default 0)")
    parser.add_argument("--force", action="store_true", help="replace PATH if it exists")
    args = parser.parse_args(argv)
    if any(s < 1 for s in args.size):
        parser.error("--size: every extent must be at least 1")
    if os.path.exists(args.path):
        if not args.force:
            parser.error(f"{args.path} exists; remove it or pass --force")
        shutil.rmtree(args.path)
    make_bench_dataset(args.path, args.size, args.voxel_size, args.fill, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
