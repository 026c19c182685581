"""`python -m dataflow [bytewax.run options]`: the pipeline with recovery on.

The same as `python -m bytewax.run dataflow.main:flow -r $CDC_RECOVERY_DIR
-s $CDC_SNAPSHOT_SECONDS -b $CDC_BACKUP_SECONDS`, so that crash-safe resume is
the default rather than a flag to remember. Other options (`-w`, `-i`, `-a`)
pass through to `bytewax.run`. `CDC_RECOVERY_DIR=off` runs without a store;
exactly-once still holds then (the Delta offsets), but more is re-read.
"""

from __future__ import annotations

import runpy
import sys

from dataflow.runtime.settings import Settings, SettingsError


def main(argv: list[str]) -> None:
    try:
        settings = Settings.from_env()
    except SettingsError as e:
        sys.exit(f"cdc: {e}")
    args = ["bytewax.run", "dataflow.main:flow"]
    store = settings.recovery
    if store.dir is not None:
        snapshot, backup = max(1, round(store.snapshot_seconds)), round(store.backup_seconds)
        args += ["-r", store.dir, "-s", str(snapshot), "-b", str(backup)]
    sys.argv = args + argv
    runpy.run_module("bytewax.run", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
