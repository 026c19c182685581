"""The Kafka source's partitions against the real broker: order, offsets, resume points, the end."""

from __future__ import annotations

import time

import pytest
from bytewax.connectors.kafka import KafkaError
from confluent_kafka import OFFSET_BEGINNING, Producer
from confluent_kafka import KafkaError as ConfluentKafkaError

from dataflow.model import REPLAY_HEADER, SourceMessage
from dataflow.runtime import shutdown
from dataflow.runtime.failures import ConfigError
from dataflow.source.kafka import ResumingKafkaSource, refuse_to_read

pytestmark = pytest.mark.integration

STEP = "read"
DEADLINE = 60.0  # seconds any one wait for the broker may take


def produce_to(bootstrap: str, topic: str, partition: int, n: int) -> list[tuple[bytes, bytes]]:
    """`n` numbered messages on one partition, confirmed; returns their (key, value)s in order."""
    sent = [(f"{topic}/{partition}/k{i}".encode(), f"v{i}".encode()) for i in range(n)]
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    errors: list[str] = []
    for key, value in sent:
        producer.produce(
            topic, key=key, value=value, partition=partition, on_delivery=lambda e, _m: e and errors.append(e)
        )
    assert producer.flush(30) == 0 and not errors, errors
    return sent


def source(bootstrap: str, partitions: dict[str, int], **kwargs) -> ResumingKafkaSource:
    kwargs.setdefault("committed", dict)
    return ResumingKafkaSource([bootstrap], list(partitions), partitions=partitions, **kwargs)


def read_until(part, wanted: int) -> list:
    """At least `wanted` items, polling as Bytewax does (it may hand out empty batches)."""
    out: list = []
    deadline = time.monotonic() + DEADLINE
    while len(out) < wanted and time.monotonic() < deadline:
        out.extend(part.next_batch())
    assert len(out) >= wanted, f"{len(out)} of {wanted} items after {DEADLINE}s"
    return out


def read_to_end(part) -> tuple[list, list[tuple[list, int]]]:
    """Everything up to the StopIteration, and each non-empty batch with the snapshot after it."""
    out: list = []
    batches: list[tuple[list, int]] = []
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        try:
            batch = part.next_batch()
        except StopIteration:
            return out, batches
        if batch:
            out.extend(batch)
            batches.append((batch, part.snapshot()))
    raise AssertionError(f"no end of partition after {DEADLINE}s ({len(out)} items)")


def test_each_partition_hands_out_its_messages_once_in_offset_order_then_ends(kafka) -> None:
    topic = kafka.topic("src", partitions=2)
    sent = {0: produce_to(kafka.bootstrap, topic, 0, 1_300), 1: produce_to(kafka.bootstrap, topic, 1, 7)}
    src = source(kafka.bootstrap, {topic: 2}, tail=False, batch_size=100)
    assert src.list_parts() == [f"0-{topic}", f"1-{topic}"]
    for p, expected in sent.items():
        part = src.build_part(STEP, f"{p}-{topic}", None)
        assert isinstance(part, shutdown.Stoppable)
        try:
            assert part.snapshot() == OFFSET_BEGINNING  # no recovery state, nothing committed
            items, batches = read_to_end(part)
            assert all(type(m) is SourceMessage for m in items)
            assert [(m.key, m.value) for m in items] == expected
            assert [m.offset for m in items] == list(range(len(expected)))
            assert {(m.topic, m.partition) for m in items} == {(topic, p)}
            assert all(m.timestamp[1] > 0 for m in items)
            assert max(len(batch) for batch, _ in batches) <= 100  # batch_size
            # After each batch the state is the offset after the last message handed out.
            assert [snapshot for _, snapshot in batches] == [batch[-1].offset + 1 for batch, _ in batches]
            assert part.snapshot() == len(expected)
        finally:
            part.close()


