"""Fuzzing `datasource-properties.json` with Hypothesis (issue 13).

Each example mutates the valid properties of a tiny two-layer dataset (keys
dropped, types swapped, values out of range, odd strings in names and
paths, unicode, deep nesting, very large numbers) and runs the CLI
in-process (`--distribution-strategy sequential`). Every mutation must
either

- exit 2 with exactly one `beam-downsample: error:` line and leave the
  dataset and its surroundings untouched, or
- exit 0 with mags that open, and that are byte-for-byte the unmutated
  run's wherever the layer's geometry and mag chain are unchanged (the
  unmutated run itself is checked against numpy below);

never a traceback, never a hang (SIGALRM per example), never a byte written
outside TARGET (the parent directory is hashed before and after).

Fixed seed (`derandomize=True`) and BEAM_DOWNSAMPLE_FUZZ_EXAMPLES examples
(default 200, under a minute); set it higher to fuzz longer.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import shutil
import signal
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from beam_downsample import demo
from beam_downsample.launch import cli
from beam_downsample.store import arrays as beam_io
from beam_downsample.store.properties import load_dataset
from conftest import PROPERTIES, tree_digest

EXAMPLES = int(os.environ.get("BEAM_DOWNSAMPLE_FUZZ_EXAMPLES", "200"))
TIMEOUT_S = 60  # one example; a tiny dataset takes ~1 s
SHAPE = (20, 18, 6)
TOP_LEFT = (3, 5, 7)
VOXEL_SIZE = (11.24, 11.24, 28.0)


# ---------------------------------------------------------------------------
# the dataset and its unmutated run


def _layers() -> list[dict]:
    rng = np.random.default_rng(13)
    return [
        {"name": "color", "category": "color", "top_left": TOP_LEFT,
         "data": rng.integers(0, 256, SHAPE, dtype=np.uint8)},
        {"name": "segmentation", "category": "segmentation", "top_left": TOP_LEFT,
         "data": rng.integers(0, 3, SHAPE, dtype=np.uint32)},
    ]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "ds"
    demo.write_dataset(str(path), _layers(), VOXEL_SIZE, name="ds")
    with open(path / PROPERTIES, encoding="utf-8") as handle:
        return path, json.load(handle)


def _run(target, *extra) -> tuple[int, str]:
    """cli.main in this process; (exit code, stderr). A hang raises TimeoutError."""

    def hung(signum, frame):
        raise TimeoutError(f"no result within {TIMEOUT_S} s")

    err = io.StringIO()
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(TIMEOUT_S)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = cli.main(["beam-downsample", str(target), "--distribution-strategy", "sequential", *extra])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return code, err.getvalue()


def _mags(path, skip=frozenset()) -> dict:
    """(layer, mag) -> the bounding box of every listed mag of every layer, read back,
    but for the (layer, mag) pairs in `skip`."""
    dataset = load_dataset(str(path))
    result = {}
    for layer in dataset.layers:
        for mag in layer.mags:
            if (layer.name, mag) in skip:
                continue
            array = beam_io.open_array(beam_io.existing_mag_spec(layer, dataset.path, mag), open=True)
            result[(layer.name, mag)] = beam_io.read_box(array, layer.bbox.scaled_down(mag), layer.num_channels)
    return result


@pytest.fixture(scope="module")
def baseline(pristine, tmp_path_factory):
    """The unmutated run: its properties and arrays."""
    source, _ = pristine
    path = tmp_path_factory.mktemp("fuzz-baseline") / "ds"
    shutil.copytree(source, path)
    code, err = _run(path)
    assert code == 0, err
    with open(path / PROPERTIES, encoding="utf-8") as handle:
        raw = json.load(handle)
    return raw, _mags(path)


def test_baseline_matches_numpy(baseline):
    """Anchors the comparisons below: the unmutated run's color mag 2-2-1 is the median
    of each 2x2x1 block of the bounding box (edge voxels replicated outward)."""
    raw, arrays = baseline
    source = _layers()[0]["data"]
    assert (("color", (2, 2, 1)) in arrays) and (("segmentation", (2, 2, 1)) in arrays)
    padded = np.pad(source, ((1, 1), (1, 1), (0, 0)), mode="edge")  # x and y start and end on odd voxels
    x, y, z = padded.shape[0] // 2, padded.shape[1] // 2, padded.shape[2]
    blocks = np.sort(padded.reshape(x, 2, y, 2, z).transpose(0, 2, 4, 1, 3).reshape(x, y, z, 4), axis=-1)
    expected = ((blocks[..., 1].astype(int) + blocks[..., 2]) // 2).astype(np.uint8)
    np.testing.assert_array_equal(arrays[("color", (2, 2, 1))][0], expected)


# ---------------------------------------------------------------------------
# mutations


def _paths(document) -> list[tuple]:
    """Every key path of the document (dict keys and list indices), without recursion."""
    found, stack = [], [(document, ())]
    while stack:
        node, prefix = stack.pop()
        if prefix:
            found.append(prefix)
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        stack.extend((value, prefix + (key,)) for key, value in items)
    return sorted(found, key=lambda path: (len(path), [str(k) for k in path]))


# Absolute paths point into the example's own directory ({parent}, replaced when the file is
# written), so that a regression writing through them stays inside what the test hashes.
# No gs:// URL: a remote source mag is read from the real GCS (credential look-ups, retries).
ODD_STRINGS = ["../evil", "../evil/color", "{parent}/abs", "{parent}/evil/color", ".beam-downsample", "a/b",
               "", ".", "..",
               "color", "segmentation", "./color/1", "./segmentation/1", "../ds/color/1", "gs:/bucket/x",
               "C:\\x", "ä", "\u202e", "\x00", "a\nb", "~", "$HOME", "%s", "uint8", "zarr3", "wkw", "zarr", "n5",
               "float", "uint24", "1", "2-2-1", "NaN", "1e400", " " * 3, "🙂" * 5]
HUGE = [0, -1, 1, 2, 3, 4, 7, 2**31 - 1, 2**31, 2**53 + 1, 2**62 - 1, 2**62, 2**63, 2**64, 10**30, -(2**63)]


def _deep(depth: int):
    node: object = 1
    for _ in range(depth):
        node = [node]
    return node


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from(HUGE),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(ODD_STRINGS),
    st.text(max_size=12),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(st.text(max_size=6), children,
                                                                                  max_size=3)),
    max_leaves=8,
) | st.integers(90, 900).map(_deep)

# "name" puts an odd string where a path is made from it: a layer name or a mag path.
mutation = st.tuples(st.sampled_from(["replace", "drop", "swap", "numeric", "name"]), st.integers(0, 10**6),
                     values | st.sampled_from(ODD_STRINGS))


def _at(document, path: tuple):
    for key in path:
        document = document[key]
    return document


def _swap(value):
    """The same content in another JSON type."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return {str(i): v for i, v in enumerate(value)}
    if isinstance(value, dict):
        return list(value.values())
    return 0


