"""Keeping a Delta table fast and its storage bounded: compaction, vacuum, checkpoints, log clean-up.

The pipeline only adds: a changelog gets a file per batch, a mirror's MERGE
leaves the files it rewrote behind, and every commit adds a log entry that a
reader replays from the last checkpoint. `maintain` tidies one table:

1. compaction (delta-rs optimize) rewrites small files into files of about
   `target_bytes`, only once a table has `min_small_files` of them; the commit
   changes no data (`dataChange: false`), so change-data-feed readers (a
   mirror's rounds) skip it, and it keeps every `txn` action: those are table
   state, not part of a file, so the exactly-once offsets stay;
2. a checkpoint once `checkpoint_every` commits passed since the last one, so
   a reader loads one Parquet file instead of replaying JSON commits;
3. log clean-up: commit files older than the log retention and older than the
   last checkpoint go (delta-rs' `cleanup_metadata`; without a checkpoint it
   removes nothing);
4. vacuum: data files no commit references any more (rewritten by compaction
   or a MERGE, or written by a commit that never landed) and older than the
   file retention go.

Retentions: a table's own `delta.deletedFileRetentionDuration` and
`delta.logRetentionDuration` win (someone chose them for that table). A table
without one gets the configured one written into it where delta-rs reads it
from the table (`_record_retentions`): the log retention when it is not Delta's
30 days, the file retention when it is longer than Delta's 7 days. Once
written, a table property is the table's own: changing the setting later does
not change it.

A merge-mode changelog is also read by its mirror's rounds and by fresh reads,
from the version after the mirror's mark (`mirror_needs`): `keep_from` keeps
the files of those versions through vacuum and holds log clean-up back while a
checkpoint lies past it, so a mirror that trails by more than the retention
still finds its changes.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from deltalake import DeltaTable, PostCommitHookProperties
from deltalake.exceptions import TableNotFoundError

from dataflow.lake.layout import CHANGELOG_DIR, name_of
from dataflow.lake.mirror import mark_app
from dataflow.lake.offsets import is_changelog, list_tables
from dataflow.lake.storage import list_files
from dataflow.lake.writer import WRITER_PROPERTIES

log = logging.getLogger(__name__)

FILE_RETENTION = "delta.deletedFileRetentionDuration"
LOG_RETENTION = "delta.logRetentionDuration"
# Delta's own defaults when a table sets neither (the protocol's and delta-rs').
DELTA_FILE_RETENTION_HOURS = 168
DELTA_LOG_RETENTION_HOURS = 720
DEFAULT_TARGET_BYTES = 100 * 1024 * 1024  # delta-rs' own default target
LOG_DIR = "_delta_log"

_INTERVAL = re.compile(r"\s*interval\s+(\d+)\s+([a-z]+?)s?\s*", re.IGNORECASE)
_HOURS_PER = {
    "nanosecond": 1 / 3_600_000_000_000,
    "microsecond": 1 / 3_600_000_000,
    "millisecond": 1 / 3_600_000,
    "second": 1 / 3600,
    "minute": 1 / 60,
    "hour": 1.0,
    "day": 24.0,
    "week": 168.0,
}
_VERSION = re.compile(r"(\d{20})\.")
# delta-rs removes expired commit files after every commit once a checkpoint exists (the
# post-commit hook, `delta.enableExpiredLogCleanup`). Maintenance's own commits leave that to
# its log clean-up step, which knows what a trailing mirror still reads.
NO_LOG_CLEANUP = PostCommitHookProperties(create_checkpoint=True, cleanup_expired_logs=False)


@dataclass(frozen=True)
class MaintenancePolicy:
    """What maintenance does and its thresholds: the CDC_COMPACT_*, CDC_VACUUM_*, CDC_CHECKPOINT_EVERY
    and CDC_LOG_RETENTION_HOURS settings (`Settings.maintenance`)."""

    enabled: bool = True
    compact: bool = True
    target_bytes: int = DEFAULT_TARGET_BYTES
    min_small_files: int = 10
    # A file is small below this share of the target: compacting a table of near-target files
    # rewrites a lot to gain little.
    small_fraction: float = 0.5
    vacuum: bool = True
    vacuum_retention_hours: int = DELTA_FILE_RETENTION_HOURS
    checkpoint: bool = True
    checkpoint_every: int = 100
    clean_logs: bool = True
    log_retention_hours: int = DELTA_LOG_RETENTION_HOURS
    dry_run: bool = False

    @property
    def small_bytes(self) -> int:
        return int(self.target_bytes * self.small_fraction)


@dataclass
class MaintenanceReport:
    """What `maintain` did to one table (with `dry_run`: what it would do)."""

    table: str
    version: int = -1  # the table's version afterwards
    small_files: int = 0  # files below the policy's small size, before compaction
    files_compacted: int = 0  # files compaction rewrote (removed)
    files_added: int = 0  # files it wrote instead
    files_vacuumed: int = 0
    bytes_vacuumed: int = 0
    checkpoint_version: int | None = None  # the checkpoint written, if one was due
    log_files_removed: int = 0
    file_retention_hours: int = DELTA_FILE_RETENTION_HOURS
    log_retention_hours: int = DELTA_LOG_RETENTION_HOURS
    properties_set: dict[str, str] = field(default_factory=dict)
    held_back: list[str] = field(default_factory=list)  # clean-up left undone, and why
    seconds: float = 0.0
    dry_run: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def interval_hours(text: str) -> float:
    """Hours in a Delta interval property (`interval 7 days`, `interval 36 hours`)."""
    m = _INTERVAL.fullmatch(text)
    if m is None or m[2].lower() not in _HOURS_PER:
        raise ValueError(f"not a Delta interval: {text!r}")
    return int(m[1]) * _HOURS_PER[m[2].lower()]


def retention_hours(configuration: dict[str, str], key: str, configured: int) -> int:
    """The retention in force, in whole hours: the table's own property (rounded up, never
    shorter than the table says), else the configured one."""
    if (value := configuration.get(key)) is not None:
        try:
            return math.ceil(interval_hours(value))
        except ValueError:
            log.warning("table property %s=%r is not an interval; using %d hours", key, value, configured)
    return configured


def _version_of(name: str) -> int | None:
    m = _VERSION.match(name.rsplit("/", 1)[-1])
    return int(m[1]) if m else None


def last_checkpoint(log_files: dict[str, Any]) -> int | None:
    """The newest checkpoint's version among a listing of `_delta_log/` (None: no checkpoint)."""
    versions = [_version_of(p) for p in log_files if ".checkpoint." in p and p.endswith(".parquet")]
    return max((v for v in versions if v is not None), default=None)


