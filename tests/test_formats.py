"""Format settings, detection, sequences from one clock, Connect types, and DDL across runs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import orjson
import pytest
from bytewax.connectors.kafka import KafkaSourceMessage
from deltalake import DeltaTable
from prometheus_client import REGISTRY

from dataflow.decode import connect
from dataflow.decode.envelopes import TOMBSTONE, Decoder
from dataflow.decode.extjson import parse_json
from dataflow.decode.formats import Format, TopicTables
from dataflow.decode.order import debezium_seq
from dataflow.decode.step import _Parser
from dataflow.lake.documents import table_documents
from dataflow.lake.writer import DeltaTableWriter
from dataflow.model import ChangeEvent, DeadLetter, Reason, SourceMessage, cluster_seq
from dataflow.runtime.failures import ConfigError
from dataflow.runtime.settings import Settings, SettingsError
from dataflow.source.sample import write_line
from tests.harness import pipeline_env, run_pipeline

CORPUS = Path(__file__).parent / "data" / "connectors"


def _corpus(name: str) -> dict:
    return json.loads((CORPUS / f"{name}.json").read_text())


def _msg(m: dict, topic: str, partition: int = 0, offset: int = 0) -> SourceMessage:
    key = None if m["key"] is None else m["key"].encode()
    value = None if m["value"] is None else m["value"].encode()
    return SourceMessage(key, value, topic, partition, offset, (1, 1_700_000_000_000))


# --- order: one clock per sequence


def test_debezium_sequences_use_one_clock() -> None:
    # Before 3.4, ts_ms is the cluster second and ord its increment.
    assert debezium_seq(1_000_000, 7, "2.7.3.Final") == cluster_seq(1000, 7)
    assert debezium_seq(1_000_000, 7, "0.x") == cluster_seq(1000, 7)
    # From 3.4 (and when the version is unknown) ts_ms may be wall time: ord is not mixed in.
    assert debezium_seq(1_000_734, 7, "3.4.0.Final") == cluster_seq(1000, 734)
    assert debezium_seq(1_000_734, 7, None) == cluster_seq(1000, 734)


def test_debezium_3_4_order_across_partitions_and_batches(tmp_path: Path) -> None:
    """Two updates of one document: B a cluster second after A but with a smaller ord, and both
    wall times within one second. Mixing wall seconds with ord put B first and dropped it."""
    case = _corpus("debezium/ordering_3_4_walltime")
    a, b = (dict(m) for m in case["messages"])
    # Adapted from the corpus pair: B's wall time moved into A's second (167 ms after A).
    b["value"] = b["value"].replace("1558965509012", "1558965508901")
    decoder = Decoder()
    ev_a = decoder.parse(_msg(a, case["topic"], partition=0, offset=5))
    ev_b = decoder.parse(_msg(b, case["topic"], partition=1, offset=3))
    assert isinstance(ev_a, ChangeEvent) and isinstance(ev_b, ChangeEvent)
    assert (ev_a.ts_ms // 1000, ev_a.ord) > (ev_b.ts_ms // 1000, ev_b.ord)  # what the old sequence compared
    assert ev_b.seq > ev_a.seq

    writer = DeltaTableWriter(str(tmp_path / "customers"), mode="merge")
    writer.write([ev_a])
    writer.write([ev_b])  # another partition, a later batch: the sequence decides, and B is newer
    assert table_documents(str(tmp_path / "customers"))["1004"]["email"] == "annemarie@noanswer.org"


def test_within_a_partition_offsets_decide_across_batches(tmp_path: Path) -> None:
    """A later offset of the row's own partition wins even when its sequence is smaller."""
    case = _corpus("debezium/ordering_3_4_walltime")
    a, b = case["messages"]
    decoder = Decoder()
    ev_b = decoder.parse(_msg(b, case["topic"], partition=0, offset=1))
    ev_a = decoder.parse(_msg(a, case["topic"], partition=0, offset=2))  # written later, older clock
    assert isinstance(ev_a, ChangeEvent) and isinstance(ev_b, ChangeEvent) and ev_a.seq < ev_b.seq
    writer = DeltaTableWriter(str(tmp_path / "customers"), mode="merge")
    writer.write([ev_b])
    writer.write([ev_a])
    assert table_documents(str(tmp_path / "customers"))["1004"]["email"] == "annek@noanswer.org"