def test_the_snapshot_after_a_batch_is_the_next_offset_to_read(kafka) -> None:
    topic = kafka.topic("src", partitions=1)
    produce_to(kafka.bootstrap, topic, 0, 50)
    part = source(kafka.bootstrap, {topic: 1}, batch_size=10).build_part(STEP, f"0-{topic}", None)
    try:
        deadline = time.monotonic() + DEADLINE
        batch: list = []
        while not batch and time.monotonic() < deadline:
            batch = part.next_batch()
        assert batch, f"no message after {DEADLINE}s"
        assert len(batch) <= 10
        assert [m.offset for m in batch] == list(range(len(batch)))
        assert part.snapshot() == batch[-1].offset + 1
        # Tailing: the end of the partition is no end of input.
        rest = read_until(part, 50 - len(batch))
        assert [m.offset for m in batch + rest] == list(range(50))
        assert part.snapshot() == 50
        for _ in range(20):
            assert part.next_batch() == []
    finally:
        part.close()


def test_a_partition_with_recovery_state_starts_there_whatever_delta_says(kafka) -> None:
    topic = kafka.topic("src", partitions=1)
    sent = produce_to(kafka.bootstrap, topic, 0, 60)
    loads: list[int] = []

    def committed() -> dict[tuple[str, int], int]:
        loads.append(1)
        return {(topic, 0): 10}

    src = source(kafka.bootstrap, {topic: 1}, tail=False, committed=committed)
    part = src.build_part(STEP, f"0-{topic}", 37)
    try:
        assert part.snapshot() == 37
        items, _ = read_to_end(part)
        assert [m.offset for m in items] == list(range(37, 60))
        assert [(m.key, m.value) for m in items] == sent[37:]
        assert part.snapshot() == 60
        assert loads == []  # Delta's offsets are not even read
    finally:
        part.close()


def test_without_recovery_state_a_partition_starts_at_its_committed_offset_inclusive(kafka) -> None:
    topic = kafka.topic("src", partitions=3)
    sent = {p: produce_to(kafka.bootstrap, topic, p, 40) for p in range(3)}
    loads: list[int] = []

    def committed() -> dict[tuple[str, int], int]:
        loads.append(1)
        return {(topic, 0): 25, (topic, 2): 40}  # partition 1: nothing committed yet

    src = source(kafka.bootstrap, {topic: 3}, tail=False, committed=committed)
    parts = [src.build_part(STEP, f"{p}-{topic}", None) for p in range(3)]
    try:
        assert [p.snapshot() for p in parts] == [25, OFFSET_BEGINNING, 40]
        read = [read_to_end(p)[0] for p in parts]
        # The committed message itself again (the sink drops it), then what follows.
        assert [m.offset for m in read[0]] == list(range(25, 40))
        assert [(m.key, m.value) for m in read[0]] == sent[0][25:]
        assert [m.offset for m in read[1]] == list(range(40))
        assert read[2] == []  # committed at the end: nothing to read, and the partition still ends
        assert [p.snapshot() for p in parts] == [40, 40, 40]
        assert loads == [1]  # read once for all partitions
    finally:
        for p in parts:
            p.close()


def test_an_empty_partition_ends_when_not_tailing(kafka) -> None:
    topic = kafka.topic("src", partitions=1)
    part = source(kafka.bootstrap, {topic: 1}, tail=False).build_part(STEP, f"0-{topic}", None)
    try:
        assert read_to_end(part) == ([], [])
        with pytest.raises(StopIteration):
            part.next_batch()
        assert part.snapshot() == OFFSET_BEGINNING
    finally:
        part.close()


