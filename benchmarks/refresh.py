"""`--bbox` refresh against a full run, same run, same machine.

    python benchmarks/refresh.py /work/bench/bench-full [--boxes 480,480,224,64,64,64;...] [--rounds 3]
                                 [--scattered 50] [--scattered-size 64] [--separate]
                                 [--ours-args "..."] [--verify] [--workdir DIR]

Per round, on a fresh copy of DATASET (never modified; it must hold only its finest mag):
1. `beam-downsample COPY` (the full pyramid), timed;
2. for each box: mag 1 of every layer is edited inside the box (new random values),
   then `beam-downsample COPY --bbox BOX`, timed;
3. with --scattered N: N boxes of --scattered-size^3 at random places (not overlapping; the
   same in every round) are edited, then refreshed by one `beam-downsample COPY --bbox-file F`;
4. with --separate as well: they are edited again and refreshed by N runs, one `--bbox` each
   (the wall time is their sum, the peak their largest).
Rounds alternate the runs, so every ratio to the full run is taken in the same session.
With --verify (last round), the refreshed copy is compared, every voxel of every mag
and the properties, with a full run on a copy of the edited mag 1 (benchmarks/dscompare.py).

Prints a markdown table: run, wall s (min and median over the rounds), peak tree RSS,
and wall time as a fraction of the full run's. The same script runs unchanged on
bigger machines (the defaults size themselves; --ours-args passes flags to every run).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dscompare  # noqa: E402  pylint: disable=wrong-import-position
from beam_downsample.core.box import Box  # noqa: E402  pylint: disable=wrong-import-position
from beam_downsample.store import arrays  # noqa: E402  pylint: disable=wrong-import-position
from beam_downsample.store.properties import load_dataset  # noqa: E402  pylint: disable=wrong-import-position
from compare_reference import run_measured  # noqa: E402  pylint: disable=wrong-import-position

DEFAULT_BOXES = "480,480,224,64,64,64;1000,1000,480,64,64,32;0,0,0,256,256,128"


def edit(dataset_path: str, box: Box, seed: int) -> None:
    """New random values in the box, in the finest mag of every layer (as a proofreading tool would)."""
    dataset = load_dataset(dataset_path)
    rng = np.random.default_rng(seed)
    for layer in dataset.layers:
        finest = min(layer.mags, key=lambda m: (max(m), m))
        array = arrays.open_array(arrays.existing_mag_spec(layer, dataset.path, finest), open=True)
        inside = box.intersect(layer.bbox)
        data = rng.integers(1, 200, (layer.num_channels, *inside.shape)).astype(layer.dtype)
        arrays.write_region(array, inside, data).result()


def parse_box(text: str) -> Box:
    x, y, z, w, h, d = (int(v) for v in text.split(","))
    return Box((x, y, z), (x + w, y + h, z + d))


def box_text(box: Box) -> str:
    return ",".join(str(v) for v in (*box.start, *box.shape))


def scattered_boxes(dataset_path: str, count: int, size: int, seed: int) -> list[Box]:
    """`count` boxes of size^3 voxels at random places inside every layer, none overlapping another."""
    layers = load_dataset(dataset_path).layers
    region = layers[0].bbox
    for layer in layers[1:]:
        region = region.intersect(layer.bbox)
    rng = np.random.default_rng(seed)
    boxes: list[Box] = []
    for _ in range(1000 * count):
        if len(boxes) == count:
            break
        start = tuple(int(v) for v in rng.integers(region.start, np.array(region.stop) - size + 1))
        box = Box(start, tuple(a + size for a in start))  # type: ignore[arg-type]
        if all(box.intersect(other).empty for other in boxes):
            boxes.append(box)
    if len(boxes) < count:
        raise SystemExit(f"only {len(boxes)} boxes of {size}^3 fit without overlapping")
    return boxes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset")
    parser.add_argument("--boxes", default=DEFAULT_BOXES, help="';'-separated x,y,z,w,h,d boxes (mag-1 voxels)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scattered", type=int, default=0, help="N scattered boxes refreshed in one run (0: none)")
    parser.add_argument("--scattered-size", type=int, default=64)
    parser.add_argument("--separate", action="store_true", help="also refresh the N boxes in N separate runs")
    parser.add_argument("--ours-args", default="", help="extra flags for every beam-downsample run")
    parser.add_argument("--verify", action="store_true", help="compare the last refresh with a full recompute")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    boxes = [b for b in args.boxes.split(";") if b]
    extra = shlex.split(args.ours_args)
    command = [sys.executable, "-m", "beam_downsample"]
    workdir = args.workdir or tempfile.mkdtemp(prefix="refresh-bench-")
    scattered = scattered_boxes(args.dataset, args.scattered, args.scattered_size, 0) if args.scattered else []
    box_file = os.path.join(workdir, "scattered-boxes.txt")
    with open(box_file, "w", encoding="utf-8") as handle:
        handle.write("".join(box_text(b) + "\n" for b in scattered))
    many = f"{len(scattered)} scattered {args.scattered_size}^3 boxes"
    # (name, runs: each a list of flags, boxes edited before)
    plan = [("full run", [[]], []), *[(f"--bbox {b}", [["--bbox", b]], [parse_box(b)]) for b in boxes]]
    if scattered:
        plan.append((f"{many}, one run (--bbox-file)", [["--bbox-file", box_file]], scattered))
        if args.separate:
            plan.append((f"{many}, {len(scattered)} runs", [["--bbox", box_text(b)] for b in scattered], scattered))
    times: dict[str, list[float]] = {name: [] for name, _, _ in plan}
    peaks: dict[str, int] = {}
    copy = os.path.join(workdir, "ds")
    for round_index in range(args.rounds):
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(args.dataset, copy)
        for step, (name, runs, edited) in enumerate(plan):
            for index, box in enumerate(edited):
                edit(copy, box, 1000 * round_index + 100 * step + index)
            wall_sum = 0.0
            for number, flags in enumerate(runs):
                log = os.path.join(workdir, f"{round_index}-{step}-{number}.log")
                code, wall, peak, _ = run_measured(command + [copy, *flags, *extra], log)
                if code != 0:
                    with open(log, encoding="utf-8") as handle:
                        raise SystemExit(f"{name} failed (exit {code}):\n{handle.read()[-3000:]}")
                wall_sum += wall
                peaks[name] = max(peaks.get(name, 0), peak)
            times[name].append(wall_sum)
            print(f"round {round_index + 1}: {name}: {wall_sum:.2f} s", file=sys.stderr, flush=True)
    full = min(times["full run"])
    print(f"\n{args.dataset}, {args.rounds} rounds, flags: {args.ours_args or '(defaults)'}, "
          f"load average at the end {os.getloadavg()[0]:.1f}\n")
    print("| run | wall s min | wall s median | peak tree RSS GB | min wall / full run min |")
    print("|---|---|---|---|---|")
    for name, walls in times.items():
        print(f"| {name} | {min(walls):.2f} | {statistics.median(walls):.2f} | {peaks[name] / 1e9:.2f} | "
              f"{min(walls) / full:.2f} |")
    if args.verify:
        expected = os.path.join(workdir, "expected")
        shutil.rmtree(expected, ignore_errors=True)
        shutil.copytree(args.dataset, expected)
        dataset = load_dataset(copy)
        for layer in dataset.layers:  # the edited finest mag, downsampled in full
            finest = min(layer.mags, key=lambda m: (max(m), m))
            name = os.path.basename(layer.mag_path(dataset.path, finest))
            shutil.rmtree(os.path.join(expected, layer.name, name))
            shutil.copytree(os.path.join(copy, layer.name, name), os.path.join(expected, layer.name, name))
        code, _, _, _ = run_measured(command + [expected, *extra], os.path.join(workdir, "expected.log"))
        assert code == 0, "the full recompute failed"
        comparison = dscompare.compare_datasets(expected, copy)
        print(f"\nrefreshed vs full recompute: {'identical' if comparison.ok else 'DIFFERENT'}")
        if not comparison.ok:
            print(json.dumps(comparison.to_dict(), indent=1)[:5000])
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