# --- CDC_FORMAT and detection


def test_auto_detection_is_logged_per_topic(caplog: pytest.LogCaptureFixture) -> None:
    decoder = Decoder()
    envelope = _corpus("debezium/envelope_schemaless_change_streams")
    unwrapped = _corpus("debezium/unwrapped_default_schemaless")
    with caplog.at_level(logging.INFO, logger="dataflow.decode.formats"):
        for i, m in enumerate(envelope["messages"][:3]):
            decoder.parse(_msg(m, envelope["topic"], offset=i))
        decoder.parse(_msg(unwrapped["messages"][0], "other.inventory.customers"))
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        f"topic {envelope['topic']} carries Debezium change events",
        "topic other.inventory.customers carries Debezium ExtractNewDocumentState records",
    ]
    # A tombstone on the envelope topic echoes the `d` event; on the unwrapped one it is the delete.
    tomb = {"key": unwrapped["messages"][-1]["key"], "value": None}
    assert decoder.parse(_msg(tomb, envelope["topic"])) == TOMBSTONE
    delete = decoder.parse(_msg(tomb, "other.inventory.customers"))
    assert isinstance(delete, ChangeEvent) and (delete.op, delete.id, delete.seq) == ("delete", "1004", None)


def test_a_named_format_decides_tombstones() -> None:
    tomb = SourceMessage(b'{"id": "1004"}', None, "fulfillment.inventory.customers", 0, 9, (1, 5))
    assert Decoder(format=Format.DEBEZIUM).parse(tomb) == TOMBSTONE
    ev = Decoder(format=Format.DEBEZIUM_UNWRAPPED).parse(tomb)
    assert isinstance(ev, ChangeEvent) and (ev.op, ev.table, ev.id) == (
        "delete",
        "inventory.customers",
        "1004",
    )
    keyless = tomb._replace(key=None)
    dead = Decoder(format=Format.DEBEZIUM_UNWRAPPED).parse(keyless)
    assert isinstance(dead, DeadLetter) and dead.reason is Reason.SCHEMA_VALIDATION_FAILED
    doc_key = tomb._replace(key=b'{"_id": {"$oid": "5f15aab12435743f9bd126a4"}}', topic="shop.orders")
    ev = Decoder(format=Format.MONGODB_FULL_DOCUMENT_ONLY).parse(doc_key)
    assert isinstance(ev, ChangeEvent) and (ev.table, ev.id) == ("shop.orders", "5f15aab12435743f9bd126a4")


def test_transaction_metadata_is_skipped_and_counted() -> None:
    case = _corpus("debezium/transaction_metadata")
    parser = _Parser(Decoder(), lambda _db: ())
    before = REGISTRY.get_sample_value(
        "cdc_messages_skipped_total", {"topic": case["topic"], "kind": "transaction"}
    )
    msgs = [_msg(m, case["topic"], offset=i) for i, m in enumerate(case["messages"])]
    assert parser.batch(msgs) == []
    after = REGISTRY.get_sample_value(
        "cdc_messages_skipped_total", {"topic": case["topic"], "kind": "transaction"}
    )
    assert after - (before or 0) == len(msgs)


def test_settings_name_the_format_and_the_topic_rule() -> None:
    s = Settings.from_env(
        {
            "CDC_FORMAT": "Debezium-Unwrapped",
            "CDC_TOPIC_TABLES": '{"routed": "shop.orders"}',
            "CDC_TOPIC_TABLE_REGEX": r"cdc\.(?P<db>[^.]+)\.(?P<collection>.+)",
        }
    )
    d = s.decoder
    assert d.format is Format.DEBEZIUM_UNWRAPPED
    assert d.tables.names("routed", debezium=True) == ("shop", "orders")
    assert d.tables.names("cdc.a.b.c", debezium=True) == ("a", "b.c")
    with pytest.raises(ConfigError):
        d.tables.names("elsewhere", debezium=True)
    for env, fragment in [
        ({"CDC_FORMAT": "avro"}, "CDC_FORMAT"),
        ({"CDC_TOPIC_TABLES": '{"t": "nodot"}'}, "CDC_TOPIC_TABLES"),
        ({"CDC_TOPIC_TABLES": "[1]"}, "CDC_TOPIC_TABLES"),
        ({"CDC_TOPIC_TABLE_REGEX": "(?P<db>x)"}, "(?P<collection>...)"),
    ]:
        with pytest.raises(
            SettingsError, match=fragment.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")
        ):
            Settings.from_env(env)


