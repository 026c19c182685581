"""Table maintenance (dataflow/lake/maintenance.py, `cdc maintain`): what it leaves on the store.

Local tables where the logic alone is tested (and where a file's age can be
set with os.utime), a real MinIO for vacuum and the command. Every test looks
at outcomes: files on the store, rows, table versions and txn versions.
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import orjson
import pyarrow as pa
import pytest
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake
from prometheus_client import REGISTRY

from dataflow.lake.maintenance import MaintenancePolicy, interval_hours, maintain, maintain_lake
from dataflow.lake.mirror import mark_app
from dataflow.lake.storage import list_files
from tests.harness import cli, pipeline_env, run_pipeline

APPS = [f"cdc:orders:{p}" for p in range(3)]


def append_batches(
    uri: str, batches: int, rows: int = 50, storage_options: dict[str, str] | None = None, start: int = 0
) -> None:
    """`batches` commits of `rows` rows, each recording a txn version as the pipeline's commits do."""
    for b in range(start, start + batches):
        ids = range(b * rows, (b + 1) * rows)
        table = pa.table(
            {"_id": [f"id-{i}" for i in ids], "n": list(ids), "text": [f"value {i}" * 3 for i in ids]}
        )
        txn = Transaction(app_id=APPS[b % len(APPS)], version=1000 + b)
        write_deltalake(
            uri,
            table,
            mode="append",
            storage_options=storage_options,
            commit_properties=CommitProperties(app_transactions=[txn]),
        )


def sorted_rows(uri: str, storage_options: dict[str, str] | None = None, version: int | None = None) -> list:
    dt = DeltaTable(uri, storage_options=storage_options, version=version)
    return sorted(dt.to_pyarrow_table().to_pylist(), key=lambda r: r["n"])


def txn_versions(uri: str, storage_options: dict[str, str] | None = None) -> dict[str, int | None]:
    dt = DeltaTable(uri, storage_options=storage_options)
    return {app: dt.transaction_version(app) for app in APPS}


def data_files(uri: str, storage_options: dict[str, str] | None = None) -> dict[str, int]:
    """Parquet files on the store (referenced or not), by path, with their sizes."""
    return {
        p: f.size
        for p, f in list_files(uri, storage_options).items()
        if p.endswith(".parquet") and not p.startswith("_delta_log/")
    }


def log_versions(uri: str) -> list[int]:
    return sorted(int(p.name[:20]) for p in (Path(uri) / "_delta_log").glob("*.json"))


def age(path: Path, hours: float) -> None:
    """Make every file under `path` look `hours` old (what log clean-up and full vacuum judge by)."""
    then = time.time() - hours * 3600
    for f in path.rglob("*"):
        if f.is_file():
            os.utime(f, (then, then))


# ---------------------------------------------------------------- compaction


def test_compaction_merges_small_files_keeping_every_row_and_txn_version(tmp_path) -> None:
    uri = str(tmp_path / "orders")
    append_batches(uri, 30)
    rows, versions = sorted_rows(uri), txn_versions(uri)
    assert len(data_files(uri)) == 30 and versions == {APPS[0]: 1027, APPS[1]: 1028, APPS[2]: 1029}

    # Fewer small files than the threshold: nothing is rewritten, no commit.
    report = maintain(uri, policy=MaintenancePolicy(min_small_files=31, vacuum=False, checkpoint=False))
    assert (report.small_files, report.files_compacted, report.version) == (30, 0, 29)
    assert DeltaTable(uri).version() == 29

    report = maintain(
        uri,
        policy=MaintenancePolicy(target_bytes=1 << 20, min_small_files=10, vacuum=False, checkpoint=False),
    )
    assert (report.files_compacted, report.files_added) == (30, 1)
    dt = DeltaTable(uri)
    assert len(dt.file_uris()) == 1 and dt.history(1)[0]["operation"] == "OPTIMIZE"
    assert sorted_rows(uri) == rows
    assert txn_versions(uri) == versions  # the exactly-once offsets survive the rewrite
    assert len(data_files(uri)) == 31  # the 30 small ones stay on the store until vacuum
    assert sorted_rows(uri, version=29) == rows  # and an old version still reads


def test_compaction_leaves_near_target_files_alone(tmp_path) -> None:
    uri = str(tmp_path / "orders")
    append_batches(uri, 12)
    size = max(data_files(uri).values())
    # Every file is above half the target: none is small, none is rewritten.
    report = maintain(
        uri,
        policy=MaintenancePolicy(target_bytes=size + 1, min_small_files=2, vacuum=False, checkpoint=False),
    )
    assert (report.small_files, report.files_compacted) == (0, 0) and DeltaTable(uri).version() == 11


# ---------------------------------------------------------------- vacuum by age


