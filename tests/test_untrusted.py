"""Untrusted datasets (issue 13): the properties cannot make us write outside TARGET.

Every case runs the CLI in-process on a tiny dataset and compares a hash of
the dataset's *parent* directory before and after, so a write anywhere next
to the dataset (`ds/../evil`) is caught too.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest

from beam_downsample.core.grid import MAX_GRID_UNITS
from beam_downsample.launch import cli
from beam_downsample.store import properties, storage
from beam_downsample.store.properties import DatasetError
from conftest import PROPERTIES, open_array, read_properties, tree_digest, write_properties

PROG = "beam-downsample"
SEQUENTIAL = ["--distribution-strategy", "sequential"]

# Measured with webknossos 4.3.3 (`Dataset.add_layer(name, "color")`, its venv):
# it accepts exactly these and refuses the others. Any name it accepts, we accept.
REFERENCE_ACCEPTS = ["color", "a.b", "a..b", "x.", "-x", "$x", "@x", "_x", "color-1", "1", "A_Z$@-9.z"]
REFERENCE_REFUSES = ["a b", "ä", "ß", "a/b", "../evil", ".hidden", ".beam-downsample", "a\\b", "/abs", "a:b",
                     "a~b", "a+b", "a%b", "a#b", "", ".", "..", "a\nb"]


def run(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main([PROG, *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_refused(code: int, err: str, *needles: str) -> str:
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("beam-downsample: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def mutate(path, change) -> None:
    raw = read_properties(path)
    change(raw)
    write_properties(path, raw)


def rename_layer(path, old: str, new: str, mag_path: str | None = None) -> None:
    def change(raw):
        layer = next(l for l in raw["dataLayers"] if l["name"] == old)
        layer["name"] = new
        if mag_path is not None:
            layer["mags"][0]["path"] = mag_path

    mutate(path, change)


# ---------------------------------------------------------------------------
# layer names


@pytest.mark.parametrize("name", REFERENCE_ACCEPTS)
def test_names_the_reference_accepts_are_accepted(name):
    assert properties.check_layer_name(name) == name


@pytest.mark.parametrize("name", REFERENCE_REFUSES + [None, 5, ["color"]])
def test_names_the_reference_refuses_are_refused(name):
    with pytest.raises(DatasetError, match="layer name .* is invalid: a layer name may only contain letters"):
        properties.check_layer_name(name)


def test_issue_scenario_dotdot_layer_writes_nothing_outside(tiny_dataset, capsys):
    """The measured escape: layer `../evil/color` with its mag 1 moved there. Before the
    fix this exited 0 and wrote mags 2, 4, 8 to ds/../evil/color and left ds/.beam-downsample."""
    evil = tiny_dataset.parent / "evil"
    evil.mkdir()
    shutil.move(tiny_dataset / "color", evil / "color")
    rename_layer(tiny_dataset, "color", "../evil/color", "../evil/color/1")
    before = tree_digest(tiny_dataset.parent)
    code, _, err = run(capsys, tiny_dataset, "--layer-name", "../evil/color", *SEQUENTIAL)
    assert_refused(code, err, "'../evil/color'", "letters, digits")
    assert tree_digest(tiny_dataset.parent) == before
    assert not (tiny_dataset / ".beam-downsample").exists()


@pytest.mark.parametrize("name", ["{abs}", "a/b", ".beam-downsample", "..", "a\\b", "ä"])
def test_bad_layer_name_refused_before_anything_is_written(tiny_dataset, capsys, name):
    name = name.replace("{abs}", str(tiny_dataset.parent / "elsewhere"))
    rename_layer(tiny_dataset, "color", name)
    before = tree_digest(tiny_dataset.parent)
    code, _, err = run(capsys, tiny_dataset, *SEQUENTIAL)  # every layer: the bad one is not even selected
    assert_refused(code, err, repr(name), "is invalid")
    assert tree_digest(tiny_dataset.parent) == before


def test_two_layers_with_one_name(tiny_dataset, capsys):
    rename_layer(tiny_dataset, "segmentation", "color")
    before = tree_digest(tiny_dataset.parent)
    code, _, err = run(capsys, tiny_dataset, *SEQUENTIAL)
    assert_refused(code, err, "two layers", "'color'")
    assert tree_digest(tiny_dataset.parent) == before


# ---------------------------------------------------------------------------
# geometry and numbers: one line naming the key, nothing written


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def change(raw):
        node = raw
        for key in keys[:-1]:
            node = node[key]
        if value is KeyError:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value

    return change


BBOX = ("dataLayers", 0, "boundingBox")
LAYER = ("dataLayers", 0)
GEOMETRY_CASES = [
    ("negative-width", _set(*BBOX, "width", -40), ["boundingBox.width", "positive integer", "-40"]),
    ("zero-depth", _set(*BBOX, "depth", 0), ["boundingBox.depth", "positive integer"]),
    ("float-height", _set(*BBOX, "height", 36.5), ["boundingBox.height", "36.5"]),
    ("bool-width", _set(*BBOX, "width", True), ["boundingBox.width", "True"]),
    ("string-width", _set(*BBOX, "width", "40"), ["boundingBox.width"]),
    ("no-depth", _set(*BBOX, "depth", KeyError), ["boundingBox has no 'depth'"]),
    ("float-top-left", _set(*BBOX, "topLeft", [3.0, 5, 7]), ["boundingBox.topLeft", "three integers"]),
    ("bool-top-left", _set(*BBOX, "topLeft", [True, 5, 7]), ["boundingBox.topLeft", "three integers"]),
    ("short-top-left", _set(*BBOX, "topLeft", [3, 5]), ["boundingBox.topLeft"]),
    ("negative-top-left", _set(*BBOX, "topLeft", [-3, 5, 7]), ["boundingBox.topLeft", "negative"]),
    ("bbox-not-object", _set(*LAYER, "boundingBox", [0, 0, 0, 1, 1, 1]), ["boundingBox must be a JSON object"]),
    ("beyond-tensorstore-range", _set(*BBOX, "width", 2**62), ["boundingBox", "index range"]),
    ("huge-top-left", _set(*BBOX, "topLeft", [10**30, 5, 7]), ["boundingBox", "index range"]),
    # inside the index range, but 2**53 / 2048 units: refused before any is counted out (it ran out of memory)
    ("absurd-width", _set(*BBOX, "width", 2**53 + 1), ["'color'", f"work units (at most {MAX_GRID_UNITS})"]),
    ("voxel-size-0", _set("scale", "factor", [11.24, 0, 28.0]), ["scale", "finite positive"]),
    ("voxel-size-nan", _set("scale", "factor", [11.24, math.nan, 28.0]), ["scale", "finite positive"]),
    ("voxel-size-inf", _set("scale", "factor", [math.inf, 11.24, 28.0]), ["scale", "finite positive"]),
    ("voxel-size-negative", _set("scale", "factor", [-1, 11.24, 28.0]), ["scale", "finite positive"]),
    ("voxel-size-bool", _set("scale", "factor", [True, 1, 1]), ["scale", "finite positive"]),
    ("voxel-size-two", _set("scale", "factor", [1, 1]), ["scale"]),
    ("unit-not-string", _set("scale", "unit", 7), ["scale.unit"]),
    ("mag-3-3-1", _set(*LAYER, "mags", [{"mag": [3, 3, 1], "path": "./color/1"}]), ["power of two", "3"]),
    ("mag-0", _set(*LAYER, "mags", [{"mag": [0, 0, 0], "path": "./color/1"}]), ["power of two"]),
    ("mag-float", _set(*LAYER, "mags", [{"mag": [1.0, 1, 1], "path": "./color/1"}]), ["power of two"]),
    ("mags-not-list", _set(*LAYER, "mags", {"mag": [1, 1, 1]}), ["mags must be a list"]),
    ("mag-path-not-string", _set(*LAYER, "mags", [{"mag": [1, 1, 1], "path": 5}]), ["mag 1 path", "string"]),
    ("num-channels-0", _set(*LAYER, "numChannels", 0), ["numChannels", "positive integer"]),
    ("num-channels-string", _set(*LAYER, "numChannels", "1"), ["numChannels", "positive integer"]),
    ("num-channels-bool", _set(*LAYER, "numChannels", True), ["numChannels", "positive integer"]),
    ("num-channels-3", _set(*LAYER, "numChannels", 3), ["does not split into 3 channels"]),
    ("element-class-unknown", _set(*LAYER, "elementClass", "uint7"), ["elementClass", "uint7"]),
    ("element-class-list", _set(*LAYER, "elementClass", ["uint8"]), ["elementClass"]),
    ("data-format-unknown", _set(*LAYER, "dataFormat", "tiff"), ["dataFormat", "tiff"]),
    ("data-format-list", _set(*LAYER, "dataFormat", ["zarr3"]), ["dataFormat"]),
    ("layer-not-object", _set("dataLayers", 0, "color"), ["dataLayers[0] must be a JSON object"]),
    ("category-list", _set(*LAYER, "category", ["color"]), ["category"]),
]


@pytest.mark.parametrize("change, needles", [c[1:] for c in GEOMETRY_CASES], ids=[c[0] for c in GEOMETRY_CASES])
def test_geometry_and_numbers_refused_with_one_line(tiny_dataset, capsys, change, needles):
    mutate(tiny_dataset, change)
    before = tree_digest(tiny_dataset.parent)
    code, _, err = run(capsys, tiny_dataset, *SEQUENTIAL)
    assert_refused(code, err, *needles)
    assert tree_digest(tiny_dataset.parent) == before


def test_wkw_index_range_is_32_bits(tmp_path):
    raw = {"scale": {"factor": [1, 1, 1]}, "dataLayers": [{
        "name": "color", "category": "color", "elementClass": "uint8", "dataFormat": "wkw",
        "boundingBox": {"topLeft": [2**31 - 10, 0, 0], "width": 20, "height": 1, "depth": 1},
        "mags": [{"mag": [1, 1, 1]}]}]}
    (tmp_path / PROPERTIES).write_text(json.dumps(raw))
    with pytest.raises(DatasetError, match="beyond the wkw arrays' index range"):
        properties.load_dataset(str(tmp_path))
    raw["dataLayers"][0]["mags"] = [{"mag": [2, 2, 2]}]  # the same box fits in mag 2's voxels
    (tmp_path / PROPERTIES).write_text(json.dumps(raw))
    assert properties.load_dataset(str(tmp_path)).layers[0].bbox.stop == (2**31 + 10, 1, 1)


@pytest.mark.parametrize("text, needle", [
    ("[" * 100_000 + "]" * 100_000, "cannot be read"),  # deeper than the JSON parser recurses
    ('{"dataLayers": [], "scale": [1, 1, 1], "n": ' + "9" * 5000 + "}", "cannot be read"),  # > 4300 digits
    (b'{"scale": "\xff"}', "not UTF-8"),
])
def test_unparseable_properties_are_one_line(tiny_dataset, capsys, text, needle):
    path = tiny_dataset / PROPERTIES
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    before = tree_digest(tiny_dataset.parent)
    code, _, err = run(capsys, tiny_dataset, *SEQUENTIAL)
    assert_refused(code, err, needle)
    assert tree_digest(tiny_dataset.parent) == before


def test_properties_we_could_not_rewrite_are_refused_before_writing(tiny_dataset, capsys):
    """JSON nested deep enough to load, but that the rewrite after the pass (deeper in the
    stack, recursing in json's encoder) might not manage: refused up front."""
    raw = read_properties(tiny_dataset)
    text = json.dumps(raw)[:-1] + ', "deep": ' + "[" * 900 + "]" * 900 + "}"
    (tiny_dataset / PROPERTIES).write_text(text)
    json.loads(text)  # loads fine
    before = tree_digest(tiny_dataset.parent)
    code, _, err = run(capsys, tiny_dataset, *SEQUENTIAL)
    assert_refused(code, err, "nests deeper than 100 levels")
    assert tree_digest(tiny_dataset.parent) == before


# ---------------------------------------------------------------------------
# one place decides where we write


def test_join_inside_local(tmp_path):
    root = str(tmp_path / "ds")
    os.makedirs(root)
    assert storage.join_inside(root, "color", "2") == os.path.join(root, "color", "2")
    assert storage.join_inside(root, "a/../b") == os.path.join(root, "b")
    for parts in [("..",), ("color", "..", ".."), ("/etc",), ("",), ("a", "/abs"), ("../ds-other",), ("x\0",)]:
        with pytest.raises(storage.OutsideTargetError):
            storage.join_inside(root, *parts)


def test_join_inside_resolves_symlinks(tmp_path):
    root, outside = tmp_path / "ds", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "color").symlink_to(outside)
    (root / "inner").mkdir()
    (root / "alias").symlink_to(root / "inner")  # a symlink that stays inside is fine
    with pytest.raises(storage.OutsideTargetError, match="through a symlink it resolves to"):
        storage.join_inside(str(root), "color", "2")
    assert storage.join_inside(str(root), "alias", "2") == str(root / "alias" / "2")
    linked_target = tmp_path / "link-to-ds"
    linked_target.symlink_to(root)  # TARGET itself may be a symlink
    assert storage.join_inside(str(linked_target), "inner") == str(linked_target / "inner")


