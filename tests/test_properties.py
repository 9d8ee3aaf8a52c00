"""datasource-properties.json: loading, checking, rewriting (contract sections 1 and 4)."""

from __future__ import annotations

import copy
import json
import os
import stat

import numpy as np
import pytest

from beam_downsample.core.box import Box
from beam_downsample.store import properties
from beam_downsample.store.properties import DatasetError

AXIS_ORDER = {"c": 0, "x": 1, "y": 2, "z": 3}


def raw_properties() -> dict:
    return {
        "id": {"name": "ds", "team": ""},
        "scale": {"factor": [11.24, 11.24, 28.0], "unit": "nanometer"},
        "version": 1,
        "defaultViewConfiguration": {"fourBit": False, "zoom": 1.5},
        "futureTopLevelKey": [1, {"nested": None}],
        "dataLayers": [
            {
                "name": "color",
                "category": "color",
                "boundingBox": {"topLeft": [3, 5, 7], "width": 150, "height": 133, "depth": 70},
                "elementClass": "uint8",
                "dataFormat": "zarr3",
                "numChannels": 1,
                "defaultViewConfiguration": {"color": [255, 0, 0], "alpha": 80},
                "additionalAxes": [],
                "mags": [
                    {"mag": [1, 1, 1], "path": "./color/1", "axisOrder": dict(AXIS_ORDER),
                     "credentials": "keep-me"},
                ],
            },
            {
                "name": "segmentation",
                "category": "segmentation",
                "largestSegmentId": 5536,
                "boundingBox": {"topLeft": [0, 0, 0], "width": 64, "height": 64, "depth": 32},
                "elementClass": "uint32",
                "dataFormat": "zarr3",
                "numChannels": 1,
                "attachments": {"meshes": [{"name": "m", "path": "./segmentation/meshes/m.hdf5"}]},
                "mags": [
                    {"mag": [1, 1, 1], "path": "./segmentation/1", "axisOrder": dict(AXIS_ORDER)},
                    {"mag": [2, 2, 1], "path": "./segmentation/2-2-1", "axisOrder": dict(AXIS_ORDER)},
                ],
            },
        ],
    }


def write(path, raw, indent=4) -> str:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, properties.PROPERTIES_FILE), "w", encoding="utf-8") as handle:
        if isinstance(raw, str):
            handle.write(raw)
        else:
            json.dump(raw, handle, indent=indent)
    return str(path)


# ---------------------------------------------------------------------------
# loading


def test_load_dataset(tmp_path):
    dataset = properties.load_dataset(write(tmp_path / "ds", raw_properties()))
    assert dataset.voxel_size == (11.24, 11.24, 28.0)
    assert dataset.unit == "nanometer"
    color, segmentation = dataset.layers
    assert color.name == "color" and color.category == "color"
    assert color.bbox == Box((3, 5, 7), (153, 138, 77))
    assert color.dtype == np.uint8 and color.num_channels == 1
    assert color.data_format == "zarr3"
    assert color.mags == {(1, 1, 1): "./color/1"}
    assert color.source_mag == (1, 1, 1)
    assert segmentation.dtype == np.uint32
    assert segmentation.source_mag == (2, 2, 1)
    assert segmentation.mag_path(str(tmp_path / "ds"), (2, 2, 1)) == str(tmp_path / "ds" / "segmentation" / "2-2-1")
    assert dataset.all_mags() == {(1, 1, 1), (2, 2, 1)}
    assert dataset.layer("segmentation") is segmentation


def test_scale_as_bare_list(tmp_path):
    raw = raw_properties()
    raw["scale"] = [10.5, 10.5, 24]
    dataset = properties.load_dataset(write(tmp_path / "ds", raw))
    assert dataset.voxel_size == (10.5, 10.5, 24.0)
    assert dataset.unit == "nanometer"


def test_scale_unit_kept(tmp_path):
    raw = raw_properties()
    raw["scale"] = {"factor": [1, 1, 2], "unit": "micrometer"}
    assert properties.load_dataset(write(tmp_path / "ds", raw)).unit == "micrometer"


