"""Voxel parity of `beam-downsample` against the reference `webknossos downsample` (4.3.3).

Each case:

1. writes its input arrays as .npy files (crops of the bundled real 512^3
   segmentation and a color layer rendered from it, see beam_downsample.demo);
2. creates the dataset with the *reference's* public Python API, inside the
   reference venv (benchmarks/refenv.py), via a small generator script;
   optionally runs the reference once more to prepare existing mags (case e);
3. copies it twice, runs `webknossos downsample --distribution-strategy
   sequential FLAGS` on one copy and `beam-downsample --distribution-strategy
   sequential FLAGS` on the other;
4. compares datasource-properties.json (parsed, strict JSON equality), every
   zarr.json (dataset group, layer groups with their NGFF multiscales, every
   mag array), and every voxel of every mag array (whole arrays, with
   tensorstore).

Prints a table case x mag (identical, or the number of differing voxels) and
exits 1 if anything differs or a tool fails. The reference is slow (~1 min per
tiny case) and memory hungry (uint64 above all): cases are small and run one
at a time.

    python benchmarks/parity.py                 # all cases
    python benchmarks/parity.py --cases a,e,f --keep /tmp/parity --json report.json

The reference venv: $BEAM_DOWNSAMPLE_REF_VENV if set, else a cached venv in
~/.cache/beam-downsample/webknossos-4.3.3 (created on first use).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dscompare  # noqa: E402  pylint: disable=wrong-import-position
import refenv  # noqa: E402  pylint: disable=wrong-import-position

# Where the crops come from in the 512^3 segmentation: a region with ~110 labels.
CROP_ORIGIN = (300, 300, 300)
TOP_LEFT = (3, 5, 7)
VOXEL = (11.24, 11.24, 28.0)
TOOL_TIMEOUT = 1800  # seconds, per tool run


@dataclasses.dataclass(frozen=True)
class Case:
    key: str
    description: str
    data: str  # which input layers: "real", "shallow", "uint16x2"
    voxel_size: tuple[float, float, float] = VOXEL
    flags: tuple[str, ...] = ()
    # Flags of a reference run made on the base dataset before it is copied (existing mags).
    prepare_flags: tuple[str, ...] | None = None
    # A failure of the reference to *create* the dataset skips the case instead of failing it.
    optional: bool = False
    data_format: str = "zarr3"  # the layers' dataFormat, as the reference's add_layer writes it

    def base_key(self) -> str:
        prep = "-".join(self.prepare_flags or ()).replace("--", "").replace(" ", "")
        voxel = "x".join(f"{v:g}" for v in self.voxel_size)
        return f"{self.data}_{self.data_format}_{voxel}" + (f"_prep-{prep}" if self.prepare_flags else "")


CASES: dict[str, Case] = {
    c.key: c
    for c in [
        Case("a", "color uint8 + segmentation uint32, 150x133x70 at (3,5,7), default options", "real"),
        Case("b", "as a, --sampling-mode isotropic --coarsest-mag 8", "real",
             flags=("--sampling-mode", "isotropic", "--coarsest-mag", "8")),
        Case("c", "as a, --sampling-mode constant_z", "real", flags=("--sampling-mode", "constant_z")),
        Case("d", "as a at voxel size 10.5,10.5,24, --coarsest-mag 16-16-8", "real", voxel_size=(10.5, 10.5, 24.0),
             flags=("--coarsest-mag", "16-16-8")),
        Case("e", "as a with mags 1 and 2-2-1 (2-2-1 made by the reference), then --coarsest-mag 8", "real",
             flags=("--coarsest-mag", "8"), prepare_flags=("--coarsest-mag", "2-2-1")),
        Case("f", "shallow layers 120x100x20 at (3,5,7) (4096x4096x32 shards), default options", "shallow"),
        Case("g", "as a, --layer-name segmentation (color untouched)", "real", flags=("--layer-name", "segmentation")),
        Case("h", "color uint16 with 2 channels (numChannels=2), 150x133x70 at (3,5,7), default options",
             "uint16x2", optional=True),
        Case("i", "as a in zarr v2 (dataFormat zarr)", "real", data_format="zarr"),
        Case("j", "as a in wkw", "real", data_format="wkw"),
        Case("k", "segmentation uint64 with IDs above 2**53, 64x48x24 at (3,5,7), default options", "uint64"),
        Case("l", "color RGB (elementClass uint24, 3 x uint8), 150x133x70 at (3,5,7), default options", "rgb"),
        Case("m", "color float32 and color int16 with negative values, 150x133x70 at (3,5,7), default options",
             "float_int16"),
    ]
}


GENERATOR = r'''
"""Runs in the reference venv: creates a dataset with webknossos' public API."""
import json
import sys
import warnings

