"""The C speed-ups (dataflow/_speedups.c) against the Python they stand in for.

Each case runs the same input through the C path and the pure-Python path and
requires the same values or the same error, word for word.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import os
import random
import subprocess
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pyarrow as pa
import pytest
from bytewax.connectors.kafka import KafkaSourceMessage
from hypothesis import given, settings
from hypothesis import strategies as st

from dataflow import speedups
from dataflow.decode import envelopes as events
from dataflow.decode import extjson, validate
from dataflow.lake import columns as arrow_convert
from dataflow.model import DeadLetter
from services.generate import Generator

native = speedups.native


def slow(fn, *args):
    """`fn(*args)` with the C code switched off: the pure-Python reference."""
    speedups.native = None
    try:
        return fn(*args)
    finally:
        speedups.native = native


def test_the_extension_is_built() -> None:
    # `make install` compiles it; without it the pipeline still works, parsing about 1.5x slower.
    assert native is not None, (
        "dataflow._speedups is not built: install a C compiler and the Python headers"
        " (e.g. gcc and python3-dev), then `touch setup.py && make install`"
    )


def same(r: object) -> object:
    """A parse result without the moment it was made (a dead letter's first_failure_ms)."""
    if isinstance(r, DeadLetter):
        return dataclasses.replace(r, first_failure_ms=0)
    return r


def outcome(fn, value):
    """What `fn(value)` gives: ("ok", repr of the result) or ("error", type, message, path)."""
    try:
        return ("ok", repr(fn(value)))
    except Exception as e:
        return ("error", type(e).__name__, str(e), getattr(e, "path", None))


# --- walk

OID = "5f1e2d3c4b5a69788796a5b4"
_strings = st.sampled_from(
    [
        "0",
        "-0",
        "7",
        "-12",
        "2147483647",
        "2147483648",
        "-2147483648",
        "-2147483649",
        "123456789012345678",
        "-123456789012345678",
        "1234567890123456789",
        "99999999999999999999",
        "1.5",
        ".5",
        "5.",
        "-.5",
        "1e5",
        "1E-5",
        "1e999",
        "-1e999",
        "1e",
        "e5",
        ".",
        "-",
        "+1",
        "1.2.3",
        " 1",
        "1 ",
        "NaN",
        "Infinity",
        "-Infinity",
        "nan",
        "0x10",
        "١٢",
        "",
        OID,
        OID.upper(),
        OID[:-1],
        "g" * 24,
        "ÿ" * 24,
        "2020-01-02T03:04:05Z",
        "2020-01-02T03:04:05.678+02:00",
        "2020-13-02T03:04:05Z",
        "-62135596800000",
        "-62135596800001",
        "253402300799999",
        "253402300800000",
        "1767135478000",
        "AQID",
        "c8edabc3-f738-4ca3-b68d-ab92a91478a3",
    ]  # fmt: skip
) | st.text(max_size=6)
_wrapper_keys = sorted(extjson._WRAPPER_KEYS | {"$regex", "$options", "$type", "$foo"})
_anything = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64)
    | st.sampled_from([-62135596800000, -62135596800001, 253402300799999, 253402300800000, 2**63 - 1])
    | st.floats()
    | _strings,
    lambda kids: (
        st.lists(kids, max_size=3)
        | st.dictionaries(
            st.sampled_from(_wrapper_keys) | st.sampled_from(["base64", "subType", "t", "i", "a"]),
            kids,
            max_size=3,
        )
        | st.builds(lambda k, v: {k: v}, st.sampled_from(_wrapper_keys), kids)
    ),
    max_leaves=12,
)


@settings(max_examples=1500, deadline=None)
@given(_anything)
def test_walk_matches_python(value: object) -> None:
    doc = {"f": value, "g": [value, {"h": value}]}
    assert outcome(extjson.decode, copy.deepcopy(doc)) == slow(outcome, extjson.decode, copy.deepcopy(doc))


@pytest.mark.parametrize(
    ("wrapper", "expected"),
    [
        ({"$oid": OID.upper()}, OID),
        ({"$numberInt": "-2147483648"}, -(2**31)),
        ({"$numberLong": "-123456789012345678"}, -123456789012345678),
        ({"$numberLong": "9223372036854775807"}, 2**63 - 1),  # 19 digits: the Python handler's
        ({"$numberDouble": "-.5e-3"}, -0.0005),
        ({"$date": {"$numberLong": "-62135596800000"}}, datetime(1, 1, 1, tzinfo=UTC)),
        ({"$date": 253402300799999}, datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)),
        ({"$date": -1}, datetime(1969, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)),
        ({"$date": 951782400000}, datetime(2000, 2, 29, tzinfo=UTC)),
    ],
)
def test_walk_edges(wrapper: dict, expected: object) -> None:
    assert extjson.decode({"x": [wrapper]}) == {"x": [expected]}


