"""Kafka messages from every supported connector -> ChangeEvent, or a DeadLetter with a reason."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime
from typing import Any

import bytewax.operators as op
import orjson
import pytest
from bson.decimal128 import Decimal128
from bytewax.connectors.kafka import KafkaSourceMessage
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, TestingSource, run_main
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dataflow.decode import envelopes as events
from dataflow.decode.envelopes import Decoder, parse
from dataflow.decode.formats import TopicTables
from dataflow.model import ChangeEvent, DeadLetter, Reason, Uuid
from dataflow.runtime.failures import BadData, ConfigError

OID = "65a1f0c2e4b0a1b2c3d4e5f6"
OID2 = "65a1f0c2e4b0a1b2c3d4e5f7"
TS = 1705111234  # cluster time, seconds
TOPIC = "dbserver1.inventory.customers"

# --- Debezium 2.x fixtures (JSON converter; schemas.enable true and false)

_JSON = "io.debezium.data.Json"
VALUE_SCHEMA = {
    "type": "struct",
    "fields": [
        {"type": "string", "optional": True, "name": _JSON, "version": 1, "field": "before"},
        {"type": "string", "optional": True, "name": _JSON, "version": 1, "field": "after"},
        {
            "type": "struct",
            "fields": [
                {"type": "array", "items": {"type": "string", "optional": False}, "optional": True,
                 "field": "removedFields"},
                {"type": "string", "optional": True, "name": _JSON, "version": 1, "field": "updatedFields"},
                {"type": "array", "items": {"type": "struct", "fields": [
                    {"type": "string", "optional": False, "field": "field"},
                    {"type": "int32", "optional": False, "field": "size"}], "optional": False},
                 "optional": True, "field": "truncatedArrays"},
            ],
            "optional": True,
            "name": "io.debezium.connector.mongodb.changestream.updatedescription",
            "version": 1,
            "field": "updateDescription",
        },
        {
            "type": "struct",
            "fields": [
                {"type": "string", "optional": False, "field": "version"},
                {"type": "string", "optional": False, "field": "connector"},
                {"type": "string", "optional": False, "field": "name"},
                {"type": "int64", "optional": False, "field": "ts_ms"},
                {"type": "string", "optional": True, "name": "io.debezium.data.Enum", "version": 1,
                 "parameters": {"allowed": "true,last,false,incremental"}, "default": "false",
                 "field": "snapshot"},
                {"type": "string", "optional": False, "field": "db"},
                {"type": "string", "optional": True, "field": "sequence"},
                {"type": "string", "optional": False, "field": "rs"},
                {"type": "string", "optional": False, "field": "collection"},
                {"type": "int32", "optional": False, "field": "ord"},
                {"type": "string", "optional": True, "field": "lsid"},
                {"type": "int64", "optional": True, "field": "txnNumber"},
                {"type": "int64", "optional": True, "field": "wallTime"},
            ],
            "optional": False,
            "name": "io.debezium.connector.mongo.Source",
            "field": "source",
        },
        {"type": "string", "optional": True, "field": "op"},
        {"type": "int64", "optional": True, "field": "ts_ms"},
        {"type": "struct", "fields": [
            {"type": "string", "optional": False, "field": "id"},
            {"type": "int64", "optional": False, "field": "total_order"},
            {"type": "int64", "optional": False, "field": "data_collection_order"}],
         "optional": True, "name": "event.block", "version": 1, "field": "transaction"},
    ],
    "optional": False,
    "name": "dbserver1.inventory.customers.Envelope",
}  # fmt: skip
KEY_SCHEMA = {
    "type": "struct",
    "fields": [{"type": "string", "optional": False, "field": "id"}],
    "optional": False,
    "name": "dbserver1.inventory.customers.Key",
}


def ej(obj: Any) -> str:
    """Extended JSON text, as a connector would put in a string field."""
    return orjson.dumps(obj).decode()


CUSTOMER_CANONICAL = ej(
    {
        "_id": {"$oid": OID},
        "first_name": "Anne",
        "last_name": "Kretchmar",
        "email": "annek@noanswer.org",
        "visits": {"$numberInt": "12"},
        "balance": {"$numberDecimal": "1024.50"},
        "score": {"$numberDouble": "4.5"},
        "created": {"$date": {"$numberLong": "1705111234000"}},
        "tags": ["vip", {"$numberLong": "7"}],
        "address": {"city": "Oslo", "zip": "0150"},
    }
)
CUSTOMER_RELAXED = ej(
    {
        "_id": {"$oid": OID},
        "first_name": "Anne",
        "last_name": "Kretchmar",
        "email": "annek@noanswer.org",
        "visits": 12,
        "balance": {"$numberDecimal": "1024.50"},
        "score": 4.5,
        "created": {"$date": "2024-01-13T02:00:34Z"},
        "tags": ["vip", 7],
        "address": {"city": "Oslo", "zip": "0150"},
    }
)
CUSTOMER = {
    "_id": OID,
    "first_name": "Anne",
    "last_name": "Kretchmar",
    "email": "annek@noanswer.org",
    "visits": 12,
    "balance": Decimal128("1024.50"),
    "score": 4.5,
    "created": datetime(2024, 1, 13, 2, 0, 34, tzinfo=UTC),
    "tags": ["vip", 7],
    "address": {"city": "Oslo", "zip": "0150"},
}


def dbz_source(**over: Any) -> dict:
    src = {
        "version": "2.5.4.Final",
        "connector": "mongodb",
        "name": "dbserver1",
        "ts_ms": TS * 1000,
        "snapshot": "false",
        "db": "inventory",
        "sequence": None,
        "rs": "rs0",
        "collection": "customers",
        "ord": 3,
        "lsid": None,
        "txnNumber": None,
        "wallTime": TS * 1000 + 17,
    }
    src.update(over)
    return src


def dbz_payload(op: str, after: str | None = None, **over: Any) -> dict:
    payload = {
        "before": None,
        "after": after,
        "updateDescription": None,
        "source": dbz_source(),
        "op": op,
        "ts_ms": TS * 1000 + 250,
        "transaction": None,
    }
    payload.update(over)
    return payload


def dbz_value(payload: dict, *, schema: bool = True) -> bytes:
    return orjson.dumps({"schema": VALUE_SCHEMA, "payload": payload} if schema else payload)


def dbz_key(id_json: str, *, schema: bool = True) -> bytes:
    payload = {"id": id_json}
    return orjson.dumps({"schema": KEY_SCHEMA, "payload": payload} if schema else payload)


OID_KEY = dbz_key(ej({"$oid": OID}))


def kmsg(
    value: bytes | None,
    key: bytes | None = OID_KEY,
    *,
    topic: str = TOPIC,
    offset: int = 42,
    timestamp: tuple[int, int] | None = (1, TS * 1000 + 999),
) -> KafkaSourceMessage:
    return KafkaSourceMessage(
        key=key, value=value, topic=topic, partition=2, offset=offset, timestamp=timestamp
    )


def ok(msg: KafkaSourceMessage, **kw: Any) -> ChangeEvent:
    ev = parse(msg, **kw)
    assert isinstance(ev, ChangeEvent), ev
    assert (ev.topic, ev.partition, ev.offset, ev.size) == (msg.topic, 2, msg.offset, len(msg.value))
    assert ev.raw_key is msg.key and ev.raw_value is msg.value  # kept by reference for a later DLQ
    return ev


def dead(msg: KafkaSourceMessage, reason: Reason, *fragments: str, **kw: Any) -> DeadLetter:
    dl = parse(msg, **kw)
    assert isinstance(dl, DeadLetter), dl
    assert dl.reason == reason, dl.error
    for fragment in fragments:
        assert fragment in dl.error
    assert dl.key is msg.key and dl.value is msg.value  # the original bytes, untouched
    assert (dl.topic, dl.partition, dl.offset) == (msg.topic or "", msg.partition, msg.offset)
    assert DeadLetter.from_json(dl.to_json()).value == msg.value
    return dl


# --- Debezium


@pytest.mark.parametrize("schema", [True, False])
@pytest.mark.parametrize("after", [CUSTOMER_CANONICAL, CUSTOMER_RELAXED])
def test_debezium_insert(schema: bool, after: str) -> None:
    ev = ok(kmsg(dbz_value(dbz_payload("c", after), schema=schema)))
    assert ev.op == "insert"
    assert (ev.db, ev.collection, ev.table) == ("inventory", "customers", "inventory.customers")
    assert ev.id == OID
    assert ev.doc == CUSTOMER
    assert (ev.ts_ms, ev.ord) == (TS * 1000, 3)
    assert ev.seq == (TS << 31) | 3
    assert ev.updated is None and ev.removed == ()


def test_debezium_snapshot_read_is_insert_and_ord_defaults_to_zero() -> None:
    payload = dbz_payload("r", CUSTOMER_RELAXED, source=dbz_source(snapshot="true", ord=None))
    ev = ok(kmsg(dbz_value(payload)))
    assert ev.op == "insert" and ev.ord == 0


def test_debezium_update_with_full_document() -> None:
    ud = {"removedFields": ["email"], "updatedFields": '{"visits": 13}', "truncatedArrays": None}
    ev = ok(kmsg(dbz_value(dbz_payload("u", CUSTOMER_RELAXED, updateDescription=ud))))
    assert ev.op == "update" and ev.doc == CUSTOMER and not ev.is_partial


@pytest.mark.parametrize("schema", [True, False])
def test_debezium_partial_update_takes_id_from_key(schema: bool) -> None:
    ud = {
        "removedFields": ["email"],
        "updatedFields": '{"visits": {"$numberInt": "13"}, "last_seen": {"$date": {"$numberLong": "0"}}}',
        "truncatedArrays": None,
    }
    ev = ok(kmsg(dbz_value(dbz_payload("u", None, updateDescription=ud), schema=schema)))
    assert ev.is_partial and ev.doc is None and ev.id == OID
    assert ev.updated == {"visits": 13, "last_seen": datetime(1970, 1, 1, tzinfo=UTC)}
    assert ev.removed == ("email",)


def test_debezium_partial_update_without_changes_is_an_empty_update() -> None:
    ud = {"removedFields": None, "updatedFields": None, "truncatedArrays": None}
    ev = ok(kmsg(dbz_value(dbz_payload("u", None, updateDescription=ud))))
    assert ev.is_partial and ev.updated == {} and ev.removed == ()


@pytest.mark.parametrize(
    "ud",
    [
        {"removedFields": None, "updatedFields": '{"address.city": "Bergen"}', "truncatedArrays": None},
        {"removedFields": ["address.zip"], "updatedFields": None, "truncatedArrays": None},
        {"removedFields": None, "updatedFields": '{"tags.1": 8}', "truncatedArrays": None},
        {
            "removedFields": None,
            "updatedFields": '{"tags": ["vip"]}',
            "truncatedArrays": [{"field": "tags", "newSize": 1}],
        },
    ],
)
def test_debezium_partial_update_on_nested_paths_carries_the_description(ud: dict) -> None:
    ev = ok(kmsg(dbz_value(dbz_payload("u", None, updateDescription=ud))))
    assert ev.is_partial and ev.change is not None and ev.updated is None
    assert ev.change.fields() == {"address"} or ev.change.fields() == {"tags"}


@pytest.mark.parametrize(
    ("key", "expected_id"),
    [
        (OID_KEY, OID),
        (dbz_key(ej({"$oid": OID}), schema=False), OID),
        (dbz_key("1004"), "1004"),
        (dbz_key('"user-17"', schema=False), "user-17"),
        (dbz_key('{"$numberLong": "9007199254740993"}'), "9007199254740993"),
        (dbz_key('{"region": "eu", "n": {"$numberInt": "5"}}'), '{"region":"eu","n":5}'),
    ],
)
def test_debezium_delete_takes_id_from_key(key: bytes, expected_id: str) -> None:
    ev = ok(kmsg(dbz_value(dbz_payload("d", None)), key))
    assert ev.op == "delete" and ev.doc is None and ev.id == expected_id


def test_debezium_delete_then_tombstone() -> None:
    assert isinstance(parse(kmsg(dbz_value(dbz_payload("d", None)))), ChangeEvent)
    # The topic carries Debezium envelopes: the tombstone after the `d` event is no second delete.
    assert parse(kmsg(None)) == events.TOMBSTONE
    assert parse(kmsg(b"")) == events.TOMBSTONE


def test_debezium_delete_without_key_is_schema_failure() -> None:
    dead(kmsg(dbz_value(dbz_payload("d", None)), key=None), Reason.SCHEMA_VALIDATION_FAILED, "no _id")


@pytest.mark.parametrize(
    ("key", "reason", "fragment"),
    [
        (b"not json", Reason.CORRUPTED_DATA, "key is not valid JSON"),
        (b'{"_id": 1}', Reason.SCHEMA_VALIDATION_FAILED, "Debezium key"),
        (dbz_key("abc"), Reason.SCHEMA_VALIDATION_FAILED, "key.id is not Extended JSON"),
        (dbz_key('{"$oid": "zz"}'), Reason.INVALID_BSON, "key.id"),
    ],
)
def test_debezium_delete_with_bad_key(key: bytes, reason: Reason, fragment: str) -> None:
    dead(kmsg(dbz_value(dbz_payload("d", None)), key), reason, fragment)


def test_debezium_key_disagreeing_with_document() -> None:
    msg = kmsg(dbz_value(dbz_payload("c", CUSTOMER_RELAXED)), dbz_key(ej({"$oid": OID2})))
    dead(msg, Reason.SCHEMA_VALIDATION_FAILED, "disagrees")


def test_debezium_unreadable_key_is_ignored_when_the_document_has_the_id() -> None:
    assert ok(kmsg(dbz_value(dbz_payload("c", CUSTOMER_RELAXED)), b"\x00binary-key")).id == OID


def test_debezium_after_without_id_gets_it_from_the_key() -> None:
    ev = ok(kmsg(dbz_value(dbz_payload("c", '{"name": "x"}'))))
    assert ev.doc == {"_id": OID, "name": "x"}


# --- Debezium 1.x legacy (oplog) and 0.x

LEGACY_SOURCE = {
    "version": "1.9.7.Final",
    "connector": "mongodb",
    "name": "dbserver1",
    "ts_ms": TS * 1000,
    "snapshot": "false",
    "db": "inventory",
    "sequence": None,
    "rs": "rs0",
    "collection": "customers",
    "ord": 1,
    "h": 1546547425148721999,
    "tord": None,
    "stxnid": None,
}


def legacy_update(patch: str, *, filt: str | None = ej({"_id": {"$oid": OID}})) -> bytes:
    return orjson.dumps(
        {
            "after": None,
            "patch": patch,
            "filter": filt,
            "source": LEGACY_SOURCE,
            "op": "u",
            "ts_ms": TS * 1000 + 5,
            "transaction": None,
        }
    )


def test_legacy_patch_set_unset_with_id_from_filter() -> None:
    patch = '{"$v": 1, "$set": {"visits": {"$numberInt": "14"}}, "$unset": {"email": true}}'
    ev = ok(kmsg(legacy_update(patch), key=None))
    assert ev.op == "update" and ev.is_partial and ev.id == OID
    assert ev.updated == {"visits": 14} and ev.removed == ("email",)
    assert (ev.ts_ms, ev.ord) == (TS * 1000, 1)


def test_legacy_patch_prefers_the_key_over_the_filter() -> None:
    ev = ok(kmsg(legacy_update('{"$set": {"a": 1}}', filt='{"_id": 5}'), key=dbz_key("7")))
    assert ev.id == "7"


def test_legacy_patch_oplog_v2_diff() -> None:
    patch = '{"$v": 2, "diff": {"u": {"visits": 15}, "i": {"vip": true}, "d": {"email": false}}}'
    ev = ok(kmsg(legacy_update(patch)))
    assert ev.updated == {"visits": 15, "vip": True} and ev.removed == ("email",)


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        ('{"$v": 1, "$set": {"address.city": "Bergen"}}', {"address": {"city": "Bergen", "zip": "0150"}}),
        ('{"$v": 1, "$unset": {"address.zip": true}}', {"address": {"city": "Oslo"}}),
        (
            '{"$v": 2, "diff": {"saddress": {"u": {"city": "Bergen"}}}}',
            {"address": {"city": "Bergen", "zip": "0150"}},
        ),
        ('{"$v": 2, "diff": {"stags": {"a": true, "l": 1, "u0": "vip"}}}', {"tags": ["vip"]}),
        ('{"$v": 2, "diff": {"stags": {"a": true, "s1": {"u": {"n": 2}}}}}', {"tags": ["a", {"n": 2}, "c"]}),
    ],
)
def test_legacy_patch_inside_fields_applies_to_the_document(patch: str, expected: dict) -> None:
    ev = ok(kmsg(legacy_update(patch)))
    assert ev.change is not None
    before = {"_id": OID, "address": {"city": "Oslo", "zip": "0150"}, "tags": ["a", {"n": 1}, "c"]}
    after = ev.change.apply(before)
    assert {k: after.get(k) for k in expected} == expected
    assert before["address"] == {"city": "Oslo", "zip": "0150"}  # applied to a copy


def test_legacy_patch_with_another_operator_is_refused() -> None:
    dead(kmsg(legacy_update('{"$v": 1, "$inc": {"visits": 1}}')), Reason.UNSUPPORTED_PARTIAL_UPDATE, "$inc")


def test_legacy_patch_replacement_document_is_replace() -> None:
    patch = ej({"_id": {"$oid": OID}, "first_name": "Anne", "visits": {"$numberLong": "1"}})
    ev = ok(kmsg(legacy_update(patch)))
    assert ev.op == "replace" and ev.doc == {"_id": OID, "first_name": "Anne", "visits": 1}


def test_legacy_replacement_without_id_takes_it_from_the_filter() -> None:
    ev = ok(kmsg(legacy_update('{"first_name": "Anne"}'), key=None))
    assert ev.op == "replace" and ev.doc == {"_id": OID, "first_name": "Anne"}


def test_legacy_unreadable_key_falls_back_to_the_filter() -> None:
    assert ok(kmsg(legacy_update('{"$set": {"a": 1}}'), key=b"\xff")).id == OID


def test_legacy_delete_with_filter_only() -> None:
    value = orjson.dumps(
        {"after": None, "filter": '{"_id": "abc"}', "source": LEGACY_SOURCE, "op": "d", "ts_ms": 1}
    )
    ev = ok(kmsg(value, key=None))
    assert ev.op == "delete" and ev.id == "abc"


def test_debezium_0x_source_with_ns_and_sec() -> None:
    source = {"name": "fulfillment", "rs": "rs0", "ns": "inventory.customers", "sec": TS, "ord": 2}
    value = orjson.dumps({"after": CUSTOMER_CANONICAL, "source": source, "op": "c", "ts_ms": 1})
    ev = ok(kmsg(value))
    assert (ev.db, ev.collection, ev.ts_ms, ev.ord) == ("inventory", "customers", TS * 1000, 2)


# --- Debezium: schema failures, corrupted and invalid values


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (dbz_payload("x", CUSTOMER_RELAXED), "unknown Debezium op"),
        (dbz_payload("t", None), "truncate"),
        (dbz_payload(5, CUSTOMER_RELAXED), "payload.op must be a string"),
        (dbz_payload("c", None), "without payload.after"),
        (dbz_payload("u", None), "update without"),
        (dbz_payload("c", 5), "payload.after must be"),
        (dbz_payload("c", '"just a string"'), "must hold a document"),
        (dbz_payload("c", CUSTOMER_RELAXED, source=None), "payload.source is missing"),
        (dbz_payload("c", CUSTOMER_RELAXED, source=dbz_source(db=None)), "payload.source.db is missing"),
        (dbz_payload("c", CUSTOMER_RELAXED, source=dbz_source(collection=7)), "not a string"),
        (dbz_payload("c", CUSTOMER_RELAXED, source=dbz_source(ts_ms=None)), "ts_ms is missing"),
        (dbz_payload("c", CUSTOMER_RELAXED, source=dbz_source(ts_ms="1")), "must be an integer"),
        (dbz_payload("c", CUSTOMER_RELAXED, source=dbz_source(ord=1.5)), "must be an integer"),
        (dbz_payload("c", CUSTOMER_RELAXED, source=dbz_source(db="")), "invalid database name"),
        (dbz_payload("c", CUSTOMER_RELAXED, source=dbz_source(db="a.b")), "invalid database name"),
        (dbz_payload("c", CUSTOMER_RELAXED, source=dbz_source(ts_ms=-5)), "cannot be sequenced"),
        (dbz_payload("u", None, updateDescription=[]), "updateDescription must be an object"),
        (
            dbz_payload("u", None, updateDescription={"updatedFields": "[1]", "removedFields": None}),
            "updatedFields must be a document",
        ),
        (
            dbz_payload("u", None, updateDescription={"updatedFields": None, "removedFields": [1]}),
            "removedFields must be a list of strings",
        ),
        (
            dbz_payload("u", None, updateDescription={"updatedFields": '{"a": 1}', "removedFields": ["a"]}),
            "both set and removed",
        ),
        (
            dbz_payload("u", None, updateDescription={"updatedFields": None, "removedFields": ["_id"]}),
            "removes _id",
        ),
        (dbz_payload("c", '{"_id": ""}'), "empty _id"),
        (dbz_payload("c", ej({"_id": {"$oid": OID}, "": 2})), "invalid field name"),
    ],
)
def test_debezium_schema_failures(payload: dict, fragment: str) -> None:
    dead(kmsg(dbz_value(payload)), Reason.SCHEMA_VALIDATION_FAILED, fragment)


def test_debezium_schema_wrapper_with_null_payload() -> None:
    value = orjson.dumps({"schema": VALUE_SCHEMA, "payload": None})
    dead(kmsg(value), Reason.SCHEMA_VALIDATION_FAILED, "payload is null")


def test_debezium_after_that_is_not_json_is_corrupted() -> None:
    dead(kmsg(dbz_value(dbz_payload("c", '{"_id": 1, '))), Reason.CORRUPTED_DATA, "payload.after")


@pytest.mark.parametrize(
    ("after", "path"),
    [
        (ej({"_id": {"$oid": OID}, "ref": {"$oid": "nothex"}}), "payload.after.ref"),
        ('{"_id": 1, "n": {"$numberLong": "abc"}}', "payload.after.n"),
        ('{"_id": 1, "when": [{"$date": "not a date"}]}', "payload.after.when[0]"),
        ('{"_id": 1, "b": {"$binary": {"base64": "***", "subType": "00"}}}', "payload.after.b"),
        (ej({"_id": 1, "x": {"$oid": OID, "extra": 1}}), "payload.after.x"),
        ('{"_id": {"$date": {"$numberLong": "99999999999999999999"}}}', "payload.after._id"),
    ],
)
def test_debezium_invalid_bson(after: str, path: str) -> None:
    dl = dead(kmsg(dbz_value(dbz_payload("c", after))), Reason.INVALID_BSON, path)
    assert dl.metadata["path"] == path


@pytest.mark.parametrize(
    ("after", "fragment"),
    [
        (ej({"_id": {"$oid": OID}, "a\x00b": 2}), "NUL"),
        (ej({"_id": {"$oid": OID}, "a": {"b\x00": 2}}), "NUL"),
        (ej({"_id": {"$oid": OID}, "a": [{"b": [{"c\x00": 1}]}]}), "NUL"),
        ('{"_id": 1, "n": 9223372036854775808}', "past int64"),
        ('{"_id": 1, "a": {"b": [18446744073709551615]}}', "past int64"),
    ],
)
def test_what_bson_cannot_hold_is_invalid_bson(after: str, fragment: str) -> None:
    """NUL in any field name (BSON keys are C strings) and integers past int64, at any depth."""
    dead(kmsg(dbz_value(dbz_payload("c", after))), Reason.INVALID_BSON, fragment)


def test_the_widest_int64_and_a_long_digit_string_are_fine() -> None:
    after = ej({"_id": {"$oid": OID}, "n": 2**63 - 1, "s": "9" * 20, "m": -(2**63)})
    ev = parse(kmsg(dbz_value(dbz_payload("c", after))))
    assert isinstance(ev, ChangeEvent)
    assert ev.doc == {"_id": OID, "n": 2**63 - 1, "s": "9" * 20, "m": -(2**63)}


# --- MongoDB Kafka source connector

CS_ID = {"_data": "8265A1F0C2000000032B022C0100296E5A1004AB12CD34EF56789046645F696400"}


def change(op: str, **fields: Any) -> dict:
    doc = {
        "_id": CS_ID,
        "operationType": op,
        "clusterTime": {"$timestamp": {"t": TS, "i": 5}},
        "wallTime": {"$date": "2024-01-13T02:00:34.017Z"},
        "ns": {"db": "shop", "coll": "orders"},
        "documentKey": {"_id": {"$oid": OID}},
    }
    doc.update(fields)
    return doc


ORDER = {
    "_id": {"$oid": OID},
    "status": "paid",
    "total": {"$numberDecimal": "99.90"},
    "qty": {"$numberInt": "3"},
    "placed": {"$date": {"$numberLong": "1705111234017"}},
    "buyer": {
        "id": {"$oid": OID2},
        "uuid": {"$binary": {"base64": "yO2rw/c4TKO2jauSqRR4ow==", "subType": "04"}},
    },
}
ORDER_DECODED = {
    "_id": OID,
    "status": "paid",
    "total": Decimal128("99.90"),
    "qty": 3,
    "placed": datetime(2024, 1, 13, 2, 0, 34, 17000, tzinfo=UTC),
    "buyer": {"id": OID2, "uuid": Uuid("c8edabc3-f738-4ca3-b68d-ab92a91478a3")},
}
CS_TOPIC = "mongo.shop.orders"


def cs_msg(doc: Any, **kw: Any) -> KafkaSourceMessage:
    kw.setdefault("topic", CS_TOPIC)
    key = orjson.dumps({"_id": CS_ID})  # the connector keys by resume token
    return kmsg(doc if isinstance(doc, bytes) else orjson.dumps(doc), key, **kw)


@pytest.mark.parametrize(
    ("op", "expected"), [("insert", "insert"), ("replace", "replace"), ("update", "update")]
)
def test_change_stream_with_full_document(op: str, expected: str) -> None:
    ev = ok(cs_msg(change(op, fullDocument=ORDER)))
    assert (ev.op, ev.db, ev.collection, ev.id) == (expected, "shop", "orders", OID)
    assert ev.doc == ORDER_DECODED
    assert (ev.ts_ms, ev.ord) == (TS * 1000, 5)


def test_change_stream_partial_update() -> None:
    ud = {
        "updatedFields": {"status": "shipped", "shipped_at": {"$date": "2024-01-14T00:00:00Z"}},
        "removedFields": ["coupon"],
        "truncatedArrays": [],
    }
    ev = ok(cs_msg(change("update", updateDescription=ud)))
    assert ev.is_partial and ev.id == OID
    assert ev.updated == {"status": "shipped", "shipped_at": datetime(2024, 1, 14, tzinfo=UTC)}
    assert ev.removed == ("coupon",)


def test_change_stream_update_with_null_full_document_falls_back_to_the_description() -> None:
    ud = {"updatedFields": {"status": "x"}, "removedFields": []}
    ev = ok(cs_msg(change("update", fullDocument=None, updateDescription=ud)))
    assert ev.is_partial and ev.updated == {"status": "x"}


def test_change_stream_dotted_field_names_resolved_by_disambiguated_paths() -> None:
    ud = {
        "updatedFields": {"price.usd": 10, "items.0": "x"},
        "removedFields": [],
        "disambiguatedPaths": {"price.usd": ["price.usd"], "items.0": ["items", 0]},
    }
    ev = ok(cs_msg(change("update", updateDescription=ud)))
    assert ev.change is not None
    after = ev.change.apply({"_id": OID, "price": {"usd": 1}, "items": ["a", "b"]})
    assert after == {"_id": OID, "price": {"usd": 1}, "price.usd": 10, "items": ["x", "b"]}
    del ud["updatedFields"]["items.0"]
    assert ok(cs_msg(change("update", updateDescription=ud))).updated == {"price.usd": 10}


@pytest.mark.parametrize(
    ("ud", "expected"),
    [
        ({"updatedFields": {"buyer.id": "x"}, "removedFields": []}, {"buyer": {"id": "x", "uuid": "u"}}),
        ({"updatedFields": {}, "removedFields": ["buyer.uuid"]}, {"buyer": {"id": "b"}}),
        ({"updatedFields": {"lines.3": 4}, "removedFields": []}, {"lines": [1, 2, 3, 4]}),
        ({"updatedFields": {"lines.5": 6}, "removedFields": []}, {"lines": [1, 2, 3, None, None, 6]}),
        ({"updatedFields": {}, "removedFields": ["lines.0"]}, {"lines": [None, 2, 3]}),
        ({"updatedFields": {"new.deep": 1}, "removedFields": []}, {"new": {"deep": 1}}),
        (
            {
                "updatedFields": {"lines.1": 9},
                "removedFields": [],
                "truncatedArrays": [{"field": "lines", "newSize": 2}],
            },
            {"lines": [1, 9]},
        ),
    ],
)
def test_change_stream_update_inside_fields_applies_as_mongodb_does(ud: dict, expected: dict) -> None:
    ev = ok(cs_msg(change("update", updateDescription=ud)))
    assert ev.is_partial and ev.change is not None
    stored = {"_id": OID, "buyer": {"id": "b", "uuid": "u"}, "lines": [1, 2, 3]}
    after = ev.change.apply(stored)
    assert {k: after.get(k) for k in expected} == expected


def test_change_stream_update_through_a_scalar_is_refused_where_it_is_applied() -> None:
    ev = ok(cs_msg(change("update", updateDescription={"updatedFields": {"qty.n": 1}, "removedFields": []})))
    with pytest.raises(BadData, match="qty.n"):
        ev.change.apply({"_id": OID, "qty": 3})


def test_change_stream_update_with_a_pre_image_is_the_whole_document() -> None:
    ud = {"updatedFields": {"buyer.id": "x"}, "removedFields": ["note"]}
    before = {"_id": {"$oid": OID}, "buyer": {"id": "b"}, "note": "n", "qty": 1}
    ev = ok(cs_msg(change("update", updateDescription=ud, fullDocumentBeforeChange=before)))
    assert not ev.is_partial and ev.doc == {"_id": OID, "buyer": {"id": "x"}, "qty": 1}


def test_change_stream_delete() -> None:
    ev = ok(cs_msg(change("delete")))
    assert ev.op == "delete" and ev.doc is None and ev.id == OID


def test_change_stream_as_a_json_string() -> None:
    doc = change("insert", fullDocument=ORDER)
    ev = ok(cs_msg(orjson.dumps(orjson.dumps(doc).decode())))
    assert ev.doc == ORDER_DECODED


def test_change_stream_schema_wrapped_string() -> None:
    doc = change("insert", fullDocument=ORDER)
    value = orjson.dumps(
        {"schema": {"type": "string", "optional": False}, "payload": orjson.dumps(doc).decode()}
    )
    assert ok(cs_msg(value)).doc == ORDER_DECODED


def test_change_stream_schema_output_with_string_fields() -> None:
    # output.format.value=schema: fullDocument, documentKey and clusterTime are Extended JSON strings.
    payload = {
        "_id": orjson.dumps(CS_ID).decode(),
        "operationType": "update",
        "fullDocument": None,
        "ns": {"db": "shop", "coll": "orders"},
        "to": None,
        "documentKey": ej({"_id": {"$oid": OID}}),
        "updateDescription": {
            "updatedFields": '{"qty": {"$numberInt": "4"}}',
            "removedFields": ["note"],
            "truncatedArrays": None,
        },
        "clusterTime": ej({"$timestamp": {"t": TS, "i": 9}}),
        "txnNumber": None,
        "lsid": None,
    }
    value = orjson.dumps(
        {"schema": {"type": "struct", "fields": [], "name": "ChangeStream"}, "payload": payload}
    )
    ev = ok(cs_msg(value))
    assert (ev.id, ev.updated, ev.removed, ev.ord) == (OID, {"qty": 4}, ("note",), 9)


def test_change_stream_without_cluster_time_uses_the_kafka_timestamp() -> None:
    doc = change("insert", fullDocument=ORDER)
    del doc["clusterTime"]
    ev = ok(cs_msg(doc))
    assert (ev.ts_ms, ev.ord) == (TS * 1000 + 999, 0)


@pytest.mark.parametrize(
    ("doc", "fragment"),
    [
        (change("rename"), "rename without `to`"),
        (change("rename", to={"db": "a/b", "coll": "x"}), "rename target: invalid database"),
        (change("shuffle"), "'shuffle' is not a change this pipeline knows"),
        (change("insert"), "insert without fullDocument"),
        (change("update"), "update without fullDocument or updateDescription"),
        (change("insert", fullDocument=ORDER, ns=None), "ns is missing"),
        (change("insert", fullDocument=ORDER, ns={"db": "shop"}), "ns.coll is missing"),
        (change("insert", fullDocument=ORDER, operationType=1), "operationType must be a string"),
        (change("insert", fullDocument=ORDER, clusterTime=5), "clusterTime must be a $timestamp"),
        (change("insert", fullDocument=[1]), "fullDocument must be a document"),
        (change("delete", documentKey={}), "documentKey._id is missing"),
        (change("insert", fullDocument=ORDER, documentKey={"_id": {"$oid": OID2}}), "disagrees"),
        (change("insert", fullDocument=ORDER, ns={"db": "shop", "coll": "a$b"}), "invalid collection"),
    ],
)
def test_change_stream_schema_failures(doc: dict, fragment: str) -> None:
    dead(cs_msg(doc), Reason.SCHEMA_VALIDATION_FAILED, fragment)


def test_change_stream_ddl_events() -> None:
    drop = ok(cs_msg(change("drop", documentKey=None)))
    assert (drop.op, drop.table, drop.id, drop.doc) == ("drop", "shop.orders", "", None)
    assert drop.seq == (TS << 31) | 5
    rename = ok(cs_msg(change("rename", documentKey=None, to={"db": "shop", "coll": "orders2"})))
    assert (rename.op, rename.target) == ("rename", ("shop", "orders2"))
    gone = ok(cs_msg(change("dropDatabase", documentKey=None, ns={"db": "shop"})))
    assert (gone.op, gone.db, gone.collection) == ("drop", "shop", "")
    invalidate = {
        "_id": CS_ID,
        "operationType": "invalidate",
        "clusterTime": {"$timestamp": {"t": 1, "i": 1}},
    }
    assert parse(cs_msg(invalidate)) == events.INVALIDATE
    assert parse(cs_msg(change("createIndexes", documentKey=None))) == events.DDL


def test_change_stream_invalid_bson() -> None:
    dl = dead(
        cs_msg(change("insert", fullDocument={**ORDER, "qty": {"$numberInt": "3.5"}})), Reason.INVALID_BSON
    )
    assert dl.metadata["path"] == "fullDocument.qty"
    bad_ct = change("delete", clusterTime={"$timestamp": {"t": -1, "i": 0}})
    assert dead(cs_msg(bad_ct), Reason.INVALID_BSON).metadata["path"] == "clusterTime"


# --- publish.full.document.only


def test_full_document_only_is_a_replace_named_by_the_topic() -> None:
    # The connector's default topic is <db>.<collection> (empty topic.prefix); a collection may hold dots.
    ev = ok(cs_msg(ORDER, topic="shop.orders"))
    assert (ev.op, ev.db, ev.collection, ev.id, ev.doc) == ("replace", "shop", "orders", OID, ORDER_DECODED)
    assert (ev.ts_ms, ev.ord, ev.seq) == (TS * 1000 + 999, 0, None)  # no source clock: offsets order it
    ev = ok(cs_msg(ORDER, topic="Tutorial1.fs.files"))
    assert (ev.db, ev.collection) == ("Tutorial1", "fs.files")


def test_full_document_only_relaxed_without_wrappers() -> None:
    ev = ok(cs_msg({"_id": 17, "name": "plain"}, topic="shop.orders", timestamp=(0, -1)))
    assert (ev.db, ev.collection, ev.id, ev.doc, ev.ts_ms) == (
        "shop",
        "orders",
        "17",
        {"_id": 17, "name": "plain"},
        0,
    )


@pytest.mark.parametrize("topic", ["orders", None])
def test_full_document_only_on_a_topic_no_rule_fits_stops_the_pipeline(topic: str | None) -> None:
    with pytest.raises(ConfigError, match="CDC_TOPIC_TABLE"):
        parse(cs_msg(ORDER, topic=topic))


def test_topic_rule_from_a_regex_or_a_map() -> None:
    regex = Decoder(tables=TopicTables(regex=r"marketdata\.(?P<db>[^.]+)\.(?P<collection>.+)\.v1"))
    ev = regex.parse(cs_msg(ORDER, topic="marketdata.Stocks.PriceData.v1"))
    assert (ev.db, ev.collection) == ("Stocks", "PriceData")
    mapped = Decoder(tables=TopicTables({"routed": "shop.orders"}))
    assert mapped.parse(cs_msg(ORDER, topic="routed")).table == "shop.orders"


# --- corrupted, oversized, unexpected


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (b"\xff\xfe\x00garbage", "not valid UTF-8"),
        (b'{"op": "c", "after": "\xc3\x28"}', "not valid UTF-8"),
        (b"{not json", "not valid JSON"),
        (b"[1, 2, 3]", "array, not an object"),
        (b"42", "number, not an object"),
        (b"null", "null, not an object"),
        (b'"not json inside"', "not valid JSON"),
        (b'{"hello": "world"}', "not a recognisable change event envelope"),
        (orjson.dumps({"schema": {}, "payload": "{broken"}), "value.payload is not valid JSON"),
        (orjson.dumps({"schema": {}, "payload": [1]}), "array, not an object"),
    ],
)
def test_corrupted_data(value: bytes, fragment: str) -> None:
    dead(kmsg(value), Reason.CORRUPTED_DATA, fragment)


def test_oversized_is_checked_before_parsing() -> None:
    value = dbz_value(dbz_payload("c", CUSTOMER_RELAXED))
    dl = dead(kmsg(value), Reason.OVERSIZED_DOCUMENT, str(len(value)), max_bytes=len(value) - 1)
    assert "limit is" in dl.error
    assert isinstance(parse(kmsg(value), max_bytes=len(value)), ChangeEvent)
    dead(kmsg(b"x" * 100), Reason.OVERSIZED_DOCUMENT, max_bytes=10)  # not even JSON: size wins


def test_a_value_no_kafka_message_has_is_our_bug_and_raises() -> None:
    with pytest.raises(TypeError):
        parse(KafkaSourceMessage(key=b"k", value=12345, topic=TOPIC, partition=0, offset=1))
    text = orjson.dumps(orjson.loads(dbz_value(dbz_payload("c", CUSTOMER_RELAXED)))).decode()
    assert isinstance(parse(KafkaSourceMessage(key=OID_KEY, value=text, topic=TOPIC)), ChangeEvent)


class _ExplodingMessage:
    key = b"k"
    topic = TOPIC
    partition = 1
    offset = 9
    timestamp = None

    @property
    def value(self) -> bytes:
        raise RuntimeError("broker gave us something odd")


def test_an_unexpected_exception_is_not_dead_lettered_but_raised() -> None:
    with pytest.raises(RuntimeError, match="broker gave us something odd"):
        parse(_ExplodingMessage())  # type: ignore[arg-type]


def test_message_without_kafka_metadata() -> None:
    msg = KafkaSourceMessage(key=None, value=b"[]")
    dl = parse(msg)
    assert isinstance(dl, DeadLetter) and (dl.topic, dl.partition, dl.offset) == ("", -1, -1)


# --- a real bytewax dataflow


def test_parse_in_a_bytewax_dataflow() -> None:
    good = [
        kmsg(dbz_value(dbz_payload("c", CUSTOMER_CANONICAL))),
        kmsg(dbz_value(dbz_payload("d", None), schema=False)),
        cs_msg(change("insert", fullDocument=ORDER)),
        cs_msg(ORDER),
    ]
    bad_values = [
        b"\xff",
        b"[]",
        dbz_value(dbz_payload("x", None)),
        dbz_value(dbz_payload("c", '{"_id": {"$oid": 1}}')),
    ]
    bad = [kmsg(v) for v in bad_values]
    tombstones = [kmsg(None), kmsg(b"")]
    inputs = [
        KafkaSourceMessage(
            key=m.key, value=m.value, topic=m.topic, partition=0, offset=i, timestamp=m.timestamp
        )
        for i, m in enumerate(good + bad + tombstones)
    ]

    flow = Dataflow("parse-test")
    stream = op.input("in", flow, TestingSource(inputs))
    parsed = op.filter("skip", op.map("parse", stream, parse), lambda x: not isinstance(x, events.Skipped))
    split = op.branch("ok", parsed, lambda x: isinstance(x, ChangeEvent))
    out_good: list[ChangeEvent] = []
    out_bad: list[DeadLetter] = []
    op.output("good", split.trues, TestingSink(out_good))
    op.output("bad", split.falses, TestingSink(out_bad))
    run_main(flow)

    assert sorted(e.offset for e in out_good) == list(range(len(good)))
    assert sorted(d.offset for d in out_bad) == list(range(len(good), len(good) + len(bad)))
    assert {d.value for d in out_bad} == set(bad_values)


# --- properties: parse never raises, and a dead letter keeps the bytes


def _check_total(msg: KafkaSourceMessage) -> None:
    out = parse(msg)
    assert isinstance(out, ChangeEvent | DeadLetter | events.Skipped)
    if not msg.value and isinstance(out, ChangeEvent):
        assert out.op == "delete"
    if isinstance(out, DeadLetter):
        assert out.key is msg.key and out.value is msg.value
        assert isinstance(out.reason, Reason) and out.error
        out.to_json()


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200), st.none() | st.binary(max_size=30))
def test_parse_never_raises_on_arbitrary_bytes(value: bytes, key: bytes | None) -> None:
    _check_total(kmsg(value, key))


_ENVELOPE_KEYS = [
    "schema", "payload", "op", "after", "source", "db", "collection", "ts_ms", "ord", "updateDescription",
    "updatedFields", "removedFields", "truncatedArrays", "patch", "filter", "id", "_id", "operationType",
    "fullDocument", "documentKey", "ns", "coll", "clusterTime", "$timestamp", "t", "i", "$oid", "$date",
    "$numberLong", "$binary", "$set", "$unset", "$v", "diff",
]  # fmt: skip
_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(blacklist_categories=["Cs"]), max_size=10)
    | st.sampled_from(["c", "u", "d", "r", "insert", "update", "delete", OID, '{"_id": 1}', "{}", "1"]),
    lambda kids: (
        st.lists(kids, max_size=4)
        | st.dictionaries(st.sampled_from(_ENVELOPE_KEYS) | st.text(max_size=4), kids, max_size=5)
    ),
    max_leaves=25,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_json_values, st.none() | _json_values.map(orjson.dumps))
def test_parse_never_raises_on_arbitrary_json(value: Any, key: bytes | None) -> None:
    _check_total(kmsg(orjson.dumps(value), key))


VALID = [
    dbz_value(dbz_payload("c", CUSTOMER_CANONICAL)),
    dbz_value(
        dbz_payload("u", None, updateDescription={"updatedFields": '{"a": 1}', "removedFields": ["b"]})
    ),
    dbz_value(dbz_payload("d", None), schema=False),
    legacy_update('{"$v": 1, "$set": {"visits": {"$numberInt": "14"}}, "$unset": {"email": true}}'),
    orjson.dumps(change("insert", fullDocument=ORDER)),
    orjson.dumps(
        change("update", updateDescription={"updatedFields": {"a": {"$oid": OID}}, "removedFields": []})
    ),
    orjson.dumps(ORDER),
]


def _paths(node: Any, path: tuple = ()) -> list[tuple]:
    """Every path in a JSON tree, descending into strings that hold JSON documents too."""
    out = [path]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*path, i))
    elif isinstance(node, str) and node[:1] in "{[":
        with contextlib.suppress(orjson.JSONDecodeError):
            out += _paths(orjson.loads(node), (*path, "<json>"))
    return out


def _replace(node: Any, path: tuple, new: Any) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if head == "<json>":
        return orjson.dumps(_replace(orjson.loads(node), rest, new)).decode()
    if new is _DELETE and not rest:
        if isinstance(node, dict):
            return {k: v for k, v in node.items() if k != head}
        return node[:head] + node[head + 1 :]
    copy = dict(node) if isinstance(node, dict) else list(node)
    copy[head] = _replace(node[head], rest, new)
    return copy


_DELETE = object()


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_parse_never_raises_on_mutated_envelopes(data: st.DataObject) -> None:
    value = data.draw(st.sampled_from(VALID))
    key = data.draw(st.sampled_from([OID_KEY, None, dbz_key("1", schema=False), b"\xff"]))
    if data.draw(st.booleans()):  # structural mutation, inner Extended JSON strings included
        tree = orjson.loads(value)
        path = data.draw(st.sampled_from(_paths(tree)))
        deletable = bool(path) and path[-1] != "<json>"
        new = data.draw(st.just(_DELETE) | _json_values) if deletable else data.draw(_json_values)
        mutated = orjson.dumps(_replace(tree, path, new))
    else:  # byte-level mutation
        start = data.draw(st.integers(0, len(value)))
        end = data.draw(st.integers(start, min(len(value), start + 8)))
        mutated = value[:start] + data.draw(st.binary(max_size=8)) + value[end:]
    _check_total(kmsg(mutated, key))


def test_valid_fixtures_are_valid() -> None:
    decoder = Decoder(tables=TopicTables({TOPIC: "*"}))  # the fixtures name several namespaces
    for value in VALID:
        assert isinstance(decoder.parse(kmsg(value)), ChangeEvent)


def test_default_max_bytes() -> None:
    assert events.DEFAULT_MAX_BYTES == 16 * 1024 * 1024


# --- a message may only write to a table its topic carries


def _ns_msg(topic: str, db: str, coll: str) -> KafkaSourceMessage:
    payload = dbz_payload("c", ej({"_id": {"$oid": OID}, "x": 1}))
    payload["source"] = {**payload["source"], "db": db, "collection": coll}
    return kmsg(dbz_value(payload), topic=topic)


@pytest.mark.parametrize(
    ("topic", "db", "coll", "tables"),
    [
        ("dbserver1.inventory.customers", "inventory", "customers", {}),
        ("prod.eu.cdc.inventory.customers", "inventory", "customers", {}),  # a prefix with dots
        ("inventory.customers", "inventory", "customers", {}),
        ("all-changes", "shop", "orders", {"all-changes": "*"}),
        ("shop-changes", "shop", "orders", {"shop-changes": "shop.*"}),
        ("orders-topic", "shop", "orders", {"orders-topic": "shop.orders"}),
    ],
)
def test_a_namespace_its_topic_carries_is_taken(topic: str, db: str, coll: str, tables: dict) -> None:
    ev = Decoder(tables=TopicTables(tables)).parse(_ns_msg(topic, db, coll))
    assert isinstance(ev, ChangeEvent) and ev.table == f"{db}.{coll}"


@pytest.mark.parametrize(
    ("topic", "db", "coll", "tables", "feeds"),
    [
        ("dbserver1.inventory.customers", "shop", "orders", {}, "[<prefix>.]shop.orders"),
        ("dbserver1.inventory.customers", "inventory", "orders", {}, "[<prefix>.]inventory.orders"),
        ("shop-changes", "billing", "orders", {"shop-changes": "shop.*"}, "shop.*"),
        ("orders-topic", "shop", "users", {"orders-topic": "shop.orders"}, "shop.orders"),
    ],
)
def test_a_namespace_its_topic_does_not_carry_is_dead_lettered_naming_both(
    topic: str, db: str, coll: str, tables: dict, feeds: str
) -> None:
    """A replayed or injected message cannot write to another table than its topic's."""
    dl = Decoder(tables=TopicTables(tables)).parse(_ns_msg(topic, db, coll))
    assert isinstance(dl, DeadLetter) and dl.reason is Reason.SCHEMA_VALIDATION_FAILED
    assert f"{db}.{coll}" in dl.error and repr(topic) in dl.error and feeds in dl.error, dl.error
