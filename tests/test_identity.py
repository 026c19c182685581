"""Which `_id`s are one document: MongoDB's equality, not the readable text of the `_id`."""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path

import orjson
import pytest
from bson.decimal128 import Decimal128
from bytewax.connectors.kafka import KafkaSourceMessage
from deltalake import DeltaTable
from hypothesis import given, settings
from hypothesis import strategies as st

from dataflow.decode.envelopes import Decoder, parse
from dataflow.decode.formats import Format
from dataflow.decode.identity import id_key
from dataflow.lake.columns import Layout
from dataflow.lake.documents import read_documents
from dataflow.lake.writer import DeltaTableWriter
from dataflow.model import Binary, ChangeEvent, DateMs, DeadLetter, ExtValue, ObjectId, Reason, Uuid

OID = "65a1f0c2e4b0a1b2c3d4e5f6"
UUID = "c8edabc3-f738-4ca3-b68d-ab92a91478a3"

# Each group holds _ids MongoDB finds equal; no two groups are equal.
EQUAL = [
    [42, 42.0, Decimal128("42"), Decimal128("42.0"), Decimal128("4.2E+1")],
    ["42"],
    [None],
    ["null"],
    [ObjectId(OID)],
    [OID],
    [0, -0.0, 0.0, Decimal128("-0"), Decimal128("0E+3")],
    [float("nan"), Decimal128("NaN")],
    [0.1],
    [Decimal128("0.1")],
    [2**63 - 1],
    [float(2**63 - 1)],  # the double nearest, 2**63: another number
    [True],
    [1],
    [ExtValue({"$symbol": "a"}), "a"],  # MongoDB compares symbols as strings
    [b"\x01"],
    [Binary(b"\x01", 0x80)],
    [Uuid(UUID), Binary(bytes.fromhex(UUID.replace("-", "")), 4)],
    [datetime(2024, 1, 2, tzinfo=UTC), date(2024, 1, 2)],
    [ExtValue({"$regularExpression": {"pattern": "a", "options": "i"}})],
    [ExtValue({"$code": "x"})],
    [ExtValue({"$code": "x", "$scope": {"d": datetime(2024, 1, 2, tzinfo=UTC)}})],
    [ExtValue({"$minKey": 1})],
    [ExtValue({"$maxKey": 1})],
    [ExtValue({"$undefined": True})],
    [DateMs(253_402_300_800_000)],
    [{"a": 1, "b": 2}, {"a": 1.0, "b": Decimal128("2")}],
    [{"b": 2, "a": 1}],  # field order matters in MongoDB
    [{"a": "1", "b": 2}],
]


def test_equal_ids_share_a_key_and_others_never_do() -> None:
    keys = [{id_key(v) for v in group} for group in EQUAL]
    assert all(len(k) == 1 for k in keys), keys
    flat = [next(iter(k)) for k in keys]
    assert len(set(flat)) == len(flat), flat


@settings(max_examples=300, deadline=None)
@given(st.integers(-(2**63), 2**63 - 1))
def test_an_integer_and_its_double_and_decimal_share_a_key_exactly_when_equal(n: int) -> None:
    f = float(n)
    assert (id_key(n) == id_key(f)) == (int(f) == n)
    assert id_key(n) == id_key(Decimal128(str(n)))


@settings(max_examples=300, deadline=None)
@given(st.floats(allow_nan=False))
def test_a_double_and_its_decimal_text_share_a_key_only_when_exact(f: float) -> None:
    text = repr(f)
    exact = float(Decimal128(text).to_decimal()) == f
    same = id_key(f) == id_key(Decimal128(text))
    if same:
        assert exact
    if f.is_integer() and abs(f) < 1e15:
        assert same


# --- through the parse step and a mirror


def _bare(doc: str, offset: int) -> KafkaSourceMessage:
    """The MongoDB connector's `publish.full.document.only` message of a document."""
    return KafkaSourceMessage(
        key=None,
        value=doc.encode(),
        topic="shop.things",
        partition=0,
        offset=offset,
        timestamp=(1, 1_700_000_000_000),
    )


