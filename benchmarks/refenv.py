"""The reference tool (`webknossos` 4.3.3, AGPL) in a venv of its own.

The reference is used strictly as a black box: its command line
(`webknossos downsample ...`) and its public Python API (to create test
datasets). None of its code is copied here.

`reference_python()` / `reference_cli()` return paths inside that venv:

- if the environment variable BEAM_DOWNSAMPLE_REF_VENV is set, that venv is
  used as it is (it must already hold webknossos);
- otherwise a venv is created once and cached in
  ~/.cache/beam-downsample/webknossos-4.3.3 (`python -m venv` +
  `pip install webknossos==4.3.3`; about a minute, a few hundred MB).

`python benchmarks/refenv.py` creates (or checks) the venv and prints its paths.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REFERENCE_VERSION = "4.3.3"
REFERENCE_PACKAGE = f"webknossos=={REFERENCE_VERSION}"
ENV_VAR = "BEAM_DOWNSAMPLE_REF_VENV"
DEFAULT_VENV = Path.home() / ".cache" / "beam-downsample" / f"webknossos-{REFERENCE_VERSION}"
_READY_MARK = ".beam-downsample-ready"


def _bin(venv: Path, name: str) -> Path:
    return venv / ("Scripts" if os.name == "nt" else "bin") / name


def reference_venv() -> Path:
    """The venv holding the reference; created and cached if BEAM_DOWNSAMPLE_REF_VENV is unset."""
    given = os.environ.get(ENV_VAR)
    if given:
        venv = Path(given).expanduser()
        if not _bin(venv, "python").exists() or not _bin(venv, "webknossos").exists():
            raise RuntimeError(f"{ENV_VAR}={given} has no bin/python and bin/webknossos")
        return venv
    venv = DEFAULT_VENV
    if (venv / _READY_MARK).exists() and _bin(venv, "webknossos").exists():
        return venv
    _create(venv)
    return venv


def _create(venv: Path) -> None:
    print(f"refenv: creating the reference venv in {venv} ({REFERENCE_PACKAGE}) ...", file=sys.stderr, flush=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    if not _bin(venv, "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(_bin(venv, "python"))
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--upgrade", "pip"], check=True)
    subprocess.run([python, "-m", "pip", "install", "--quiet", REFERENCE_PACKAGE], check=True)
    check = subprocess.run(
        [python, "-c", "import importlib.metadata as m; print(m.version('webknossos'))"],
        check=True, capture_output=True, text=True,
    )
    installed = check.stdout.strip()
    if installed != REFERENCE_VERSION:
        raise RuntimeError(f"refenv: expected webknossos {REFERENCE_VERSION} in {venv}, got {installed!r}")
    (venv / _READY_MARK).write_text(REFERENCE_PACKAGE + "\n", encoding="utf-8")
    print("refenv: ready", file=sys.stderr, flush=True)


def reference_python() -> str:
    """Path of the reference venv's python (creates the venv if needed)."""
    return str(_bin(reference_venv(), "python"))


def reference_cli() -> str:
    """Path of the reference venv's `webknossos` command (creates the venv if needed)."""
    return str(_bin(reference_venv(), "webknossos"))


def reference_env() -> dict:
    """Environment for running the reference: quiet warnings, no stray venv/PYTHONPATH of ours."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env



def ours_command() -> list[str]:
    """How to run beam-downsample: the console script, else the module."""
    exe = shutil.which("beam-downsample")
    return [exe] if exe else [sys.executable, "-m", "beam_downsample"]


def tail(path: str, lines: int = 12) -> str:
    """The last lines of a run's log, for error messages."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        return "".join(handle.readlines()[-lines:])


if __name__ == "__main__":
    print("python:", reference_python())
    print("cli:   ", reference_cli())
