"""Many boxes at once (`--bbox` repeated, `--bbox-file`, `bboxes=[...]`): scattered,
overlapping, nested, adjacent and duplicate boxes each give exactly what a full recompute
gives; a unit touched by several boxes runs once; a unit reads only its boxes' parts and
nothing outside the boxes is written; an interrupted refresh of a set of boxes is reported
with a way to rerun it, and that rerun resumes. Flags given twice are refused."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

import beam_downsample as bd
from beam_downsample import demo
from beam_downsample.core.box import Box, disjoint, region_in_mag
from beam_downsample.launch import cli
from beam_downsample.plan import refresh
from beam_downsample.store import arrays
from beam_downsample.store.properties import load_dataset
from beam_downsample.transforms import work
from conftest import tree_digest
from refresh_helpers import assert_same_pyramid, copy_pyramid, mag_voxels

VOXEL_SIZE = (11.24, 11.24, 28.0)
TOP_LEFT = (3, 5, 7)
SHAPE = (600, 500, 64)
# small units (several per pass), in this process
RUN = {"distribution_strategy": "sequential", "memory_budget": "400M", "coarsest_mag": 8, "progress": False}
CASES = {
    "scattered": [(10, 10, 10, 20, 20, 10), (400, 300, 40, 30, 30, 20), (550, 20, 8, 40, 40, 30),
                  (200, 450, 30, 25, 40, 20)],
    "overlapping-and-nested": [(100, 100, 10, 80, 80, 30), (150, 150, 20, 80, 80, 30), (120, 120, 15, 10, 10, 5)],
    "duplicate": [(300, 200, 10, 40, 40, 20)] * 3 + [(50, 50, 50, 10, 10, 10)],
    "adjacent": [(100, 100, 10, 40, 40, 20), (140, 100, 10, 40, 40, 20), (100, 140, 10, 80, 13, 20)],
}


def box_text(box6) -> str:
    return ",".join(map(str, box6))


def original_layers() -> list[dict]:
    rng = np.random.default_rng(0)
    return [
        {"name": "color", "category": "color", "data": rng.integers(0, 256, SHAPE, dtype=np.uint8),
         "top_left": TOP_LEFT},
        {"name": "segmentation", "category": "segmentation", "data": rng.integers(0, 6, SHAPE, dtype=np.uint32),
         "top_left": TOP_LEFT, "largest_segment_id": 1000},
    ]


def edited_layers(boxes) -> list[dict]:
    """The original data with each box overwritten (new values and an erased slab), in order."""
    rng = np.random.default_rng(1)
    layers = [dict(layer, data=layer["data"].copy()) for layer in original_layers()]
    for box6 in boxes:
        start = [b - t for b, t in zip(box6[:3], TOP_LEFT)]
        index = tuple(slice(max(a, 0), a + s) for a, s in zip(start, box6[3:]))
        for layer in layers:
            part = layer["data"][index]
            part[...] = rng.integers(100, 200, part.shape).astype(part.dtype)
            part[:, :, : max(part.shape[2] // 3, 1)] = 0
    return layers


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The original data with its full pyramid (never changed)."""
    path = tmp_path_factory.mktemp("base") / "ds"
    demo.write_dataset(str(path), original_layers(), VOXEL_SIZE, name="ds")
    bd.downsample(path, **RUN)
    return path


def stale(base, boxes, path):
    """mag 1 edited inside the boxes, the other mags as before the edit."""
    demo.write_dataset(str(path), edited_layers(boxes), VOXEL_SIZE, name="ds")
    copy_pyramid(base, path)
    return path


def recomputed(boxes, path):
    """The expected result: the edited data written afresh and downsampled in full."""
    demo.write_dataset(str(path), edited_layers(boxes), VOXEL_SIZE, name="ds")
    bd.downsample(path, **RUN)
    return path