def small_files(dt: DeltaTable, policy: MaintenancePolicy) -> int:
    """How many of the table's files are below the policy's small size."""
    sizes = dt.get_add_actions(flatten=True).column("size_bytes").to_pylist()
    return sum(1 for s in sizes if s is not None and s < policy.small_bytes)


def compact(dt: DeltaTable, policy: MaintenancePolicy) -> tuple[int, int]:
    """Rewrite small files into target-sized ones, if enough are small: (files removed, files added).

    Same Parquet writer properties as the pipeline's commits (row group size matters to MERGE).
    """
    if small_files(dt, policy) < policy.min_small_files:
        return 0, 0
    out = dt.optimize.compact(
        target_size=policy.target_bytes,
        writer_properties=WRITER_PROPERTIES,
        post_commithook_properties=NO_LOG_CLEANUP,
    )
    return int(out.get("numFilesRemoved", 0)), int(out.get("numFilesAdded", 0))


def _record_retentions(
    dt: DeltaTable, policy: MaintenancePolicy, report: MaintenanceReport
) -> dict[str, str]:
    """Write the configured retentions into a table that has none where delta-rs needs them there.

    The log retention whenever it differs from Delta's default: `cleanup_metadata`
    reads it from the table only. The file retention only when it is longer than
    Delta's default: a checkpoint drops tombstones older than the table's file
    retention, and full vacuum then judges such a file by its own (older) age. A
    shorter one is given to vacuum directly, and is not made permanent.
    Returns the table's configuration with what was (or, dry, would be) set.
    """
    config = dt.metadata().configuration
    wanted = {}
    if (
        policy.clean_logs
        and LOG_RETENTION not in config
        and policy.log_retention_hours != DELTA_LOG_RETENTION_HOURS
    ):
        wanted[LOG_RETENTION] = f"interval {policy.log_retention_hours} hours"
    if (
        policy.vacuum
        and FILE_RETENTION not in config
        and policy.vacuum_retention_hours > DELTA_FILE_RETENTION_HOURS
    ):
        wanted[FILE_RETENTION] = f"interval {policy.vacuum_retention_hours} hours"
    if wanted and not policy.dry_run:
        dt.alter.set_table_properties(wanted, post_commithook_properties=NO_LOG_CLEANUP)
    report.properties_set = wanted
    return {**config, **wanted}