def test_join_inside_gcs():
    assert storage.join_inside("gs://b/ds", "color", "2") == "gs://b/ds/color/2"
    assert storage.join_inside("gs://b/ds/", "color") == "gs://b/ds/color"
    assert storage.join_inside("gs://b", "color") == "gs://b/color"
    for root, parts in [("gs://b/ds", ("..", "evil")), ("gs://b/ds", ("../ds-other",)), ("gs://b", ("..",)),
                        ("gs://b/ds", ("color/../../x",)), ("gs://b/ds", ("/abs",))]:
        with pytest.raises(storage.OutsideTargetError):
            storage.join_inside(root, *parts)


def test_layer_directory_symlinked_out_of_target_is_refused(tiny_dataset, capsys):
    """Writing through `ds/color -> elsewhere` would change another dataset: refused with one
    line before anything is written (docs/reliability.md: copy the layer in, or downsample where it lives)."""
    elsewhere = tiny_dataset.parent / "elsewhere"
    shutil.move(tiny_dataset / "color", elsewhere)
    (tiny_dataset / "color").symlink_to(elsewhere)
    before = tree_digest(tiny_dataset.parent)
    code, _, err = run(capsys, tiny_dataset, "--layer-name", "color", *SEQUENTIAL)
    assert_refused(code, err, "symlink", "outside TARGET")
    assert tree_digest(tiny_dataset.parent) == before


