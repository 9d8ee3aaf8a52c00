"""Progress in a log (stderr not a terminal, e.g. a SLURM job's output): a line now and
then and when a pass completes, with units done/total and the voxel rate of this run."""

from __future__ import annotations

import io

from beam_downsample.launch.progressbar import ProgressBar as _ProgressBar

LABEL = "pass 1/2: color 2-2-1"


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def lines_of(updates, pass_voxels=(1_000_000_000,), interval=30.0):
    stream, clock = io.StringIO(), Clock()
    with _ProgressBar(pass_voxels, stream=stream, interval=interval, clock=clock) as bar:
        for at, done, total, label in updates:
            clock.now = 100.0 + at
            bar.update(done, total, label)
    return stream.getvalue().splitlines()


def test_a_line_every_interval_and_one_when_the_pass_completes():
    lines = lines_of([(0, 0, 10, LABEL), (10, 3, 10, LABEL), (31, 5, 10, LABEL), (40, 6, 10, LABEL),
                      (62, 8, 10, LABEL), (70, 10, 10, LABEL), (71, 10, 10, LABEL)])
    # 5 of 10 units of 10^9 voxels in 31 s: 16.1 Mvoxel/s; 8 of 10 in 62 s: 12.9; all in 70 s: 14.3
    assert lines == [
        f"{LABEL}: 5/10 work units (50%), 16.1 Mvoxel/s, 31 s",
        f"{LABEL}: 8/10 work units (80%), 12.9 Mvoxel/s, 62 s",
        f"{LABEL}: 10/10 work units (100%), 14.3 Mvoxel/s, 70 s",
    ]


def test_units_done_by_an_earlier_run_do_not_count_for_the_rate():
    lines = lines_of([(0, 6, 10, LABEL), (20, 10, 10, LABEL)])
    assert lines == [f"{LABEL}: 10/10 work units (100%), 20.0 Mvoxel/s, 20 s"]  # 4 units in 20 s


def test_each_pass_gets_its_own_lines_and_rate():
    second = "pass 2/2: color 4-4-2"
    lines = lines_of([(0, 0, 2, LABEL), (10, 2, 2, LABEL), (10, 0, 1, second), (15, 1, 1, second)],
                     pass_voxels=(100_000_000, 10_000_000))
    assert lines == [f"{LABEL}: 2/2 work units (100%), 10.0 Mvoxel/s, 10 s",
                     f"{second}: 1/1 work units (100%), 2.0 Mvoxel/s, 5 s"]


def test_a_terminal_gets_the_bar_not_lines():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    with _ProgressBar((1000,), stream=stream, interval=0.0) as bar:
        bar.update(1, 2, LABEL)
        bar.update(2, 2, LABEL)
    assert "work units (" not in stream.getvalue()
    assert "2/2" in stream.getvalue()  # tqdm's bar


def test_a_rerun_counts_what_the_markers_say_is_done(tmp_path):
    """Workers stopped with an abandoned run leave tallies short of what they finished;
    after `rerun` the count starts from the markers' answer, and the new run's tallies add."""
    import dataclasses
    import os

    from beam_downsample.state import progress
    from beam_downsample.store import storage

    @dataclasses.dataclass
    class Config:
        marker_dir: str

    config = Config(str(tmp_path / "markers"))
    reports = []
    bar = progress.Progress([config], 10, "pass 1/1: x", lambda done, total, label: reports.append(done))
    tally = progress.Tally(config.marker_dir)
    tally.add()  # a worker of the first run counted one unit (written at the end of its bundle),
    tally.flush()  # then finished 3 more and was stopped
    assert bar.count() == 1
    todo = bar.rerun(list(range(6)))  # the markers: 4 of 10 done, 6 to run again
    assert todo == list(range(6)) and bar.count() == 4
    storage.makedirs(progress.tally_dir(config.marker_dir))
    again = progress.Tally(config.marker_dir)
    for _ in range(6):
        again.add()
    again.flush()
    assert bar.count() == 10
    assert os.listdir(progress.tally_dir(config.marker_dir)) == [os.path.basename(again._path)]  # pylint: disable=protected-access
