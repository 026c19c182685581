"""How soon delta-rs' allocator gives freed memory back: set before `deltalake` is first imported.

delta-rs is built with jemalloc (under the `_rjem_` prefix), whose background
thread returns freed pages to the system only after they have been unused for
`dirty_decay_ms`, 10 s by default. A MERGE frees hundreds of MB at a time, so
those pages stayed in the process's RSS, which a container's memory limit
counts. At 1 s they go back soon after, for a little more system time
(bench/RESULTS.md, "jemalloc decay").
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

ENV = "_RJEM_MALLOC_CONF"
DEFAULT = "dirty_decay_ms:1000"


def configure(environ: MutableMapping[str, str] = os.environ) -> str:
    """Apply the default unless the environment already names a setting; return what applies.

    jemalloc reads the variable once, at the library's first allocation, so
    this must run before `deltalake` is imported (`dataflow/__init__.py`).
    """
    return environ.setdefault(ENV, DEFAULT)
