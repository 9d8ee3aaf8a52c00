"""Sparse layers: cost against the bounding box and against the stored data.

    python benchmarks/sparse.py [--sizes 8192x8192x1024,65536x65536x8192,262144x262144x16384] [--workdir /tmp/x]

For each bounding box, a zarr3 dataset (color uint8 + segmentation uint32)
holding four real 512x512x256 blocks (the bundled segmentation and its
color rendering) spread over the box; then `beam-downsample --dry-run` and a
real `--distribution-strategy sequential` run, each in its own process.
Prints a markdown table: bounding-box voxels, stored voxels, units planned
(pass 1, both layers) of the grid's units, wall and CPU seconds (user+sys of
the child, `/usr/bin/time`) and the child's peak RSS (the run is one process).

The first row (`dense`) is the baseline: the same four blocks side by side
in a 1024x1024x256 layer, every chunk stored, run the same way. A sparse run
should cost about what its stored data costs, i.e. about that row. Each run
is repeated `--repeat` times on a fresh copy; the row shows the fastest.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np

from beam_downsample import demo

BLOCK = (512, 512, 256)


def layers_for(size, segmentation):
    color = demo.render_color(segmentation)
    # four blocks: near the origin, in the middle, near the far corner, and one more off-centre
    fractions = [(0.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.99, 0.99, 0.9), (0.25, 0.75, 0.3)]
    offsets = []
    for fraction in fractions:
        offset = [min(int(f * s) // 32 * 32, s - b) for f, s, b in zip(fraction, size, BLOCK)]
        offsets.append(tuple(offset))
    return [
        {"name": "color", "category": "color", "dtype": "uint8", "blocks": [(o, color) for o in offsets]},
        {"name": "segmentation", "category": "segmentation", "dtype": "uint32",
         "blocks": [(o, segmentation) for o in offsets]},
    ]


def dense_layers(segmentation):
    """The four blocks side by side: 1024x1024x256, the same stored voxels as a sparse row."""
    tiled = np.concatenate([np.concatenate([segmentation, segmentation], axis=1)] * 2, axis=0)
    color = demo.render_color(segmentation)
    color_tiled = np.concatenate([np.concatenate([color, color], axis=1)] * 2, axis=0)
    return [{"name": "color", "category": "color", "data": color_tiled},
            {"name": "segmentation", "category": "segmentation", "data": tiled}]


def measured(command):
    """(stdout, wall s, CPU s user+sys, peak RSS bytes) of a child process, by /usr/bin/time."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as timing:
        result = subprocess.run(["/usr/bin/time", "-o", timing.name, "-f", "%e %U %S %M", *command],
                                capture_output=True, text=True, check=False)
        wall, user, system, rss_kb = timing.read().split()[-4:]
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    return result.stdout, float(wall), float(user) + float(system), int(rss_kb) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="8192x8192x1024,65536x65536x8192,262144x262144x16384")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--no-run", action="store_true", help="only --dry-run")
    parser.add_argument("--no-dense", action="store_true", help="no dense baseline row")
    parser.add_argument("--repeat", type=int, default=1, help="runs per row (the fastest is shown)")
    args = parser.parse_args()
    segmentation = np.ascontiguousarray(demo.load_segmentation()[:, :, : BLOCK[2]])
    workdir = args.workdir or tempfile.mkdtemp(prefix="sparse-bench-")
    base = [sys.executable, "-m", "beam_downsample"]
    rows = []
    sizes = ([] if args.no_dense else ["dense"]) + args.sizes.split(",")
    for text in sizes:
        path = os.path.join(workdir, text)
        shutil.rmtree(path, ignore_errors=True)
        if text == "dense":
            size = (2 * BLOCK[0], 2 * BLOCK[1], BLOCK[2])
            demo.write_dataset(path, dense_layers(segmentation), (11.24, 11.24, 28.0))
        else:
            size = tuple(int(v) for v in text.lower().split("x"))
            demo.write_sparse_dataset(path, size, layers_for(size, segmentation), (11.24, 11.24, 28.0))
        out, wall, cpu, rss = measured([*base, path, "--dry-run", "--distribution-strategy", "sequential"])
        planned = [(int(a.replace(",", "")), int(b.replace(",", ""))) for a, b in
                   re.findall(r"pass 1: .*?\(([\d,]+) of ([\d,]+) work units hold data\)", out)]
        if text == "dense":
            planned = [(int(n.replace(",", "")),) * 2 for n in re.findall(r"pass 1: .*? in ([\d,]+) work units", out)]
        units = sum(a for a, _ in planned) or None
        grid = sum(b for _, b in planned) or None
        row = {"size": text if text != "dense" else "x".join(map(str, size)) + " (dense)",
               "voxels": np.prod(size, dtype=np.float64), "stored": 4 * np.prod(BLOCK) * 2,
               "units": units, "grid": grid, "dry": (wall, cpu, rss)}
        if not args.no_run:
            runs = []
            for _ in range(max(args.repeat, 1)):
                copy = path + ".run"
                shutil.rmtree(copy, ignore_errors=True)
                shutil.copytree(path, copy)
                runs.append(measured([*base, copy, "--distribution-strategy", "sequential"])[1:])
                shutil.rmtree(copy, ignore_errors=True)
            row["run"] = min(runs)
            row["runs"] = runs
        rows.append(row)
        shutil.rmtree(path, ignore_errors=True)
        print(row, file=sys.stderr)
    print("| bounding box | voxels | stored voxels (2 layers) | units planned (pass 1) | dry-run wall s / CPU s "
          "| dry-run peak RSS MB | run wall s / CPU s | run peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        run = row.get("run")
        print(f"| {row['size']} | {row['voxels']:.2e} | {row['stored']:.2e} | {row['units']:,} of {row['grid']:,} "
              f"| {row['dry'][0]:.1f} / {row['dry'][1]:.1f} | {row['dry'][2] / 1e6:.0f} "
              f"| {f'{run[0]:.1f} / {run[1]:.1f}' if run else '-'} | {f'{run[2] / 1e6:.0f}' if run else '-'} |")


if __name__ == "__main__":
    main()