def _apply(raw: dict, kind: str, pick: int, value) -> None:
    if kind == "name":
        targets = [path for path in _paths(raw) if path[-1] in ("name", "path") and path[0] == "dataLayers"]
        if targets:
            path = targets[pick % len(targets)]
            _at(raw, path[:-1])[path[-1]] = ODD_STRINGS[pick % len(ODD_STRINGS)] if pick % 3 else value
        return
    paths = _paths(raw)
    if not paths:
        return
    path = paths[pick % len(paths)]
    parent, key = _at(raw, path[:-1]), path[-1]
    if kind == "drop":
        del parent[key]
    elif kind == "swap":
        parent[key] = _swap(parent[key])
    elif kind == "numeric" and isinstance(parent[key], (int, float)) and not isinstance(parent[key], bool):
        parent[key] = [0, -1, -parent[key], parent[key] * 2**40, parent[key] + 0.5][pick % 5]
    else:
        parent[key] = value


def _text(raw: dict) -> str:
    return json.dumps(raw, indent=4)


# ---------------------------------------------------------------------------
# the property


def _load(target):
    """The dataset as we read it, None if we refuse it (then the CLI must say so in one line).

    A valid box far larger than the data is real work (hours of fill values), not a
    hang: such examples are only loaded. Absurd ones are refused by the planner's
    unit limit (tests/test_untrusted.py)."""
    try:
        return load_dataset(target)
    except Exception:  # pylint: disable=broad-except
        return None


