"""`beam-downsample verify`: passes on every format's output of a run, and fails, naming
the layer, mag and box, when a chunk of a coarse mag is damaged, a listed mag is
missing, a shard (chunk, wkw file) is deleted, a voxel in a sampled box is changed,
the NGFF metadata is out of step or a mag is unlisted. The damage is done here
with independent means (shard indices, wkw jump tables and zarr chunk files read
with numpy; voxels written with tensorstore), never through beam_downsample.store.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorstore as ts
from PIL import Image

from beam_downsample import demo
from beam_downsample.core.box import Box, region_in_mag
from beam_downsample.launch import cli, verify_cli
from beam_downsample.verify import VerifyUsageError, preview, verify
from conftest import read_properties, run_cli, tree_digest, write_properties
from test_formats import element_class_layers

VOXEL_SIZE = (11.24, 11.24, 28.0)
TOP_LEFT = (3, 5, 7)
FORMATS = ("zarr3", "zarr", "wkw")
COARSE = [(2, 2, 1), (4, 4, 2)]  # the run's mags of a 150x133x70 layer at VOXEL_SIZE
NO_INDEX_ENTRY = 2**64 - 1


def downsample(path, *args) -> None:
    assert cli.main(["beam-downsample", str(path), "--distribution-strategy", "sequential", *map(str, args)]) == 0


@pytest.fixture(scope="module")
def pyramids(tmp_path_factory, segmentation) -> dict:
    """data format -> a dataset (real segmentation and its color rendering, 150x133x70 at an
    unaligned offset) downsampled by a run. Never modified: tests work on copies."""
    crop = np.ascontiguousarray(segmentation[100:250, 50:183, 20:90])
    root = tmp_path_factory.mktemp("verify")
    made = {}
    for data_format in FORMATS:
        path = root / data_format
        demo.write_dataset(str(path), [
            {"name": "color", "category": "color", "data": demo.render_color(crop), "top_left": TOP_LEFT},
            {"name": "segmentation", "category": "segmentation", "data": crop, "top_left": TOP_LEFT},
        ], VOXEL_SIZE, data_format=data_format)
        downsample(path)
        made[data_format] = path
    return made


@pytest.fixture
def copy_of(pyramids, tmp_path):
    def copy(data_format: str):
        path = tmp_path / data_format
        shutil.copytree(pyramids[data_format], path)
        return path

    return copy


def lines_of(capsys, *args) -> tuple[int, list[str], str]:
    """(exit status, stdout lines, stderr) of `beam-downsample verify ARGS` run in this process."""
    code = cli.main(["beam-downsample", "verify", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err


# ---------------------------------------------------------------------------
# independent views of what is stored


def shard_index(path) -> np.ndarray:
    """(chunks, 2) offset, length of a zarr3 shard of 32^3 chunks of 32^3 voxels (index at the end, crc32c after)."""
    with open(path, "rb") as handle:
        raw = handle.read()
    return np.frombuffer(raw[-(32**3 * 16 + 4):-4], dtype="<u8").reshape(-1, 2)


def stored_chunks(path, data_format: str) -> int:
    """Chunks stored in the coarse mags (wkw: files), counted from the files themselves."""
    count = 0
    for layer in ("color", "segmentation"):
        for mag in ("2-2-1", "4-4-2"):
            for directory, _, files in os.walk(os.path.join(path, layer, mag)):
                for name in files:
                    if data_format == "zarr3" and name.isdigit():
                        count += int(np.sum(shard_index(os.path.join(directory, name))[:, 0] != NO_INDEX_ENTRY))
                    elif data_format == "zarr" and name.isdigit():
                        count += 1
                    elif data_format == "wkw" and name.endswith(".wkw") and name != "header.wkw":
                        count += 1
    return count


def region(mag) -> Box:
    return region_in_mag(Box(TOP_LEFT, (TOP_LEFT[0] + 150, TOP_LEFT[1] + 133, TOP_LEFT[2] + 70)), mag)


def open_zarr3(path) -> ts.TensorStore:
    return ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}).result()


# ---------------------------------------------------------------------------
# passes


@pytest.mark.parametrize("data_format", FORMATS)
def test_verify_passes_on_every_formats_output(pyramids, data_format):
    path = pyramids[data_format]
    before = tree_digest(path)
    result = verify(str(path))
    assert result.ok, [finding.line() for finding in result.findings]
    assert (result.layers, result.mags) == (2, 6)
    assert result.chunks_decoded == stored_chunks(path, data_format) > 0
    for layer in ("color", "segmentation"):
        for mag in COARSE:
            boxes = [s.box for s in result.samples if s.layer == layer and s.mag == mag]
            far = tuple(b - 1 for b in region(mag).stop)
            assert any(box.intersect(Box(far, tuple(v + 1 for v in far))) == Box(far, tuple(v + 1 for v in far))
                       for box in boxes), "the far corner (edge replication on every axis) is sampled"
    assert result.voxels_compared == sum(s.box.voxels for s in result.samples) > 0
    assert tree_digest(path) == before  # nothing written


def test_verify_passes_on_every_element_class(tmp_path):
    """Every dtype (floats with -0.0 and NaN-free wide values, uint64 above 2**53), RGB and two
    channels: the recomputed samples equal the run's bit for bit; a changed float's sign does not."""
    path = tmp_path / "ds"
    demo.write_dataset(str(path), element_class_layers(seed=3), VOXEL_SIZE, data_format="zarr3")
    downsample(path, "--coarsest-mag", "4")
    result = verify(str(path))
    assert result.ok, [finding.line() for finding in result.findings]
    assert result.layers == len(element_class_layers()) and result.voxels_compared > 0
    array = open_zarr3(path / "c_float32" / "2-2-1")
    voxel = (0, 5, 6, 8)
    value = float(array[voxel].read().result())
    array[voxel].write(np.float32(-value)).result()
    findings = verify(str(path), layer_name="c_float32").findings
    assert [(f.check, f.mag) for f in findings if f.mag == (2, 2, 1)] == [("sample", (2, 2, 1))]
    assert f"first at {voxel[1:]}: stored {-value}, recomputed {value}" in findings[0].message
    # (4-4-2, recomputed from the changed 2-2-1, now differs from what was made from the original)


def test_verify_command_line_exit_status_and_lines(pyramids, capsys):
    code, out, err = lines_of(capsys, pyramids["zarr3"])
    assert code == 0
    assert out[-1].startswith("verify: ok: 2 layer(s), 6 mag(s)")
    assert "verify: decoding and recomputing samples: " in err and "(100%)" in err  # lines in a log (no terminal)
    process = run_cli("verify", pyramids["zarr3"], "--layer-name", "color", "--sample", "4")
    assert process.returncode == 0, process.stderr
    assert process.stdout.splitlines()[-1].startswith("verify: ok: 1 layer(s), 3 mag(s)")


def test_samples_are_seeded_and_random(pyramids):
    first, again, other = (verify(str(pyramids["zarr3"]), seed=s, sample=8) for s in (3, 3, 4))
    assert first.samples == again.samples
    assert [s.box for s in first.samples] != [s.box for s in other.samples]
    data = [s for s in first.samples if s.layer == "color" and s.mag == (2, 2, 1) and s.why == "data"]
    assert len({s.box for s in data}) == len(data) >= 5
    assert len([s for s in first.samples if s.layer == "color" and s.mag == (2, 2, 1)]) == 8  # of 27 boxes


# ---------------------------------------------------------------------------
# damage


def corrupt_chunk(path, data_format: str) -> Box:
    """Damages one stored chunk (wkw: block) of color mag 4-4-2; returns its box in that mag."""
    mag_dir = os.path.join(path, "color", "4-4-2")
    if data_format == "zarr3":
        shard = os.path.join(mag_dir, "c", "0", "0", "0", "0")
        index = shard_index(shard)
        entry = int(np.flatnonzero(index[:, 0] != NO_INDEX_ENTRY)[3])
        offset, length = (int(v) for v in index[entry])
        with open(shard, "r+b") as handle:  # one byte of the chunk's compressed data
            handle.seek(offset + length // 2)
            byte = handle.read(1)
            handle.seek(offset + length // 2)
            handle.write(bytes([byte[0] ^ 0x5A]))
        cell = np.unravel_index(entry, (32, 32, 32))  # index entries in C order of the chunk grid (x, y, z)
    elif data_format == "zarr":
        chunk = os.path.join(mag_dir, "0", "1", "0", "1")
        with open(chunk, "r+b") as handle:
            handle.truncate(os.path.getsize(chunk) // 2)
        cell = (1, 0, 1)
    else:
        wkw_file = os.path.join(mag_dir, "z0", "y0", "x0.wkw")
        with open(wkw_file, "r+b") as handle:
            header = handle.read(16)
            data_offset = int.from_bytes(header[8:16], "little")  # block 0 (Morton order) starts here
            handle.seek(data_offset + 64)
            handle.write(b"\xff" * 2048)
        cell = (0, 0, 0)
    start = tuple(int(c) * 32 for c in cell)
    return Box(start, tuple(a + 32 for a in start))  # type: ignore[arg-type]


@pytest.mark.parametrize("data_format", FORMATS)
def test_a_damaged_chunk_of_a_coarse_mag_is_named_with_its_box(copy_of, data_format, capsys):
    path = copy_of(data_format)
    box = corrupt_chunk(path, data_format)
    result = verify(str(path))
    decode = [f for f in result.findings if f.check == "decode"]
    assert [(f.layer, f.mag, f.box) for f in decode] == [("color", (4, 4, 2), box)], [f.line() for f in result.findings]
    assert {f.check for f in result.findings} == {"decode"}  # the samples over it say nothing more
    code, out, _ = lines_of(capsys, path)
    assert code == 1
    assert any(f"layer 'color' mag 4-4-2 box {box.start[0]}-{box.stop[0]}," in line and "does not decode" in line
               for line in out)
    assert out[-1].startswith("verify: 1 problem(s) found")


@pytest.mark.parametrize("data_format", ["zarr3", "wkw"])
def test_a_listed_mag_that_is_missing_fails(copy_of, data_format, capsys):
    path = copy_of(data_format)
    shutil.rmtree(os.path.join(path, "segmentation", "4-4-2"))
    result = verify(str(path))
    assert [(f.check, f.layer, f.mag) for f in result.findings] == [("metadata", "segmentation", (4, 4, 2))]
    assert "does not open" in result.findings[0].message
    assert not [s for s in result.samples if s.layer == "segmentation" and s.mag == (4, 4, 2)]
    code, out, _ = lines_of(capsys, path)
    assert code == 1 and out[0].startswith("layer 'segmentation' mag 4-4-2: listed in the properties")


def sparse_pyramid(path, data_format: str) -> None:
    """4096x64x64 with data in two blocks, far apart: mag 2-2-1 spans two shards (wkw files)
    along x, the second block fills the second; mag 1 stores only the blocks' shards, chunks
    or files."""
    rng = np.random.default_rng(5)
    blocks = [((0, 0, 0), rng.integers(1, 256, (64, 64, 64), dtype=np.uint8)),
              ((2048, 0, 0), rng.integers(1, 256, (2048, 64, 64), dtype=np.uint8))]
    demo.write_sparse_dataset(str(path), (4096, 64, 64), [{"name": "color", "category": "color", "dtype": "uint8",
                                                            "blocks": blocks}], VOXEL_SIZE, data_format=data_format)
    downsample(path, "--coarsest-mag", "4")


@pytest.mark.parametrize("data_format,key", [("zarr3", "c/0/1/0/0"), ("zarr", "0/40/0/1"), ("wkw", "z0/y0/x1.wkw")])
def test_a_deleted_shard_fails(tmp_path, data_format, key, capsys):
    """A shard (zarr v2: chunk, wkw: file) of mag 2-2-1 over the second block is deleted:
    the mag before's data says it should be there, so a box in it is recomputed."""
    path = tmp_path / "ds"
    sparse_pyramid(path, data_format)
    assert verify(str(path)).ok
    os.unlink(os.path.join(path, "color", "2-2-1", *key.split("/")))
    result = verify(str(path))
    missing = [f for f in result.findings if f.mag == (2, 2, 1)]
    assert missing and all(f.check == "sample" and f"{key} is missing" in f.message for f in missing), \
        [f.line() for f in result.findings]
    assert all(1024 <= f.box.start[0] < 2048 for f in missing)  # in the second block's part of mag 2-2-1
    code, out, _ = lines_of(capsys, path, "--sample", "1")  # even with one sample per mag
    assert code == 1 and any(f"{key} is missing" in line for line in out)


