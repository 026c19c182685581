"""The C speed-ups (`dataflow/_speedups.c`), or None where they were not built.

Callers read `speedups.native` each time they run, so setting it to None
switches every one of them back to the pure-Python reference: the tests
compare the two that way, and a build without a C compiler runs that way.
"""

from __future__ import annotations

from types import ModuleType

native: ModuleType | None
try:
    from dataflow import _speedups as native
except ImportError:  # pragma: no cover - installed without a C compiler
    native = None
