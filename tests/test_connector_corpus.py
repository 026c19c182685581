"""Real connector output, run through the pipeline: the mirror ends as the collection, the changelog right.

tests/data/connectors holds messages taken from Debezium's and MongoDB's own
docs, tests and code (each file says where from, and what was adapted to make
one coherent sequence per collection), with the documents the collection
holds after them. Each file runs through `python -m bytewax.run
dataflow.main:flow` from a recorded-message file, with its `CDC_FORMAT` and
any setting it names, in `both` mode, once as one batch and once as a batch
per message: the mirror must hold exactly the expected documents, and the
changelog the expected `_op` per change.

Where a connector's output cannot carry what happened (the unwrap SMT drops
removed fields; full-document-only output sends a drop as a tombstone keyed by
a resume token), the file says so in `expected_mirror`, and those messages
must be dead-lettered with a reason, never applied silently.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from deltalake import DeltaTable

from dataflow.decode import extjson
from dataflow.lake.columns import to_json_bytes
from dataflow.lake.documents import table_documents
from dataflow.model import DeadLetter
from dataflow.source.sample import write_line
from services.generate import Message, produce
from tests.harness import pipeline_env, run_pipeline

CORPUS = Path(__file__).parent / "data" / "connectors"
FILES = sorted(CORPUS.glob("*/*.json"))
# A dropDatabase becomes a drop of each table of the database that is known when it is read;
# it arrives on a topic of its own, so whether this one is read before the collection's table
# exists depends on the order topics are read (test_ddl covers it); the collection's own drop
# precedes it.
_NOT_ASSERTED = {"dropDatabase"}


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _canonical(doc: dict[str, Any]) -> tuple[str, dict[str, bytes]]:
    """An expected document as (`_id` text, field -> JSON text of its value); null fields left out."""
    d = extjson.decode(json.loads(json.dumps(doc)))
    return extjson.id_text(d["_id"]), {
        k: to_json_bytes(v) for k, v in d.items() if k != "_id" and v is not None
    }


def _stored(docs: dict[str, dict[str, Any]]) -> dict[str, dict[str, bytes]]:
    return {i: {k: to_json_bytes(v) for k, v in d.items()} for i, d in docs.items()}


def _expected_tables(case: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    mirror = case.get("expected_mirror", {}).get("documents", case["expected_documents"])
    tables = {case["collection"]: mirror} if case["collection"] else {}
    tables.update(case.get("expected_after_rename", {}))
    return tables


def _run(case: dict[str, Any], tmp_path: Path, batch_rows: int) -> Path:
    sample = tmp_path / "messages.jsonl"
    with sample.open("wb") as f:
        for m in case["messages"]:
            key = None if m["key"] is None else m["key"].encode()
            value = None if m["value"] is None else m["value"].encode()
            f.write(write_line(m.get("topic", case["topic"]), key, value))
    lake = tmp_path / "lake"
    env = pipeline_env(
        CDC_SAMPLE_PATH=str(sample),
        CDC_LAKE_URI=str(lake),
        CDC_TABLE_MODE="merge",
        CDC_FORMAT=case["format"],
        CDC_RECOVERY_DIR="off",
        CDC_DLQ_FALLBACK=str(tmp_path / "dlq.jsonl"),
        CDC_BATCH_MAX_ROWS=str(batch_rows),
        **case.get("settings", {}),
    )
    run_pipeline(env, timeout=300)
    return lake


@pytest.mark.parametrize("batch_rows", [1, 4000], ids=["batch_per_message", "one_batch"])
@pytest.mark.parametrize("path", FILES, ids=[f"{p.parent.name}/{p.stem}" for p in FILES])
def test_connector_output_lands_as_the_collection_holds_it(
    path: Path, batch_rows: int, tmp_path: Path
) -> None:
    """In one batch, changes fold in memory; a batch per message makes every change meet the
    stored table instead (updates inside fields read the stored value, the Debezium 3.4 order
    pair is compared across commits, a drop deletes committed rows)."""
    case = _load(path)
    lake = _run(case, tmp_path, batch_rows)

    for table, docs in _expected_tables(case).items():
        db, _, coll = table.partition(".")
        stored = _stored(table_documents(str(lake / db / coll)))
        expected = dict(_canonical(d) for d in docs)
        assert stored == expected, f"{table}: the mirror differs from the collection"

    dead_file = tmp_path / "dlq.jsonl"
    dead = (
        [DeadLetter.from_json(line) for line in dead_file.read_bytes().splitlines()]
        if dead_file.exists()
        else []
    )
    wanted = case.get("expected_mirror", {}).get("dead_letters", [])
    assert sorted(d.offset for d in dead) == sorted(wanted), [(d.offset, d.reason, d.error) for d in dead]
    assert all(d.error for d in dead)

    if case["collection"]:
        db, _, coll = case["collection"].partition(".")
        changelog = lake / "_changelog" / db / coll
        rows = DeltaTable(str(changelog)).to_pyarrow_table().to_pylist() if changelog.exists() else []
        rows.sort(
            key=lambda r: (r["_source_topic"] != case["topic"], r["_source_topic"], r["_source_offset"])
        )
        ops = [
            op
            for i, op in enumerate(case["expected_ops"])
            if op is not None and i < len(case["messages"]) and i not in wanted
        ]
        got = [r["_op"] for r in rows]
        if _NOT_ASSERTED & set(ops):
            ops = [op for op in ops if op not in _NOT_ASSERTED]
            got = got[: len(ops)]
        assert got == ops


# Corpus files whose topics and tables do not overlap, read together in `auto` mode.
ON_KAFKA = [
    "mongodb/default_update_description",
    "debezium/unwrapped_rewrite",
    "mongodb/full_document_only_tombstone_fs_files",
    "debezium/transaction_metadata",
    "debezium/unwrapped_default_schema_wrapped_date",
    "mongodb/disambiguated_paths",
    "mongodb/nan_infinity_default_json",
    "mongodb/json_jsonconverter_schemas_enabled",
]


@pytest.mark.integration
def test_connector_output_through_kafka_and_minio(kafka, s3, tmp_path: Path) -> None:
    """The same files through the real broker and object store, in one run with `CDC_FORMAT=auto`
    and a commit per message: each topic's format is told from its messages alone."""
    cases = [_load(CORPUS / f"{name}.json") for name in ON_KAFKA]
    topics = sorted({m.get("topic", c["topic"]) for c in cases for m in c["messages"]})
    # One partition a topic: a connector keys all changes of a document alike, but the corpus
    # files were assembled from several sources, and their keys are not byte for byte alike.
    kafka.create_topics(topics, partitions=1)
    produce(
        kafka.bootstrap,
        (
            Message(
                m.get("topic", c["topic"]),
                None if m["key"] is None else m["key"].encode(),
                None if m["value"] is None else m["value"].encode(),
            )
            for c in cases
            for m in c["messages"]
        ),
    )
    bucket = s3.bucket("corpus")
    dlq_topic = kafka.topic("dlq", partitions=1)
    env = pipeline_env(
        CDC_KAFKA_BROKERS=kafka.bootstrap,
        CDC_TOPICS=",".join(topics),
        CDC_LAKE_URI=f"s3://{bucket}/lake",
        CDC_TABLE_MODE="merge",
        CDC_FORMAT="auto",
        CDC_DLQ_TOPIC=dlq_topic,
        CDC_DLQ_FALLBACK=str(tmp_path / "fallback.jsonl"),
        CDC_BATCH_MAX_ROWS="1",
        CDC_RECOVERY_DIR="off",
        CDC_LOG_LEVEL="INFO",
        **s3.env,
    )
    proc = run_pipeline(env)
    so = s3.storage_options
    for case in cases:
        for table, docs in _expected_tables(case).items():
            db, _, coll = table.partition(".")
            stored = _stored(table_documents(f"s3://{bucket}/lake/{db}/{coll}", so))
            assert stored == dict(_canonical(d) for d in docs), table
    # What auto found on each topic is in the log, once per topic.
    for topic, what in [
        ("engineering.users", "MongoDB change-stream documents"),
        ("fulfillment.inventory.customers", "Debezium ExtractNewDocumentState records"),
        ("Tutorial1.fs.files", "MongoDB full documents (publish.full.document.only)"),
        ("fulfillment.transaction", "Debezium transaction metadata"),
    ]:
        assert proc.stderr.count(f"topic {topic} carries {what}") == 1, topic
    assert not (tmp_path / "fallback.jsonl").exists()