def maintain(
    uri: str,
    *,
    storage_options: dict[str, str] | None = None,
    policy: MaintenancePolicy | None = None,
    keep_from: int | None = None,
) -> MaintenanceReport:
    """Compact, checkpoint, clean the log and vacuum one table, as the policy says.

    `keep_from`: the first version some reader still needs whole (a merge-mode
    changelog's mirror); its files and commits are kept. Run it between the
    commits of the table's writer, not beside them: compaction of a mirror
    beside a MERGE makes one of the two commits conflict and be retried.
    """
    policy = policy or MaintenancePolicy()
    started = time.monotonic()
    report = MaintenanceReport(table=uri, dry_run=policy.dry_run)
    so = storage_options or None
    dt = DeltaTable(uri, storage_options=so)
    logs = list_files(uri, storage_options, under=LOG_DIR)  # to count what log clean-up removed
    config = _record_retentions(dt, policy, report)
    report.file_retention_hours = retention_hours(config, FILE_RETENTION, policy.vacuum_retention_hours)
    report.log_retention_hours = retention_hours(config, LOG_RETENTION, policy.log_retention_hours)
    if report.properties_set and not policy.dry_run:
        dt = DeltaTable(uri, storage_options=so)

    if policy.compact:
        report.small_files = small_files(dt, policy)
        if policy.dry_run:
            report.files_compacted = report.small_files if report.small_files >= policy.min_small_files else 0
        else:
            report.files_compacted, report.files_added = compact(dt, policy)
            if report.files_compacted:
                dt = DeltaTable(uri, storage_options=so)

    checkpointed = last_checkpoint(list_files(uri, storage_options, under=LOG_DIR))
    if policy.checkpoint and dt.version() - (checkpointed if checkpointed is not None else -1) >= max(
        1, policy.checkpoint_every
    ):
        if not policy.dry_run:
            dt.create_checkpoint()
            checkpointed = dt.version()
        report.checkpoint_version = dt.version()

    if policy.clean_logs and not policy.dry_run:
        if keep_from is not None and checkpointed is not None and checkpointed > keep_from:
            report.held_back.append(
                f"log clean-up: version {keep_from} on is still read (mirror), checkpoint is {checkpointed}"
            )
        else:
            dt.cleanup_metadata()
            after = list_files(uri, storage_options, under=LOG_DIR)
            report.log_files_removed = sum(1 for p in logs if p not in after and _version_of(p) is not None)

    if policy.vacuum:
        if keep_from is not None and keep_from <= (version := dt.version()):
            report.held_back.append(f"vacuum: files of versions {keep_from} to {version} kept (mirror)")
        report.files_vacuumed, report.bytes_vacuumed = vacuum(
            dt, uri, storage_options, report.file_retention_hours, keep_from=keep_from, dry_run=policy.dry_run
        )

    report.version = dt.version()
    report.seconds = time.monotonic() - started
    return report


def vacuum(
    dt: DeltaTable,
    uri: str,
    storage_options: dict[str, str] | None,
    retention_hours: int,
    *,
    keep_from: int | None = None,
    dry_run: bool = False,
) -> tuple[int, int]:
    """Delete files no version within the retention references: (files, bytes) deleted.

    Full mode: besides the files commits removed (tombstones older than the
    retention), files no commit ever added (a commit that crashed or lost its
    race) go once their own age passes the retention. So does a file a writer
    has written and not committed yet: a retention shorter than the longest
    commit is unsafe beside a writer (tests use 0 on tables nobody writes).
    delta-rs returns only paths, so sizes come from a listing of the store
    taken before.
    """
    before = list_files(uri, storage_options)
    keep = list(range(keep_from, dt.version() + 1)) if keep_from is not None else None
    gone = dt.vacuum(
        retention_hours=retention_hours,
        dry_run=dry_run,
        enforce_retention_duration=False,  # the retention was decided above, table property first
        full=True,
        keep_versions=keep or None,
        post_commithook_properties=NO_LOG_CLEANUP,  # its VACUUM START/END commits
    )
    return len(gone), sum(before[p].size for p in gone if p in before)


# ---------------------------------------------------------------- the lake


TableKind = Literal["changelog", "mirror"]


@dataclass
class TableOutcome:
    """One table of the lake after `maintain_lake`: its report, or the error that stopped it."""

    uri: str
    db: str
    collection: str
    kind: TableKind
    report: MaintenanceReport | None = None
    error: str | None = None

    @property
    def label(self) -> str:
        return f"{self.db}.{self.collection}"