def test_a_changed_voxel_in_a_sampled_box_fails_naming_it(copy_of, capsys):
    path = copy_of("zarr3")
    first = verify(str(path), seed=11, sample=8)
    sample = next(s for s in first.samples if s.layer == "color" and s.mag == (2, 2, 1) and s.why == "data")
    voxel = tuple(a + 5 for a in sample.box.start)
    array = open_zarr3(path / "color" / "2-2-1")
    value = int(array[(0, *voxel)].read().result())
    array[(0, *voxel)].write(np.uint8(value ^ 0x40)).result()
    again = verify(str(path), seed=11, sample=8)
    assert again.samples == first.samples
    changed = [f for f in again.findings if f.mag == (2, 2, 1)]
    assert [(f.check, f.box) for f in changed] == [("sample", sample.box)], [f.line() for f in again.findings]
    assert f"1 of {sample.box.voxels} voxels differ" in changed[0].message
    assert f"first at {voxel}: stored {value ^ 0x40}, recomputed {value}" in changed[0].message
    assert not [f for f in again.findings if f.check == "decode"]  # it decodes: only the sample finds it
    assert verify(str(path), sample=0).ok
    code, out, _ = lines_of(capsys, path, "--seed", 11, "--sample", 8)
    box = sample.box
    assert code == 1 and any(line.startswith(f"layer 'color' mag 2-2-1 box {box.start[0]}-{box.stop[0]},"
                                             f"{box.start[1]}-{box.stop[1]},{box.start[2]}-{box.stop[2]} ")
                             for line in out)


