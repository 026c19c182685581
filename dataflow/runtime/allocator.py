"""How soon delta-rs' allocator gives freed memory back: set before `deltalake` is first imported.

delta-rs is built with jemalloc (under the `_rjem_` prefix), whose background
thread returns freed pages to the system only after they have been unused for
`dirty_decay_ms`, 10 s by default. A MERGE frees hundreds of MB at a time, so
those pages stayed in the process's RSS, which a container's memory limit
counts. At 1 s, the 1M-event benchmark's merge-mode peak RSS (25,000-row
batches) went from 1,051-1,103 to 931-992 MiB, for about 5 s more system time per
million merged events (returning pages and faulting them in again).
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
