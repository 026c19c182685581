"""Real Apache Kafka and MinIO on 127.0.0.1, installed and run as plain processes.

No Docker engine runs on our machines, so the project installs both itself:
Kafka from its jars (resolved with Maven), MinIO built with `go install`. Both
are cached under `.cache/` in the repository and reused. `make services`, the
pytest fixtures and `.ci/run` all go through this package.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache"
