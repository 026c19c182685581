"""Python's cycle collector on a timer, not on allocation counts.

Open batches keep tens of thousands of decoded documents alive, and the
collector, triggered by allocations, walks them again and again
(bench/RESULTS.md, "Cycle collector on a timer"). Everything here is
freed by reference counting the moment a batch is committed; only reference
cycles (exception tracebacks, mostly) need the collector, and they can wait.
So automatic collection is off, and the parse step, which does the allocating,
calls `collect_if_due()`: a full collection at most every `interval` seconds.
"""

from __future__ import annotations

import gc
import time

_interval = 30.0
_next_at = 0.0


def install(interval: float = 30.0) -> None:
    """Collect once, freeze what start-up left (modules, clients), and switch to the timer."""
    global _interval, _next_at
    gc.collect()
    gc.freeze()
    gc.disable()
    _interval = interval
    _next_at = time.monotonic() + interval


def collect_if_due(now: float | None = None) -> bool:
    """Run a full collection when the interval has passed; True if one ran."""
    global _next_at
    now = time.monotonic() if now is None else now
    if now < _next_at or gc.isenabled():
        return False
    gc.collect()
    _next_at = now + _interval
    return True
