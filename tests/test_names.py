"""Any legal MongoDB database and collection name gets its own table, at a path that round-trips."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import unquote

import duckdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataflow.decode.validate import check_namespace
from dataflow.lake.documents import table_documents
from dataflow.lake.layout import CHANGELOG_DIR, TableLocations, name_of, path_part
from dataflow.lake.offsets import collections_in, list_tables
from dataflow.lake.writer import DeltaTableWriter
from dataflow.model import ChangeEvent
from dataflow.runtime.failures import Kind, classify
from dataflow.source.sample import write_line
from tests.harness import pipeline_env, run_pipeline

# Legal in MongoDB (collection names may hold anything but NUL and `$`; database names not
# `/\\. "$`), and each outside the plain letters, digits, `_` and `-`.
NAMES = [("shop", "café"), ("shop", "日本"), ("shop", "a b"), ("shop", "a:b"), ("shop", "a+b"),
         ("shop", "a@b"), ("shop", "..."), ("shop", "a%2Eb"), ("shop", "x~y"), ("shop", "fs.files"),
         ("_changelog", "orders"), ("ünï", "c/d")]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=30))
def test_every_name_round_trips_through_one_path_segment(name: str) -> None:
    part = path_part(name)
    assert name_of(part) == name
    assert "/" not in part and "%" not in part and set(part) - {"."}
    assert part != CHANGELOG_DIR


def test_plain_names_keep_their_paths() -> None:
    for name in ("orders", "order_items", "fs.files", "Tutorial1", "a-b"):
        assert path_part(name) == name


def _event(db: str, coll: str, i: int) -> ChangeEvent:
    return ChangeEvent(
        db, coll, str(i), "insert", {"_id": str(i), "name": coll}, 1_700_000_000_000 + i, 0, "t", 0, i, 10
    )


@pytest.mark.parametrize(("db", "coll"), NAMES)
def test_a_table_for_each_name_on_a_local_lake(db: str, coll: str, tmp_path: Path) -> None:
    assert check_namespace(db, coll) is None
    lake = str(tmp_path / "lake")
    uri = TableLocations(lake, "merge").uri(db, coll, "merge")
    w = DeltaTableWriter(uri, mode="merge")
    assert w.write([_event(db, coll, 0)]).committed
    assert w.write([_event(db, coll, 1)]).committed  # opened again at the path it was created at
    assert set(table_documents(uri)) == {"0", "1"}
    assert [i for i, _ in _second_reader(uri)] == ["0", "1"]
    assert coll in collections_in(lake, db)
    assert list_tables(lake) == [uri]


@pytest.mark.integration
def test_every_name_on_minio(s3, tmp_path: Path) -> None:
    bucket = s3.bucket("names")
    lake = f"s3://{bucket}/lake"
    so = s3.storage_options
    uris = []
    for db, coll in NAMES:
        uri = TableLocations(lake, "merge").uri(db, coll, "merge")
        uris.append(uri)
        w = DeltaTableWriter(uri, mode="merge", storage_options=so)
        w.write([_event(db, coll, 0)])
        w.write([_event(db, coll, 1)])
        assert set(table_documents(uri, so)) == {"0", "1"}, (db, coll)
    assert list_tables(lake, so) == sorted(uris)
    for db, coll in NAMES:
        assert coll in collections_in(lake, db, so)


def test_the_pipeline_writes_unusual_names_to_their_own_tables(tmp_path: Path) -> None:
    """Change-stream events naming each collection, through the pipeline: nothing dead-lettered."""
    sample = tmp_path / "messages.jsonl"
    lines = []
    for i, (db, coll) in enumerate(NAMES):
        doc = {"_id": i, "name": coll}
        event = {"operationType": "insert", "clusterTime": {"$timestamp": {"t": 1700000000, "i": i + 1}},
                 "ns": {"db": db, "coll": coll}, "documentKey": {"_id": i}, "fullDocument": doc}  # fmt: skip
        lines.append(write_line("mongo.names", json.dumps({"_id": i}).encode(), json.dumps(event).encode()))
    sample.write_bytes(b"".join(lines))
    lake = tmp_path / "lake"
    run_pipeline(
        pipeline_env(
            CDC_SAMPLE_PATH=str(sample),
            CDC_LAKE_URI=str(lake),
            CDC_RECOVERY_DIR="off",
            CDC_DLQ_FALLBACK=str(tmp_path / "dlq.jsonl"),
            CDC_TOPIC_TABLES=json.dumps({"mongo.names": "*"}),  # one topic carries every collection
        )
    )
    assert not (tmp_path / "dlq.jsonl").exists()
    for i, (db, coll) in enumerate(NAMES):
        uri = TableLocations(str(lake)).uri(db, coll, "merge")
        assert table_documents(uri) == {str(i): {"name": coll}}, (db, coll)
        assert _second_reader(uri) == [(str(i), coll)], (db, coll)


def _second_reader(uri: str) -> list[tuple[str, str]]:
    """The table read without delta-rs: its log replayed here, its Parquet files read by DuckDB.

    The log's `add.path` is a URI-encoded relative path (Delta protocol); a reader decodes it.
    Only JSON commits are read: these tables are far below the checkpoint interval.
    """
    live: dict[str, None] = {}
    log = sorted(Path(uri, "_delta_log").glob("*.json"))
    assert log, uri
    for commit in log:
        for line in commit.read_text().splitlines():
            action = json.loads(line)
            if "add" in action:
                live[unquote(action["add"]["path"])] = None
            elif "remove" in action:
                live.pop(unquote(action["remove"]["path"]), None)
    files = [str(Path(uri, p)) for p in live]
    assert all(Path(f).is_file() for f in files), files
    con = duckdb.connect()
    return sorted(con.execute("SELECT _id, name FROM read_parquet(?)", [files]).fetchall())


def test_a_table_created_but_not_found_is_a_bug_not_an_outage(tmp_path: Path) -> None:
    """The old percent-encoded path: delta-rs created the table there and then opened the decoded one.
    That was retried as an outage for a minute a batch; now it stops the flow at once."""
    w = DeltaTableWriter(str(tmp_path / "lake" / "shop" / "caf%C3%A9"), mode="merge")
    with pytest.raises(Exception) as raised:  # noqa: B017, PT011 - delta-rs' own error, or ours after it
        w.write([_event("shop", "café", 0)])
    assert classify(raised.value) is Kind.BUG, raised.value
    assert "café" in str(raised.value) or "caf%C3%A9" in str(raised.value)
