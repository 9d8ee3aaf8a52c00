"""The effect of `--ignore-background`, counted from the tool's own output.

    python benchmarks/background.py [--work DIR] [--picture docs/img/background.png] [--jobs N]

Runs beam-downsample (the CLI, as a user would) on the bundled real 512^3
segmentation (`demo.load_segmentation()`, voxel size 11.24 x 11.24 x 28 nm,
so the chain is 2-2-1, 4-4-2, 8-8-4, 16-16-8), dense as bundled and in the
sparse version of issue 18 (5 % of the sorted non-zero ids,
`np.random.default_rng(0).choice(ids, size=len(ids) // 20, replace=False)`,
0 elsewhere), once plainly and once with `--ignore-background`, reads every
mag back and counts per mag:

- ids kept: segment ids present, as a share of the ids at mag 1;
- lost >= 256: segments of at least 256 mag-1 voxels absent from the mag;
- non-zero: the share of non-zero voxels (the growth of objects);
- split: segments that are one 6-connected piece at mag 1 and several at the mag.

tinybrain's `downsample_segmentation(..., sparse=True)` (chained with the same
factors) is a third column if it is installed (benchmark-only:
`pip install tinybrain connected-components-3d matplotlib`).

Color: the demo's color rendering of the segmentation with MARGIN columns of
zeros prepended along x (an acquisition's black padding, not aligned to any
mag). For each mag, the mean of the voxel column that holds the margin's edge,
against the mean of the mag-1 tissue under it, plain and with the option.

`--picture` writes the same coarse-mag slices with and without the option
(matplotlib). Wall times of the runs are printed too (note the machine's load).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from beam_downsample import demo
from beam_downsample.core.box import region_in_mag
from beam_downsample.core.mags import mag_name
from beam_downsample.store import arrays
from beam_downsample.store.properties import load_dataset

VOXEL_SIZE = (11.24, 11.24, 28.0)
MAGS = [(2, 2, 1), (4, 4, 2), (8, 8, 4), (16, 16, 8)]
FACTORS = [(2, 2, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2)]
MARGIN = 37  # zero columns before the tissue
LARGE = 256  # mag-1 voxels of a segment that must not be lost


def sparse_version(segmentation: np.ndarray) -> np.ndarray:
    """Issue 18's sparse version: 5 % of the sorted non-zero ids kept, 0 elsewhere."""
    ids = np.unique(segmentation)
    ids = ids[ids != 0]
    kept = np.random.default_rng(0).choice(ids, size=len(ids) // 20, replace=False)
    return np.where(np.isin(segmentation, kept), segmentation, 0).astype(segmentation.dtype)


def warm_kernels() -> None:
    """Compiles (or loads) the kernels the runs use into numba's on-disk cache first, so that
    no run pays for compiling them (a cold cache costs a run seconds)."""
    from beam_downsample.kernels import compiled, reduce  # pylint: disable=import-outside-toplevel

    for dtype, interpolation in (("uint32", "mode"), ("uint8", "median")):
        for name in (interpolation, reduce.reduction(interpolation, True)):
            for factor in FACTORS[:2]:
                compiled.downsample(np.zeros((1, 4, 4, 4), dtype=dtype, order="F"), factor, name)


def run_tool(data: np.ndarray, category: str, work: str, label: str, option: bool, jobs) -> tuple[dict, float]:
    """Writes a one-layer dataset, runs the CLI on it; (mag -> voxels (x, y, z), wall seconds)."""
    path = os.path.join(work, label)
    shutil.rmtree(path, ignore_errors=True)
    demo.write_dataset(path, [{"name": "layer", "category": category, "data": data}], VOXEL_SIZE)
    command = [sys.executable, "-m", "beam_downsample", path, "--coarsest-mag", "16-16-8"]
    command += ["--ignore-background"] if option else []
    command += ["--jobs", str(jobs)] if jobs else []
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    dataset = load_dataset(path)
    layer = dataset.layer("layer")
    mags = {}
    for mag in MAGS:
        array = arrays.open_array(arrays.existing_mag_spec(layer, path, mag), open=True)
        mags[mag] = arrays.read_box(array, region_in_mag(layer.bbox, mag), 1)[0]
    shutil.rmtree(path)
    return mags, seconds


def tinybrain_pyramid(data: np.ndarray) -> dict | None:
    try:
        import tinybrain  # pylint: disable=import-outside-toplevel
    except ImportError:
        return None
    mags, level = {}, data
    for mag, factor in zip(MAGS, FACTORS):
        # Fortran order: tinybrain 1.7.0 returns a C-order input's result with its axes permuted.
        level = tinybrain.downsample_segmentation(np.asfortranarray(level), factor, sparse=True)[0]
        mags[mag] = level
    return mags


# ---------------------------------------------------------------------------
# counting


def pieces(labels: np.ndarray) -> dict[int, int]:
    """6-connected pieces per non-zero id."""
    import cc3d  # pylint: disable=import-outside-toplevel

    components, count = cc3d.connected_components(labels, connectivity=6, return_N=True)
    owner = np.zeros(count + 1, dtype=labels.dtype)
    owner[components.ravel()] = labels.ravel()
    ids, counts = np.unique(owner[1:], return_counts=True)
    return dict(zip(ids.tolist(), counts.tolist()))


class Mag1:
    """What the counts compare with: mag 1's ids, sizes and pieces."""

    def __init__(self, labels: np.ndarray):
        ids, sizes = np.unique(labels, return_counts=True)
        keep = ids != 0
        self.ids = set(ids[keep].tolist())
        self.large = {i for i, s in zip(ids[keep].tolist(), sizes[keep].tolist()) if s >= LARGE}
        self.one_piece = {i for i, n in pieces(labels).items() if n == 1}
        self.nonzero = np.count_nonzero(labels) / labels.size


def counts(mag1: Mag1, labels: np.ndarray) -> dict:
    present = set(np.unique(labels).tolist()) - {0}
    split = sum(1 for i, n in pieces(labels).items() if n > 1 and i in mag1.one_piece)
    return {
        "kept": 100 * len(present & mag1.ids) / len(mag1.ids),
        "lost_large": len(mag1.large - present),
        "nonzero": 100 * np.count_nonzero(labels) / labels.size,
        "split": split,
    }


def segmentation_tables(work: str, jobs, picture_slices: dict) -> None:
    bundled = demo.load_segmentation()
    for version, data in (("dense", bundled), ("sparse", sparse_version(bundled))):
        mag1 = Mag1(data)
        results, seconds = {}, {}
        for label, option in (("plain mode", False), ("--ignore-background", True)):
            results[label], seconds[label] = run_tool(data, "segmentation", work, f"{version}-{option}", option, jobs)
        brain = tinybrain_pyramid(data)
        if brain is not None:
            results["tinybrain sparse=True"] = brain
        picture_slices[version] = {label: mags[(8, 8, 4)] for label, mags in results.items()}
        print(f"\n{version}: {len(mag1.ids)} ids at mag 1, {len(mag1.large)} of >= {LARGE} voxels, "
              f"{len(mag1.one_piece)} in one 6-connected piece, {100 * mag1.nonzero:.2f} % non-zero; "
              + ", ".join(f"{label} run {s:.1f} s" for label, s in seconds.items()))
        columns = list(results)
        print("| mag | " + " | ".join(f"{c}: ids kept / lost >= {LARGE} / non-zero / split" for c in columns) + " |")
        print("|---|" + "---|" * len(columns))
        for mag in MAGS:
            cells = []
            for column in columns:
                c = counts(mag1, results[column][mag])
                cells.append(f"{c['kept']:.1f} % / {c['lost_large']} / {c['nonzero']:.2f} % / {c['split']}")
            print(f"| {mag_name(mag)} | " + " | ".join(cells) + " |", flush=True)


def color_table(work: str, jobs, picture_slices: dict) -> None:
    color = np.pad(demo.render_color(demo.load_segmentation()), ((MARGIN, 0), (0, 0), (0, 0)))
    results = {label: run_tool(color, "color", work, f"color-{option}", option, jobs)[0]
               for label, option in (("plain median", False), ("--ignore-background", True))}
    picture_slices["color"] = {label: mags[(8, 8, 4)] for label, mags in results.items()}
    tissue_mean = color[MARGIN:].mean()
    print(f"\ncolor, {MARGIN} zero columns before the tissue (tissue mean {tissue_mean:.1f}): the voxel column "
          "holding the margin's edge")
    print("| mag | its mag-1 footprint (x) | mag-1 tissue there | plain median | --ignore-background |")
    print("|---|---|---|---|---|")
    for mag in MAGS:
        column = MARGIN // mag[0]
        low, high = column * mag[0], (column + 1) * mag[0]
        truth = color[MARGIN:high].mean()
        cells = [f"{results[label][mag][column].mean():.1f}" for label in results]
        print(f"| {mag_name(mag)} | {low}-{high - 1} ({MARGIN - low} zero) | {truth:.1f} | " + " | ".join(cells) + " |",
              flush=True)


def draw(picture: str, slices: dict) -> None:
    """The 8-8-4 slice at the middle z, plain and with the option: sparse segmentation and the color margin."""
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    seg = slices["sparse"]
    color = slices["color"]
    panels = [(f"sparse segmentation, 8-8-4: {label}", seg[label]) for label in ("plain mode", "--ignore-background")]
    panels += [(f"color with a zero margin, 8-8-4: {label}", color[label]) for label in color]
    figure, axes = plt.subplots(2, 2, figsize=(8, 8.4))
    palette = np.random.default_rng(1).integers(40, 256, (1 << 16, 3)).astype(np.uint8)
    for axis, (title, volume) in zip(axes.ravel(), panels):
        plane = volume[:, :, volume.shape[2] // 2].T
        if plane.dtype == np.uint8:
            axis.imshow(plane[:, :24], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        else:
            rgb = palette[(plane % (1 << 16)).astype(np.int64)]
            rgb[plane == 0] = 0
            axis.imshow(rgb, interpolation="nearest")
        axis.set_title(title, fontsize=8)
        axis.set_xticks([])
        axis.set_yticks([])
    figure.tight_layout()
    figure.savefig(picture, dpi=90)
    print(f"\npicture: {picture} ({os.path.getsize(picture) / 1024:.0f} KB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", help="scratch directory (default: a temporary one)")
    parser.add_argument("--jobs", type=int, help="--jobs for the runs (default: the tool's)")
    parser.add_argument("--picture", help="write the slices with and without the option to this PNG")
    parser.add_argument("--skip-color", action="store_true")
    args = parser.parse_args()
    load = os.getloadavg()
    print(f"load average at start: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    warm_kernels()
    slices: dict = {}
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        segmentation_tables(work, args.jobs, slices)
        if not args.skip_color:
            color_table(work, args.jobs, slices)
    if args.picture and "color" in slices:
        draw(args.picture, slices)
    load = os.getloadavg()
    print(f"load average at end: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")


if __name__ == "__main__":
    main()