def test_walk_names_the_path_of_a_bad_wrapper_after_decoding_good_ones() -> None:
    doc = {"a": {"$numberInt": "1"}, "b": [{"$oid": OID}, {"c": {"$numberLong": "x"}}], "d": {"$oid": OID}}
    with pytest.raises(extjson.InvalidBson) as info:
        extjson.decode(doc)
    assert info.value.path == "b[1].c"


@settings(max_examples=500, deadline=None)
@given(
    st.dictionaries(
        st.text(max_size=4) | st.sampled_from(["", "\x00", "a\x00", "é\x00", "😀\x00b"]), st.none()
    )
)
def test_field_name_check_matches_python(doc: dict) -> None:
    assert validate.check_field_names(doc) == slow(validate.check_field_names, doc)


# --- columns for Arrow

_cell = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=3) | st.binary(max_size=3)
_cell = _cell | st.lists(_cell, max_size=2) | st.dictionaries(st.text(max_size=2), _cell, max_size=2)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.dictionaries(st.sampled_from(["_id", "a", "b", "c", "é", ""]), _cell, max_size=5), max_size=8)
)
def test_field_columns_match_python(rows: list[dict]) -> None:
    fast, reference = arrow_convert.field_columns(rows), slow(arrow_convert.field_columns, rows)
    assert repr(fast[0]) == repr(reference[0])  # same fields, order and values (NaN included)
    assert fast[1] == reference[1]
    assert "_id" not in fast[0]


_json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats()
    | st.sampled_from(['a,"b"]', "null", "[{", "\\", "é", 'x\\"]'])
    | st.text(max_size=4)
    | st.binary(max_size=3)
    | st.datetimes(timezones=st.just(UTC))
)
_json_value = st.recursive(
    _json_leaf,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=3), kids, max_size=3),
    max_leaves=8,
)


@settings(max_examples=400, deadline=None)
@given(st.lists(_json_value, max_size=6))
def test_json_column_matches_one_value_at_a_time(values: list) -> None:
    assert arrow_convert.json_array(values).to_pylist() == slow(arrow_convert.json_array, values).to_pylist()


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.none()
        | st.datetimes(timezones=st.just(UTC))
        | st.datetimes(timezones=st.timezones())
        | st.datetimes(),
        max_size=10,
    )
)
def test_timestamp_column_matches_pyarrow(values: list) -> None:
    column = arrow_convert.Column("t", "timestamp", "value", "t")
    fast = arrow_convert.to_array(values, column)
    expected = pa.array(values, arrow_convert.TIMESTAMP_UTC)
    fast.validate(full=True)
    assert fast.equals(expected)


# --- payload_span and the parse step


@functools.cache
def _messages() -> list[KafkaSourceMessage]:
    gen = Generator(seed=7, doc_bytes=200, corrupt_ratio=0.05, drift_collection=True)
    out = []
    for i, m in enumerate(gen.messages(400)):
        out.append(KafkaSourceMessage(m.key, m.value, topic=m.topic, partition=0, offset=i))
    return out


def _variants(value: bytes) -> list[bytes]:
    """The message, and ways of writing (or breaking) its envelope the scanner must get right."""
    out = [value, b" \n" + value + b"\r\n\t"]
    if value.startswith(b'{"schema":'):
        out += [
            value.replace(b'{"schema":', b'{ "schema" : ', 1).replace(b',"payload":', b' , "payload" :\n', 1),
            value.replace(b'"optional":false', b'"optional":fals', 1),  # broken schema
            value.replace(b'"type":"struct"', b'"type":"str\xc3\xbcct"', 1),  # non-ASCII schema
            value.replace(b'"type":"struct"', b'"type":"\\u0073truct"', 1),
            value.replace(b'"type":"struct"', b'"type":1.5e+3', 1),
            value.replace(b'"type":"struct"', b'"type":01', 1),  # not JSON
            value.replace(b'"type":"struct"', b'"type":-', 1),
            value.replace(b'"type":"struct"', b'"type":"a\tb"', 1),  # raw control character
            value[:-1] + b',"payload":null}',  # duplicate key: the last one wins
            value[:-1],  # truncated
            value[:-1] + b"}}",
            value.replace(b',"payload":', b',"payload":"', 1),
            value.replace(b'{"schema":', b'{"schema":{"a":' * 70, 1)[:-1] + b"}" * 70 + b"}",  # deep
        ]
    return out