def table_names(uri: str, lake_uri: str) -> tuple[str, str, TableKind]:
    """(db, collection, kind) of a table of the lake, from its path."""
    parts = uri[len(lake_uri.rstrip("/")) :].strip("/").split("/")
    db, coll = parts[-2:]
    kind: TableKind = "changelog" if parts[0] == CHANGELOG_DIR else "mirror"
    return name_of(db), name_of(coll), kind


def mirror_needs(
    uri: str, lake_uri: str, storage_options: dict[str, str] | None = None, pipeline: str = "cdc"
) -> int | None:
    """The first changelog version a merge-mode changelog's mirror has not applied (None: not such
    a changelog). A mirror not created yet needs the changelog from version 0."""
    if not is_changelog(uri, lake_uri):
        return None
    base = lake_uri.rstrip("/")
    mirror_uri = f"{base}/{uri[len(base) :].strip('/')[len(CHANGELOG_DIR) + 1 :]}"
    try:
        mark = DeltaTable(mirror_uri, storage_options=storage_options).transaction_version(mark_app(pipeline))
    except TableNotFoundError:
        return 0
    return 0 if mark is None else mark + 1


def maintain_lake(
    lake_uri: str,
    *,
    storage_options: dict[str, str] | None = None,
    policy: MaintenancePolicy | None = None,
    pipeline: str = "cdc",
    only: list[tuple[str, str]] | None = None,
) -> list[TableOutcome]:
    """`maintain` every table of the lake (or of the collections `only`), one after another.

    Append-mode tables are changelogs at `<lake>/<db>/<coll>` (their `cdc.mode`
    says so). A failure on one table is reported and the others go on. Metrics:
    `cdc_maintenance_*`, by table and kind (not for a dry run).
    """
    policy = policy or MaintenancePolicy()
    outcomes = []
    for uri in list_tables(lake_uri, storage_options):
        db, coll, kind = table_names(uri, lake_uri)
        if only is not None and (db, coll) not in only:
            continue
        outcome = TableOutcome(uri, db, coll, kind)
        outcomes.append(outcome)
        labels = (outcome.label, kind)
        try:
            if kind == "mirror" and not is_changelog(uri, lake_uri):
                mode = (
                    DeltaTable(uri, storage_options=storage_options).metadata().configuration.get("cdc.mode")
                )
                outcome.kind = kind = "changelog" if mode == "append" else "mirror"
                labels = (outcome.label, kind)
            keep_from = mirror_needs(uri, lake_uri, storage_options, pipeline)
            outcome.report = maintain(
                uri, storage_options=storage_options, policy=policy, keep_from=keep_from
            )
        except Exception as e:
            outcome.error = f"{type(e).__name__}: {e}"
            log.warning("maintenance of %s failed: %s", uri, outcome.error, extra={"table": outcome.label})
            if not policy.dry_run:
                record_failure(*labels)
            continue
        if not policy.dry_run:
            record(outcome.report, *labels)
    return outcomes


def record(r: MaintenanceReport, table: str, kind: TableKind) -> None:
    """The `cdc_maintenance_*` metrics and a log line for one table's maintenance."""
    from dataflow.runtime.metrics import (
        MAINTENANCE_BYTES_VACUUMED,
        MAINTENANCE_DURATION,
        MAINTENANCE_FILES_COMPACTED,
        MAINTENANCE_LAST_RUN,
    )

    MAINTENANCE_FILES_COMPACTED.labels(table, kind).inc(r.files_compacted)
    MAINTENANCE_BYTES_VACUUMED.labels(table, kind).inc(r.bytes_vacuumed)
    MAINTENANCE_DURATION.labels(table, kind).observe(r.seconds)
    MAINTENANCE_LAST_RUN.labels(table, kind).set(time.time())
    log.info(
        "maintained %s: %d files compacted into %d, %d files (%d bytes) vacuumed, checkpoint %s, "
        "%d log files removed, in %.2fs",
        r.table,
        r.files_compacted,
        r.files_added,
        r.files_vacuumed,
        r.bytes_vacuumed,
        r.checkpoint_version,
        r.log_files_removed,
        r.seconds,
        extra={"table": table},
    )


def record_failure(table: str, kind: TableKind) -> None:
    from dataflow.runtime.metrics import MAINTENANCE_FAILURES

    MAINTENANCE_FAILURES.labels(table, kind).inc()
