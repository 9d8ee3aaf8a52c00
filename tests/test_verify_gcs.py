"""`beam-downsample verify` on gs://, against the GCS emulator of test_gcs.py: the same
pyramids as test_verify.py uploaded object by object, verified where they lie."""

from __future__ import annotations

import json
import shutil

import pytest

from beam_downsample.launch import verify_cli
from beam_downsample.store import storage
from beam_downsample.verify import verify
from conftest import PROPERTIES, run_cli
from test_gcs import download, emulator, error_lines, upload  # noqa: F401  pylint: disable=unused-import
from test_verify import corrupt_chunk, pyramids, stored_chunks  # noqa: F401  pylint: disable=unused-import


@pytest.mark.parametrize("data_format", ["zarr3", "zarr"])
def test_gcs_verify_passes_and_names_a_damaged_chunk(emulator, pyramids, tmp_path, data_format):
    url = upload(pyramids[data_format], f"verify-{data_format}")
    before = download(f"verify-{data_format}")
    result = verify(url)
    assert result.ok, [finding.line() for finding in result.findings]
    assert result.chunks_decoded == stored_chunks(pyramids[data_format], data_format)
    assert result.samples and result.voxels_compared > 0
    assert download(f"verify-{data_format}") == before  # nothing written
    damaged = tmp_path / "damaged"
    shutil.copytree(pyramids[data_format], damaged)
    box = corrupt_chunk(damaged, data_format)
    url = upload(damaged, f"verify-{data_format}-damaged")
    findings = verify(url).findings
    assert [(f.check, f.layer, f.mag, f.box) for f in findings] == [("decode", "color", (4, 4, 2), box)]


def test_gcs_verify_command_line_and_unlisted_mag(emulator, pyramids):
    url = upload(pyramids["zarr3"], "verify-cli")
    process = run_cli("verify", url)
    assert process.returncode == 0, process.stderr
    assert process.stdout.splitlines()[-1].startswith("verify: ok: 2 layer(s), 6 mag(s)")
    raw = json.loads(download("verify-cli")[PROPERTIES])
    layer = next(l for l in raw["dataLayers"] if l["name"] == "color")
    layer["mags"] = [m for m in layer["mags"] if m["mag"] != [4, 4, 2]]
    storage.write_json_atomically(f"{url}/{PROPERTIES}", raw)
    findings = verify(url).findings
    assert [(f.check, f.layer, f.mag) for f in findings if f.check == "metadata"] == [("metadata", "color", (4, 4, 2))]
    assert f"{url}/color/4-4-2" in findings[0].message


def test_gcs_wkw_is_refused_with_one_line(emulator, pyramids, capsys):
    url = upload(pyramids["wkw"], "verify-wkw")
    assert verify_cli.main(["verify", url]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "wkw library reads local files only" in line