@pytest.mark.parametrize(
    "element_class, dtype, channels, num_channels",
    [("uint24", "uint8", 3, 1), ("uint24", "uint8", 3, 3), ("float", "float32", 1, 1), ("double", "float64", 1, 1),
     ("int16", "int16", 1, 1), ("uint16", "uint8", 2, 2), ("uint64", "uint64", 1, 1),
     ("uint32", "uint16", 2, 2), ("uint64", "uint16", 4, 4), ("double", "float32", 2, 2), ("uint48", "uint16", 3, 3)],
)
def test_element_classes(tmp_path, element_class, dtype, channels, num_channels):
    raw = raw_properties()
    raw["dataLayers"][0]["elementClass"] = element_class
    raw["dataLayers"][0]["numChannels"] = num_channels
    layer = properties.load_dataset(write(tmp_path / "ds", raw)).layers[0]
    assert layer.dtype == np.dtype(dtype)
    assert layer.num_channels == channels


def test_element_class_that_does_not_split_into_channels_is_refused(tmp_path):
    raw = raw_properties()
    raw["dataLayers"][0]["elementClass"] = "uint8"
    raw["dataLayers"][0]["numChannels"] = 2
    with pytest.raises(DatasetError, match="does not split into 2 channels"):
        properties.load_dataset(write(tmp_path / "ds", raw))


def test_unknown_layer_lists_layers(tmp_path):
    dataset = properties.load_dataset(write(tmp_path / "ds", raw_properties()))
    with pytest.raises(DatasetError) as error:
        dataset.layer("nope")
    assert "color" in str(error.value) and "segmentation" in str(error.value)


def _drop(key_path):
    def mutate(raw):
        target = raw
        for key in key_path[:-1]:
            target = target[key]
        del target[key_path[-1]]
    return mutate