def test_parse_matches_python_on_every_envelope_and_its_breakages() -> None:
    msgs = _messages()
    cases = []
    for m in msgs:
        for v in _variants(m.value) if m.value else [m.value]:
            for key in (m.key, m.key[:-2] if m.key else m.key):
                cases.append(KafkaSourceMessage(key, v, topic=m.topic, partition=0, offset=m.offset))
    fast = [same(events.parse(m)) for m in cases]
    assert len({type(r) for r in fast}) > 1  # both events and dead letters are in there
    assert fast == slow(lambda: [same(events.parse(m)) for m in cases])


def test_payload_span_reads_only_exactly_schema_then_payload() -> None:
    v = b'{"schema": {"a": [1, -2.5e3, true, null, "x\\"y"]}, "payload": {"b": 2} }'
    start, end = native.payload_span(v)
    assert orjson.loads(v[start:end]) == {"b": 2}
    for other in [
        b'{"payload": {"b": 2}, "schema": {}}',
        b'{"schema": {}, "payload": {"b": 2}, "x": 1',
        b'{"schema": {}}',
        b'["schema", "payload"]',
        b'{"schema": {"a": "\\u00e9"}, "payload": {}}',
    ]:
        assert native.payload_span(other) is None, other


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=60), st.integers(0, 2**32))
def test_parse_matches_python_on_random_bytes(noise: bytes, seed: int) -> None:
    base = _messages()[random.Random(seed).randrange(20)]
    value = base.value or b"{}"
    cut = random.Random(seed).randrange(len(value) + 1)
    msg = KafkaSourceMessage(base.key, value[:cut] + noise + value[cut:], topic=base.topic, offset=1)
    assert same(events.parse(msg)) == slow(lambda: same(events.parse(msg)))


# --- objects crafted through the Python API
#
# The C functions call back into Python (walk's handlers and classify, a key's __eq__ and
# __hash__, a value type's __hash__), and that code may change the very containers being
# read. None of it may crash them, corrupt memory or leak. Each case that could crash runs
# in its own interpreter with the debug allocator, which overwrites freed memory so that a
# use-after-free fails for sure instead of passing by luck, and ends by checking that new
# dicts and lists are distinct objects (an object freed twice is handed out twice).

ROOT = Path(__file__).resolve().parent.parent

_PRELUDE = """\
import gc, sys
from dataflow import speedups
from dataflow.lake import columns as arrow_convert
native = speedups.native
assert native is not None
"""
_EPILOGUE = """
gc.collect()
fresh = [{} for _ in range(200)] + [[] for _ in range(200)]
assert len(set(map(id, fresh))) == len(fresh), "heap corrupted: an object handed out twice"
print("survived")
"""


def isolated(code: str, **params: object) -> str:
    """Run `code` in a fresh interpreter, with `params` as its globals; a crash there fails the
    test instead of ending the run."""
    env = {**os.environ, "PYTHONMALLOC": "debug", "PYTHONFAULTHANDLER": "1", "PYTHONPATH": str(ROOT)}
    given = "".join(f"{name} = {value!r}\n" for name, value in params.items())
    script = _PRELUDE + given + textwrap.dedent(code) + _EPILOGUE
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"exit status {proc.returncode}\n{proc.stdout}{proc.stderr}"
    assert proc.stdout.endswith("survived\n"), proc.stdout
    return proc.stdout


def test_walk_survives_a_handler_that_clears_the_dict_being_walked() -> None:
    # The key the result is stored under was only held by the dict. Like `_walk`: the result
    # is stored, then the next step finds that the dict changed size.
    isolated("""
        plain = object()
        doc = {f"field-{i}": f"value-{i}" for i in range(6)}
        doc[f"wrapper-{1}"] = {"$x": 1}  # built at run time: only the dict holds it
        doc.update({f"more-{i}": {"$x": i} for i in range(6)})

        def handler(wv, d):
            doc.clear()
            return "decoded"

        try:
            native.walk([doc], {"$x": handler}, lambda d: plain, plain)
        except RuntimeError as e:
            assert str(e) == "dictionary changed size during iteration", e
        else:
            raise AssertionError("no RuntimeError")
        assert doc == {"wrapper-1": "decoded"}, doc
    """)