def test_the_interpolation_a_pyramid_was_made_with_can_be_given(tmp_path, segmentation):
    path = tmp_path / "ds"
    crop = np.ascontiguousarray(segmentation[:70, :60, :20])
    demo.write_dataset(str(path), [{"name": "color", "category": "color", "data": demo.render_color(crop)}],
                       VOXEL_SIZE)
    downsample(path, "--interpolation", "max")
    mismatches = verify(str(path)).findings
    assert mismatches and all(f.check == "sample" and "reduced with median" in f.message for f in mismatches)
    result = verify(str(path), interpolation="max")
    assert result.ok and result.interpolations == {"color": "max"}


def test_a_pyramid_made_with_ignore_background_is_checked_with_its_recorded_reduction(tmp_path, segmentation):
    """A run with --ignore-background records its reduction (LAYER/beam-downsample.json); verify
    recomputes those mags with it. Without the record the same mags are wrong for a plain mode."""
    path = tmp_path / "ds"
    crop = segmentation[200:328, 380:508, 100:140]  # 97 ids
    sparse = np.where(np.isin(crop, np.unique(crop)[::3]), crop, 0)  # a third of them, the rest background
    demo.write_dataset(str(path), [{"name": "segmentation", "category": "segmentation",
                                    "data": np.ascontiguousarray(sparse)}], VOXEL_SIZE)
    downsample(path, "--ignore-background")
    result = verify(str(path), sample=64)
    assert result.ok, [f.line() for f in result.findings]
    assert set(result.interpolations.values()) >= {"mode-nonzero"}
    (path / "segmentation" / "beam-downsample.json").unlink()
    mismatches = verify(str(path), sample=64).findings
    assert mismatches and all(f.check == "sample" and "reduced with mode;" in f.message for f in mismatches)
    (path / "segmentation" / "beam-downsample.json").write_text("{not json")
    findings = verify(str(path), sample=0).findings
    assert [f.check for f in findings] == ["record"] and "beam-downsample.json" in findings[0].message


