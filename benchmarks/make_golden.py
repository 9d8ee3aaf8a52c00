"""Golden outputs of webknossos 4.3.3 for the CI suite (tests/golden/, tests/test_golden.py).

    python benchmarks/make_golden.py [--cases aniso,iso,uint64] [--out tests/golden] [--max-rss 14G]

For each input set (small layers with many ties in 2-2-1 and 2-2-2 blocks,
odd sizes at an odd offset, NaN and both zeros in a float layer, two
channels, uint64 ids above 2**53, color and segmentation) this writes the
input arrays to `inputs-NAME.npz`, creates the dataset with the
reference's own Python API in its own venv (benchmarks/refenv.py), runs
`webknossos downsample --distribution-strategy sequential FLAGS` on a copy,
and stores every new mag of every layer (the layer's bounding box aligned
outward in that mag) and the properties' mag list in `CASE.npz`.

The reference is used as a black box (its command line and public API). It
is memory hungry: one reference job at a time, and a watchdog kills a run
whose process tree holds more than --max-rss (the case is then reported as
not made, and the suite covers it with the independent oracle instead).
tests/test_golden.py replays every case with beam-downsample and needs no
reference.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import ab  # noqa: E402  pylint: disable=wrong-import-position
import parity  # noqa: E402  pylint: disable=wrong-import-position
import refenv  # noqa: E402  pylint: disable=wrong-import-position

VOXEL = (11.24, 11.24, 28.0)
TOP_LEFT = (3, 5, 7)  # odd: every mag's region is aligned outward, border blocks are partial
SHAPE = (45, 38, 21)  # odd sizes


def _ties(rng, shape, values, dtype) -> np.ndarray:
    """Voxels drawn from a few values: ties in most blocks."""
    return np.asarray(values, dtype=dtype)[rng.integers(0, len(values), shape)]


def inputs_main() -> list[dict]:
    """Color uint8, int16, float32 (NaN, -0.0, inf), two uint16 channels; segmentation uint32."""
    rng = np.random.default_rng(20261204)
    shape = SHAPE
    wide = rng.random(shape) < 0.2  # these voxels take any value: blocks without ties too

    def mixed(values, dtype, low, high):
        data = _ties(rng, shape, values, dtype)
        data[wide] = rng.integers(low, high, int(wide.sum()), endpoint=True).astype(dtype)
        return data

    color_u8 = mixed([0, 7, 8, 200, 255], np.uint8, 0, 255)
    color_i16 = mixed([-32768, -3, -2, 0, 1, 32767], np.int16, -32768, 32767)
    floats = np.array([np.nan, -0.0, 0.0, 1.5, -1.5, np.inf, -np.inf, 2.25], dtype=np.float32)
    color_f32 = floats[rng.choice(len(floats), shape, p=[0.1, 0.2, 0.2, 0.15, 0.15, 0.05, 0.05, 0.1])]
    color_f32[wide] = (rng.standard_normal(int(wide.sum())) * 100).astype(np.float32)
    channel0 = mixed([0, 1, 65535, 1000], np.uint16, 0, 65535)
    channel1 = mixed([5, 6, 7], np.uint16, 0, 65535)
    segmentation = mixed([0, 1, 2, 3, 4_000_000_000], np.uint32, 0, 2**32 - 1)
    return [
        {"name": "color_u8", "category": "color", "dtype": "uint8", "data": color_u8},
        {"name": "color_i16", "category": "color", "dtype": "int16", "data": color_i16},
        {"name": "color_f32", "category": "color", "dtype": "float32", "data": color_f32},
        {"name": "color_u16x2", "category": "color", "dtype": "uint16", "num_channels": 2,
         "data": np.stack([channel0, channel1])},
        {"name": "segmentation", "category": "segmentation", "dtype": "uint32", "data": segmentation,
         "largest_segment_id": int(segmentation.max())},
    ]


def inputs_uint64() -> list[dict]:
    """A segmentation uint64 whose ids are above 2**53 and differ only in the low bits (small: the
    reference's memory grows fast with uint64)."""
    rng = np.random.default_rng(53)
    base = np.uint64(2**60 + 2**54)
    ids = base + np.array([0, 1, 2, 3, 2**40], dtype=np.uint64)
    data = ids[rng.integers(0, len(ids), (30, 26, 12))]
    data[rng.random(data.shape) < 0.1] = 0
    return [{"name": "segmentation", "category": "segmentation", "dtype": "uint64", "data": data,
             "largest_segment_id": int(data.max())}]


def inputs_floats() -> list[dict]:
    """A float32 color layer of the values where float arithmetic has choices: NaN of both
    signs, both zeros, infinities, values near the largest float32 (a sum overflows) and
    subnormals (a halving rounds)."""
    rng = np.random.default_rng(754)
    pool = np.array([np.nan, -np.nan, 0.0, -0.0, np.inf, -np.inf, 3.0e38, 3.3e38, -3.2e38, 1e-45, 3e-45, 1.1754942e-38,
                     -2.3e-38, 1.0, 2.5, -7.25], dtype=np.float32)
    pool[1] = np.frombuffer(np.uint32(0xFFC00000).tobytes(), dtype=np.float32)[0]  # a NaN with its sign bit set
    data = pool[rng.integers(0, len(pool), (34, 30, 14))]
    return [{"name": "color_f32", "category": "color", "dtype": "float32", "data": data}]


INPUTS = {"main": inputs_main, "uint64": inputs_uint64, "floats": inputs_floats}
CASES = {  # case: (inputs, reference flags)
    "aniso": ("main", ("--coarsest-mag", "8")),  # 2-2-1, 4-4-2, 8-8-4: 2-2-1 and 2-2-2 blocks
    "iso": ("main", ("--sampling-mode", "isotropic", "--coarsest-mag", "8")),  # 2, 4, 8
    "uint64": ("uint64", ("--coarsest-mag", "4")),
    "floats": ("floats", ("--coarsest-mag", "4")),  # 2-2-1, 4-4-2
}


def save_inputs(name: str, layers: list[dict], out: str) -> str:
    path = os.path.join(out, f"inputs-{name}.npz")
    meta = [{k: v for k, v in layer.items() if k != "data"} for layer in layers]
    np.savez_compressed(path, meta=np.array(json.dumps({"voxel_size": VOXEL, "top_left": TOP_LEFT,
                                                         "layers": meta})),
                        **{f"layer/{layer['name']}": layer["data"] for layer in layers})
    return path


def create_reference_dataset(layers: list[dict], folder: str) -> str:
    """The dataset made with the reference's own API (parity.GENERATOR) from the input arrays."""
    dataset, spec, script, _ = parity.write_reference_inputs(folder, layers, VOXEL, "zarr3", TOP_LEFT)
    code, _ = watched([refenv.reference_python(), script, spec], os.path.join(folder, "create.log"), None)
    if code != 0:
        raise RuntimeError(f"the reference API could not create the dataset: {refenv.tail(os.path.join(folder, 'create.log'))}")
    return dataset


def watched(command: list[str], log_path: str, max_rss: int | None) -> tuple[int, float]:
    """Runs `command` (reference environment), killing its tree above `max_rss` bytes: (exit status, peak RSS)."""
    peak = [0]
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=refenv.reference_env(),
                                stdin=subprocess.DEVNULL, start_new_session=True)
        stop = threading.Event()

        def watch():
            while not stop.wait(0.2):
                rss = ab.tree_rss(proc.pid)
                peak[0] = max(peak[0], rss)
                if max_rss and rss > max_rss:
                    log.write(f"\n[make_golden] killed: process tree above {max_rss >> 20} MiB\n")
                    os.killpg(proc.pid, 9)
                    return

        watcher = threading.Thread(target=watch, name="make-golden-watchdog")
        watcher.start()
        try:
            code = proc.wait(timeout=parity.TOOL_TIMEOUT)
        finally:
            stop.set()
            watcher.join()
    return code, peak[0] / 2**30


