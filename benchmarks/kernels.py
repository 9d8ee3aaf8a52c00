"""Kernel speed: input MVox/s per kernel, dtype and factor, numpy against compiled.

    python benchmarks/kernels.py [--size 512] [--repeats 3] [--startup]

Mode runs on the real 512^3 segmentation (`beam_downsample/data`, cast to
each dtype), median on uniform noise (0..255 cast to each dtype). Time is
CPU time of this thread (`time.thread_time`, the best of `--repeats`), so
other processes on a shared machine matter less than for wall time; both
sides run interleaved. `2-2-1 x3` is three levels in a row, through level
buffers as `work.reduce_tile` does, counted on the first level's input.

`--startup` also measures, in fresh processes, what the compiled kernels
cost a worker before its first tile: importing numba, and the first call
with a cold and with a warm on-disk cache.

`--background` measures the kernels of `--ignore-background` (compiled, 2-2-1
and 2-2-2, every element class) against today's kernel for the same
interpolation and input (compiled for median and mode, numpy for the rest),
paired and interleaved; `slower` is their time over today's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from beam_downsample import demo
from beam_downsample.kernels import compiled, reduce

CASES = [  # (interpolation, dtypes)
    ("mode", ["uint32", "uint64", "uint16", "int32", "int64", "float32"]),
    ("median", ["uint8", "uint16", "int8", "int16", "uint32", "float32", "float64"]),
]
FACTORS = {"2-2-1": [(2, 2, 1)], "2-2-2": [(2, 2, 2)], "2-2-1 x3": [(2, 2, 1)] * 3}


def chain(data: np.ndarray, factors, interpolation: str, use_compiled: bool, buffers: list) -> None:
    """Every level into a reused Fortran buffer (as the level buffers of a unit)."""
    reduce._COMPILED[:] = [compiled if use_compiled else None]  # pylint: disable=protected-access
    source, shape = data, data.shape[1:]
    for i, factor in enumerate(factors):
        shape = tuple(s // f for s, f in zip(shape, factor))
        if len(buffers) <= i:
            buffers.append(np.zeros((data.shape[0], *shape), dtype=data.dtype, order="F"))
        reduce.downsample_box(source, (0, 0, 0), buffers[i], (0, 0, 0), shape, factor, interpolation)
        source = buffers[i]


def cpu_seconds(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.thread_time()
        fn()
        best = min(best, time.thread_time() - start)
    return best


def speeds(size: int, repeats: int) -> list[tuple]:
    seg = demo.load_segmentation()[:size, :size, :size]
    noise = np.random.default_rng(0).integers(0, 256, seg.shape, dtype=np.uint8)
    rows = []
    for interpolation, dtypes in CASES:
        base = seg if interpolation == "mode" else noise
        for dtype in dtypes:
            data = np.asfortranarray(base.astype(dtype))[None]
            for name, factors in FACTORS.items():
                buffers: list = []
                for use in (True, False):  # warm-up: first call, page faults of the buffers
                    chain(data, factors, interpolation, use, buffers)
                times = {True: float("inf"), False: float("inf")}
                for _ in range(repeats):
                    for use in (True, False):
                        times[use] = min(times[use], cpu_seconds(
                            lambda: chain(data, factors, interpolation, use, buffers), 1))
                mvox = data.size / 1e6
                rows.append((interpolation, dtype, name, mvox / times[False], mvox / times[True]))
                print(f"| {interpolation} | {dtype} | {name} | {rows[-1][3]:.0f} | {rows[-1][4]:.0f} | "
                      f"{rows[-1][4] / rows[-1][3]:.1f}x |", flush=True)
    return rows


_PROBE = """
import time, json
t0 = time.perf_counter(); c0 = time.process_time()
import numba
t1 = time.perf_counter(); c1 = time.process_time()
import numpy as np
from beam_downsample.kernels import compiled
src = np.zeros((1, 64, 64, 64), dtype=np.{dtype}, order="F")
dst = np.zeros((1, 32, 32, 64), dtype=np.{dtype}, order="F")
t2 = time.perf_counter(); c2 = time.process_time()
compiled.downsample_box(src, (0, 0, 0), dst, (0, 0, 0), (32, 32, 64), (2, 2, 1), "{interpolation}")
t3 = time.perf_counter(); c3 = time.process_time()
print(json.dumps({{"import_numba": c1 - c0, "first_call": c3 - c2, "first_call_wall": t3 - t2}}))
"""


def startup() -> None:
    """Per-process cost of the compiled kernels, cold and warm on-disk cache."""
    print("\n| first call in a fresh process | import numba (CPU s) | first call (CPU s) | first call (wall s) |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        for interpolation, dtype in (("mode", "uint32"), ("median", "uint8")):
            for state in ("cold cache", "warm cache"):
                out = subprocess.run([sys.executable, "-c", _PROBE.format(dtype=dtype, interpolation=interpolation)],
                                     env=env, check=True, capture_output=True, text=True).stdout
                r = json.loads(out)
                print(f"| {interpolation} 2-2-1 {dtype}, {state} | {r['import_numba']:.2f} | "
                      f"{r['first_call']:.2f} | {r['first_call_wall']:.2f} |", flush=True)


ALL_DTYPES = ["uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64", "float32", "float64"]


def background_speeds(size: int, repeats: int, interpolations) -> None:
    """Each background-aware compiled kernel against today's kernel, same input, same buffers."""
    seg = demo.load_segmentation()[:size, :size, :size]
    noise = np.random.default_rng(0).integers(0, 256, seg.shape, dtype=np.uint8)
    reduce._COMPILED[:] = [compiled]  # pylint: disable=protected-access
    print("\n| reduction | dtype | factor | today's kernel | today MVox/s | ignoring background MVox/s | slower |")
    print("|---|---|---|---|---|---|---|")
    for interpolation in interpolations:
        base = seg if interpolation == "mode" else noise
        for dtype in ALL_DTYPES:
            data = np.asfortranarray(base.astype(dtype))[None]
            for factor in ((2, 2, 1), (2, 2, 2)):
                shape = tuple(s // f for s, f in zip(data.shape[1:], factor))
                out = np.zeros((1, *shape), dtype=dtype, order="F")
                name = reduce.reduction(interpolation, True)
                assert compiled.available(data, factor, name, out)
                today = "compiled" if compiled.available(data, factor, interpolation, out) else "numpy"

                def plain():
                    reduce.downsample_box(data, (0, 0, 0), out, (0, 0, 0), shape, factor, interpolation)

                def ours():
                    reduce.downsample_box(data, (0, 0, 0), out, (0, 0, 0), shape, factor, name)

                plain(), ours()  # compile or load, touch the pages
                times = {plain: float("inf"), ours: float("inf")}
                for _ in range(repeats):
                    for fn in (plain, ours):
                        times[fn] = min(times[fn], cpu_seconds(fn, 1))
                mvox = data.size / 1e6
                print(f"| {name} | {dtype} | {'-'.join(map(str, factor))} | {today} | {mvox / times[plain]:.0f} | "
                      f"{mvox / times[ours]:.0f} | {times[ours] / times[plain]:.2f}x |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="edge of the cube cut from the segmentation")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--startup", action="store_true", help="also measure import and compile/cache-load time")
    parser.add_argument("--background", action="store_true",
                        help="only the --ignore-background kernels against today's (every element class)")
    parser.add_argument("--interpolations", default="mode,median,mean,min,max",
                        help="with --background: which reductions (comma-separated)")
    args = parser.parse_args()
    load = os.getloadavg()
    print(f"load average: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    if args.background:
        background_speeds(args.size, args.repeats, args.interpolations.split(","))
        return
    print("| kernel | dtype | factor | numpy MVox/s | compiled MVox/s | speed-up |\n|---|---|---|---|---|---|")
    speeds(args.size, args.repeats)
    if args.startup:
        startup()


if __name__ == "__main__":
    main()