def test_ngff_metadata_out_of_step_fails(copy_of):
    path = copy_of("zarr3")
    group = path / "color" / "zarr.json"
    document = json.loads(group.read_text())
    datasets = document["attributes"]["ome"]["multiscales"][0]["datasets"]
    document["attributes"]["ome"]["multiscales"][0]["datasets"] = [d for d in datasets if d["path"] != "4-4-2"]
    group.write_text(json.dumps(document))
    path_v2 = copy_of("zarr")
    attributes = json.loads((path_v2 / "segmentation" / ".zattrs").read_text())
    attributes["multiscales"][0]["datasets"][1]["coordinateTransformations"][0]["scale"][1] = 11.24
    (path_v2 / "segmentation" / ".zattrs").write_text(json.dumps(attributes))
    found = [(f.check, f.layer, f.mag) for f in verify(str(path)).findings]
    assert found == [("ngff", "color", (4, 4, 2))]
    found = [(f.check, f.layer, f.mag) for f in verify(str(path_v2)).findings]
    assert found == [("ngff", "segmentation", (2, 2, 1))]


def test_a_mag_on_disk_that_is_not_listed_fails(copy_of):
    path = copy_of("zarr3")
    raw = read_properties(path)
    layer = next(l for l in raw["dataLayers"] if l["name"] == "segmentation")
    layer["mags"] = [m for m in layer["mags"] if m["mag"] != [4, 4, 2]]
    write_properties(path, raw)
    findings = verify(str(path)).findings
    unlisted = [f for f in findings if f.check == "metadata"]
    assert [(f.layer, f.mag) for f in unlisted] == [("segmentation", (4, 4, 2))]
    assert "the properties do not list mag 4-4-2" in unlisted[0].message
    assert [(f.check, f.mag) for f in findings if f.check == "ngff"] == [("ngff", None)]  # NGFF lists it