def test_vacuum_judges_removed_files_by_removal_and_stray_files_by_age(tmp_path) -> None:
    """Retention 1 hour, real ages: files compaction removed a moment ago stay, however old they
    are themselves; a file no commit references goes only once it is older than the retention."""
    uri = str(tmp_path / "orders")
    append_batches(uri, 6)
    rows = sorted_rows(uri)
    age(tmp_path / "orders", hours=24 * 30)  # written a month ago
    (tmp_path / "orders" / "part-stray-old.parquet").write_bytes(b"x" * 300)
    (tmp_path / "orders" / "part-stray-new.parquet").write_bytes(b"x" * 200)
    os.utime(tmp_path / "orders" / "part-stray-old.parquet", (time.time() - 7200, time.time() - 7200))
    small = data_files(uri)

    policy = MaintenancePolicy(
        target_bytes=1 << 20, min_small_files=2, vacuum_retention_hours=1, checkpoint=False
    )
    report = maintain(uri, policy=policy)
    assert report.files_compacted == 6
    assert (report.files_vacuumed, report.bytes_vacuumed) == (1, 300)
    left = data_files(uri)
    assert "part-stray-old.parquet" not in left and "part-stray-new.parquet" in left
    assert set(small) - {"part-stray-old.parquet"} <= set(left)  # the compacted-away files stay
    assert sorted_rows(uri) == rows and sorted_rows(uri, version=0) == rows[:50]


def test_an_append_mode_lake_is_all_changelogs_without_mirrors(tmp_path) -> None:
    lake = tmp_path / "lake"
    for coll in ("orders", "customers"):
        uri = str(lake / "shop" / coll)
        DeltaTable.create(
            uri,
            pa.schema([("_id", pa.string()), ("n", pa.int64()), ("text", pa.string())]),
            configuration={"cdc.mode": "append"},
            raise_if_key_not_exists=False,
        )
        append_batches(uri, 4)
    policy = MaintenancePolicy(target_bytes=1 << 20, min_small_files=2, vacuum_retention_hours=0)
    outcomes = maintain_lake(str(lake), policy=policy, only=[("shop", "orders")])
    assert [(o.label, o.kind, o.error) for o in outcomes] == [("shop.orders", "changelog", None)]
    r = outcomes[0].report
    assert r is not None and (r.files_compacted, r.files_vacuumed) == (4, 4) and not r.held_back
    assert len(data_files(str(lake / "shop" / "orders"))) == 1
    assert len(data_files(str(lake / "shop" / "customers"))) == 4  # not named: untouched


# ---------------------------------------------------------------- checkpoints and the log


def test_checkpoint_then_log_clean_up_only_past_the_retention(tmp_path) -> None:
    uri = str(tmp_path / "orders")
    append_batches(uri, 25)
    rows, versions = sorted_rows(uri), txn_versions(uri)
    policy = MaintenancePolicy(compact=False, vacuum=False, checkpoint_every=10, log_retention_hours=24)

    report = maintain(uri, policy=policy)
    # The log retention differs from Delta's 30 days: recorded in the table (one commit, v25),
    # since delta-rs' log clean-up reads it from there; then a checkpoint of v25.
    assert report.properties_set == {"delta.logRetentionDuration": "interval 24 hours"}
    assert report.checkpoint_version == 25 and report.log_retention_hours == 24
    assert (tmp_path / "orders" / "_delta_log" / f"{25:020d}.checkpoint.parquet").is_file()
    assert report.log_files_removed == 0 and log_versions(uri) == list(range(26))  # all younger than 24 h

    # A day and a bit later: the commits before the checkpoint go, the checkpoint's and later stay.
    age(tmp_path / "orders" / "_delta_log", hours=25)
    report = maintain(uri, policy=policy)
    assert report.checkpoint_version is None  # no commit since the last checkpoint
    assert report.log_files_removed == 25 and log_versions(uri) == [25]
    # The txn actions live on in the checkpoint: the exactly-once offsets are all there.
    assert DeltaTable(uri).version() == 25 and sorted_rows(uri) == rows
    assert txn_versions(uri) == versions
    append_batches(uri, 1, start=25)
    assert txn_versions(uri) == {**versions, APPS[25 % 3]: 1025}
    # What an old version's reader loses: versions before the checkpoint cannot be loaded.
    with pytest.raises(Exception):  # noqa: B017 - delta-rs' own error for a version it cannot find
        DeltaTable(uri, version=3)
    assert sorted_rows(uri, version=25) == rows


def test_log_clean_up_without_a_checkpoint_removes_nothing(tmp_path) -> None:
    uri = str(tmp_path / "orders")
    append_batches(uri, 5)
    age(tmp_path / "orders" / "_delta_log", hours=24 * 400)
    report = maintain(uri, policy=MaintenancePolicy(compact=False, vacuum=False, checkpoint=False))
    assert report.log_files_removed == 0 and log_versions(uri) == list(range(5))
    assert DeltaTable(uri, version=0).version() == 0