def test_walk_survives_a_handler_that_empties_the_list_being_walked() -> None:
    # `_walk` stores the result with `c[k] = r`, which fails the same way.
    isolated("""
        plain = object()
        lst = [{"$x": 1}, {"$x": 2}, {"a": [1]}]

        def handler(wv, d):
            lst.clear()
            return "decoded"

        try:
            native.walk([lst], {"$x": handler}, lambda d: plain, plain)
        except IndexError as e:
            assert str(e) == "list assignment index out of range", e
        else:
            raise AssertionError("no IndexError")
        assert lst == [], lst
    """)


def test_walk_survives_classify_dropping_the_dict_it_classifies() -> None:
    # Like `_walk`, the plain document is still walked (pushed) after classify returns.
    isolated("""
        plain = object()
        doc = {"$foo": 1, "n": {"$numberInt": "7"}, **{f"k{i}": [i] for i in range(20)}}
        lst = [doc, {"$foo": 2}]
        del doc
        calls = []

        def classify(d):
            calls.append(len(d))
            lst[0] = "replaced"
            return plain

        native.walk([lst], {}, classify, plain)
        assert lst == ["replaced", {"$foo": 2}], lst
        assert calls == [22, 1], calls
    """)


def test_walk_survives_a_wrapper_key_whose_hash_clears_the_parent() -> None:
    # Looking the handler up hashes the key: here that frees the wrapper, its key and value.
    isolated("""
        plain = object()
        armed = False

        class Key:
            def __hash__(self):
                if armed:
                    doc.clear()
                return 12345

        doc = {"before-1": 1, "wrapper-1": {Key(): [f"v{i}" for i in range(9)]}, "after-1": 2}
        armed = True
        try:
            native.walk([doc], {"$x": None}, lambda d: plain, plain)
        except RuntimeError as e:
            assert str(e) == "dictionary changed size during iteration", e
        else:
            raise AssertionError("no RuntimeError")
        armed = False
        assert doc == {}, doc
    """)


def test_walk_fast_date_runs_no_python_code() -> None:
    # {"$date": {"$numberLong": ..}} with a key that only compares equal to "$numberLong":
    # its __eq__ would drop the dict being searched. That is the handler's case, not the fast path's.
    isolated("""
        plain = object()

        class Key:
            def __hash__(self):
                return hash("$numberLong")

            def __eq__(self, other):
                lst[0] = None
                return False

        lst = [{"$date": {Key(): "1"}}]
        native.walk([lst], {"$date": lambda wv, d: "handled"}, lambda d: plain, plain)
        assert lst == ["handled"], lst
    """)


@pytest.mark.parametrize("behaviour", ["returns the plain marker", "returns a value", "raises", "classify"])
def test_walk_keeps_no_reference_on_a_handler_path(behaviour: str) -> None:
    plain, value, wrapped = object(), object(), object()

    def handler(wv: object, d: dict) -> object:
        if behaviour == "raises":
            raise ValueError("bad")
        return plain if behaviour == "returns the plain marker" else value

    def classify(d: dict) -> object:
        return value if behaviour == "classify" else plain

    handlers = {} if behaviour == "classify" else {"$x": handler}
    before = [sys.getrefcount(o) for o in (plain, value, wrapped)]
    for _ in range(20_000):
        holder = [{"a": {"$x": wrapped}}, [{"$x": wrapped}], {"$y": 1, "b": 2}]
        with contextlib.suppress(ValueError):
            native.walk(holder, handlers, classify, plain)
        del holder
    assert [sys.getrefcount(o) for o in (plain, value, wrapped)] == before


def test_walk_stores_whatever_a_handler_returns_like_python() -> None:
    plain = object()
    holder = [{"a": {"$x": 1}}, {"$x": 2}]
    native.walk(holder, {"$x": lambda wv, d: plain}, lambda d: plain, plain)
    assert holder == [{"a": plain}, plain]  # `_walk`: c[k] = handler(wv, v)


