"""Extended JSON decoding: every BSON type in v1 and v2, canonical and relaxed."""

from __future__ import annotations

import base64
import copy
import uuid
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from bson.decimal128 import Decimal128
from hypothesis import given, settings
from hypothesis import strategies as st

from dataflow.decode import extjson
from dataflow.decode.extjson import InvalidBson, decode, id_text, loads
from dataflow.model import Binary, BsonTimestamp, DateMs, ExtValue, ObjectId, Uuid

OID = "5f1e2d3c4b5a69788796a5b4"
UUID = "c8edabc3-f738-4ca3-b68d-ab92a91478a3"
UUID_B64 = base64.b64encode(uuid.UUID(UUID).bytes).decode()
DT = datetime(2020, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
DT_MS = 1577934245678


def one(wrapper: object) -> object:
    """Decode a value through both entry points and check they agree."""
    via_text = loads(orjson.dumps(wrapper))
    via_value = decode(orjson.loads(orjson.dumps(wrapper)))
    assert via_text == via_value or (via_text != via_text and via_value != via_value)
    return via_text


def bad(wrapper: object) -> InvalidBson:
    with pytest.raises(InvalidBson) as info:
        loads(orjson.dumps({"f": wrapper}))
    assert info.value.path == "f"
    return info.value


# --- ObjectId


def test_oid() -> None:
    assert one({"$oid": OID}) == OID
    assert one({"$oid": OID.upper()}) == OID


@pytest.mark.parametrize("v", [5, None, "x" * 24, OID[:-1], OID + "0", "g" * 24, " " + OID[1:], ["a"]])
def test_oid_malformed(v: object) -> None:
    assert "$oid" in str(bad({"$oid": v}))


# --- dates


@pytest.mark.parametrize(
    "wrapper",
    [
        {"$date": "2020-01-02T03:04:05.678Z"},  # v2 relaxed
        {"$date": "2020-01-02T04:04:05.678+01:00"},  # relaxed with an offset
        {"$date": "2020-01-02T03:04:05.678"},  # no offset: UTC
        {"$date": {"$numberLong": str(DT_MS)}},  # v2 canonical
        {"$date": DT_MS},  # v1
    ],
)
def test_date(wrapper: object) -> None:
    got = one(wrapper)
    assert got == DT
    assert got.tzinfo is UTC


def test_date_before_epoch_and_extremes() -> None:
    assert one({"$date": {"$numberLong": "-1"}}) == datetime(1969, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)
    assert one({"$date": -62135596800000}) == datetime(1, 1, 1, tzinfo=UTC)
    assert one({"$date": {"$numberLong": "253402300799999"}}).year == 9999


@pytest.mark.parametrize(
    ("wrapper", "ms"),
    [
        ({"$numberLong": "253402300800000"}, 253402300800000),  # year 10000
        (-62135596800001, -62135596800001),  # year 0
        ({"$numberLong": "9223372036854775807"}, 2**63 - 1),
        ({"$numberLong": "-9223372036854775808"}, -(2**63)),
        ("0001-01-01T00:00:00+01:00", -62135596800000 - 3_600_000),  # before year 1 in UTC
    ],
)
def test_the_whole_bson_date_range(wrapper: object, ms: int) -> None:
    """BSON dates are int64 milliseconds; those datetime cannot hold are `DateMs`, never refused."""
    assert one({"$date": wrapper}) == DateMs(ms)


@pytest.mark.parametrize(
    "v",
    [
        "not a date",
        "",
        {"$numberLong": "abc"},
        {"$numberLong": "1", "x": 1},
        {"$numberInt": "1"},
        True,
        1.5,
        None,
        {"$numberLong": "9223372036854775808"},
        2**63,
        "2020-01-01T00:00:00.0001Z",  # finer than BSON's milliseconds
        "2020-01-01",
    ],
)
def test_date_malformed_or_out_of_range(v: object) -> None:
    assert "$date" in str(bad({"$date": v}))


# --- numbers


def test_int32_int64() -> None:
    assert one({"$numberInt": "42"}) == 42
    assert one({"$numberInt": "-2147483648"}) == -(2**31)
    assert one({"$numberLong": "9223372036854775807"}) == 2**63 - 1
    assert one({"$numberLong": "-9223372036854775808"}) == -(2**63)
    assert type(one({"$numberInt": "1"})) is int
    assert one(42) == 42  # relaxed


@pytest.mark.parametrize(
    "wrapper",
    [
        {"$numberInt": "2147483648"},
        {"$numberInt": "1.0"},
        {"$numberLong": "abc"},
        {"$numberLong": "9223372036854775808"},
        {"$numberLong": " 12"},
        {"$numberLong": "1_000"},
        {"$numberLong": "\u0661\u0662"},  # Arabic-Indic digits: int() would take them
        {"$numberLong": "+5"},
        {"$numberLong": ""},
        {"$numberLong": "-"},
        {"$numberLong": "9" * 5000},
        {"$numberLong": True},
        {"$numberLong": 1.0},
        {"$numberLong": 7},  # the spec calls a bare number in a wrapper a parse error
        {"$numberInt": 42},
    ],
)
def test_int_malformed(wrapper: object) -> None:
    bad(wrapper)


def test_double() -> None:
    assert one({"$numberDouble": "1.5"}) == 1.5
    assert one({"$numberDouble": "-1.23456789012346e+15"}) == -1.23456789012346e15
    assert one({"$numberDouble": "1E-300"}) == 1e-300
    assert one({"$numberDouble": "Infinity"}) == float("inf")
    assert one({"$numberDouble": "-Infinity"}) == float("-inf")
    nan = one({"$numberDouble": "NaN"})
    assert nan != nan
    neg_zero = one({"$numberDouble": "-0.0"})
    assert neg_zero == 0.0 and str(neg_zero) == "-0.0"
    assert type(one({"$numberDouble": "10"})) is float
    assert one(1.5) == 1.5  # relaxed


@pytest.mark.parametrize("v", ["one", "nan", "inf", "1.5x", "", " 1", None, True, "0x10", 42, 1.5])
def test_double_malformed(v: object) -> None:
    bad({"$numberDouble": v})


def test_decimal128_in_canonical_form() -> None:
    for text, canonical in [
        ("1.10", "1.10"),
        ("-0", "-0"),
        ("NaN", "NaN"),
        ("-NaN", "NaN"),
        ("inf", "Infinity"),
        ("-Infinity", "-Infinity"),
        ("1E+3", "1E+3"),
        ("1e3", "1E+3"),
        ("1000", "1000"),
        ("1E+6144", "1.000000000000000000000000000000000E+6144"),
        ("1.234567890123456789012345678901234E-6143", "1.234567890123456789012345678901234E-6143"),
    ]:
        got = one({"$numberDecimal": text})
        assert type(got) is Decimal128 and str(got) == canonical


@pytest.mark.parametrize("v", ["abc", "", 1, "1.0.0", "1 ", "1_000", "1E+6145", "1" * 35])
def test_decimal128_malformed(v: object) -> None:
    bad({"$numberDecimal": v})


# --- binary and UUID


def test_binary_v2_and_v1() -> None:
    assert one({"$binary": {"base64": "AQID", "subType": "00"}}) == b"\x01\x02\x03"
    assert one({"$binary": {"subType": "0", "base64": ""}}) == b""
    assert one({"$binary": "AQID", "$type": "00"}) == b"\x01\x02\x03"
    assert one({"$type": "80", "$binary": "AQID"}) == Binary(b"\x01\x02\x03", 0x80)  # the subtype is kept
    assert one({"$binary": {"base64": "AQID", "subType": "05"}}) == Binary(b"\x01\x02\x03", 5)


@pytest.mark.parametrize(
    "wrapper",
    [
        {"$binary": {"base64": UUID_B64, "subType": "04"}},
        {"$binary": {"base64": UUID_B64, "subType": "4"}},
        {"$binary": UUID_B64, "$type": "04"},
        {"$uuid": UUID},
        {"$uuid": UUID.upper()},
    ],
)
def test_uuid(wrapper: object) -> None:
    assert one(wrapper) == Uuid(UUID)


def test_legacy_uuid_subtype_and_wrong_length_stay_binary() -> None:
    """Subtype 03's byte order depends on the driver that wrote it: kept as binary, subtype and all."""
    raw = uuid.UUID(UUID).bytes
    assert one({"$binary": {"base64": UUID_B64, "subType": "03"}}) == Binary(raw, 3)
    assert one({"$binary": UUID_B64, "$type": "03"}) == Binary(raw, 3)
    assert one({"$binary": {"base64": "AQID", "subType": "04"}}) == Binary(b"\x01\x02\x03", 4)


@pytest.mark.parametrize(
    "wrapper",
    [
        {"$binary": {"base64": "!!!!", "subType": "00"}},
        {"$binary": {"base64": "AQI", "subType": "00"}},  # bad padding
        {"$binary": {"base64": "AQID", "subType": "zz"}},
        {"$binary": {"base64": "AQID", "subType": "100"}},
        {"$binary": {"base64": "AQID", "subType": 0}},
        {"$binary": {"base64": "AQID"}},
        {"$binary": {"base64": "AQID", "subType": "00", "x": 1}},
        {"$binary": "AQID"},  # v1 needs $type
        {"$binary": "AQ!D", "$type": "00"},
        {"$binary": 5, "$type": "00"},
        {"$binary": {"base64": "AQID", "subType": "00"}, "$type": "00"},
        {"$binary": "w6k=", "$type": ""},
        {"$uuid": "not-a-uuid"},
        {"$uuid": UUID.replace("-", "")},
        {"$uuid": "{" + UUID[1:-1] + "}"},
    ],
)
def test_binary_malformed(wrapper: object) -> None:
    bad(wrapper)


# --- timestamp


def test_timestamp() -> None:
    assert one({"$timestamp": {"t": 1700000000, "i": 7}}) == BsonTimestamp(1700000000, 7)
    assert one({"$timestamp": {"i": 0, "t": 4294967295}}) == BsonTimestamp(4294967295, 0)


@pytest.mark.parametrize(
    "v",
    [{"t": -1, "i": 0}, {"t": "1", "i": 0}, {"t": 1}, {"t": 1, "i": 2, "x": 3}, {"t": 2**32, "i": 0}, [1, 2]],
)
def test_timestamp_malformed(v: object) -> None:
    bad({"$timestamp": v})


# --- types kept as their canonical Extended JSON


@pytest.mark.parametrize(
    ("wrapper", "canonical"),
    [
        ({"$regularExpression": {"pattern": "^a.*b$", "options": "mi"}}, None),  # options sorted
        ({"$regex": "^a.*b$", "$options": "im"}, None),  # v1
        ({"$code": "function () { return 1; }"}, {"$code": "function () { return 1; }"}),
        (
            {"$code": "function () { return x; }", "$scope": {"x": {"$numberInt": "1"}}},
            {"$code": "function () { return x; }", "$scope": {"x": 1}},  # scope values decoded
        ),
        ({"$minKey": 1}, {"$minKey": 1}),
        ({"$maxKey": 1}, {"$maxKey": 1}),
        (
            {"$dbPointer": {"$id": {"$oid": OID.upper()}, "$ref": "db.coll"}},
            {"$dbPointer": {"$ref": "db.coll", "$id": {"$oid": OID}}},
        ),
        ({"$undefined": True}, {"$undefined": True}),
        ({"$symbol": "sym"}, {"$symbol": "sym"}),
    ],
)
def test_types_without_a_column_keep_their_canonical_form(wrapper: dict, canonical: dict | None) -> None:
    canonical = canonical or {"$regularExpression": {"pattern": "^a.*b$", "options": "im"}}
    got = one(wrapper)
    assert got == ExtValue(canonical)
    assert orjson.loads(extjson.dumps({"v": got})) == {"v": canonical}  # written once, not as a string


def test_nul_in_a_regex_is_refused() -> None:
    assert "NUL" in str(bad({"$regularExpression": {"pattern": "a\x00", "options": ""}}))
    assert "NUL" in str(bad({"$regularExpression": {"pattern": "a", "options": "i\x00"}}))


@pytest.mark.parametrize(
    "wrapper",
    [
        {"$regularExpression": {"pattern": "a"}},
        {"$regularExpression": {"pattern": 1, "options": ""}},
        {"$regularExpression": "a"},
        {"$code": 1},
        {"$code": "x", "$scope": "y"},
        {"$scope": {}},
        {"$minKey": 0},
        {"$maxKey": True},
        {"$symbol": 1},
        {"$dbPointer": {"$ref": "c", "$id": OID}},
        {"$dbPointer": {"$ref": "c", "$id": {"$oid": "nothex"}}},
        {"$undefined": 1},
    ],
)
def test_text_types_malformed(wrapper: object) -> None:
    bad(wrapper)


# --- documents, arrays, and objects that are not wrappers


def test_nested_documents_and_arrays() -> None:
    doc = {
        "_id": {"$oid": OID},
        "a": {"b": [{"$numberInt": "1"}, {"c": {"$numberLong": "2"}}, [{"$date": DT_MS}]]},
        "empty": {},
        "none": [],
        "s": "$not a wrapper",
    }
    assert one(doc) == {
        "_id": OID,
        "a": {"b": [1, {"c": 2}, [DT]]},
        "empty": {},
        "none": [],
        "s": "$not a wrapper",
    }


@pytest.mark.parametrize(
    "plain",
    [
        {"$foo": 1},
        {"$type": "string"},  # query operator
        {"$regex": "^a"},  # query operator, no $options
        {"price": {"$gt": 5}},
        {"$set": {"a": 1}, "$unset": {"b": ""}},
        {"$options": "i"},
    ],
)
def test_dollar_keys_that_are_not_wrappers_are_documents(plain: dict) -> None:
    assert one(plain) == plain


def test_dbref_is_a_document_with_its_id_decoded() -> None:
    assert one({"$ref": "users", "$id": {"$oid": OID}, "$db": "app"}) == {
        "$ref": "users",
        "$id": OID,
        "$db": "app",
    }


def test_regex_query_operator_with_wrapper_inside() -> None:
    got = one({"$regex": {"$regularExpression": {"pattern": "a", "options": ""}}, "$options": "i"})
    regex = ExtValue({"$regularExpression": {"pattern": "a", "options": ""}})
    assert got == {"$regex": regex, "$options": "i"}


@pytest.mark.parametrize(
    "mixed",
    [
        {"$oid": OID, "x": 1},
        {"x": 1, "$date": DT_MS},
        {"$numberLong": "1", "$numberInt": "1"},
        {"$timestamp": {"t": 1, "i": 1}, "$foo": 1},
        {"$binary": "AQID", "$type": "00", "x": 1},
        {"$code": "x", "$scope": {}, "y": 1},
    ],
)
def test_wrapper_keys_mixed_with_other_keys(mixed: dict) -> None:
    assert "unexpected keys" in str(bad(mixed))


def test_error_names_the_field_path() -> None:
    with pytest.raises(InvalidBson) as info:
        loads('{"a": {"b": [1, {"c": {"$oid": 5}}]}}', path="payload.after")
    assert info.value.path == "payload.after.a.b[1].c"
    assert "payload.after.a.b[1].c" in str(info.value)
    assert isinstance(info.value, ValueError)
    with pytest.raises(InvalidBson) as info:
        decode({"$oid": 5}, path="key.id")
    assert info.value.path == "key.id"
    with pytest.raises(InvalidBson) as info:
        decode([[{"$date": "x"}]])
    assert info.value.path == "[0][0]"


def test_top_level_scalars_and_wrappers() -> None:
    assert loads("42") == 42
    assert loads('"abc"') == "abc"
    assert loads("null") is None
    assert loads(orjson.dumps({"$oid": OID})) == OID
    assert loads(b"[]") == []
    assert loads(bytearray(b'[{"$numberInt": "3"}]')) == [3]
    assert loads(memoryview(b'[{"$numberInt": "3"}]')) == [3]


def test_escaped_dollar_key_is_still_a_wrapper() -> None:
    assert loads('{"a": {"\\u0024oid": "' + OID + '"}}') == {"a": OID}


def test_loads_without_wrappers_is_plain_orjson() -> None:
    text = b'{"a": [1, 2.5, "x", null, true, {"b": "$"}]}'
    assert loads(text) == orjson.loads(text)


def test_loads_rejects_invalid_json() -> None:
    with pytest.raises(orjson.JSONDecodeError):
        loads(b"{not json")


def test_decode_works_in_place_and_is_idempotent() -> None:
    value = {"a": {"$numberLong": "1"}, "b": [{"$oid": OID}]}
    out = decode(value)
    assert out is value and value == {"a": 1, "b": [OID]}
    assert decode(copy.deepcopy(out)) == out


def test_deep_nesting_does_not_recurse() -> None:
    depth = 1000  # orjson's limit is 1024
    text = '{"a":' * depth + '{"$numberInt": "1"}' + "}" * depth
    value = loads(text)
    for _ in range(depth):
        value = value["a"]
    assert value == 1
    bad_text = '{"a":' * depth + '{"$numberInt": "x"}' + "}" * depth
    with pytest.raises(InvalidBson) as info:
        loads(bad_text)
    assert info.value.path == ".".join(["a"] * depth)


# --- one document in every dialect


def _every_type(mode: str) -> dict:
    long_ = 2**40
    if mode == "v1":  # Debezium legacy / mongoexport v1 "strict"
        return {
            "_id": {"$oid": OID},
            "i32": 7,
            "i64": {"$numberLong": str(long_)},
            "dbl": 1.5,
            "dec": {"$numberDecimal": "1.10"},
            "date": {"$date": DT_MS},
            "bin": {"$binary": "AQID", "$type": "00"},
            "uuid": {"$binary": UUID_B64, "$type": "04"},
            "ts": {"$timestamp": {"t": 1700000000, "i": 7}},
            "sym": {"$symbol": "s"},
            "nested": {"arr": [{"$numberLong": "1"}, "x", None, True]},
        }
    canonical = mode == "canonical"
    return {
        "_id": {"$oid": OID},
        "i32": {"$numberInt": "7"} if canonical else 7,
        "i64": {"$numberLong": str(long_)} if canonical else long_,
        "dbl": {"$numberDouble": "1.5"} if canonical else 1.5,
        "dec": {"$numberDecimal": "1.10"},
        "date": {"$date": {"$numberLong": str(DT_MS)}}
        if canonical
        else {"$date": "2020-01-02T03:04:05.678Z"},
        "bin": {"$binary": {"base64": "AQID", "subType": "00"}},
        "uuid": {"$binary": {"base64": UUID_B64, "subType": "04"}},
        "ts": {"$timestamp": {"t": 1700000000, "i": 7}},
        "sym": {"$symbol": "s"},
        "nested": {"arr": [{"$numberLong": "1"} if canonical else 1, "x", None, True]},
    }


@pytest.mark.parametrize("mode", ["v1", "canonical", "relaxed"])
def test_every_dialect_decodes_to_the_same_values(mode: str) -> None:
    assert loads(orjson.dumps(_every_type(mode))) == {
        "_id": OID,
        "i32": 7,
        "i64": 2**40,
        "dbl": 1.5,
        "dec": Decimal128("1.10"),
        "date": DT,
        "bin": b"\x01\x02\x03",
        "uuid": Uuid(UUID),
        "ts": BsonTimestamp(1700000000, 7),
        "sym": ExtValue({"$symbol": "s"}),
        "nested": {"arr": [1, "x", None, True]},
    }


# --- id_text


def test_id_text() -> None:
    assert id_text(OID) == OID
    assert id_text("abc") == "abc"
    assert id_text(42) == "42"
    assert id_text(42.0) == "42"  # MongoDB compares numbers by value: same key as 42
    assert id_text(-0.0) == "0"
    assert id_text(1.5) == "1.5"
    assert id_text(float("nan")) == "NaN"
    assert id_text(float("-inf")) == "-Infinity"
    assert id_text(True) == "true"
    assert id_text(ObjectId(OID)) == OID
    assert id_text(Uuid(UUID)) == UUID
    assert id_text(Decimal128("1e3")) == "1E+3"
    assert id_text(DT) == '{"$date":{"$numberLong":"1577934245678"}}'
    assert id_text(b"\x01\x02") == '{"$binary":{"base64":"AQI=","subType":"00"}}'
    assert id_text(BsonTimestamp(1, 2)) == '{"$timestamp":{"t":1,"i":2}}'
    # Key order is kept: MongoDB treats {a, b} and {b, a} as different _ids.
    assert id_text({"b": 1, "a": DT}) == '{"b":1,"a":{"$date":{"$numberLong":"1577934245678"}}}'
    assert id_text({"a": 1, "b": 1}) != id_text({"b": 1, "a": 1})
    # The readable text loses the type; the MERGE key (tests/test_identity.py) keeps it.
    assert id_text(42) == id_text("42")


# --- properties

_keys = st.text(max_size=8).filter(lambda k: not k.startswith("$") and "\x00" not in k)
_dt = st.datetimes(
    min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59), timezones=st.just(UTC)
).map(lambda d: d.replace(microsecond=d.microsecond // 1000 * 1000))


def _ms(d: datetime) -> int:
    return (d - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)


def _iso(d: datetime) -> str:
    return d.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _pairs(values: st.SearchStrategy, *encoders) -> st.SearchStrategy:
    """(Extended JSON, expected) pairs: a value in any of its encodings."""
    return values.flatmap(lambda v: st.sampled_from(encoders).map(lambda enc: enc(v)))


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


_leaves = st.one_of(
    st.none().map(lambda v: (v, v)),
    st.booleans().map(lambda v: (v, v)),
    st.text(max_size=10).map(lambda v: (v, v)),
    _pairs(
        st.integers(-(2**31), 2**31 - 1),
        lambda n: (n, n),
        lambda n: ({"$numberInt": str(n)}, n),
        lambda n: ({"$numberLong": str(n)}, n),
    ),
    _pairs(st.integers(-(2**63), 2**63 - 1), lambda n: (n, n), lambda n: ({"$numberLong": str(n)}, n)),
    _pairs(
        st.floats(allow_nan=False, allow_infinity=False),
        lambda f: (f, f),
        lambda f: ({"$numberDouble": repr(f)}, f),
    ),
    _pairs(
        st.sampled_from([float("inf"), float("-inf")]),
        lambda f: ({"$numberDouble": "Infinity" if f > 0 else "-Infinity"}, f),
    ),
    _pairs(
        _dt,
        lambda d: ({"$date": {"$numberLong": str(_ms(d))}}, d),
        lambda d: ({"$date": _ms(d)}, d),
        lambda d: ({"$date": _iso(d)}, d),
    ),
    _pairs(
        st.binary(max_size=20),
        lambda b: ({"$binary": {"base64": _b64(b), "subType": "00"}}, b),
        lambda b: ({"$binary": _b64(b), "$type": "0"}, b),
    ),
    _pairs(
        st.uuids(),
        lambda u: ({"$binary": {"base64": _b64(u.bytes), "subType": "04"}}, Uuid(str(u))),
        lambda u: ({"$binary": _b64(u.bytes), "$type": "04"}, Uuid(str(u))),
        lambda u: ({"$uuid": str(u)}, Uuid(str(u))),
    ),
    _pairs(
        st.binary(min_size=12, max_size=12).map(bytes.hex),
        lambda h: ({"$oid": h}, h),
        lambda h: ({"$oid": h.upper()}, h),
    ),
    st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)).map(
        lambda ti: ({"$timestamp": {"t": ti[0], "i": ti[1]}}, BsonTimestamp(*ti))
    ),
    st.decimals(allow_nan=False, allow_infinity=False, places=6)
    .filter(lambda d: len(d.as_tuple().digits) <= 34)
    .map(lambda d: ({"$numberDecimal": str(d)}, Decimal128(str(d)))),
)
_trees = st.recursive(
    _leaves,
    lambda kids: st.one_of(
        st.lists(kids, max_size=4).map(lambda xs: ([e for e, _ in xs], [x for _, x in xs])),
        st.dictionaries(_keys, kids, max_size=4).map(
            lambda d: ({k: e for k, (e, _) in d.items()}, {k: x for k, (_, x) in d.items()})
        ),
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(_trees)
def test_roundtrip_property(pair: tuple) -> None:
    encoded, expected = pair
    text = orjson.dumps(encoded)
    assert loads(text) == expected
    assert loads(text.decode()) == expected
    assert decode(orjson.loads(text)) == expected


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10)
    | st.sampled_from(["AQID", OID, "NaN", "1", "2020-01-01T00:00:00Z", UUID]),
    lambda kids: (
        st.lists(kids, max_size=3)
        | st.dictionaries(
            st.sampled_from(sorted(extjson._WRAPPER_KEYS | {"$regex", "$options", "$type"}))
            | st.sampled_from(["base64", "subType", "t", "i", "pattern", "options", "$ref", "$id"])
            | st.text(max_size=5),
            kids,
            max_size=3,
        )
    ),
    max_leaves=15,
)


@settings(max_examples=500, deadline=None)
@given(_json)
def test_arbitrary_json_decodes_or_raises_invalid_bson(value: object) -> None:
    text = orjson.dumps(value)
    try:
        loads(text)
    except InvalidBson as e:
        assert e.problem
