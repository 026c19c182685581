"""Which of two changes to one document came first, when offsets cannot tell.

Within a Kafka partition the offset decides. Across partitions, and against a
replayed message, the writer compares `ChangeEvent.seq`, which must come from
one clock only (the decoder's docstring lists the clock per format).
"""

from __future__ import annotations

import re
from typing import Any

_FIRST_WALL_CLOCK_VERSION = (3, 4)  # DBZ-9683
_VERSION = re.compile(r"(\d+)(?:\.(\d+))?")


def debezium_seq(ts_ms: int, ord_: int, version: Any) -> int:
    """The sequence of a Debezium event, from one clock (`dataflow.decode.envelopes`).

    Before 3.4, `ts_ms` is the cluster time's seconds (times 1000) and `ord` its
    increment. From 3.4 `ts_ms` may be the wall time, so, when the version is
    3.4 or later or not known, the wall milliseconds alone (packed like a
    cluster time, so that a table keeps one scale across a connector upgrade).
    """
    before = _VERSIONS.get(version) if type(version) is str else False  # per message: one dict look-up
    if before is None:
        before = _before_wall_clock(version)
    return ((ts_ms // 1000) << 31) | (ord_ if before else ts_ms % 1000)  # as model.cluster_seq packs


_VERSIONS: dict[str, bool] = {}


def _before_wall_clock(version: Any) -> bool:
    if type(version) is not str:
        return False
    known = _VERSIONS.get(version)
    if known is None:
        m = _VERSION.match(version)
        known = m is not None and (int(m[1]), int(m[2] or 0)) < _FIRST_WALL_CLOCK_VERSION
        if len(_VERSIONS) < 1000:
            _VERSIONS[version] = known
    return known
