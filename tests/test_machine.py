"""The malloc arena limit reaches the processes beam-downsample starts."""

import subprocess
import sys

from beam_downsample.core import machine


def test_arena_limit_is_inherited_by_children(monkeypatch):
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    machine.limit_malloc_arenas()
    expected = str(max(machine.available_cores(), 2))
    child = subprocess.run([sys.executable, "-c", "import os; print(os.environ['MALLOC_ARENA_MAX'])"],
                           capture_output=True, text=True, check=True)
    assert child.stdout.strip() == expected


def test_a_user_setting_wins(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "7")
    machine.limit_malloc_arenas()
    assert machine.os.environ["MALLOC_ARENA_MAX"] == "7"