warnings.simplefilter("ignore")
import numpy as np
import webknossos as wk

spec = json.load(open(sys.argv[1], encoding="utf-8"))
dataset = wk.Dataset(spec["path"], voxel_size=tuple(spec["voxel_size"]))
for item in spec["layers"]:
    data = np.load(item["npy"])
    kwargs = {}
    if item["category"] == "segmentation":
        kwargs["largest_segment_id"] = item["largest_segment_id"]
    if item.get("num_channels", 1) != 1:
        kwargs["num_channels"] = item["num_channels"]
    category = wk.SEGMENTATION_CATEGORY if item["category"] == "segmentation" else wk.COLOR_CATEGORY
    layer = dataset.add_layer(item["name"], category, dtype_per_channel=item["dtype"],
                              data_format=spec["data_format"], **kwargs)
    layer.add_mag(1).write(data, absolute_offset=tuple(item["top_left"]), allow_resize=True)
print("created", spec["path"])
'''


# ---------------------------------------------------------------------------
# Inputs


_SEGMENTATION: np.ndarray | None = None


def _segmentation() -> np.ndarray:
    global _SEGMENTATION  # pylint: disable=global-statement
    if _SEGMENTATION is None:
        from beam_downsample.demo import load_segmentation  # pylint: disable=import-outside-toplevel

        _SEGMENTATION = load_segmentation()
    return _SEGMENTATION


def _crop(size: Sequence[int]) -> np.ndarray:
    o = CROP_ORIGIN
    return np.ascontiguousarray(_segmentation()[o[0]:o[0] + size[0], o[1]:o[1] + size[1], o[2]:o[2] + size[2]])


def input_layers(kind: str) -> list[dict]:
    """Layer specs with numpy data (x, y, z) or (c, x, y, z)."""
    from beam_downsample.demo import render_color  # pylint: disable=import-outside-toplevel

    if kind in ("real", "shallow"):
        seg = _crop((150, 133, 70) if kind == "real" else (120, 100, 20))
        return [
            {"name": "color", "category": "color", "dtype": "uint8", "data": render_color(seg, seed=1)},
            {"name": "segmentation", "category": "segmentation", "dtype": "uint32", "data": seg,
             "largest_segment_id": int(seg.max())},
        ]
    if kind == "uint16x2":
        seg = _crop((150, 133, 70))
        first = render_color(seg, seed=2).astype(np.uint16) * 257
        # A per-label pseudo-random 16-bit value: large values, many even-size median ties.
        second = ((seg.astype(np.uint64) * 2654435761) >> np.uint64(13)).astype(np.uint16)
        return [{"name": "color16", "category": "color", "dtype": "uint16", "num_channels": 2,
                 "data": np.stack([first, second])}]
    if kind == "uint64":
        seg = _crop((64, 48, 24)).astype(np.uint64)
        labels = np.where(seg == 0, np.uint64(0), seg + np.uint64(2**60))  # differ only in the low bits
        return [{"name": "segmentation", "category": "segmentation", "dtype": "uint64", "data": labels,
                 "largest_segment_id": int(labels.max())}]
    if kind == "rgb":
        seg = _crop((150, 133, 70))
        rgb = np.stack([render_color(seg, seed=s) for s in (3, 4, 5)])
        return [{"name": "color", "category": "color", "dtype": "uint8", "num_channels": 3, "data": rgb}]
    if kind == "float_int16":
        seg = _crop((150, 133, 70))
        color = render_color(seg, seed=6)
        return [
            {"name": "color_float", "category": "color", "dtype": "float32",
             "data": (color.astype(np.float32) / 7.0 - 11.5)},
            {"name": "color_int16", "category": "color", "dtype": "int16",
             "data": (color.astype(np.int16) - 128) * 255 + (seg % 255).astype(np.int16)},
        ]
    raise ValueError(f"unknown input kind {kind!r}")


# ---------------------------------------------------------------------------
# Running things


def _run(cmd: Sequence[str], log_path: str, env: dict | None = None) -> tuple[int, float]:
    start = time.monotonic()
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        try:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=TOOL_TIMEOUT,
                                  stdin=subprocess.DEVNULL, check=False)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            log.write(f"\n[parity] timed out after {TOOL_TIMEOUT} s\n")
            code = -999
    return code, time.monotonic() - start




def reference_downsample(dataset: str, flags: Sequence[str], log_path: str) -> tuple[int, float]:
    cmd = [refenv.reference_cli(), "downsample", dataset, "--distribution-strategy", "sequential", *flags]
    return _run(cmd, log_path, env=refenv.reference_env())


def _log(message: str) -> None:
    print(f"[parity {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def write_reference_inputs(folder: str, layers: Sequence[dict], voxel_size, data_format: str,
                           top_left=TOP_LEFT) -> tuple[str, str, str, list[str]]:
    """Everything the reference needs to create a dataset of `layers` with its own API
    (GENERATOR, run in its venv): the arrays as .npy, spec.json and the script, in `folder`.
    Returns (dataset path, spec path, script path, npy paths)."""
    dataset = os.path.join(folder, "dataset")
    spec_layers = []
    for layer in layers:
        npy = os.path.join(folder, f"{layer['name']}.npy")
        np.save(npy, layer["data"])
        entry = {k: v for k, v in layer.items() if k != "data"}
        entry.update(npy=npy, top_left=list(top_left))
        spec_layers.append(entry)
    spec_path = os.path.join(folder, "spec.json")
    with open(spec_path, "w", encoding="utf-8") as handle:
        json.dump({"path": dataset, "voxel_size": list(voxel_size), "layers": spec_layers,
                   "data_format": data_format}, handle, indent=2)
    script = os.path.join(folder, "make_reference_dataset.py")
    with open(script, "w", encoding="utf-8") as handle:
        handle.write(GENERATOR)
    return dataset, spec_path, script, [entry["npy"] for entry in spec_layers]


class BaseDatasets:
    """Creates (once per run) the input dataset of each distinct case setup."""

    def __init__(self, root: str):
        self.root = root
        self.made: dict[str, tuple[str | None, str]] = {}

    def get(self, case: Case) -> tuple[str | None, str]:
        """(dataset path or None, note)."""
        key = case.base_key()
        if key in self.made:
            return self.made[key]
        folder = os.path.join(self.root, "bases", key)
        os.makedirs(folder, exist_ok=True)
        dataset, spec_path, script, npys = write_reference_inputs(folder, input_layers(case.data), case.voxel_size,
                                                                  case.data_format)
        _log(f"creating input {key} with the reference API ...")
        try:
            result = self._create(case, folder, dataset, script, spec_path)
        finally:
            for npy in npys:
                if os.path.exists(npy):
                    os.remove(npy)
        self.made[key] = result
        return result

    @staticmethod
    def _create(case: Case, folder: str, dataset: str, script: str, spec_path: str) -> tuple[str | None, str]:
        log = os.path.join(folder, "create.log")
        code, seconds = _run([refenv.reference_python(), script, spec_path], log, env=refenv.reference_env())
        if code != 0:
            return None, f"reference API could not create it (exit {code}): {refenv.tail(log, 5)}"
        note = f"created in {seconds:.0f} s"
        if case.prepare_flags:
            _log(f"preparing existing mags with the reference: {' '.join(case.prepare_flags)} ...")
            log = os.path.join(folder, "prepare.log")
            code, seconds = reference_downsample(dataset, case.prepare_flags, log)
            if code != 0:
                return None, f"reference preparation failed (exit {code}): {refenv.tail(log, 5)}"
            note += f", prepared in {seconds:.0f} s"
        return dataset, note


@dataclasses.dataclass
class CaseResult:
    key: str
    description: str
    status: str  # identical | differs | reference-failed | ours-failed | skipped | error
    note: str = ""
    reference_seconds: float | None = None
    ours_seconds: float | None = None
    comparison: dict | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("identical", "skipped")


def run_case(case: Case, bases: BaseDatasets, root: str, ours_args: Sequence[str]) -> CaseResult:
    result = CaseResult(case.key, case.description, "error")
    base, note = bases.get(case)
    if base is None:
        result.status = "skipped" if case.optional else "error"
        result.note = note
        return result
    folder = os.path.join(root, f"case-{case.key}")
    if os.path.exists(folder):
        shutil.rmtree(folder)
    os.makedirs(folder)
    ref_ds = os.path.join(folder, "reference")
    ours_ds = os.path.join(folder, "ours")
    shutil.copytree(base, ref_ds)
    shutil.copytree(base, ours_ds)
    _log(f"case {case.key}: reference  webknossos downsample --distribution-strategy sequential {' '.join(case.flags)}")
    code, result.reference_seconds = reference_downsample(ref_ds, case.flags, os.path.join(folder, "reference.log"))
    if code != 0:
        result.status = "reference-failed"
        result.note = f"exit {code}: {refenv.tail(os.path.join(folder, 'reference.log'))}"
        return result
    cmd = [*refenv.ours_command(), ours_ds, "--distribution-strategy", "sequential", *case.flags, *ours_args]
    _log(f"case {case.key}: ours       {shlex.join(cmd[1:])}")
    code, result.ours_seconds = _run(cmd, os.path.join(folder, "ours.log"))
    if code != 0:
        result.status = "ours-failed"
        result.note = f"exit {code}: {refenv.tail(os.path.join(folder, 'ours.log'))}"
        return result
    _log(f"case {case.key}: comparing")
    comparison = dscompare.compare_datasets(ref_ds, ours_ds)
    result.comparison = comparison.to_dict()
    result.status = "identical" if comparison.ok else "differs"
    notes = [note]
    if comparison.properties_equal and not comparison.properties_text_equal:
        notes.append("datasource-properties.json parses equal but its text differs")
    result.note = "; ".join(notes)
    return result


# ---------------------------------------------------------------------------
# Report


def _mag_sort_key(name: str) -> tuple:
    mag = dscompare.mag_tuple(name)
    return (max(mag), mag)


def print_report(results: Sequence[CaseResult], out=sys.stdout) -> None:
    print("\n## Cases\n", file=out)
    print("| case | result | reference s | ours s | properties | zarr.json | description |", file=out)
    print("|---|---|---|---|---|---|---|", file=out)
    for r in results:
        props = jsons = "-"
        if r.comparison:
            props = "identical" if r.comparison["properties_equal"] else f"{len(r.comparison['properties_diff'])} diffs"
            jsons = "identical" if not r.comparison["json_diffs"] else f"{len(r.comparison['json_diffs'])} diffs"
        ref_s = f"{r.reference_seconds:.1f}" if r.reference_seconds is not None else "-"
        ours_s = f"{r.ours_seconds:.1f}" if r.ours_seconds is not None else "-"
        print(f"| {r.key} | {r.status} | {ref_s} | {ours_s} | {props} | {jsons} | {r.description} |", file=out)

    rows = []
    mags: set[str] = set()
    for r in results:
        if not r.comparison:
            continue
        by_layer: dict[str, dict[str, str]] = {}
        for a in r.comparison["arrays"]:
            cell = "identical" if a["ok"] else (f"{a['differing']} differ" if a["status"] == "differs" and
                                                  a["differing"] > 0 else a["status"])
            by_layer.setdefault(a["layer"], {})[a["mag"]] = cell
            mags.add(a["mag"])
        for layer, cells in by_layer.items():
            rows.append((f"{r.key} / {layer}", cells))
    if rows:
        columns = sorted(mags, key=_mag_sort_key)
        print("\n## Voxels (case / layer x mag; '.' = mag not present in either output)\n", file=out)
        print("| case / layer | " + " | ".join(columns) + " |", file=out)
        print("|---|" + "---|" * len(columns), file=out)
        for label, cells in rows:
            print(f"| {label} | " + " | ".join(cells.get(m, ".") for m in columns) + " |", file=out)

    problems = [r for r in results if r.status != "identical"]
    if problems:
        print("\n## Details\n", file=out)
    for r in problems:
        print(f"- case {r.key} ({r.status}): {r.note}".rstrip(), file=out)
        if not r.comparison:
            continue
        for line in r.comparison["properties_diff"][:20]:
            print(f"    properties: {line}", file=out)
        for line in r.comparison["json_diffs"][:20]:
            print(f"    zarr.json: {line}", file=out)
        for a in r.comparison["arrays"]:
            if a["ok"]:
                continue
            print(f"    {a['layer']} mag {a['mag']}: {a['status']}, {a['differing']} differing voxels "
                  f"({a['differing_outside_bbox']} outside the bbox), of {a['compared_voxels']} compared"
                  + (f"; {a['note']}" if a["note"] else ""), file=out)
            if a["example"]:
                print(f"      example: {json.dumps(a['example'])}", file=out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES),
                        help=f"comma-separated case keys (default: all = {','.join(CASES)})")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep every dataset and log there")
    parser.add_argument("--json", metavar="OUT", help="write the results as JSON to OUT")
    parser.add_argument("--ours-args", default="",
                        help="extra flags for beam-downsample, one shell-quoted string "
                             "(write --ours-args=--flag for a single flag)")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    args = parser.parse_args(argv)
    if args.list:
        for case in CASES.values():
            print(f"{case.key}: {case.description}  [flags: {' '.join(case.flags) or '(none)'}]")
        return 0
    keys = [k.strip() for k in args.cases.split(",") if k.strip()]
    unknown = [k for k in keys if k not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    root = os.path.abspath(args.keep) if args.keep else tempfile.mkdtemp(prefix="beam-downsample-parity-")
    os.makedirs(root, exist_ok=True)
    _log(f"reference venv: {refenv.reference_venv()}; work dir {root}")
    bases = BaseDatasets(root)
    results: list[CaseResult] = []
    try:
        for key in keys:
            try:
                result = run_case(CASES[key], bases, root, shlex.split(args.ours_args))
            except Exception as error:  # pylint: disable=broad-except
                result = CaseResult(key, CASES[key].description, "error", note=f"{type(error).__name__}: {error}")
            _log(f"case {key}: {result.status}")
            results.append(result)
    finally:
        print_report(results)
        if args.json:
            with open(args.json, "w", encoding="utf-8") as handle:
                json.dump({"ok": all(r.ok for r in results) and len(results) == len(keys),
                           "work_dir": root if args.keep else None,
                           "cases": [dataclasses.asdict(r) | {"ok": r.ok} for r in results]}, handle, indent=2)
        if args.keep:
            print(f"\noutputs kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0 if all(r.ok for r in results) and len(results) == len(keys) else 1


if __name__ == "__main__":
    sys.exit(main())