def test_disjoint_covers_the_union_once():
    rng = np.random.default_rng(2)
    for _ in range(300):
        boxes = []
        for _ in range(rng.integers(1, 7)):
            start, size = rng.integers(0, 12, 3), rng.integers(0, 7, 3)
            boxes.append(Box(tuple(int(v) for v in start), tuple(int(v) for v in start + size)))
        union, covered = np.zeros((20, 20, 20), bool), np.zeros((20, 20, 20), int)
        for box in boxes:
            union[tuple(slice(a, b) for a, b in zip(box.start, box.stop))] = True
        for piece in disjoint(boxes):
            assert not piece.empty
            covered[tuple(slice(a, b) for a, b in zip(piece.start, piece.stop))] += 1
        assert np.array_equal(covered, union.astype(int))


def test_box_files_lines_and_json():
    text = "# proofread boxes\n1,2,3,4,5,6\n\n 7, 8, 9, 10, 11, 12  # second\n"
    assert refresh.parse_box_file(text, "f") == [Box((1, 2, 3), (5, 7, 9)), Box((7, 8, 9), (17, 19, 21))]
    entries = ["1,2,3,4,5,6", [7, 8, 9, 10, 11, 12], {"topLeft": [0, 0, 0], "width": 1, "height": 2, "depth": 3}]
    assert refresh.parse_box_file(json.dumps(entries), "f") == [
        Box((1, 2, 3), (5, 7, 9)), Box((7, 8, 9), (17, 19, 21)), Box((0, 0, 0), (1, 2, 3))]
    for bad, where in [("1,2,3,4,5,6\n1,2,3\n", "line 2"), ("[[1,2,3,4,5,6], [1,2,3,4,5]]", "entry 2"),
                       ("[[1,2,3,4,5,6],", "line 1"), ("1,2,3,4,5,0\n", "line 1"), ("# nothing\n", "no boxes")]:
        with pytest.raises(bd.UsageError, match=where):
            refresh.parse_box_file(bad, "f")


# ---------------------------------------------------------------------------
# equal to a full recompute


@pytest.mark.parametrize("case", list(CASES))
def test_many_boxes_equal_a_full_recompute(base, tmp_path, case, capsys):
    boxes = CASES[case]
    got = stale(base, boxes, tmp_path / "got" / "ds")
    expected = recomputed(boxes, tmp_path / "expected" / "ds")
    before = mag_voxels(got)
    assert any(np.any(before[k] != v) for k, v in mag_voxels(expected).items() if k[1] != (1, 1, 1))
    if case == "scattered":  # the command, with --bbox given once per box
        args = [f"--bbox={box_text(b)}" for b in boxes]
        code = cli.main(["beam-downsample", str(got), *args, "--distribution-strategy", "sequential",
                         "--memory-budget", "400M", "--coarsest-mag", "8"])
        assert code == 0, capsys.readouterr().err
    elif case == "overlapping-and-nested":  # the command, with a box file
        box_file = tmp_path / "boxes.txt"
        box_file.write_text("".join(box_text(b) + "\n" for b in boxes), encoding="utf-8")
        code = cli.main(["beam-downsample", str(got), "--bbox-file", str(box_file), "--distribution-strategy",
                         "sequential", "--memory-budget", "400M", "--coarsest-mag", "8"])
        assert code == 0, capsys.readouterr().err
    else:
        result = bd.downsample(got, bboxes=[box_text(b) for b in boxes], **RUN)
        for layer in result.layers.values():
            assert layer.refreshed == ("2-2-1", "4-4-2", "8-8-4") and layer.made == ()
    assert_same_pyramid(got, expected)


