"""Each failure class from a real cause, through the real pipeline, Kafka and MinIO.

- configuration (a lake table of the other mode, bad settings): the pipeline refuses or stops,
  saying what to fix, and nothing is dead-lettered;
- our bug (an error nobody planned for; here a table log that no longer parses): the flow stops
  with the events still in Kafka, and nothing is dead-lettered;
- bad data: only the events at fault are dead-lettered (tests/test_outages.py,
  `test_only_the_events_delta_refuses_reach_the_dlq`);
- storage unavailable: waited out (tests/test_outages.py, `test_minio_stopped_for_30s_mid_run`).
"""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
from deltalake import DeltaTable

from dataflow.lake.storage import s3_client
from dataflow.lake.writer import DeltaTableWriter
from services.generate import Generator, produce
from tests.harness import (
    ROOT,
    Model,
    assert_table_matches,
    ev,
    lake_env,
    pipeline_env,
    read_dlq,
    run_pipeline,
)


def committed_versions(uri: str, so: dict[str, str], topic: str, partitions: int) -> list[int | None]:
    table = DeltaTable(uri, storage_options=so)
    return [table.transaction_version(f"cdc:{topic}:{p}") for p in range(partitions)]


def append_env(kafka, s3, gen: Generator, bucket: str, tmp_path, dlq_topic: str) -> dict[str, str]:
    """An append-mode pipeline over `gen`'s topics, its dead letters on their own topic."""
    return lake_env(
        kafka.bootstrap,
        s3.env,
        gen.topics,
        bucket,
        tmp_path,
        CDC_TABLE_MODE="append",
        CDC_DLQ_TOPIC=dlq_topic,
    )


def run_failing(env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "bytewax.run", "dataflow.main:flow"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode != 0, f"the pipeline should have stopped\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.integration
def test_a_table_of_the_other_mode_stops_the_flow_and_dead_letters_nothing(kafka, s3, tmp_path) -> None:
    gen = Generator(collections=1, prefix=f"mode{tmp_path.name[-6:]}", seed=41, doc_bytes=300)
    messages = list(gen.messages(3_000))
    kafka.create_topics(gen.topics, partitions=2)
    produce(kafka.bootstrap, iter(messages))
    dlq_topic = kafka.topic("dlq", partitions=1)
    bucket = s3.bucket("mode")
    uri = f"s3://{bucket}/lake/{gen.db}/{gen.names[0]}"
    # Someone else's merge-mode table where this append-mode pipeline would write.
    DeltaTableWriter(uri, mode="merge", pipeline="other", storage_options=s3.storage_options).write(
        [ev("seed", doc={"a": 1}, offset=0)]
    )
    env = append_env(kafka, s3, gen, bucket, tmp_path, dlq_topic)
    proc = run_failing(env)
    assert "CDC_TABLE_MODE" in proc.stderr and "merge-mode table" in proc.stderr
    assert "stopping: a configuration error" in proc.stderr
    assert read_dlq(kafka.bootstrap, dlq_topic, 0) == []
    assert not (tmp_path / "fallback.jsonl").exists()
    # Nothing was taken from Kafka: no offset of this pipeline is recorded in the table.
    assert committed_versions(uri, s3.storage_options, gen.topics[0], 2) == [None, None]

    # With the mode the lake has, every event lands, none lost to the failed run.
    run_pipeline(dict(env, CDC_TABLE_MODE="merge"))
    model = Model()
    model.apply(messages)
    expected = model.tables[gen.names[0]] | {"seed": {"a": 1}}
    assert_table_matches(uri, expected, s3.storage_options)


@pytest.mark.integration
def test_an_unexpected_error_stops_the_flow_with_the_events_still_in_kafka(kafka, s3, tmp_path) -> None:
    gen = Generator(collections=1, prefix=f"bug{tmp_path.name[-6:]}", seed=42, doc_bytes=300)
    messages = list(gen.messages(4_000))
    first, second = messages[:2_000], messages[2_000:]
    kafka.create_topics(gen.topics, partitions=1)
    dlq_topic = kafka.topic("dlq", partitions=1)
    bucket = s3.bucket("bug")
    env = append_env(kafka, s3, gen, bucket, tmp_path, dlq_topic)
    produce(kafka.bootstrap, iter(first))
    run_pipeline(env)
    uri = f"s3://{bucket}/lake/{gen.db}/{gen.names[0]}"
    table = DeltaTable(uri, storage_options=s3.storage_options)
    version, rows = table.version(), table.to_pyarrow_table().num_rows
    [committed] = committed_versions(uri, s3.storage_options, gen.topics[0], 1)
    assert committed is not None
    # The table's next log entry is garbage: delta-rs cannot read the table any more.
    client = s3_client(s3.storage_options)
    garbage = f"lake/{gen.db}/{gen.names[0]}/_delta_log/{version + 1:020d}.json"
    client.put_object(bucket, garbage, io.BytesIO(b"{oops\n"), 6)
    produce(kafka.bootstrap, iter(second))

    proc = run_failing(env)
    assert "stopping: an unexpected error (a bug)" in proc.stderr
    assert "Traceback" in proc.stderr  # the bug is shown, not hidden
    assert read_dlq(kafka.bootstrap, dlq_topic, 0) == []
    assert not (tmp_path / "fallback.jsonl").exists()
    # The second half is still only in Kafka: the table's recorded offset did not move.
    client.remove_object(bucket, garbage)
    assert committed_versions(uri, s3.storage_options, gen.topics[0], 1) == [committed]
    assert DeltaTable(uri, storage_options=s3.storage_options).to_pyarrow_table().num_rows == rows

    run_pipeline(env)  # mended: the next run takes the rest from Kafka
    changes = sum(1 for m in messages if m.change is not None)
    assert DeltaTable(uri, storage_options=s3.storage_options).to_pyarrow_table().num_rows == changes


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CDC_BATCH_MAX_SECONDS", "nan"),
        ("CDC_BATCH_MAX_SECONDS", "inf"),
        ("CDC_RETRY_MAX_SECONDS", "nan"),
        ("CDC_SNAPSHOT_SECONDS", "nan"),
        ("CDC_LOG_LEVEL", "VERBOSE"),
        ("CDC_LOG_FORMAT", "jsn"),
        ("CDC_SAMPLE_PATH", "/nonexistent/changes.jsonl"),
        ("CDC_LAKE_URI", "s3:/bucket/x"),
        ("CDC_LAKE_URI", "s3://"),
        ("CDC_KAFKA_SECURTY_PROTOCOL", "SSL"),
    ],
)
def test_a_bad_setting_refuses_to_start_naming_the_variable(tmp_path, name: str, value: str) -> None:
    env = pipeline_env(**{"CDC_KAFKA_BROKERS": "", "CDC_LAKE_URI": str(tmp_path / "lake"), name: value})
    proc = run_failing(env, timeout=60)
    assert name in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "lake").exists()