def test_default_topic_rules_follow_the_connectors() -> None:
    rules = TopicTables()
    assert rules.names("fulfillment.inventory.customers", debezium=True) == ("inventory", "customers")
    assert rules.names("dbserver1.Tutorial1.fs.files", debezium=True) == ("Tutorial1", "fs.files")
    assert rules.names("Tutorial1.fs.files", debezium=False) == ("Tutorial1", "fs.files")


# --- values


def test_bare_nan_and_infinity_literals_are_floats() -> None:
    v = parse_json(b'{"a": NaN, "b": [Infinity, -Infinity], "c": "NaN"}')
    assert v["a"] != v["a"] and v["b"] == [float("inf"), float("-inf")] and v["c"] == "NaN"
    for bad in (
        b'{"a": NaN, "b": }',
        b'{"a": NaN, "b": "\\ud800"}',
        b'{"a": Infinity, "b": 1' + b"0" * 30 + b"}",
    ):
        with pytest.raises(orjson.JSONDecodeError):
            parse_json(bad)


def test_connect_logical_types() -> None:
    schema = {
        "type": "struct",
        "fields": [
            {"field": "ts", "type": "int64", "name": connect.TIMESTAMP},
            {"field": "day", "type": "int32", "name": connect.DATE},
            {"field": "at", "type": "int32", "name": connect.TIME},
            {"field": "price", "type": "bytes", "name": connect.DECIMAL, "parameters": {"scale": "2"}},
            {"field": "qty", "type": "bytes", "name": connect.DECIMAL, "parameters": {"scale": "1"}},
            {"field": "raw", "type": "bytes"},
            {"field": "nested", "type": "array", "items": {"type": "int64", "name": connect.TIMESTAMP}},
        ],
    }
    value = {
        "ts": 1637582400000,
        "day": 18953,
        "at": 3723004,
        "price": "MDk=",
        "qty": 12.5,
        "raw": "AAE=",
        "nested": [0],
    }
    out = connect.convert(value, schema)
    assert out["ts"].isoformat() == "2021-11-22T12:00:00+00:00"
    assert out["day"].isoformat() == "2021-11-22"
    assert out["at"] == "01:02:03.004"
    assert (out["price"], out["qty"]) == ("123.45", "12.5")
    assert out["raw"] == b"\x00\x01" and out["nested"][0].year == 1970
    assert connect.has_logical_types(schema) and not connect.has_logical_types({"type": "string"})
    with pytest.raises(connect.ConnectValueError, match="ts"):
        connect.convert({"ts": "soon"}, schema)


# --- DDL across runs


def test_drop_database_drops_the_tables_the_lake_has(tmp_path: Path) -> None:
    """The dropDatabase arrives in a later run, when the collection's table is already in the lake."""
    case = _corpus("mongodb/drop_database")
    insert, _drop, drop_db = case["messages"]
    lake = tmp_path / "lake"

    def run(messages: list[dict], name: str) -> None:
        sample = tmp_path / f"{name}.jsonl"
        sample.write_bytes(
            b"".join(
                write_line(m.get("topic", case["topic"]), m["key"].encode(), m["value"].encode())
                for m in messages
            )
        )
        env = pipeline_env(
            CDC_SAMPLE_PATH=str(sample),
            CDC_LAKE_URI=str(lake),
            CDC_TABLE_MODE="merge",
            CDC_RECOVERY_DIR="off",
            CDC_DLQ_FALLBACK=str(tmp_path / "dlq.jsonl"),
        )
        run_pipeline(env, timeout=300)

    run([insert], "first")
    assert len(table_documents(str(lake / "engineering" / "users"))) == 1
    run([drop_db], "second")
    assert table_documents(str(lake / "engineering" / "users")) == {}
    rows = DeltaTable(str(lake / "_changelog" / "engineering" / "users")).to_pyarrow_table().to_pylist()
    ops = [r["_op"] for r in sorted(rows, key=lambda r: r["_seq"])]
    assert ops == ["insert", "drop"]
    assert not (tmp_path / "dlq.jsonl").exists()