def test_new_mag_symlinked_out_of_target_is_refused(tiny_dataset, capsys):
    elsewhere = tiny_dataset.parent / "elsewhere"
    elsewhere.mkdir()
    (tiny_dataset / "color" / "2-2-1").symlink_to(elsewhere)
    before = tree_digest(tiny_dataset.parent)
    code, _, err = run(capsys, tiny_dataset, "--layer-name", "color", *SEQUENTIAL)
    assert_refused(code, err, "color/2-2-1", "symlink")
    assert tree_digest(tiny_dataset.parent) == before


def test_source_mag_outside_target_is_read_not_written(make_dataset, capsys):
    """WEBKNOSSOS lets a mag live elsewhere (absolute path, another dataset): we read it
    and write the new mags into TARGET only; the other dataset is untouched."""
    other = make_dataset("other")
    target = make_dataset("target")
    shutil.rmtree(target / "color" / "1")
    mutate(target, _set("dataLayers", 0, "mags", [{"mag": [1, 1, 1], "path": str(other / "color" / "1")}]))
    before_other = tree_digest(other)
    code, _, err = run(capsys, target, "--layer-name", "color", *SEQUENTIAL)
    assert code == 0, err
    assert tree_digest(other) == before_other
    mags = [m["mag"] for m in read_properties(target)["dataLayers"][0]["mags"]]
    assert mags[0] == [1, 1, 1] and len(mags) > 1
    source = open_array(other / "color" / "1").read().result()[0]
    written = open_array(target / "color" / "2-2-1").read().result()[0]
    # mag 2-2-1 of the bbox (3..43, 5..41, 7..19): median of each 2x2x1 block, edges replicated
    box = source[3:43, 5:41, 7:19]
    padded = np.pad(box, ((1, 1), (1, 1), (0, 0)), mode="edge")  # x, y start and end at odd coordinates
    blocks = padded.reshape(21, 2, 19, 2, 12).transpose(0, 2, 4, 1, 3).reshape(21, 19, 12, 4)
    ordered = np.sort(blocks, axis=-1).astype(np.int32)
    expected = ((ordered[..., 1] + ordered[..., 2]) // 2).astype(np.uint8)
    np.testing.assert_array_equal(written[1:22, 2:21, 7:19], expected)