# ---------------------------------------------------------------------------
# preview


def test_preview_writes_one_png_of_the_expected_size(pyramids, tmp_path):
    png = tmp_path / "pyramid.png"
    result = verify(str(pyramids["zarr3"]), preview=str(png))
    assert result.ok and result.preview == str(png)
    image = Image.open(png)
    # Both layers are 150x133 voxels of 11.24 nm: the longer side fills a panel; 3 mags each.
    width, height = preview.PANEL, math.ceil(133 / 150 * preview.PANEL)
    assert image.size == (preview.GAP + 3 * (width + preview.GAP), preview.GAP + 2 * (preview.LABEL + height + preview.GAP))
    # The mag-1 segmentation panel (upsampled: every voxel of the central slice shows) holds
    # exactly the colours of the slice's ids.
    top = preview.GAP + preview.LABEL + height + preview.GAP + preview.LABEL
    panel = np.asarray(image.convert("RGB"))[top:top + height, preview.GAP:preview.GAP + width]
    z = (7 + 7 + 70 - 1) // 2
    ids = open_zarr3(pyramids["zarr3"] / "segmentation" / "1")[0, 3:153, 5:138, z].read().result()
    expected = {tuple(c) for c in preview.id_colours(np.unique(ids)).reshape(-1, 3)}
    assert {tuple(c) for c in panel.reshape(-1, 3)} == expected


def test_segmentation_colours_are_stable_per_id():
    ids = np.arange(1, 2001, dtype=np.uint64)
    colours = preview.id_colours(ids)
    assert len({tuple(c) for c in colours}) > 1990
    assert np.array_equal(preview.id_colours(ids.astype(np.uint32)), colours)
    assert np.array_equal(preview.id_colours(ids.astype(np.int64)), colours)
    assert preview.id_colours(np.zeros(3, dtype=np.uint32)).tolist() == [[0, 0, 0]] * 3
    assert colours.min() >= 64  # never as dark as the background


