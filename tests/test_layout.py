"""The package's layer rules (`.importlinter`): each stage imports only from the stages
below it, Beam stays above the plan, core and kernels do no I/O. Checked with
import-linter, the same tool a reviewer would run (`lint-imports .importlinter`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lint_imports(config: str) -> subprocess.CompletedProcess:
    executable = shutil.which("lint-imports", path=os.path.dirname(sys.executable)) or shutil.which("lint-imports")
    assert executable, "import-linter is missing: pip install -e '.[test]'"
    return subprocess.run([executable, "--no-cache", config], cwd=ROOT, capture_output=True, text=True, check=False)


def test_import_contracts_are_kept():
    result = _lint_imports(os.path.join(ROOT, ".importlinter"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_a_lower_stage_importing_a_higher_one_is_caught(tmp_path):
    """The contract can fail: the same rules on a copy of the package where core imports run."""
    copy = tmp_path / "src"
    shutil.copytree(os.path.join(ROOT, "beam_downsample"), copy / "beam_downsample",
                    ignore=shutil.ignore_patterns("data", "__pycache__"))
    with open(copy / "beam_downsample" / "core" / "box.py", "a", encoding="utf-8") as module:
        module.write("\n\ndef _upward():\n    from beam_downsample.run import watch  # noqa: F401\n")
    shutil.copy(os.path.join(ROOT, ".importlinter"), copy / ".importlinter")
    executable = shutil.which("lint-imports", path=os.path.dirname(sys.executable)) or shutil.which("lint-imports")
    result = subprocess.run([executable, "--no-cache", ".importlinter"], cwd=copy, capture_output=True, text=True,
                            check=False, env=dict(os.environ, PYTHONPATH=str(copy)))
    assert result.returncode != 0
    assert "beam_downsample.core is not allowed to import beam_downsample.run" in result.stdout


def test_tests_skip_only_through_the_ci_aware_helpers():
    """A skip hides an untested path: outside the opt-in reference parity, tests skip only
    through conftest.skip_or_fail / require_module, which fail under CI instead."""
    tests = os.path.dirname(os.path.abspath(__file__))
    offenders = []
    for name in sorted(os.listdir(tests)):
        if not name.endswith(".py") or name in ("conftest.py", "test_parity_reference.py", "test_layout.py"):
            continue
        with open(os.path.join(tests, name), encoding="utf-8") as handle:
            text = handle.read()
        offenders += [f"{name}: {call}" for call in ("pytest.skip(", "importorskip(", "mark.skip", "mark.xfail")
                      if call in text]
    assert not offenders, offenders


def test_skip_or_fail_fails_under_ci(monkeypatch):
    import pytest  # pylint: disable=import-outside-toplevel

    from conftest import skip_or_fail  # pylint: disable=import-outside-toplevel

    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set"):
        skip_or_fail("no such thing here")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        skip_or_fail("no such thing here")
