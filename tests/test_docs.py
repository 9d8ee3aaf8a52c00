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
