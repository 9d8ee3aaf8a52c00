"""What a run cost in storage requests, by kind, for the `done:` line (and the Python API).

The launcher's own requests (planning, creating the mags, progress, markers,
properties) come from its process's counts (`store.usage`); the workers'
from the Beam counters their DoFns incremented at the end of each bundle
(`requests_<kind>`, `transforms.downsample`), whichever process or machine
they ran in. Units that ran in the launcher's process are counted once:
what its DoFns reported is not counted again as the launcher's own.
"""

from __future__ import annotations

from beam_downsample.store import usage
from beam_downsample.transforms.downsample import REQUESTS


def storage_requests(metrics: dict, start: usage.Mark) -> dict[str, int]:
    """Requests of the run that began at `start` (`usage.mark()`), by kind (reads, writes,
    lists, deletes, other) plus `total`; `metrics` is `run.job.run_job`'s result. All 0 for a
    run on local files (file reads are not requests)."""
    own = usage.own_since(start)
    counted = {kind: own[kind] + int(metrics.get(f"{REQUESTS}{kind}", 0)) for kind in usage.KINDS}
    counted["total"] = sum(counted.values())
    return counted


def work_metrics(metrics: dict) -> dict:
    """`metrics` without the request counters (they are summed in `storage_requests`)."""
    return {name: value for name, value in metrics.items() if not name.startswith(REQUESTS)}


def describe(counted: dict) -> str:
    """`84 storage requests (30 reads, 25 writes, 12 lists, 7 deletes)`; '' if there were none."""
    if not counted.get("total"):
        return ""
    kinds = ", ".join(f"{counted[kind]} {kind}" for kind in usage.KINDS if counted.get(kind) or kind != "other")
    return f"{counted['total']} storage requests ({kinds})"