def test_consumer_errors_are_handed_out_without_moving_the_offset(kafka) -> None:
    topic = kafka.topic("src", partitions=1)
    produce_to(kafka.bootstrap, topic, 0, 5)
    # Recovery state beyond the end (a topic recreated, say): with `auto.offset.reset=error`
    # (`add_config` goes over Bytewax's settings) the consumer reports it instead of a message.
    settings = {"committed": dict, "add_config": {"auto.offset.reset": "error"}}
    part = source(kafka.bootstrap, {topic: 1}, raise_on_errors=False, **settings).build_part(
        STEP, f"0-{topic}", 1000
    )
    try:
        items = read_until(part, 1)
        assert all(isinstance(m, KafkaError) for m in items), items
        assert items[0].err.code() == ConfluentKafkaError._AUTO_OFFSET_RESET
        assert (items[0].msg.topic, items[0].msg.partition, items[0].msg.offset) == (topic, 0, 1000)
        assert part.snapshot() == 1000
    finally:
        part.close()
    part = source(kafka.bootstrap, {topic: 1}, **settings).build_part(STEP, f"0-{topic}", 1000)
    try:
        with pytest.raises(RuntimeError, match="error consuming from Kafka topic"):
            read_until(part, 1)
        assert part.snapshot() == 1000
    finally:
        part.close()


@pytest.mark.parametrize(
    ("error", "stops"),
    [
        (ConfluentKafkaError(ConfluentKafkaError._TRANSPORT), False),
        (ConfluentKafkaError(ConfluentKafkaError._ALL_BROKERS_DOWN), False),
        (ConfluentKafkaError(ConfluentKafkaError.SASL_AUTHENTICATION_FAILED), True),
        (ConfluentKafkaError(ConfluentKafkaError.TOPIC_AUTHORIZATION_FAILED), True),
        (ConfluentKafkaError(ConfluentKafkaError._FENCED, fatal=True), True),
    ],
)
def test_errors_no_waiting_cures_stop_the_flow(error: ConfluentKafkaError, stops: bool) -> None:
    if stops:
        with pytest.raises(ConfigError, match="Kafka refuses to serve t partition 3"):
            refuse_to_read("t", 3, error)
    else:
        refuse_to_read("t", 3, error)  # handed out and logged; librdkafka reconnects


def test_a_message_sent_again_by_dlq_replay_is_marked_replayed(kafka) -> None:
    """`cdc dlq replay` adds REPLAY_HEADER; the source marks such messages, and only those."""
    topic = kafka.topic("src", partitions=1)
    producer = Producer({"bootstrap.servers": kafka.bootstrap, "enable.idempotence": True})
    producer.produce(topic, key=b"k0", value=b"v0", partition=0)
    producer.produce(topic, key=b"k1", value=b"v1", partition=0, headers=[(REPLAY_HEADER, b"orig:0:7")])
    producer.produce(topic, key=b"k2", value=b"v2", partition=0, headers=[("other", b"x")])
    assert producer.flush(30) == 0
    part = source(kafka.bootstrap, {topic: 1}, tail=False).build_part(STEP, f"0-{topic}", None)
    try:
        items, _ = read_to_end(part)
    finally:
        part.close()
    assert [(m.key, m.replayed) for m in items] == [(b"k0", False), (b"k1", True), (b"k2", False)]


def test_a_partition_tells_the_input_backlog_what_it_has_left_unread(kafka) -> None:
    """The materializer's pace reads this: after every poll, from the last fetch's high watermark."""
    from dataflow.source.backlog import InputBacklog

    topic = kafka.topic("backlog", partitions=1)
    produce_to(kafka.bootstrap, topic, 0, 3_000)
    backlog = InputBacklog()
    part = source(kafka.bootstrap, {topic: 1}, tail=False, batch_size=100, backlog=backlog).build_part(
        STEP, f"0-{topic}", None
    )
    try:
        items = read_until(part, 1)  # the poll that read the first messages knows the rest
        assert 0 < len(items) < 3_000 and backlog.unread() == 3_000 - len(items)
        items += read_until(part, 500 - len(items))
        assert backlog.unread() == 3_000 - len(items)
        rest, _ = read_to_end(part)
        assert len(items) + len(rest) == 3_000 and backlog.unread() == 0
        backlog.report(topic, 0, 7)  # as if more had come: a closed partition takes its count along
    finally:
        part.close()
    assert backlog.unread() == 0