def test_drop_of_a_table_from_another_partition_keeps_newer_rows(tmp_path: Path) -> None:
    """A drop takes the rows changed before it, by cluster time; a later insert of another partition stays."""
    uri = str(tmp_path / "t")
    writer = DeltaTableWriter(uri, mode="merge")

    def ev(op: str, id_: str, partition: int, offset: int, second: int) -> ChangeEvent:
        doc = None if op == "drop" else {"_id": id_, "v": second}
        return ChangeEvent("db", "c", id_, op, doc, second * 1000, 1, "t", partition, offset, 10)  # type: ignore[arg-type]

    writer.write([ev("insert", "a", 0, 0, 100), ev("insert", "b", 1, 0, 300)])
    writer.write([ev("drop", "", 2, 0, 200), ev("insert", "c", 0, 1, 150)])
    # a (second 100) and c (150) are older than the drop (200); b (300) happened after it.
    assert set(table_documents(uri)) == {"b"}


def test_unknown_topic_for_a_bare_document_stops_with_the_setting_named() -> None:
    msg = KafkaSourceMessage(b'{"_id": 1}', b'{"_id": 1, "a": 2}', topic="orders", partition=0, offset=0)
    with pytest.raises(ConfigError, match="CDC_TOPIC_TABLES"):
        Decoder(format=Format.MONGODB_FULL_DOCUMENT_ONLY).parse(msg)


@pytest.mark.parametrize(
    ("key", "deletes"),
    [
        (b'{"id": "{\\"$oid\\": \\"5f15aab12435743f9bd126a4\\"}"}', False),  # Debezium's envelope key
        (b'{"id": "1004"}', False),  # the envelope's key of a numeric _id: Extended JSON text
        (b'{"schema": {"type": "struct"}, "payload": {"id": "\\"abc\\""}}', False),
        (b'{"id": 1004}', True),  # the unwrap SMT's key: the _id itself
        (b'{"id": "5f15aab12435743f9bd126a4"}', True),  # ... an ObjectId as its hex
        (b'{"_id": {"$oid": "5f15aab12435743f9bd126a4"}}', True),  # MongoDB's document key
    ],
)
def test_a_tombstone_first_on_its_topic_is_told_by_its_key(key: bytes, deletes: bool) -> None:
    """After a restart the first message of a topic may be a tombstone: its key says whose it is."""
    out = Decoder().parse(SourceMessage(key, None, "fulfillment.inventory.customers", 0, 7, (1, 5)))
    if deletes:
        assert isinstance(out, ChangeEvent) and out.op == "delete"
    else:
        assert out == TOMBSTONE


def test_a_crash_between_the_steps_of_a_drop_batch_replays_to_the_same_state(tmp_path: Path) -> None:
    """A merge batch holding a drop is committed in steps and only the last records the offsets.
    Stopping after any step and committing the whole batch again ends as one clean commit does."""
    case = _corpus("mongodb/drop_collection")
    decoder = Decoder()
    events = [decoder.parse(_msg(m, case["topic"], offset=i)) for i, m in enumerate(case["messages"])]
    later = ChangeEvent(
        "engineering", "users", "99", "insert", {"_id": 99, "name": "after the drop"},
        events[-1].ts_ms + 1000, 1, case["topic"], 0, len(events), 10,
    )  # fmt: skip
    batch = [*events, later]
    assert [e.op for e in batch] == ["insert", "insert", "drop", "insert"]
    clean = DeltaTableWriter(str(tmp_path / "clean"), mode="merge")
    clean.write(batch)
    expected = table_documents(str(tmp_path / "clean"))
    assert set(expected) == {"99"}

    for stop_after in ("before", "drop"):
        uri = str(tmp_path / f"crashed-{stop_after}")
        w = DeltaTableWriter(uri, mode="merge")
        w.write(events[:1])  # an earlier batch
        before = w._prepare(batch[:2], record=False)  # the steps of _write_with_ddl, cut short
        w._commit(before, record=False)
        if stop_after == "drop":
            w._apply_ddl(batch[2])
        restarted = DeltaTableWriter(uri, mode="merge")
        result = restarted.write(batch)
        assert result.committed and result.offsets == {(case["topic"], 0): len(events)}
        assert table_documents(uri) == expected, stop_after
        assert restarted.write(batch).skipped == len(batch)  # and exactly once from then on