def _set(key_path, value):
    def mutate(raw):
        target = raw
        for key in key_path[:-1]:
            target = target[key]
        target[key_path[-1]] = value
    return mutate


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (_drop(["dataLayers"]), "dataLayers"),
        (_drop(["scale"]), "scale"),
        (_drop(["dataLayers", 0, "name"]), "name"),
        (_drop(["dataLayers", 0, "category"]), "category"),
        (_drop(["dataLayers", 0, "elementClass"]), "elementClass"),
        (_drop(["dataLayers", 0, "boundingBox"]), "boundingBox"),
        (_drop(["dataLayers", 0, "mags"]), "mags"),
        (_drop(["dataLayers", 1, "boundingBox", "width"]), "boundingBox"),
        (_set(["dataLayers", 0, "mags"], []), "mags"),
        (_set(["dataLayers", 0, "elementClass"], "uint12"), "elementClass"),
        (_set(["dataLayers", 0, "category"], "skeleton"), "category"),
        (_set(["dataLayers", 0, "mags", 0, "mag"], [3, 3, 3]), "mag"),
        (_set(["dataLayers"], {"color": {}}), "dataLayers"),
        (_set(["scale"], [1, 2]), "scale"),
        (_set(["scale"], {"factor": [1, 0, 1]}), "scale"),
        (_set(["scale"], "big"), "scale"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_invalid_properties(tmp_path, mutate, needle):
    raw = raw_properties()
    mutate(raw)
    with pytest.raises(DatasetError) as error:
        properties.load_dataset(write(tmp_path / "ds", raw))
    message = str(error.value)
    assert needle in message
    assert "\n" not in message


def test_missing_dataset(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        properties.load_dataset(str(tmp_path / "nowhere"))


def test_target_is_a_file(tmp_path):
    path = tmp_path / "file.txt"
    path.write_text("hi")
    with pytest.raises(DatasetError, match="not a directory"):
        properties.load_dataset(str(path))


def test_missing_properties_file(tmp_path):
    with pytest.raises(DatasetError, match=properties.PROPERTIES_FILE):
        properties.load_dataset(str(tmp_path))


@pytest.mark.parametrize("text", ["{", "", "not json", '{"dataLayers": [}'])
def test_broken_json(tmp_path, text):
    with pytest.raises(DatasetError, match="JSON"):
        properties.load_dataset(write(tmp_path / "ds", text))


def test_json_not_an_object(tmp_path):
    with pytest.raises(DatasetError):
        properties.load_dataset(write(tmp_path / "ds", "[1, 2, 3]"))


# ---------------------------------------------------------------------------
# rewriting


def test_with_new_mags_appends_sorted_and_keeps_unknown_keys():
    raw = raw_properties()
    before = copy.deepcopy(raw)
    updated = properties.with_new_mags(raw, "segmentation", [(8, 8, 4), (4, 4, 2)])
    assert raw == before  # the input is not modified

    mags = updated["dataLayers"][1]["mags"]
    assert [m["mag"] for m in mags] == [[1, 1, 1], [2, 2, 1], [4, 4, 2], [8, 8, 4]]
    assert mags[2] == {"mag": [4, 4, 2], "path": "./segmentation/4-4-2", "axisOrder": AXIS_ORDER}
    assert mags[3] == {"mag": [8, 8, 4], "path": "./segmentation/8-8-4", "axisOrder": AXIS_ORDER}

    # everything else is as it was
    expected = copy.deepcopy(before)
    expected["dataLayers"][1]["mags"] = mags
    assert updated == expected


def test_with_new_mags_isotropic_names_and_finest_first():
    raw = raw_properties()
    updated = properties.with_new_mags(raw, "color", [(4, 4, 4), (2, 2, 1), (16, 16, 8), (8, 8, 8)])
    mags = updated["dataLayers"][0]["mags"]
    assert [m["mag"] for m in mags] == [[1, 1, 1], [2, 2, 1], [4, 4, 4], [8, 8, 8], [16, 16, 8]]
    assert [m["path"] for m in mags] == ["./color/1", "./color/2-2-1", "./color/4", "./color/8", "./color/16-16-8"]
    assert mags[0]["credentials"] == "keep-me"
    assert updated["dataLayers"][1] == raw["dataLayers"][1]


def test_with_new_mags_does_not_duplicate():
    raw = raw_properties()
    updated = properties.with_new_mags(raw, "segmentation", [(2, 2, 1), (4, 4, 2)])
    updated = properties.with_new_mags(updated, "segmentation", [(4, 4, 2)])
    assert [m["mag"] for m in updated["dataLayers"][1]["mags"]] == [[1, 1, 1], [2, 2, 1], [4, 4, 2]]


def test_save_properties_roundtrip_indent_4(tmp_path):
    path = write(tmp_path / "ds", raw_properties(), indent=2)
    dataset = properties.load_dataset(path)
    updated = properties.with_new_mags(dataset.raw, "color", [(2, 2, 1)])
    properties.save_properties(path, updated)
    text = (tmp_path / "ds" / properties.PROPERTIES_FILE).read_text(encoding="utf-8")
    assert text == json.dumps(updated, indent=4)
    assert '\n    "dataLayers": [\n        {' in text
    reloaded = json.loads(text)
    assert reloaded["futureTopLevelKey"] == [1, {"nested": None}]
    assert reloaded["defaultViewConfiguration"] == {"fourBit": False, "zoom": 1.5}
    assert reloaded["dataLayers"][0]["defaultViewConfiguration"] == {"color": [255, 0, 0], "alpha": 80}
    assert reloaded["dataLayers"][1]["attachments"]["meshes"][0]["name"] == "m"
    assert reloaded["dataLayers"][1]["largestSegmentId"] == 5536
    assert reloaded["dataLayers"][0]["boundingBox"] == {"topLeft": [3, 5, 7], "width": 150, "height": 133, "depth": 70}
    assert reloaded["dataLayers"][0]["mags"][1] == {"mag": [2, 2, 1], "path": "./color/2-2-1", "axisOrder": AXIS_ORDER}
    # and it still loads
    assert properties.load_dataset(path).layers[0].mags == {(1, 1, 1): "./color/1", (2, 2, 1): "./color/2-2-1"}


def test_save_properties_leaves_no_temp_files(tmp_path):
    path = write(tmp_path / "ds", raw_properties())
    (tmp_path / "ds" / "color").mkdir()
    before = sorted(os.listdir(path))
    for mags in ([(2, 2, 1)], [(4, 4, 2)], [(8, 8, 4)]):
        properties.save_properties(path, properties.with_new_mags(properties.load_dataset(path).raw, "color", mags))
    assert sorted(os.listdir(path)) == before


def test_save_properties_failure_keeps_old_file_and_no_temp(tmp_path):
    path = write(tmp_path / "ds", raw_properties())
    file = tmp_path / "ds" / properties.PROPERTIES_FILE
    old = file.read_bytes()
    before = sorted(os.listdir(path))
    bad = raw_properties()
    bad["unserialisable"] = object()
    with pytest.raises(TypeError):
        properties.save_properties(path, bad)
    assert file.read_bytes() == old
    assert sorted(os.listdir(path)) == before


def test_save_properties_keeps_file_mode(tmp_path):
    path = write(tmp_path / "ds", raw_properties())
    file = tmp_path / "ds" / properties.PROPERTIES_FILE
    os.chmod(file, 0o640)
    properties.save_properties(path, raw_properties())
    assert stat.S_IMODE(os.stat(file).st_mode) == 0o640
