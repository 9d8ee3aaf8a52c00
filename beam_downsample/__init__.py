"""beam-downsample: WEBKNOSSOS mag pyramids as an Apache Beam batch job, as a command and a library.

    import beam_downsample as bd
    result = bd.downsample("path/or/gs://bucket/dataset", layer_name="segmentation")
    result.layers["segmentation"].made        # ('2-2-1', '4-4-2', ...)

`downsample` does what `beam-downsample TARGET` does (the keywords mirror the
flags); `prepare` plans without touching anything and returns a `Job` to run;
`beam_downsample.beam` holds Beam transforms for your own pipelines. Errors
derive from `Error`: `UsageError` and `DatasetError` (nothing was touched),
`RunError` (a fault during a run; the same call resumes).

Importing this package is cheap: the pipeline's modules (Beam, tensorstore)
load on first use of a name below.
"""

from __future__ import annotations

import importlib

from beam_downsample.core.errors import DatasetError, Error, RunError, UsageError

TYPE_CHECKING = False  # not typing's: importing typing would cost this cheap import 4 ms
if TYPE_CHECKING:  # the names below load lazily (`__getattr__`)
    from typing import Any

    from beam_downsample import beam
    from beam_downsample.launch.api import Job, Result, downsample, prepare
    from beam_downsample.run.result import LayerResult

__all__ = ["DatasetError", "Error", "Job", "LayerResult", "Result", "RunError", "UsageError", "beam", "downsample",
           "prepare"]

_LAZY = {
    "downsample": "beam_downsample.launch.api",
    "prepare": "beam_downsample.launch.api",
    "Job": "beam_downsample.launch.api",
    "Result": "beam_downsample.launch.api",
    "LayerResult": "beam_downsample.run.result",
}


def __getattr__(name: str) -> Any:
    if name == "beam":
        return importlib.import_module("beam_downsample.beam")
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'beam_downsample' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
