"""The Bytewax recovery store: created on first start, checked on every start.

Bytewax fixes the number of recovery partitions when the store is created, and
a cluster can use at most that many workers, so the store is created with room
for the largest cluster we support (`CDC_RECOVERY_PARTITIONS`, default 16).

A store that is missing, empty, truncated or garbage is not fatal: the Delta
tables' committed offsets are the record of truth. Such a store is moved
aside, a new one is created, and every partition resumes from Delta (see
`dataflow.source.kafka`); so is a store of another snapshot format, whose
pickles this version could not read. A store written for other topics or
partition counts is refused: resuming from it would mix up offsets.
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
import time
from pathlib import Path

import orjson
from bytewax.recovery import init_db_dir

from dataflow.runtime.failures import ConfigError

log = logging.getLogger(__name__)

FINGERPRINT = "cdc-store.json"
REQUIRED_TABLES = {"parts", "exs", "fronts", "commits", "snaps"}
# Raise when a snapshot's pickled classes move or change shape: a store of another
# format is moved aside at start, and every partition resumes from Delta's offsets.
SNAPSHOT_FORMAT = 2


class RecoveryStoreMismatch(ConfigError):
    """The store belongs to another topic set or partition layout."""


def _problems(directory: Path) -> list[str]:
    files = sorted(directory.glob("part-*.sqlite3"))
    if not files:
        return ["no partition files"]
    problems: list[str] = []
    seen: dict[int, int] = {}
    for f in files:
        try:
            con = sqlite3.connect(f"file:{f}?mode=ro", uri=True)
            try:
                if (check := con.execute("PRAGMA quick_check").fetchone()[0]) != "ok":
                    problems.append(f"{f.name}: {check}")
                    continue
                tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
                if missing := REQUIRED_TABLES - tables:
                    problems.append(f"{f.name}: missing tables {sorted(missing)}")
                    continue
                for index, count in con.execute("SELECT part_index, part_count FROM parts"):
                    seen[index] = count
            finally:
                con.close()
        except sqlite3.DatabaseError as e:
            problems.append(f"{f.name}: {e}")
    counts = set(seen.values())
    if not problems and (len(counts) != 1 or set(seen) != set(range(next(iter(counts))))):
        problems.append(f"partitions {sorted(seen)} do not form a complete store")
    return problems


def prepare(directory: str | Path, *, partitions: int, fingerprint: dict) -> str:
    """Make `directory` a usable store; returns "created", "replaced" or "resumed"."""
    directory = Path(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    _owner_only(directory)
    meta = directory / FINGERPRINT
    has_files = any(directory.glob("part-*.sqlite3"))
    problems: list[str] = []
    if has_files and meta.exists():
        recorded = orjson.loads(meta.read_bytes())
        if recorded.get("format") != SNAPSHOT_FORMAT:
            # Snapshots pickle our classes: another layout of them cannot be unpickled.
            problems.append(
                f"snapshot format {recorded.get('format')}, this version writes {SNAPSHOT_FORMAT}"
            )
        elif {**recorded, "format": None} != {**fingerprint, "format": None}:
            raise RecoveryStoreMismatch(
                f"the recovery store at {directory} was written for {recorded}, but this pipeline reads "
                f"{fingerprint}. Resuming from it would mix up offsets. If the topics or their partitions "
                f"changed on purpose, delete {directory} (or point CDC_RECOVERY_DIR at a new folder): the "
                f"pipeline then resumes every partition from the offsets committed in the Delta tables."
            )
    fingerprint = {**fingerprint, "format": SNAPSHOT_FORMAT}
    if has_files and not problems and not (problems := _problems(directory)):
        meta.write_bytes(orjson.dumps(fingerprint, option=orjson.OPT_SORT_KEYS))  # fresh: "ready in this run"
        return "resumed"
    if has_files:
        aside = directory.with_name(f"{directory.name}.unusable-{time.strftime('%Y%m%dT%H%M%S')}")
        shutil.move(str(directory), aside)
        directory.mkdir(mode=0o700, parents=True)
        log.error(
            "recovery store at %s is unusable (%s); moved it to %s and created a new one; "
            "every partition resumes from the offsets committed in the Delta tables",
            directory,
            "; ".join(problems),
            aside,
        )
        state = "replaced"
    else:
        log.warning(
            "recovery store at %s is missing or empty: creating it with %d partitions; "
            "partitions resume from the offsets committed in the Delta tables, if any",
            directory,
            partitions,
        )
        state = "created"
    init_db_dir(directory, partitions)
    meta.write_bytes(orjson.dumps(fingerprint, option=orjson.OPT_SORT_KEYS))
    _owner_only(directory)
    return state


def _owner_only(directory: Path) -> None:
    """The store holds pickles (whoever can write them runs code at the next restore) and raw
    documents: the folder 0700 and its files 0600, whatever umask made them."""
    directory.chmod(0o700)
    for f in directory.iterdir():
        if f.is_file():
            f.chmod(0o600)


def wait_ready(directory: str | Path, timeout: float, started: float | None = None) -> None:
    """For processes other than 0: wait until process 0 has prepared a shared store in this run.

    Process 0 rewrites the fingerprint at every start, after any repair, so a
    fingerprint older than this process (less a minute of start-up skew) is a
    previous run's and is not trusted yet.
    """
    started = time.time() if started is None else started
    meta = Path(directory) / FINGERPRINT
    deadline = time.monotonic() + timeout
    while not (meta.exists() and meta.stat().st_mtime >= started - 60):
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"recovery store at {directory} was not prepared by process 0 in {timeout:.0f}s"
            )
        time.sleep(0.5)