# ---------------------------------------------------------------- a lake: changelogs and their mirrors


def test_a_changelog_keeps_what_its_trailing_mirror_still_reads(tmp_path) -> None:
    """A merge-mode changelog is read from the version after its mirror's mark: vacuum keeps those
    files and log clean-up waits, until the mirror has caught up."""
    lake = tmp_path / "lake"
    changelog, mirror = str(lake / "_changelog" / "shop" / "orders"), str(lake / "shop" / "orders")
    append_batches(changelog, 20)
    mark = Transaction(app_id=mark_app("cdc"), version=5)  # the mirror applied versions 0 to 5
    first = pa.table({"_id": ["id-0"], "n": [0]})
    # As the pipeline's writer makes a mirror: `cdc.mode` says what the table is.
    DeltaTable.create(
        mirror, first.schema, configuration={"cdc.mode": "merge"}, raise_if_key_not_exists=False
    )
    write_deltalake(mirror, first, mode="append", commit_properties=CommitProperties(app_transactions=[mark]))
    rows = sorted_rows(changelog)
    expected = DeltaTable(changelog).load_cdf(starting_version=6, ending_version=19).read_all().num_rows
    policy = MaintenancePolicy(
        target_bytes=1 << 20, min_small_files=2, vacuum_retention_hours=0, checkpoint_every=5
    )

    [log_outcome, mirror_outcome] = maintain_lake(str(lake), policy=policy)
    assert (log_outcome.kind, mirror_outcome.kind) == ("changelog", "mirror")
    r = log_outcome.report
    assert r is not None and r.files_compacted == 20 and r.checkpoint_version == 20
    # Compacted away, past the retention, and yet kept: the mirror still reads versions 6 on.
    assert r.files_vacuumed == 0 and len(data_files(changelog)) == 21
    assert any("vacuum" in why for why in r.held_back) and any("log clean-up" in why for why in r.held_back)
    cdf = DeltaTable(changelog).load_cdf(starting_version=6, ending_version=19).read_all()
    assert cdf.num_rows == expected == 14 * 50  # the compaction commit is no change to a change feed

    # The mirror catches up (its mark: the changelog's last version): now the small files go.
    write_deltalake(
        mirror,
        pa.table({"_id": ["id-1"], "n": [1]}),
        mode="append",
        commit_properties=CommitProperties(app_transactions=[Transaction(mark_app("cdc"), 20)]),
    )
    [log_outcome, _] = maintain_lake(str(lake), policy=policy)
    r = log_outcome.report
    assert r is not None and r.files_vacuumed == 20 and not r.held_back
    assert len(data_files(changelog)) == 1 and sorted_rows(changelog) == rows
    labels = {"table": "shop.orders", "kind": "changelog"}
    assert REGISTRY.get_sample_value("cdc_maintenance_files_compacted_total", labels) >= 20
    assert REGISTRY.get_sample_value("cdc_maintenance_bytes_vacuumed_total", labels) >= r.bytes_vacuumed > 0
    assert REGISTRY.get_sample_value("cdc_maintenance_last_run_timestamp_seconds", labels) > time.time() - 60


def test_delta_intervals() -> None:
    assert interval_hours("interval 7 days") == 168
    assert interval_hours("interval 36 hours") == 36
    assert interval_hours("INTERVAL 1 week") == 168
    assert interval_hours("interval 90 minutes") == 1.5
    with pytest.raises(ValueError):
        interval_hours("7 days")


# ---------------------------------------------------------------- a real MinIO


