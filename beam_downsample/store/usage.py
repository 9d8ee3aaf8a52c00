"""Storage requests this process made, by kind: tensorstore's own metrics plus our GCS client.

tensorstore counts its operations per kvstore driver
(`ts.experimental_collect_matching_metrics`): for object stores (gcs, s3,
http) `batch_read` is one per GET of object data or metadata (however
many chunks a coalesced range carries), `write` one per upload or deletion
of an object, `list` one per listing, and `/tensorstore/http/request_started`
every HTTP request it sent, retries and further listing pages included;
what the kinds do not explain is counted as `other`. Our google-cloud-storage
client (properties, markers, locks, tallies: `store.storage`) is counted per
HTTP response it received, by method and URL.

Workers report what their process sent with `take()` (a delta: each request
is reported once per process); the launcher's own requests are what its
process sent since `mark()` less what DoFns running in it reported.
`run.accounting` adds the two up for the `done:` line.
(Named `usage`, not `requests`: that is the HTTP library's name.)
"""

from __future__ import annotations

import collections
import dataclasses
import re
import threading
import urllib.parse

import tensorstore as ts

KINDS = ("reads", "writes", "lists", "deletes", "other")
LOCAL_KVSTORES = ("file", "memory")

_lock = threading.Lock()
_client: collections.Counter = collections.Counter()  # our GCS client's requests by kind
_taken: collections.Counter = collections.Counter()  # what `take` has handed out so far (all of it reported)
_reported: collections.Counter = collections.Counter()


def count_response(response, *args, **kwargs) -> None:
    """A `requests` response hook for our GCS client's session: one request of its kind."""
    request = response.request
    path = urllib.parse.urlsplit(request.url).path
    method = request.method.upper()
    if method == "GET":
        kind = "lists" if re.search(r"/b/[^/]+/o/?$", path) else "reads"
    elif method == "DELETE":
        kind = "deletes"
    else:
        kind = "writes"
    with _lock:
        _client[kind] += 1


def counts() -> dict[str, int]:
    """Every storage request of this process so far, by kind."""
    found: collections.Counter = collections.Counter()
    total = 0
    for metric in ts.experimental_collect_matching_metrics("/tensorstore/"):
        name, values = metric["name"], metric.get("values") or [{}]
        value = sum(int(v.get("value", 0)) for v in values if isinstance(v.get("value", 0), (int, float)))
        if name == "/tensorstore/http/request_started":
            total = value
            continue
        match = re.fullmatch(r"/tensorstore/kvstore/([^/]+)/(batch_read|write|list)", name)
        if match and match.group(1) not in LOCAL_KVSTORES:
            found[{"batch_read": "reads", "write": "writes", "list": "lists"}[match.group(2)]] += value
    found["other"] = max(total - sum(found.values()), 0)
    with _lock:
        found.update(_client)
    return {kind: int(found.get(kind, 0)) for kind in KINDS}


@dataclasses.dataclass(frozen=True)
class Mark:
    """Where a run started: this process's counts, and what its DoFns had reported, then."""

    counts: dict
    reported: dict


def mark() -> Mark:
    """The start of a run in this process; DoFns running here report only what follows."""
    now = counts()
    with _lock:
        _taken.clear()
        _taken.update(now)
        return Mark(now, dict(_reported))


def take() -> dict[str, int]:
    """What this process sent since the last `take` (or `mark`, or its start): a worker's report."""
    now = counts()
    with _lock:
        delta = {kind: max(now[kind] - _taken.get(kind, 0), 0) for kind in KINDS}
        _taken.clear()
        _taken.update(now)
        _reported.update(delta)
    return delta


def own_since(start: Mark) -> dict[str, int]:
    """What this process sent since `start` and its DoFns did not report as theirs."""
    now = counts()
    with _lock:
        reported = {kind: _reported.get(kind, 0) - start.reported.get(kind, 0) for kind in KINDS}
    return {kind: max(now[kind] - start.counts[kind] - reported[kind], 0) for kind in KINDS}
