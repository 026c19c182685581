"""Operating the pipeline: its metrics endpoint while storage fails, and the DLQ tools end to end."""

from __future__ import annotations

import collections
import signal
import time
import urllib.request

import orjson
import pytest
from deltalake import DeltaTable

from dataflow.model import DeadLetter, Reason
from services.generate import Generator, produce
from services.process import free_port
from tests.harness import (
    Model,
    PipelineProcess,
    assert_table_matches,
    cli,
    pipeline_env,
    read_dlq,
    read_topic,
    run_pipeline,
    table_rows,
)

pytestmark = pytest.mark.integration


def scrape(port: int) -> dict[str, float]:
    """Samples from the Prometheus text format, `name{labels}` -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def total(samples: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in samples.items() if k == prefix or k.startswith(prefix + "{"))


def wait_for(port: int, check, timeout: float, what: str) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    last: dict[str, float] = {}
    while time.monotonic() < deadline:
        try:
            last = scrape(port)
            if check(last):
                return last
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(
        f"timed out waiting for {what}; last scrape: { {k: v for k, v in last.items() if 'cdc' in k or 'circuit' in k} }"
    )


def test_metrics_move_and_the_breaker_opens_when_minio_stops(kafka, own_s3, tmp_path) -> None:
    gen = Generator(collections=2, prefix=f"met{tmp_path.name[-6:]}", seed=41, doc_bytes=400)
    messages = list(gen.messages(30_000))
    kafka.create_topics(gen.topics, partitions=2)
    produce(kafka.bootstrap, iter(messages[:10_000]))
    bucket = own_s3.bucket("metrics")
    port = free_port()
    env = pipeline_env(
        CDC_KAFKA_BROKERS=kafka.bootstrap,
        CDC_TOPICS=",".join(gen.topics),
        CDC_LAKE_URI=f"s3://{bucket}/lake",
        CDC_DLQ_FALLBACK=str(tmp_path / "fallback.jsonl"),
        CDC_RECOVERY_DIR=str(tmp_path / "recovery"),
        CDC_STOP_AT_END="0",
        CDC_BATCH_MAX_SECONDS="1",
        CDC_BREAKER_RESET_SECONDS="5",
        CDC_RETRY_MAX_SECONDS="2",
        CDC_STORAGE_MAX_RETRIES="2",
        CDC_STORAGE_RETRY_TIMEOUT="3s",
        BYTEWAX_DATAFLOW_API_ENABLED="1",
        BYTEWAX_DATAFLOW_API_PORT=str(port),
        **own_s3.env,
    )
    p = PipelineProcess(env, tmp_path / "pipeline.log")
    try:
        first = wait_for(port, lambda s: total(s, "cdc_delta_commits_total") >= 2, 120, "the first commits")
        assert total(first, "cdc_events_in_total") >= 1
        assert first.get('cdc_circuit_breaker_state{name="storage"}') == 0
        produce(kafka.bootstrap, iter(messages[10_000:20_000]))
        out_before = total(first, "cdc_events_out_total")
        moving = wait_for(
            port,
            lambda s: (
                total(s, "cdc_events_in_total") >= 20_000 and total(s, "cdc_events_out_total") > out_before
            ),
            120,
            "the second 10,000 events read and committed",
        )
        assert (
            total(moving, "cdc_batch_rows_count") > 0 and total(moving, "cdc_checkpoints_committed_total") > 0
        )

        own_s3.server.stop()
        produce(kafka.bootstrap, iter(messages[20_000:]))
        opened = wait_for(
            port, lambda s: s.get('cdc_circuit_breaker_state{name="storage"}') == 1, 180, "breaker open"
        )
        assert opened['cdc_circuit_breaker_opens_total{name="storage"}'] >= 1
        assert total(opened, "cdc_retry_attempts_total") >= 5
        assert total(opened, "cdc_checkpoint_failures_total") >= 5

        own_s3.server.start()
        wait_for(
            port, lambda s: s.get('cdc_circuit_breaker_state{name="storage"}') == 0, 180, "breaker closed"
        )
        wait_for(port, lambda s: total(s, "cdc_retry_success_total") >= 1, 60, "a retry to succeed")
        # SIGTERM drains what was read; what is still in Kafka would wait for the next run.
        wait_for(port, lambda s: total(s, "cdc_events_in_total") >= len(messages), 120, "every event read")
    finally:
        p.kill(signal.SIGTERM)
        assert p.wait(120) == 0, p.tail()
    # SIGTERM stops the materializer after its round: the rest is in the changelogs; catch up apart.
    assert "changes applied" in cli(env, "materialize").stderr
    model = Model()
    model.apply(messages)
    for coll, expected in model.tables.items():
        assert_table_matches(f"s3://{bucket}/lake/{gen.db}/{coll}", expected, own_s3.storage_options)


def test_dlq_replay_round_trip_from_corrupt_event_to_delta_row_twice(kafka, s3, tmp_path) -> None:
    gen = Generator(collections=1, prefix=f"rep{tmp_path.name[-6:]}", seed=42, doc_bytes=300)
    messages = list(gen.messages(200))
    kafka.create_topics(gen.topics, partitions=2)
    dlq_topic = kafka.topic("dlq", partitions=1)
    # One insert arrives truncated: valid before, corrupt on the wire.
    touched_later = collections.Counter(m.change.id for m in messages if m.change is not None)
    victim = next(
        m
        for m in messages[50:]
        if m.change is not None and m.change.op == "insert" and touched_later[m.change.id] == 1
    )
    good_value = victim.value
    victim.value = good_value[: len(good_value) // 2]
    produce(kafka.bootstrap, iter(messages))
    bucket = s3.bucket("replay")
    env = pipeline_env(
        CDC_KAFKA_BROKERS=kafka.bootstrap,
        CDC_TOPICS=",".join(gen.topics),
        CDC_LAKE_URI=f"s3://{bucket}/lake",
        CDC_TABLE_MODE="merge",
        CDC_DLQ_TOPIC=dlq_topic,
        CDC_DLQ_FALLBACK=str(tmp_path / "fallback.jsonl"),
        **s3.env,
    )
    table = f"s3://{bucket}/lake/{gen.db}/{gen.names[0]}"
    changelog = f"s3://{bucket}/lake/_changelog/{gen.db}/{gen.names[0]}"
    run_pipeline(env)
    assert victim.change.id not in {r["_id"] for r in table_rows(table, s3.storage_options)}
    assert len(read_dlq(kafka.bootstrap, dlq_topic, 1)) == 1

    # Inspect, fix the record's value, replay it.
    out = cli(env, "dlq", "inspect", "--json", "--reason", "CORRUPTED_DATA").stdout
    records = [orjson.loads(line) for line in out.splitlines()]
    assert len(records) == 1 and records[0]["value"] == victim.value.decode()
    records[0]["value"] = good_value.decode()
    fixed = tmp_path / "fixed.jsonl"
    fixed.write_bytes(orjson.dumps(records[0]) + b"\n")
    assert "replayed 1," in cli(env, "dlq", "replay", "--file", str(fixed)).stdout
    run_pipeline(env)
    rows = {r["_id"]: r for r in table_rows(table, s3.storage_options)}
    assert rows[victim.change.id]["name"] == victim.change.doc["name"]
    model = Model()
    model.apply(messages)
    assert_table_matches(table, model.tables[gen.names[0]], s3.storage_options)
    changes = len(table_rows(changelog, s3.storage_options))
    version = DeltaTable(table, storage_options=s3.storage_options).version()

    # Replaying again adds nothing: the ledger knows the source was replayed.
    second = cli(env, "dlq", "replay", "--file", str(fixed)).stdout
    assert "replayed 0, already replayed 1" in second
    run_pipeline(env)
    assert len(table_rows(changelog, s3.storage_options)) == changes
    assert DeltaTable(table, storage_options=s3.storage_options).version() == version

    status = orjson.loads(cli(env, "status", "--json").stdout)
    mine = next(t for t in status if t["table"] == table)
    assert mine["mirror"]["documents"] == len(model.tables[gen.names[0]])
    assert mine["mirror"]["changes_behind"] == 0 and mine["offsets"] == []  # the changelog records them
    log = next(t for t in status if t["table"] == changelog)
    assert {o["partition"] for o in log["offsets"]} == {0, 1} and log["rows"] == changes
    # Lag counts offsets: only a trailing tombstone or dead letter may sit past the last commit.
    assert all(0 <= o["lag"] <= 1 for o in mine["offsets"])


@pytest.mark.integration
def test_dlq_replay_writes_only_to_the_topics_the_pipeline_reads(kafka, tmp_path) -> None:
    """A record names its own topic, and records can be edited: a replay to any other topic is
    refused (even with --force) unless allowed by hand."""
    read, other = kafka.topic("read", partitions=1), kafka.topic("other", partitions=1)
    gen = Generator(collections=1, prefix="x", seed=3)
    good = next(m for m in gen.messages(5) if m.change is not None and m.change.op == "insert")
    records = [
        DeadLetter(Reason.DELTA_WRITE_ERROR, "refused", good.key, good.value, t, 0, n)
        for n, t in enumerate((read, other))
    ]
    path = tmp_path / "records.jsonl"
    path.write_bytes(b"".join(r.to_json() + b"\n" for r in records))
    env = pipeline_env(
        CDC_KAFKA_BROKERS=kafka.bootstrap,
        CDC_TOPICS=read,
        CDC_LAKE_URI=str(tmp_path / "lake"),
        CDC_TOPIC_TABLES=orjson.dumps({read: "*", other: "*"}).decode(),
    )
    out = cli(env, "dlq", "replay", "--file", str(path), "--force", "--ledger", kafka.topic("ledger", 1))
    assert "replayed 1," in out.stdout and "refused 1," in out.stdout, out.stdout + out.stderr
    assert f"topic {other!r} is not one this pipeline reads" in out.stderr
    assert len(read_topic(kafka.bootstrap, read, 1)) == 1
    assert read_topic(kafka.bootstrap, other, 0) == []
    again = cli(
        env, "dlq", "replay", "--file", str(path), "--allow-topic", other, "--ledger", kafka.topic("l2", 1)
    )
    assert "replayed 2," in again.stdout, again.stdout + again.stderr
    assert len(read_topic(kafka.bootstrap, other, 1)) == 1


def test_a_deleted_document_stays_deleted_when_an_older_insert_is_replayed_or_comes_late(
    kafka, s3, tmp_path
) -> None:
    """insert and delete of one document on partition 0; an older insert of it arrives later on
    partition 1, and another older one, corrupt on the wire, is fixed and replayed through
    `cdc dlq replay`. The mirror's tombstone keeps the document deleted; a newer insert then
    brings it back."""
    from confluent_kafka import Producer

    from services.generate import ObjectId

    gen = Generator(collections=1, prefix=f"tomb{tmp_path.name[-6:]}", seed=5, doc_bytes=300)
    coll = gen.names[0]
    topic = gen.topic(coll)
    kafka.create_topics([topic], partitions=2)
    dlq_topic = kafka.topic("dlq", partitions=1)
    oid = "65a1f0c2e4b0a1b2c3d4e5f6"
    key = gen._key(oid)
    insert = gen._envelope(coll, "c", {"_id": ObjectId(oid), "v": "first"}, None)
    late = gen._envelope(coll, "c", {"_id": ObjectId(oid), "v": "late"}, None)  # older than the delete
    replay = gen._envelope(coll, "c", {"_id": ObjectId(oid), "v": "replayed"}, None)  # older too
    delete = gen._envelope(coll, "d", None, None)
    newer = gen._envelope(coll, "c", {"_id": ObjectId(oid), "v": "newer"}, None)
    other = gen._envelope(coll, "c", {"_id": ObjectId("65a1f0c2e4b0a1b2c3d4e5f7"), "v": "x"}, None)

    def send(*messages: tuple[int, bytes, bytes | None]) -> None:
        p = Producer({"bootstrap.servers": kafka.bootstrap})
        for partition, k, v in messages:
            p.produce(topic, key=k, value=v, partition=partition)
        assert p.flush(30) == 0

    send((0, key, insert), (0, key, replay[: len(replay) // 2]), (0, key, delete))
    send((1, key, late), (1, gen._key("65a1f0c2e4b0a1b2c3d4e5f7"), other))
    bucket = s3.bucket("tomb")
    env = pipeline_env(
        CDC_KAFKA_BROKERS=kafka.bootstrap,
        CDC_TOPICS=topic,
        CDC_LAKE_URI=f"s3://{bucket}/lake",
        CDC_DLQ_TOPIC=dlq_topic,
        CDC_DLQ_FALLBACK=str(tmp_path / "fallback.jsonl"),
        CDC_RECOVERY_DIR=str(tmp_path / "recovery"),
        **s3.env,
    )

    def live() -> dict[str, str]:
        out = cli(env, "read", f"{gen.db}.{coll}").stdout
        return {d["_id"]: d["v"] for d in map(orjson.loads, out.splitlines())}

    run_pipeline(env)
    assert live() == {"65a1f0c2e4b0a1b2c3d4e5f7": "x"}
    (record,) = [orjson.loads(line) for line in cli(env, "dlq", "inspect", "--json").stdout.splitlines()]
    record["value"] = replay.decode()
    fixed = tmp_path / "fixed.jsonl"
    fixed.write_bytes(orjson.dumps(record) + b"\n")
    assert "replayed 1," in cli(env, "dlq", "replay", "--file", str(fixed)).stdout
    run_pipeline(env)
    assert live() == {"65a1f0c2e4b0a1b2c3d4e5f7": "x"}
    tombs = [
        orjson.loads(line) for line in cli(env, "read", f"{gen.db}.{coll}", "--deleted").stdout.splitlines()
    ]
    assert {"_id": oid, "_deleted": True} in tombs
    changelog = table_rows(f"s3://{bucket}/lake/_changelog/{gen.db}/{coll}", s3.storage_options)
    assert sorted(r["_op"] for r in changelog) == ["delete", "insert", "insert", "insert", "insert"]
    assert sum(bool(r["_replayed"]) for r in changelog) == 1

    send((0, key, newer))
    run_pipeline(env)
    assert live() == {oid: "newer", "65a1f0c2e4b0a1b2c3d4e5f7": "x"}
    mirror = DeltaTable(f"s3://{bucket}/lake/{gen.db}/{coll}", storage_options=s3.storage_options)
    assert len(mirror.to_pyarrow_table()) == 2  # the tombstone became the document again
