"""The documentation site builds with warnings as errors (a broken link, an anchor that
is gone or a page missing from the nav fails), with the toolchain of the `docs` extra."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_docs_build_strict(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "architecture" / "index.html").exists()
    # the API reference is generated from the docstrings; the library page includes the tested example
    api = (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8")
    assert "Downsamples a WEBKNOSSOS dataset into a mag pyramid" in api and "DownsamplePyramid" in api
    library = (tmp_path / "site" / "library" / "index.html").read_text(encoding="utf-8")
    assert 'class="n">WriteBlock' in library


def test_a_broken_link_fails_the_build(tmp_path):
    """--strict is real: the same site with one broken link does not build."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# x\n\nSee [a page that is not there](missing.md).\n", encoding="utf-8")
    config = tmp_path / "mkdocs.yml"
    with open(os.path.join(ROOT, "mkdocs.yml"), encoding="utf-8") as source:
        text = source.read()
    config.write_text(text.split("\nnav:")[0] + "\nnav:\n  - Home: index.md\n", encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            cwd=tmp_path, capture_output=True, text=True, check=False)
    assert result.returncode != 0
    assert "missing.md" in result.stdout + result.stderr


def test_readme_is_short_and_starts_with_the_two_commands():
    """A newcomer reads it in five minutes; its first lines are the two set-up commands, and the
    second one is what .ci/run runs."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as readme:
        lines = readme.read().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move details to docs/"
    assert "python -m beam_downsample.demo demo-data && beam-downsample demo-data" in lines[3]
    assert lines[4].endswith("python -m pytest -q tests")
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as ci:
        assert lines[4] in ci.read()


def test_readme_links_point_at_pages_that_exist():
    """The README is outside the site, so mkdocs does not check its links: every docs/ link must exist."""
    import re
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as readme:
        targets = re.findall(r"\]\((docs/[^)#]+)", readme.read())
    assert targets
    missing = [t for t in targets if not os.path.exists(os.path.join(ROOT, t))]
    assert not missing, missing