def test_verify_preview_on_the_demo(tmp_path):
    demo.make_demo(str(tmp_path / "demo-data"), depth=64)
    downsample(tmp_path / "demo-data")
    process = run_cli("verify", "demo-data", "--preview", "demo.png", cwd=tmp_path)
    assert process.returncode == 0, process.stderr
    assert "preview: demo.png" in process.stdout
    assert Image.open(tmp_path / "demo.png").size[0] > 4 * preview.PANEL


# ---------------------------------------------------------------------------
# usage


@pytest.mark.parametrize("args,message", [
    ([], "verify needs one TARGET"),
    (["{ds}", "{ds}"], "verify takes one TARGET"),
    (["{ds}", "--bogus"], "Unknown command line flag 'bogus'"),
    (["{ds}", "--sample", "-1"], "--sample=-1"),
    (["{ds}", "--interpolation", "cubic"], "--interpolation"),
    (["{ds}", "--preview", "out.txt"], "must be a .png file"),
    (["{ds}", "--preview", "/nonexistent/dir/out.png"], "is not a writable directory"),
    (["{ds}", "--layer-name", "nope"], "no layer named 'nope'"),
    (["{ds}/nothere"], "does not exist"),
])
def test_usage_errors_are_one_line_and_exit_2(pyramids, tmp_path, capsys, args, message):
    path = tmp_path / "ds"
    shutil.copytree(pyramids["zarr3"], path)
    before = tree_digest(path)
    code = verify_cli.main(["verify", *[a.format(ds=path) for a in args]])
    captured = capsys.readouterr()
    assert code == 2
    (line,) = captured.err.splitlines()
    assert line.startswith("beam-downsample: error: ") and message in line
    assert tree_digest(path) == before


def test_api_refuses_bad_arguments(pyramids):
    for kwargs in ({"sample": -1}, {"sample": 1.5}, {"seed": -2}, {"interpolation": "cubic"}, {"preview": "x.jpg"}):
        with pytest.raises(VerifyUsageError):
            verify(str(pyramids["zarr3"]), **kwargs)



def test_the_command_verifies_without_importing_beam(pyramids):
    """`beam-downsample verify` skips the run's imports (Apache Beam: ~0.9 CPU-s, a third of
    verify's cost on the bench); `cli.main` dispatches to the same command line."""
    code = ("import sys; from beam_downsample.launch import entry; sys.argv = ['beam-downsample', 'verify', "
            f"{str(pyramids['zarr3'])!r}]\ntry:\n    entry.run()\nexcept SystemExit as e:\n    status = e.code\n"
            "print(status, 'apache_beam' in sys.modules)")
    process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert process.stdout.splitlines()[-1] == "0 False", process.stderr


def test_help_lists_the_options(capsys):
    assert verify_cli.main(["verify", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: beam-downsample verify TARGET")
    assert all(f"--{name}" in out for name in ("layer-name", "sample", "seed", "interpolation", "preview"))


def test_progress_is_a_bar_on_a_terminal_and_lines_in_a_log():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    with verify_cli._Progress(stream=terminal) as bar:  # pylint: disable=protected-access
        for done in range(0, 11):
            bar.update(done, 10, "verify: decoding")
        bar.update(0, 3, "verify: recomputing samples")
    assert "verify: decoding: 100%" in terminal.getvalue() and "verify: recomputing samples" in terminal.getvalue()
    log, now = io.StringIO(), [0.0]
    with verify_cli._Progress(stream=log, interval=30, clock=lambda: now[0]) as bar:  # pylint: disable=protected-access
        for done in range(0, 101):
            now[0] = done  # one step a second: a line every 30 s and one at the end
            bar.update(done, 100, "verify: decoding")
        bar.update(100, 100, "verify: decoding")
    assert log.getvalue().splitlines() == [
        "verify: decoding: 30/100 (30%), 30 s", "verify: decoding: 60/100 (60%), 60 s",
        "verify: decoding: 90/100 (90%), 90 s", "verify: decoding: 100/100 (100%), 100 s"]
