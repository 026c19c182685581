"""The cycle collector runs on the timer only: cycles wait for it, then go."""

from __future__ import annotations

import gc
import time
import weakref

from dataflow.runtime import gc_timer


class Node:
    other: Node | None = None


def test_cycles_wait_for_the_timer_and_are_then_collected() -> None:
    was_enabled = gc.isenabled()
    try:
        gc_timer.install(interval=60)
        assert not gc.isenabled()
        freed: list[str] = []
        a, b = Node(), Node()
        a.other, b.other = b, a
        weakref.finalize(a, freed.append, "cycle")
        del a, b
        junk = [[{}] for _ in range(200_000)]  # far past any allocation threshold
        del junk
        assert freed == []
        assert not gc_timer.collect_if_due(now=time.monotonic() + 1)
        assert freed == []
        assert gc_timer.collect_if_due(now=time.monotonic() + 61)
        assert freed == ["cycle"]
        assert not gc_timer.collect_if_due(now=time.monotonic() + 62)  # the next one is 60 s later
    finally:
        gc.unfreeze()
        if was_enabled:
            gc.enable()
