"""Which reduction made a layer's mags, kept beside them: `TARGET/<layer>/beam-downsample.json`.

A mag made with `--ignore-background` has an entry; a mag without one was
made by a plain reduction (by WEBKNOSSOS, by an older run, or by a run
without the option). So a default run never creates the file, and a layer
WEBKNOSSOS made has none. WEBKNOSSOS ignores files it does not know in a
layer directory, so the dataset stays readable; the file outlives the run
(its state under `TARGET/.beam-downsample/` does not), so a later `--bbox`
refresh can check that it reduces as the pyramid was made.

    {"mags": {"2-2-1": {"interpolation": "mode", "ignoreBackground": true}, ...}}
"""

from __future__ import annotations

import dataclasses
import json
from typing import Iterable, Optional

from beam_downsample.core.mags import Mag, mag_name, parse_mag
from beam_downsample.kernels.background import reduction
from beam_downsample.store import storage
from beam_downsample.store.properties import DatasetError

RECORD_FILE = "beam-downsample.json"


@dataclasses.dataclass(frozen=True)
class Reduction:
    """How a mag was made; `interpolation` None: not recorded (a plain reduction, which one is unknown)."""

    interpolation: Optional[str]
    ignore_background: bool

    @classmethod
    def of(cls, interpolation: str, ignore_background: bool) -> "Reduction":
        """The option as it acts: `nearest` is the same with and without it."""
        return cls(interpolation, reduction(interpolation, ignore_background) != interpolation)

    def options(self) -> str:
        """The command-line options that reduce this way."""
        if not self.ignore_background:
            return "without --ignore-background"
        return f"--interpolation {self.interpolation} --ignore-background"

    def describe(self) -> str:
        if not self.ignore_background:
            return f"a plain {self.interpolation}" if self.interpolation else "a plain reduction"
        return f"{self.interpolation} over non-zero voxels (--ignore-background)"


PLAIN = Reduction(None, False)


def record_path(dataset_path: str, layer_name: str) -> str:
    return storage.join_inside(dataset_path, layer_name, RECORD_FILE)


def read(dataset_path: str, layer_name: str) -> dict[Mag, Reduction]:
    """The recorded reductions by mag (mags without an entry are plain)."""
    path = record_path(dataset_path, layer_name)
    try:
        document = storage.read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path} is not JSON ({error}); it records how the layer's mags were made") from None
    if document is None:
        return {}
    try:
        return {parse_mag(name): Reduction(str(entry["interpolation"]), bool(entry["ignoreBackground"]))
                for name, entry in document["mags"].items()}
    except (KeyError, TypeError, AttributeError, ValueError) as error:
        raise DatasetError(f"{path}: not a record of mags and their reductions ({error!r})") from None


def reduction_of(recorded: dict[Mag, Reduction], mag: Mag) -> Reduction:
    return recorded.get(tuple(mag), PLAIN)  # type: ignore[arg-type]


def write(dataset_path: str, layer_name: str, mags: Iterable[Mag], made_by: Reduction) -> None:
    """Records that `made_by` made `mags`: an entry for a background-aware reduction, none for
    a plain one (the file goes when its last entry does; untouched if nothing changes)."""
    path = record_path(dataset_path, layer_name)
    document = storage.read_json(path)
    entries = dict((document or {}).get("mags", {}))
    before = dict(entries)
    for mag in mags:
        if made_by.ignore_background:
            entries[mag_name(mag)] = {"interpolation": made_by.interpolation, "ignoreBackground": True}
        else:
            entries.pop(mag_name(mag), None)
    if entries == before and document is not None:
        return
    if entries:
        storage.write_json_atomically(path, {"mags": dict(sorted(entries.items(), key=lambda e: _order(e[0])))})
    elif document is not None:
        storage.delete(path)


def _order(name: str) -> tuple:
    mag = parse_mag(name)
    return (max(mag), mag)