def read_outputs(dataset: str, layers: list[dict]) -> tuple[dict, dict]:
    """(every mag's region of every layer, the mags each layer lists), read with tensorstore."""
    import tensorstore as ts  # pylint: disable=import-outside-toplevel

    from beam_downsample.core.box import Box, region_in_mag  # pylint: disable=import-outside-toplevel
    from beam_downsample.core.mags import parse_mag  # pylint: disable=import-outside-toplevel

    with open(os.path.join(dataset, "datasource-properties.json"), encoding="utf-8") as handle:
        properties = json.load(handle)
    arrays, listed = {}, {}
    for raw in properties["dataLayers"]:
        spec = next(layer for layer in layers if layer["name"] == raw["name"])
        shape = spec["data"].shape[-3:]
        bbox = Box(TOP_LEFT, tuple(t + s for t, s in zip(TOP_LEFT, shape)))
        listed[raw["name"]] = [m["path"].rsplit("/", 1)[-1] for m in raw["mags"]]
        for entry in raw["mags"]:
            mag = parse_mag(entry["mag"])
            name = entry["path"].rsplit("/", 1)[-1]
            region = region_in_mag(bbox, mag)
            array = ts.open({"driver": "zarr3", "kvstore": {"driver": "file",
                                                              "path": os.path.join(dataset, raw["name"], name)}}).result()
            index = (slice(None),) + tuple(slice(a, b) for a, b in zip(region.start, region.stop))
            arrays[f"{raw['name']}/{name}"] = array[index].read().result()
    return arrays, listed


def make_case(case: str, out: str, work: str, max_rss: int) -> str:
    inputs, flags = CASES[case]
    layers = INPUTS[inputs]()
    save_inputs(inputs, layers, out)
    folder = os.path.join(work, case)
    os.makedirs(folder, exist_ok=True)
    dataset = create_reference_dataset(layers, folder)
    started = time.monotonic()
    code, peak = watched([refenv.reference_cli(), "downsample", dataset, "--distribution-strategy", "sequential",
                          *flags], os.path.join(folder, "reference.log"), max_rss)
    seconds = time.monotonic() - started
    if code != 0:
        return f"{case}: reference failed (exit {code}, peak {peak:.1f} GiB): {refenv.tail(os.path.join(folder, 'reference.log'), 3)}"
    arrays, listed = read_outputs(dataset, layers)
    meta = {"inputs": inputs, "flags": list(flags), "listed": listed, "reference": refenv.REFERENCE_PACKAGE}
    np.savez_compressed(os.path.join(out, f"{case}.npz"), meta=np.array(json.dumps(meta)),
                        **{key: value for key, value in arrays.items() if not key.endswith("/1")})
    return f"{case}: made in {seconds:.0f} s (peak {peak:.1f} GiB), mags {json.dumps(listed)}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--out", default=os.path.join(os.path.dirname(HERE), "tests", "golden"))
    parser.add_argument("--max-rss", default="14G", help="kill a reference run whose tree holds more (default 14G)")
    parser.add_argument("--keep", help="work directory to keep (default: a temp dir, removed)")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    max_rss = int(float(args.max_rss.rstrip("GgMm")) * (2**30 if args.max_rss[-1] in "Gg" else 2**20))
    work = args.keep or tempfile.mkdtemp(prefix="beam-downsample-golden-")
    try:
        for case in args.cases.split(","):
            print(make_case(case.strip(), args.out, work, max_rss), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    for name in sorted(os.listdir(args.out)):
        print(f"{name}: {os.path.getsize(os.path.join(args.out, name)) / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
