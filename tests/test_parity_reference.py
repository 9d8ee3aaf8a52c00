"""Voxel parity against the reference `webknossos downsample` 4.3.3 (opt-in, slow).

Runs benchmarks/parity.py (which installs/caches the reference in its own venv,
see benchmarks/refenv.py) and asserts on its JSON report. About 1-2 minutes
per case, one reference job at a time, several GB of memory.

    BEAM_DOWNSAMPLE_PARITY=1 python -m pytest tests/test_parity_reference.py
    BEAM_DOWNSAMPLE_PARITY=1 BEAM_DOWNSAMPLE_PARITY_CASES=a,e,f python -m pytest tests/test_parity_reference.py

BEAM_DOWNSAMPLE_REF_VENV points at an existing reference venv (else the
cached one in ~/.cache/beam-downsample/webknossos-4.3.3 is created).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PARITY = ROOT / "benchmarks" / "parity.py"
ALL_CASES = "abcdefghijklm"
ENABLED = os.environ.get("BEAM_DOWNSAMPLE_PARITY") == "1"
SKIP_REASON = "reference parity is opt-in: set BEAM_DOWNSAMPLE_PARITY=1 (runs webknossos 4.3.3; ~1-2 min per case)"


def _selected_cases() -> list[str]:
    text = os.environ.get("BEAM_DOWNSAMPLE_PARITY_CASES", ",".join(ALL_CASES))
    return [c.strip() for c in text.split(",") if c.strip()]


@pytest.fixture(scope="module")
def parity_report(tmp_path_factory):
    if not ENABLED:
        pytest.skip(SKIP_REASON)
    work = tmp_path_factory.mktemp("parity")
    report_path = work / "report.json"
    proc = subprocess.run(
        [sys.executable, str(PARITY), "--cases", ",".join(_selected_cases()), "--keep", str(work / "outputs"),
         "--json", str(report_path)],
        capture_output=True, text=True, check=False, timeout=4 * 3600,
    )
    assert report_path.exists(), f"parity.py wrote no report (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    report = json.loads(report_path.read_text(encoding="utf-8"))
    report["exit_code"] = proc.returncode
    report["stdout"] = proc.stdout
    return report


@pytest.mark.parametrize("case", _selected_cases())
def test_case_is_voxel_identical(parity_report, case):
    results = {r["key"]: r for r in parity_report["cases"]}
    assert case in results, f"case {case} was not run:\n{parity_report['stdout']}"
    result = results[case]
    if result["status"] == "skipped":
        pytest.skip(f"case {case}: {result['note']}")
    assert result["status"] == "identical", f"case {case}: {result['status']}\n{parity_report['stdout']}"
    comparison = result["comparison"]
    assert comparison["properties_equal"], comparison["properties_diff"]
    assert not comparison["json_diffs"], comparison["json_diffs"]
    arrays = comparison["arrays"]
    assert arrays, "no arrays compared"
    bad = [a for a in arrays if not a["ok"]]
    assert not bad, bad
    # Something was actually produced and compared beyond the input mags.
    assert len(arrays) > len({a["layer"] for a in arrays}), "no new mags were compared"


def test_script_exit_code(parity_report):
    all_ok = all(r["ok"] for r in parity_report["cases"])
    assert parity_report["ok"] == all_ok
    assert (parity_report["exit_code"] == 0) == all_ok, parity_report["stdout"]


# ---------------------------------------------------------------------------
# WEBKNOSSOS reads a pyramid made with --ignore-background, whose layer holds our record


def test_webknossos_reads_an_ignore_background_pyramid_and_ignores_the_record(tmp_path, segmentation):
    if not ENABLED:
        pytest.skip(SKIP_REASON)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import refenv  # pylint: disable=import-outside-toplevel

    from test_background_job import RECORD, VOXEL_SIZE, layers_of, run_sequential  # pylint: disable=import-outside-toplevel

    from beam_downsample import demo  # pylint: disable=import-outside-toplevel

    pyramid = tmp_path / "ds"
    demo.write_dataset(str(pyramid), layers_of(segmentation), VOXEL_SIZE, data_format="zarr3")
    run_sequential(pyramid, "--coarsest-mag", "8", "--ignore-background")
    probe = ("import sys, json, webknossos as wk; ds = wk.Dataset.open(sys.argv[1]); "
             "print(json.dumps({l.name: {str(m): int((mag.read() != 0).sum()) for m, mag in l.mags.items()} "
             "for l in ds.layers.values()}))")
    result = subprocess.run([refenv.reference_python(), "-c", probe, str(pyramid)], capture_output=True, text=True,
                            env=refenv.reference_env(), timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert os.path.exists(pyramid / "segmentation" / RECORD)
    assert sorted(found["segmentation"]) == ["1", "2-2-1", "4-4-2", "8-8-4"]
    assert all(count > 0 for counts in found.values() for count in counts.values())