def test_distinct_ids_are_distinct_rows_and_equal_ids_one(tmp_path: Path) -> None:
    decoder = Decoder(format=Format.MONGODB_FULL_DOCUMENT_ONLY)
    docs = [
        '{"_id": 42, "v": "int"}',
        '{"_id": "42", "v": "string"}',
        '{"_id": null, "v": "null"}',
        '{"_id": "null", "v": "string null"}',
        f'{{"_id": {{"$oid": "{OID}"}}, "v": "objectid"}}',
        f'{{"_id": "{OID}", "v": "hex string"}}',
        '{"_id": {"$numberLong": "42"}, "v": "long"}',
        '{"_id": {"$numberDouble": "42.0"}, "v": "double"}',
        '{"_id": {"$numberDecimal": "42.0"}, "v": "decimal"}',
        '{"_id": {"a": 1}, "v": "doc"}',
        '{"_id": {"a": {"$numberDouble": "1.0"}}, "v": "same doc"}',
    ]
    events = [decoder.parse(_bare(d, n)) for n, d in enumerate(docs)]
    assert all(isinstance(e, ChangeEvent) for e in events), events
    uri = str(tmp_path / "shop" / "things")
    for batch in ([events], [[e] for e in events]):  # one batch, and a batch per change
        w = DeltaTableWriter(uri + str(len(batch)), mode="merge")
        for b in batch:
            w.write(b)
        dt = DeltaTable(uri + str(len(batch)))
        rows = {r["_key"]: (r["_id"], r["v"]) for r in dt.to_pyarrow_table().to_pylist()}
        assert rows == {
            # 42, NumberLong(42), 42.0 and Decimal128 42.0: one document, `_id` as the last change wrote it
            "n:42": ("42.0", "decimal"),
            "s:42": ("42", "string"),
            "z:null": ("null", "null"),
            "s:null": ("null", "string null"),
            "o:" + OID: (OID, "objectid"),
            "s:" + OID: (OID, "hex string"),
            '{"a":n:1}': ('{"a":1.0}', "same doc"),
        }
        by_key = read_documents(dt, Layout.from_schema(dt.schema().to_arrow(), {}), by="_key")
        assert by_key["s:42"]["v"] == "string" and by_key["n:42"]["v"] == "decimal"


def _dbz(after: str, key_id: str) -> KafkaSourceMessage:
    source = {"db": "shop", "collection": "things", "ts_ms": 1_700_000_000_000, "ord": 1}
    value = orjson.dumps({"op": "c", "after": after, "source": source, "ts_ms": 1_700_000_000_000})
    key = orjson.dumps({"id": key_id})
    return KafkaSourceMessage(
        key=key, value=value, topic="dbz.shop.things", partition=0, offset=1, timestamp=(1, 0)
    )


@pytest.mark.parametrize(
    ("after", "key_id"),
    [
        ('{"_id": "abcdefghijklmn"}', '"abcdefghijklmn-and-more"'),  # the _id's text is in the key
        ('{"_id": "abcdefabcdef"}', '{"$oid": "abcdefabcdef000000000000"}'),
        (f'{{"_id": "{OID}"}}', f'{{"$oid": "{OID}"}}'),  # a string in the document, an ObjectId in the key
        (f'{{"_id": {{"$oid": "{OID}"}}}}', f'"{OID}"'),
        ('{"_id": 42}', '"42"'),
        ('{"_id": null}', '"null"'),
    ],
)
def test_a_key_naming_another_id_is_refused(after: str, key_id: str) -> None:
    for fast in (True, False):
        dl = parse(_dbz(after, key_id), fast=fast)
        assert isinstance(dl, DeadLetter), dl
        assert dl.reason is Reason.SCHEMA_VALIDATION_FAILED and "disagrees" in dl.error


@pytest.mark.parametrize(
    ("after", "key_id"),
    [
        ('{"_id": "abcdefghijklmn"}', '"abcdefghijklmn"'),
        (f'{{"_id": {{"$oid": "{OID}"}}}}', f'{{"$oid": "{OID.upper()}"}}'),
        ('{"_id": 42}', '{"$numberLong": "42"}'),
        ('{"_id": 42}', "42.0"),
    ],
)
def test_a_key_naming_an_equal_id_is_taken(after: str, key_id: str) -> None:
    for fast in (True, False):
        assert isinstance(parse(_dbz(after, key_id), fast=fast), ChangeEvent)


def test_a_mirror_written_before_typed_keys_stops_the_pipeline(tmp_path: Path) -> None:
    """Its `_id` text cannot say whether "42" was a number: guessing would duplicate documents."""
    import pyarrow as pa
    from deltalake import write_deltalake

    from dataflow.runtime.failures import ConfigError

    uri = str(tmp_path / "old")
    legacy = pa.table({"_id": ["42"], "_seq": pa.array([1], pa.int64()), "v": ["x"]})
    DeltaTable.create(uri, legacy.schema, configuration={"cdc.mode": "merge"}, raise_if_key_not_exists=False)
    write_deltalake(uri, legacy, mode="append")
    ev = ChangeEvent("shop", "old", "42", "insert", {"_id": 42, "v": "y"}, 1, 0, "t", 0, 0, 1, key="n:42")
    with pytest.raises(ConfigError, match="typed _id keys"):
        DeltaTableWriter(uri, mode="merge").write([ev])