_CRAFTED_ROWS = """
class Val:
    def __init__(self, n):
        self.n = n

    def __repr__(self):
        return f"Val({self.n})"


class Sub(dict):
    def items(self):
        return [("y", Val(9))]


class Key:
    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f"Key({self.name!r})"

    def __hash__(self):
        if TRIGGER == "__hash__":
            mutate()
        return hash(self.name)

    def __eq__(self, other):
        if TRIGGER == "__eq__":
            mutate()
        return type(other) is Key and other.name == self.name


def mutate():
    global fired
    if armed and not fired:
        fired = True
        MUTATIONS[MUTATION](rows)


MUTATIONS = {
    "clear the rows": lambda rows: rows.clear(),
    "replace the next row by an int": lambda rows: rows.__setitem__(1, 5),
    "replace the next row by a dict subclass": lambda rows: rows.__setitem__(1, Sub(x=Val(8))),
    "append a row": lambda rows: rows.append({"b-1": Val(5)}),
    "clear the row": lambda rows: rows[0].clear(),
    "add to the row": lambda rows: rows[0].__setitem__(f"new-{1}", Val(6)),
}


def outcome():
    global rows, armed, fired
    armed = fired = False
    rows = [
        {"_id": Val(0), Key("a"): Val(1), f"b-{1}": Val(2), f"c-{1}": Val(3)},
        {f"b-{1}": Val(4), Key("a"): Val(5)},
    ]
    armed = True
    try:
        values, kinds = arrow_convert.field_columns(rows)
        armed = False
        return ("ok", repr(values), repr(sorted(kinds.items(), key=repr)))
    except Exception as e:
        armed = False
        return ("error", type(e).__name__, str(e))


fast = outcome()
speedups.native = None
reference = outcome()
speedups.native = native
assert fast == reference, (fast, reference)
print(fast)
"""


@pytest.mark.parametrize("trigger", ["__eq__", "__hash__"])
@pytest.mark.parametrize(
    "mutation",
    [
        "clear the rows",
        "replace the next row by an int",
        "replace the next row by a dict subclass",
        "append a row",
        "clear the row",
        "add to the row",
    ],
)
def test_columns_matches_python_when_a_key_changes_the_rows(trigger: str, mutation: str) -> None:
    # A field name's __eq__ (compared with skip) or __hash__ (the column lookup) changes the
    # rows list or the row being read: the same values, or the same error, as field_values.
    isolated(_CRAFTED_ROWS, TRIGGER=trigger, MUTATION=mutation)


@pytest.mark.parametrize("column", ["new", "existing"])
@pytest.mark.parametrize("clears", ["rows", "row"])
def test_columns_survives_a_value_type_whose_hash_changes_the_rows(column: str, clears: str) -> None:
    # The value types are gathered during the pass in C (afterwards in Python). Rows left are
    # not read; the row being read is finished, unless it is what changed (as field_values).
    isolated(
        """
        armed = False

        class Meta(type):
            def __hash__(cls):
                if armed:
                    (rows if CLEARS == "rows" else rows[1]).clear()
                return 7

        class T(metaclass=Meta):
            pass

        class Val:
            pass

        first = {"x": 1} if COLUMN == "new" else {"a": 1}
        rows = [first, {"a": T(), f"b-{1}": Val()}, {"a": Val(), f"c-{1}": Val()}]
        armed = True
        try:
            values, types = native.columns(rows, 3, "_id")
        except RuntimeError as e:
            assert CLEARS == "row" and str(e) == "dictionary changed size during iteration", e
        else:
            assert CLEARS == "rows", values
            armed = False
            n = type(None)
            if COLUMN == "new":  # T is the first value of column a
                expected = {"x": [int, n, n], "a": [n, T, n], "b-1": [n, Val, n]}
                expected_types = {"x": {int}, "a": {T}, "b-1": {Val}}
            else:
                expected = {"a": [int, T, n], "b-1": [n, Val, n]}
                expected_types = {"a": {int, T}, "b-1": {Val}}
            assert {f: [type(v) for v in c] for f, c in values.items()} == expected, values
            assert types == expected_types, types
    """,
        COLUMN=column,
        CLEARS=clears,
    )


def test_columns_passes_on_the_error_of_a_value_type_hash() -> None:
    class Meta(type):
        def __hash__(cls) -> int:
            raise ZeroDivisionError

    value = Meta("T", (), {})()
    key = "".join(["fie", "ld"])
    before = sys.getrefcount(value), sys.getrefcount(key)
    for _ in range(1000):
        with pytest.raises(ZeroDivisionError):
            native.columns([{"a": 1}, {key: value}], 2, "_id")
    assert (sys.getrefcount(value), sys.getrefcount(key)) == before