def _outside(digest: dict) -> dict:
    """The parent directory's digest without TARGET (`ds/...`)."""
    return {k: v for k, v in digest.items() if k.split("/")[0] != "ds"}


def _layer(raw, name: str):
    layers = raw.get("dataLayers") if isinstance(raw, dict) else None
    return next((l for l in layers or [] if isinstance(l, dict) and l.get("name") == name), None)


def _comparable(original: dict, mutated: dict, result: dict, baseline_raw: dict, name: str) -> bool:
    """Whether this layer's new mags must equal the unmutated run's: the same scale and
    layer description as unmutated, and the same listed mags (so the same chain made them)."""
    before, pristine, after, base = (_layer(r, name) for r in (mutated, original, result, baseline_raw))
    if None in (before, pristine, after, base) or mutated.get("scale") != original.get("scale"):
        return False
    keys = ("category", "elementClass", "numChannels", "dataFormat", "boundingBox")
    return (all(before.get(k) == pristine.get(k) for k in keys)
            and before.get("mags", [None])[:1] == pristine["mags"][:1]
            and [m["mag"] for m in after["mags"]] == [m["mag"] for m in base["mags"]])


@settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large])
@given(mutations=st.lists(mutation, min_size=1, max_size=3), select_layer=st.booleans())
def test_fuzzed_properties_downsample_or_refuse_in_one_line(pristine, baseline, mutations, select_layer):
    source, original = pristine
    raw = copy.deepcopy(original)
    for kind, pick, value in mutations:
        _apply(raw, kind, pick, value)
    try:
        text = _text(raw)
    except (ValueError, RecursionError):
        event("not JSON-serialisable")
        return  # not a JSON document we can even write
    with tempfile.TemporaryDirectory(prefix="fuzz-") as parent:
        target = os.path.join(parent, "ds")
        shutil.copytree(source, target)
        os.makedirs(os.path.join(parent, "evil"))  # a neighbour to write into
        with open(os.path.join(target, PROPERTIES), "w", encoding="utf-8") as handle:
            handle.write(text.replace("{parent}", parent))
        before = tree_digest(parent)
        dataset = _load(target)
        if dataset is not None and any(layer.bbox.voxels > 10**7 for layer in dataset.layers):
            event("bounding box of more than 10^7 voxels: loaded, not run")
            return
        extra = []
        layers = raw.get("dataLayers")
        if select_layer and isinstance(layers, list) and layers and isinstance(layers[0], dict) \
                and isinstance(layers[0].get("name"), str) and "\x00" not in layers[0]["name"]:
            extra = ["--layer-name", layers[0]["name"].replace("{parent}", parent)]
        code, err = _run(target, *extra)
        event(f"exit {code}")  # pytest --hypothesis-show-statistics counts the outcomes
        lines = err.splitlines()
        assert "Traceback" not in err, err
        if code == 2:
            assert len(lines) == 1 and lines[0].startswith("beam-downsample: error: "), err
            assert tree_digest(parent) == before, "refused, but something was written"
            return
        assert code == 0, f"exit {code}: {err}"
        # Besides our own notes, stderr carries the progress lines ("pass 1/1: ...") when it is no TTY.
        assert all(line.startswith(("beam-downsample: ", "pass ")) for line in lines), err
        assert _outside(tree_digest(parent)) == _outside(before), "wrote outside TARGET"
        with open(os.path.join(target, PROPERTIES), encoding="utf-8") as handle:
            result = json.load(handle)
        baseline_raw, baseline_arrays = baseline
        # Every new mag opens and reads; mags listed before need not (only the source is read).
        listed_before = {(l.name, m) for l in dataset.layers for m in l.mags}
        for (name, mag), data in _mags(target, listed_before).items():
            if (name, mag) in baseline_arrays and _comparable(original, raw, result, baseline_raw, name):
                np.testing.assert_array_equal(data, baseline_arrays[(name, mag)], err_msg=f"{name} {mag}")