def test_a_unit_touched_by_several_boxes_runs_once(base, tmp_path):
    def units(boxes) -> int:
        result = bd.downsample(base, bboxes=boxes, dry_run=True, **RUN)
        return sum(layer.units for layer in result.layers.values())

    one = (300, 200, 10, 40, 40, 20)
    same_unit = (310, 210, 40, 5, 5, 5)  # inside the same units as `one`
    far = (10, 10, 10, 20, 20, 10)
    assert units([one] * 3) == units([one])
    assert units([one, same_unit]) == units([one])
    # in different units of pass 1; a coarser pass's larger units may hold both (then it runs once)
    assert max(units([one]), units([far])) < units([one, far]) <= units([one]) + units([far])
    fresh = tmp_path / "ds"
    demo.write_dataset(str(fresh), original_layers(), VOXEL_SIZE, name="ds")
    full = sum(layer.units for layer in bd.downsample(fresh, dry_run=True, **RUN).layers.values())
    assert units([one, far]) < full / 2


def test_a_unit_reads_only_its_boxes(base, tmp_path):
    """Voxels read by one refresh of two far-apart boxes are those of two separate refreshes,
    a small part of a full run's."""
    boxes = [(10, 10, 10, 20, 20, 10), (550, 400, 40, 30, 30, 20)]
    read = {}
    for name, chosen in (("both", boxes), ("first", boxes[:1]), ("second", boxes[1:])):
        path = stale(base, chosen, tmp_path / name / "ds")
        result = bd.downsample(path, bboxes=[box_text(b) for b in chosen], **RUN)
        read[name] = sum(layer.voxels_read for layer in result.layers.values())
    full = tmp_path / "full" / "ds"
    demo.write_dataset(str(full), original_layers(), VOXEL_SIZE, name="ds")
    full_read = sum(layer.voxels_read for layer in bd.downsample(full, **RUN).layers.values())
    assert read["both"] == read["first"] + read["second"]
    assert read["both"] < full_read / 20, (read, full_read)


def test_nothing_outside_the_boxes_is_written(base, tmp_path):
    """Two boxes in one unit with a gap between them: every voxel of every mag outside the boxes
    (aligned outward) is poisoned first and must keep its poison; inside, a full recompute's.
    One pass (the default budget): a later pass would read the poison around its boxes."""
    boxes = [(100, 100, 10, 30, 30, 20), (200, 160, 30, 30, 30, 20)]
    one_pass = dict(RUN, memory_budget=None)
    got = stale(base, boxes, tmp_path / "got" / "ds")
    plan = bd.downsample(got, bboxes=[box_text(b) for b in boxes], dry_run=True, **one_pass).plan
    assert "pass 1: 1 -> 2-2-1, 4-4-2, 8-8-4 in 1 work units" in plan and "pass 2" not in plan, plan
    expected = mag_voxels(recomputed(boxes, tmp_path / "expected" / "ds"))
    dataset = load_dataset(str(got))
    boxes_mag1 = [Box(b[:3], tuple(a + s for a, s in zip(b[:3], b[3:]))) for b in boxes]
    inside = {}
    for layer in dataset.layers:
        for mag in sorted(layer.mags)[1:]:
            region = region_in_mag(layer.bbox, mag)
            array = arrays.open_array(arrays.existing_mag_spec(layer, dataset.path, mag), open=True)
            data = arrays.read_box(array, region, layer.num_channels)
            mask = np.zeros(data.shape, dtype=bool)
            for box in boxes_mag1:
                part = region_in_mag(box, mag).intersect(region)
                mask[(slice(None),) + tuple(slice(a - r, b - r) for a, b, r in zip(part.start, part.stop, region.start))] = True
            data[~mask] += 1  # a stale value outside the boxes is right: the poison differs from it
            arrays.write_region(array, region, data).result()
            inside[layer.name, mag] = (mask, data.copy())
    bd.downsample(got, bboxes=[box_text(b) for b in boxes], **one_pass)
    after = mag_voxels(got)
    for key, (mask, poisoned) in inside.items():
        assert np.array_equal(after[key][~mask], poisoned[~mask]), f"{key}: a voxel outside the boxes was written"
        assert np.array_equal(after[key][mask], expected[key][mask]), key