@pytest.mark.integration
def test_vacuum_on_minio_removes_only_unreferenced_files_past_the_retention(s3) -> None:
    so = s3.storage_options
    bucket = s3.bucket("vacuum")
    uri = f"s3://{bucket}/lake/shop/orders"
    append_batches(uri, 12, storage_options=so)
    rows, versions = sorted_rows(uri, so), txn_versions(uri, so)
    small = data_files(uri, so)
    # A file no commit references (a commit that never landed), just written.
    s3.client().put_object(bucket, "lake/shop/orders/part-orphan.parquet", io.BytesIO(b"x" * 1234), 1234)

    # Compaction makes the 12 small files unreferenced; with the retention not passed, nothing goes.
    policy = MaintenancePolicy(
        target_bytes=1 << 20, min_small_files=4, vacuum_retention_hours=1, checkpoint=False
    )
    report = maintain(uri, storage_options=so, policy=policy)
    assert (report.files_compacted, report.files_added) == (12, 1)
    assert (report.files_vacuumed, report.bytes_vacuumed) == (0, 0)
    after_compaction = data_files(uri, so)
    assert set(small) < set(after_compaction) and "part-orphan.parquet" in after_compaction
    assert sorted_rows(uri, so, version=0) == rows[:50]  # an old version still reads

    # A dry run with the retention passed says what would go, and deletes nothing.
    dry = maintain(uri, storage_options=so, policy=MaintenancePolicy(vacuum_retention_hours=0, dry_run=True))
    assert dry.files_vacuumed == 13 and data_files(uri, so) == after_compaction

    report = maintain(
        uri, storage_options=so, policy=MaintenancePolicy(vacuum_retention_hours=0, checkpoint=False)
    )
    assert report.files_vacuumed == 13
    assert report.bytes_vacuumed == sum(small.values()) + 1234  # sizes from the store's listing
    left = data_files(uri, so)
    assert set(left) == set(after_compaction) - set(small) - {"part-orphan.parquet"}
    assert {Path(u).name for u in DeltaTable(uri, storage_options=so).file_uris()} == set(left)
    assert sorted_rows(uri, so) == rows and txn_versions(uri, so) == versions
    # What an old version's reader loses after vacuum: its files.
    with pytest.raises(Exception):  # noqa: B017 - the object store's not-found, through delta-rs
        sorted_rows(uri, so, version=0)


@pytest.mark.integration
def test_cdc_maintain_on_a_minio_lake(s3, tmp_path) -> None:
    """The pipeline writes the bundled sample into MinIO in small batches (three collections:
    changelogs and mirrors); `cdc maintain` compacts and vacuums them, and reads stay the same."""
    bucket = s3.bucket("maintain")
    lake = f"s3://{bucket}/lake"
    env = pipeline_env(
        CDC_KAFKA_BROKERS="",
        CDC_LAKE_URI=lake,
        CDC_TABLE_MODE="merge",
        CDC_BATCH_MAX_ROWS="40",
        CDC_RECOVERY_DIR="off",
        CDC_DLQ_FALLBACK=str(tmp_path / "fallback.jsonl"),
        **s3.env,
    )
    run_pipeline(env)
    so = s3.storage_options
    status = {t["table"]: t for t in orjson.loads(cli(env, "status", "--json").stdout)}
    changelogs = sorted(t for t in status if "/_changelog/" in t)
    assert len(changelogs) == 3 and len(status) == 6
    before = {
        t: sorted(map(str, DeltaTable(t, storage_options=so).to_pyarrow_table().to_pylist())) for t in status
    }
    offsets = {t: status[t]["offsets"] for t in changelogs}
    files_before = {t: len(data_files(t, so)) for t in changelogs}
    assert all(n >= 3 for n in files_before.values())
    docs = cli(env, "read", "shop.orders").stdout

    # Only one collection, dry: the plan, and the store untouched.
    out = cli({**env, "CDC_COMPACT_MIN_FILES": "2"}, "maintain", "shop.orders", "--dry-run").stdout
    assert out.startswith("dry run") and out.count("shop.orders") == 2 and "shop.customers" not in out
    assert "2 tables, 0 failed" in out
    assert {t: len(data_files(t, so)) for t in changelogs} == files_before

    run_env = {
        **env,
        "CDC_COMPACT_MIN_FILES": "2",
        "CDC_VACUUM_RETENTION_HOURS": "0",
        "CDC_CHECKPOINT_EVERY": "2",
    }
    out = cli(run_env, "maintain").stdout
    assert "6 tables, 0 failed" in out
    lines = {
        tuple(line.split()[:2]): line.split() for line in out.splitlines()[1:] if line.startswith("shop.")
    }
    assert len(lines) == 6
    for t in changelogs:
        name = t.rsplit("/", 2)
        row = lines[(f"{name[-2]}.{name[-1]}", "changelog")]
        assert row[3] == f"{files_before[t]}->1", out  # compacted -> added
        assert int(row[4]) == files_before[t] and int(row[5]) > 0  # vacuumed files, bytes
        assert len(data_files(t, so)) == 1
    status_after = {t["table"]: t for t in orjson.loads(cli(env, "status", "--json").stdout)}
    for t in status:
        rows = sorted(map(str, DeltaTable(t, storage_options=so).to_pyarrow_table().to_pylist()))
        assert rows == before[t], t
    assert {t: status_after[t]["offsets"] for t in changelogs} == offsets
    assert all(status_after[t]["mirror"]["changes_behind"] == 0 for t in status if t not in changelogs)
    assert cli(env, "read", "shop.orders").stdout == docs

    # --json: one report per table; a second run finds nothing left to do.
    again = orjson.loads(cli(run_env, "maintain", "--json").stdout)
    assert len(again) == 6 and all(r["error"] is None for r in again)
    assert sum(r["files_compacted"] for r in again) == 0 and sum(r["bytes_vacuumed"] for r in again) == 0
