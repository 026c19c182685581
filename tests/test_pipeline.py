"""The whole pipeline, as a process, against the real broker and MinIO."""

from __future__ import annotations

import collections
import re

import pytest
from deltalake import DeltaTable

from services.generate import Generator, produce
from tests.harness import (
    Model,
    assert_exactly_once,
    assert_table_matches,
    pipeline_env,
    read_dlq,
    run_pipeline,
    table_rows,
)

pytestmark = pytest.mark.integration


def versions_with_data(uri: str, storage_options: dict[str, str]) -> list[int]:
    history = DeltaTable(uri, storage_options=storage_options).history()
    return sorted(
        h["version"]
        for h in history
        if h.get("operation") in ("WRITE", "MERGE")
        and any(
            int(v)
            for k, v in (h.get("operationMetrics") or {}).items()
            if k
            in (
                "num_added_files",
                "numAddedFiles",
                "num_target_rows_inserted",
                "num_target_rows_updated",
                "num_target_rows_deleted",
            )
        )
    )


def test_50k_events_match_an_independent_model_and_a_rerun_changes_nothing(kafka, s3, tmp_path) -> None:
    gen = Generator(
        collections=3, prefix=f"e2e{tmp_path.name[-6:]}", seed=11, corrupt_ratio=0.01, doc_bytes=600
    )
    messages = list(gen.messages(50_000))
    kafka.create_topics(gen.topics, partitions=4)
    dlq_topic = kafka.topic("dlq", partitions=1)
    produce(kafka.bootstrap, iter(messages))
    model = Model()
    model.apply(messages)
    bucket = s3.bucket("e2e")
    env = pipeline_env(
        CDC_KAFKA_BROKERS=kafka.bootstrap,
        CDC_TOPICS=",".join(gen.topics),
        CDC_LAKE_URI=f"s3://{bucket}/lake",
        CDC_TABLE_MODE="merge",
        CDC_DLQ_TOPIC=dlq_topic,
        CDC_DLQ_FALLBACK=str(tmp_path / "fallback.jsonl"),
        CDC_BATCH_MAX_ROWS="5000",
        CDC_BATCH_MAX_SECONDS="2",
        **s3.env,
    )
    proc = run_pipeline(env)
    # librdkafka warns when a client gets settings meant for another kind; none should.
    assert "CONFWARN" not in proc.stderr, proc.stderr[-2000:]

    so = s3.storage_options
    # The tables equal the model; the changelog holds every valid change exactly once.
    assert_exactly_once(model, gen, bucket, so)
    # Every corrupt message is on the DLQ topic once, with its original bytes.
    corrupt = collections.Counter((m.topic, m.value) for m in messages if m.corrupt)
    dead = read_dlq(kafka.bootstrap, dlq_topic, len([m for m in messages if m.corrupt]))
    assert len(dead) == sum(1 for m in messages if m.corrupt)
    assert collections.Counter((d.topic, d.value) for d in dead) == corrupt
    assert len({d.source_id for d in dead}) == len(dead)

    # Same input again, with a fresh recovery store: no new rows, no new versions with data.
    before = {
        c: DeltaTable(f"s3://{bucket}/lake/{gen.db}/{c}", storage_options=so).version() for c in model.tables
    }
    with_data = {c: versions_with_data(f"s3://{bucket}/lake/{gen.db}/{c}", so) for c in model.tables}
    # Re-read every partition from its start: only the txn check stands between the replay and duplicates.
    rerun = run_pipeline(dict(env, CDC_START_FROM="beginning", CDC_LOG_LEVEL="INFO"))
    skipped = sum(int(n) for n in re.findall(r"(\d+) already committed", rerun.stderr))
    assert skipped == sum(model.events.values()), rerun.stderr[-3000:]
    for coll, expected in model.tables.items():
        uri = f"s3://{bucket}/lake/{gen.db}/{coll}"
        assert_table_matches(uri, expected, so)
        assert DeltaTable(uri, storage_options=so).version() == before[coll]
        assert versions_with_data(uri, so) == with_data[coll]
    for coll, n in model.events.items():
        assert len(table_rows(f"s3://{bucket}/lake/_changelog/{gen.db}/{coll}", so)) == n


def test_a_field_that_changes_type_lands_every_event(kafka, s3, tmp_path) -> None:
    gen = Generator(
        collections=1, prefix=f"drift{tmp_path.name[-6:]}", seed=3, drift_collection=True, doc_bytes=300
    )
    messages = list(gen.messages(3_000))
    kafka.create_topics(gen.topics, partitions=2)
    produce(kafka.bootstrap, iter(messages))
    model = Model()
    model.apply(messages)
    bucket = s3.bucket("drift")
    env = pipeline_env(
        CDC_KAFKA_BROKERS=kafka.bootstrap,
        CDC_TOPICS=",".join(gen.topics),
        CDC_LAKE_URI=f"s3://{bucket}/lake",
        CDC_TABLE_MODE="merge",
        CDC_DLQ_FALLBACK=str(tmp_path / "fallback.jsonl"),
        CDC_BATCH_MAX_ROWS="300",  # many batches, so the type changes between commits too
        **s3.env,
    )
    run_pipeline(env)
    assert_table_matches(
        f"s3://{bucket}/lake/{gen.db}/drifting", model.tables["drifting"], s3.storage_options
    )
    kinds = {type(d["value"]).__name__ for d in model.tables["drifting"].values()}
    assert {"int", "str", "dict"} <= kinds
    rows = table_rows(f"s3://{bucket}/lake/_changelog/{gen.db}/drifting", s3.storage_options)
    assert len(rows) == model.events["drifting"]
    assert not (tmp_path / "fallback.jsonl").exists()