# ---------------------------------------------------------------------------
# an interrupted refresh of a set of boxes


@pytest.mark.parametrize("case", ["scattered", "adjacent"])
def test_an_interrupted_set_is_reported_and_its_rerun_resumes(base, tmp_path, monkeypatch, case):
    boxes = CASES[case]
    got = stale(base, boxes, tmp_path / "got" / "ds")
    expected = recomputed(boxes, tmp_path / "expected" / "ds")
    real_run_unit, calls = work.run_unit, []

    def failing_run_unit(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("injected")
        return real_run_unit(*args, **kwargs)

    monkeypatch.setattr(work, "run_unit", failing_run_unit)
    with pytest.raises(bd.RunError, match="injected"):
        bd.downsample(got, bboxes=[box_text(b) for b in boxes], **RUN)
    monkeypatch.setattr(work, "run_unit", real_run_unit)
    warnings = bd.downsample(got, dry_run=True, **RUN).warnings  # another run of these layers is told
    assert len(warnings) == 2  # one per layer
    rerun = re.search(r"rerun it: (.*)$", warnings[0]).group(1)
    if len(boxes) <= 3:
        assert "--bbox 100,100,10,40,40,20 --bbox 100,140,10,80,13,20 --bbox 140,100,10,40,40,20 refresh was " \
               "interrupted" in warnings[0]
        assert rerun == " ".join(f"--bbox {box_text(b)}" for b in sorted(boxes))
        again = {"bboxes": re.findall(r"--bbox (\S+)", rerun)}
    else:
        assert "a refresh of 4 boxes was interrupted" in warnings[0] and rerun.startswith("--bbox-file ")
        again = {"bbox_file": rerun.split(" ", 1)[1]}
    assert not bd.downsample(got, dry_run=True, **again, **RUN).warnings  # the same set: nothing to warn of
    result = bd.downsample(got, **again, **RUN)
    assert sum(layer.units_already_done for layer in result.layers.values()) >= 1
    assert_same_pyramid(got, expected)


# ---------------------------------------------------------------------------
# the command's flags


@pytest.mark.parametrize("content, words", [
    ("3,5,7,10,10,10\n\n# a comment\n3,5,7,10,ten,10\n", ["line 4", "six integers"]),
    ('["3,5,7,10,10,10", [3, 5, 7, 10, 10]]', ["entry 2", "six integers"]),
    ("3,5,7,10,10,10\n5000,0,0,10,10,10\n", ["5000,0,0,10,10,10", "outside layer"]),
], ids=["line", "json", "outside"])
def test_a_bad_box_file_is_a_usage_error(base, tmp_path, capsys, content, words):
    box_file = tmp_path / "boxes.txt"
    box_file.write_text(content, encoding="utf-8")
    before = tree_digest(base)
    capsys.readouterr()
    code = cli.main(["beam-downsample", str(base), "--bbox-file", str(box_file)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("beam-downsample: error:"), err
    for word in words:
        assert word in err, err
    assert tree_digest(base) == before


@pytest.mark.parametrize("args, flag", [
    (["--layer-name", "color", "--layer-name", "segmentation"], "--layer-name"),
    (["--jobs", "1", "--jobs=2"], "--jobs"),
    (["--dry-run", "--dry-run"], "--dry-run"),
    (["--coarsest-mag=8", "--coarsest-mag", "4"], "--coarsest-mag"),
    (["--dry-run", "--nodry-run"], "--dry-run"),
    (["--bbox-file", "a.txt", "--bbox-file", "b.txt"], "--bbox-file"),
], ids=["layer-name", "jobs", "dry-run", "coarsest-mag", "nodry-run", "bbox-file"])
def test_a_single_valued_flag_given_twice_is_refused(base, capsys, args, flag):
    before = tree_digest(base)
    capsys.readouterr()
    code = cli.main(["beam-downsample", str(base), *args])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"{flag} was given 2 times" in err, err
    assert tree_digest(base) == before

