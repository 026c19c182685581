"""Decoded document values -> Arrow columns, with per-column type decisions that never change.

MongoDB documents have no fixed schema, so a field can be an int in one change
and a string or a sub-document in the next. The rules, applied per field:

* every BSON type has one column kind (the README's type mapping): string,
  ObjectId (`objectid`, its hex as a string), int32/int64 (`int64`), double
  (`float64`), bool, date (`timestamp`, UTC microseconds), binary of the generic
  subtype (`binary`), UUID (`uuid`, its hyphenated text), Decimal128
  (`decimal`, its canonical string), timestamp (`bsonts`, struct<t, i>).
  Documents, arrays, binary of other subtypes and the rest (regex, code,
  minKey, ...) are JSON text (`json`);
* a new column takes the kind of the first non-null value the table receives
  for the field, in change order. How changes fall into batches never matters;
* an existing column never changes type (Delta cannot retype a column in
  place). A value of another kind (a double in an int64 column, a string in an
  ObjectId column, a date past what timestamp[us] holds) goes, as JSON text, to
  a companion column `<column>__json` added the first time it is needed. A
  reader recovers the field as `coalesce(<column>, <column>__json)`;
* JSON text is relaxed JSON for what JSON has (numbers, strings, booleans,
  null) and canonical Extended JSON v2 for every other value, written once
  (`dataflow.decode.extjson.dumps`);
* a table has at most `max_columns` value columns (a MERGE's cost grows with
  the columns: 10,000 of them made a 2-row MERGE take minutes). Once a field
  would pass the limit the table gets one overflow column (`_overflow`, role
  `overflow`), JSON text of an object holding, whole, every field of the row
  that has no column. From then on no value column is added: which fields have
  columns never changes, whatever the limit is later set to. A reader merges
  the object's fields into the row's.

The table schema is the record of these decisions: every column carries field
metadata (`cdc.field`, `cdc.kind`, `cdc.role`) written in the same commit that
adds the column, so later batches and restarted processes rebuild the same
`Layout` from the table alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

import orjson
import pyarrow as pa
from bson.decimal128 import Decimal128

from dataflow import speedups
from dataflow.decode import extjson
from dataflow.model import Binary, BsonTimestamp, DateMs, ExtValue, ObjectId, Reason, Uuid
from dataflow.runtime.failures import BadData

Kind = Literal[
    "string",
    "objectid",
    "int64",
    "float64",
    "bool",
    "timestamp",
    "date",
    "binary",
    "uuid",
    "decimal",
    "bsonts",
    "json",
    "other",
]
Role = Literal["value", "json_fallback", "meta", "overflow"]
OVERFLOW = "_overflow"  # the overflow column's name, unless a field took it first
DEFAULT_MAX_COLUMNS = 500

BSON_TIMESTAMP = pa.struct([pa.field("t", pa.int64()), pa.field("i", pa.int64())])
TIMESTAMP_UTC = pa.timestamp("us", tz="UTC")
# What converting a value can raise when the value is at fault (orjson's error is a TypeError).
_VALUE_ERRORS = (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError)

ARROW_TYPES: dict[str, pa.DataType] = {
    "string": pa.string(),
    "objectid": pa.string(),
    "int64": pa.int64(),
    "float64": pa.float64(),
    "bool": pa.bool_(),
    "timestamp": TIMESTAMP_UTC,
    "date": pa.date32(),  # a Kafka Connect Date in a schema-wrapped record; BSON has none
    "binary": pa.binary(),
    "uuid": pa.string(),
    "decimal": pa.string(),
    "bsonts": BSON_TIMESTAMP,
    "json": pa.string(),
}
_TYPED = (
    "string",
    "objectid",
    "int64",
    "float64",
    "bool",
    "timestamp",
    "date",
    "binary",
    "uuid",
    "decimal",
    "bsonts",
)

# Which value kinds a column of a given kind holds: its own only (an int in a double column
# would read back as a double), except JSON text, which holds anything.
ACCEPTS: dict[str, frozenset[str]] = {
    "json": frozenset(ARROW_TYPES),
    "other": frozenset(),
    **{k: frozenset({k}) for k in _TYPED},
}

_KIND_OF_TYPE: dict[type, str | None] = {
    type(None): None,
    str: "string",
    ObjectId: "objectid",
    int: "int64",
    float: "float64",
    bool: "bool",
    datetime: "timestamp",
    DateMs: "timestamp",
    date: "date",
    bytes: "binary",
    Uuid: "uuid",
    Decimal128: "decimal",
    BsonTimestamp: "bsonts",
    dict: "json",
    list: "json",
    tuple: "json",
    Binary: "json",
    ExtValue: "json",
}


def kind_of(t: type) -> str | None:
    """Kind of a Python value type (None for NoneType); subclasses resolve to their base, cached."""
    try:
        return _KIND_OF_TYPE[t]
    except KeyError:
        pass
    kind = "json"
    for base, k in (
        (bool, "bool"),
        (int, "int64"),
        (float, "float64"),
        (str, "string"),
        (datetime, "timestamp"),
        (date, "date"),
        (bytes, "binary"),
        (BsonTimestamp, "bsonts"),
    ):
        if issubclass(t, base):
            kind = k
            break
    _KIND_OF_TYPE[t] = kind
    return kind


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
_MIN_US_MS, _MAX_US_MS = -(2**63) // 1000 + 1, (2**63 - 1) // 1000  # dates timestamp[us] holds, in ms


def _fits_timestamp(v: Any) -> bool:
    return type(v) is not DateMs or _MIN_US_MS <= v.ms <= _MAX_US_MS


FirstKind = Callable[[str], str]  # a new field's first non-null value kind, in change order


# ---------------------------------------------------------------- JSON text


def to_json_bytes(v: Any) -> bytes:
    """JSON text, UTF-8, for any decoded value (`extjson.dumps`); a value no JSON holds is bad data.

    Arrow takes the bytes for a string column as they are: no Python str is built.
    """
    try:
        return extjson.dumps(v)
    except orjson.JSONEncodeError as e:
        if e.__cause__ is not None:  # `extjson.canonical` refused a type the decoder made: ours to fix
            raise
        # orjson's own refusals: an integer past 64 bits, nesting deeper than it writes
        raise BadData(Reason.DELTA_WRITE_ERROR, f"value cannot be stored as JSON text: {e}") from e


# ---------------------------------------------------------------- layout


@dataclass(frozen=True, slots=True)
class Column:
    """One table column: where a document field (or pipeline metadata) lives, and as what."""

    name: str
    kind: str
    role: Role
    field: str | None = None
    arrow_type: pa.DataType | None = None  # for meta columns with types outside ARROW_TYPES

    @property
    def type(self) -> pa.DataType:
        return self.arrow_type if self.arrow_type is not None else ARROW_TYPES[self.kind]

    def arrow_field(self) -> pa.Field:
        meta = {"cdc.kind": self.kind, "cdc.role": self.role}
        if self.field is not None:
            meta["cdc.field"] = self.field
        return pa.field(self.name, self.type, nullable=True, metadata=meta)


def _kind_from_arrow(t: pa.DataType) -> str:
    for kind, at in ARROW_TYPES.items():
        if kind != "json" and t.equals(at):
            return kind
    return "other"


class Layout:
    """The table's columns and the decision behind each; built from (and recorded in) the schema."""

    def __init__(self, columns: Iterable[Column]) -> None:
        self.columns: list[Column] = []
        self.value: dict[str, Column] = {}
        self.fallback: dict[str, Column] = {}
        self.overflow: Column | None = None  # JSON object of the fields without a column
        self._taken: set[str] = set()
        for c in columns:
            self._add(c)

    def _add(self, c: Column) -> None:
        self.columns.append(c)
        self._taken.add(c.name.lower())  # Delta column names are case-insensitive
        if c.role == "value":
            self.value[c.field] = c  # type: ignore[index]
        elif c.role == "json_fallback":
            self.fallback[c.field] = c  # type: ignore[index]
        elif c.role == "overflow":
            self.overflow = c

    @classmethod
    def from_schema(cls, schema: pa.Schema, meta: Mapping[str, Column]) -> Layout:
        """Read the decisions back from column metadata; columns we didn't write are taken as they are."""
        cols = []
        for f in schema:
            md = {k.decode(): v.decode() for k, v in (f.metadata or {}).items()}
            role = md.get("cdc.role")
            if role in ("value", "json_fallback"):
                cols.append(Column(f.name, md["cdc.kind"], role, md.get("cdc.field", f.name)))
            elif role == "overflow":
                cols.append(Column(f.name, "json", "overflow"))
            elif role == "meta" or f.name in meta:
                cols.append(meta.get(f.name) or Column(f.name, "other", "meta", arrow_type=f.type))
            else:  # a column from another writer: keep its type, send what doesn't fit to a fallback
                kind = _kind_from_arrow(f.type)
                cols.append(Column(f.name, kind, "value", f.name, None if kind != "other" else f.type))
        return cls(cols)

    def schema(self) -> pa.Schema:
        return pa.schema([c.arrow_field() for c in self.columns])

    def claim(self, base: str) -> str:
        """A column name not used yet (case-insensitively): `base`, else `base__2`, `base__3`, ..."""
        name, n = base, 1
        while name.lower() in self._taken:
            n += 1
            name = f"{base}__{n}"
        return name

    def missing(self, meta: Iterable[Column]) -> list[Column]:
        """Pipeline columns a table made by an older version lacks: added like new fields."""
        new = [c for c in meta if c.name.lower() not in self._taken]
        for c in new:
            self._add(c)
        return new

    def overflows(self, field: str) -> bool:
        """Whether the field's values go to the overflow column (it has no column of its own)."""
        return self.overflow is not None and field not in self.value

    def plan(
        self,
        kinds: Mapping[str, frozenset[str]],
        first: FirstKind,
        max_columns: int = DEFAULT_MAX_COLUMNS,
    ) -> list[Column]:
        """Add the columns this batch needs (new fields, first drift of a field); return them.

        A new field takes the kind of its first value in change order, which
        `first` finds (in merge mode an earlier change of a document may have
        held another kind than the collapsed row does). Past `max_columns`
        value columns, or once the table has an overflow column, a new field
        gets none: the overflow column (added the first time) holds it.
        """
        new = []
        for field, ks in kinds.items():
            if not ks:  # only nulls: nothing to decide, absent and null read the same
                continue
            main = self.value.get(field)
            if main is None and (self.overflow is not None or len(self.value) >= max_columns):
                if self.overflow is None:
                    self.overflow = Column(self.claim(OVERFLOW), "json", "overflow")
                    self._add(self.overflow)
                    new.append(self.overflow)
                continue
            if main is None:
                kind = first(field)
                c = Column(self.claim(field), kind, "value", field)
                self._add(c)
                new.append(c)
                if ks <= ACCEPTS[kind]:
                    continue
                c = Column(self.claim(f"{c.name}__json"), "json", "json_fallback", field)
            elif ks <= ACCEPTS[main.kind] or field in self.fallback:
                continue
            else:
                c = Column(self.claim(f"{main.name}__json"), "json", "json_fallback", field)
            self._add(c)
            new.append(c)
        return new


# ---------------------------------------------------------------- arrays


def field_values(rows: Iterable[Mapping[str, Any]], n: int, skip: str = "_id") -> dict[str, list[Any]]:
    """Per-field value lists (None where a row lacks the field): the one per-value Python pass."""
    cols: dict[str, list[Any]] = {}
    for i, row in enumerate(rows):
        for k, v in row.items():
            col = cols.get(k)
            if col is None:
                if k == skip:
                    continue
                col = cols[k] = [None] * n
            col[i] = v
    return cols


def _kinds(types: Iterable[type], col: list[Any]) -> frozenset[str]:
    """Non-null value kinds of a field from its value types; a date past timestamp[us] adds `json`."""
    ks = frozenset(k for k in map(kind_of, types) if k is not None)
    if DateMs in types and not all(map(_fits_timestamp, col)):
        ks |= {"json"}
    return ks


def field_kinds(values: Mapping[str, list[Any]]) -> dict[str, frozenset[str]]:
    """Non-null value kinds per field."""
    return {field: _kinds(set(map(type, col)), col) for field, col in values.items()}


def field_columns(
    rows: list[Mapping[str, Any]], skip: str = "_id"
) -> tuple[dict[str, list[Any]], dict[str, frozenset[str]]]:
    """`field_values` and `field_kinds` of the rows, in one pass in C when it is built.

    Every value is touched once instead of twice, and touching them is most of the
    cost (cache misses; bench/RESULTS.md, "Field columns in one pass").
    """
    native = speedups.native
    if native is not None and type(rows) is list:
        out = native.columns(rows, len(rows), skip)
        if out is not None:
            values, types = out
            return values, {f: _kinds(ts, values[f]) for f, ts in types.items()}
    values = field_values(rows, len(rows), skip)
    return values, field_kinds(values)


def json_array(values: list[Any]) -> pa.Array:
    """A string array of each value's `to_json_bytes` (None stays null).

    With the C speed-ups: one orjson call for the whole column, split back into
    each value's text in C (orjson writes a list's items as it writes each alone),
    instead of one call per value. Items whose text is or holds `null` (a NaN or
    Infinity may hide there) are redone one by one.
    """
    native = speedups.native
    if native is not None:
        try:
            split = native.json_elements(
                orjson.dumps(values, default=extjson.canonical, option=extjson.DUMPS_OPTIONS)
            )
        except orjson.JSONEncodeError:  # too deep as one list, say: the one-by-one path decides
            split = None
        if split is not None and len(split[0]) == len(values):
            texts, suspects = split
            for i in suspects:
                v = values[i]
                texts[i] = None if v is None else to_json_bytes(v)
            return pa.array(texts, pa.string())
    return pa.array([None if v is None else to_json_bytes(v) for v in values], pa.string())


def _micros(values: list[Any]) -> pa.Array:
    """Dates (datetimes and `DateMs` within range) as timestamp[us] through their microseconds."""
    us = [None if v is None else v.ms * 1000 if type(v) is DateMs else (v - _EPOCH) // _US for v in values]
    return pa.array(us, pa.int64()).cast(TIMESTAMP_UTC)


def to_array(values: list[Any], column: Column) -> pa.Array:
    """One Arrow array for the column from Python values that fit it (or are None)."""
    kind = column.kind
    if kind == "json":
        return json_array(values)
    if kind == "other":  # nothing fits a foreign-typed column
        return pa.nulls(len(values), column.type)
    if kind == "uuid":
        return pa.array([None if v is None else v.text for v in values], pa.string())
    if kind == "decimal":
        return pa.array([None if v is None else str(v) for v in values], pa.string())
    native = speedups.native
    if kind == "timestamp":
        if DateMs in set(map(type, values)):
            return _micros(values)
        if native is not None:
            # Decoded dates are UTC datetimes: their microseconds straight into the Arrow buffers.
            bufs = native.timestamps_us(values)
            if bufs is not None:
                data, valid, nulls = bufs
                buffers = [None if valid is None else pa.py_buffer(valid), pa.py_buffer(data)]
                return pa.Array.from_buffers(TIMESTAMP_UTC, len(values), buffers, null_count=nulls)
    return pa.array(values, column.type)


def overflow_objects(layout: Layout, values: Mapping[str, list[Any]], n: int) -> list[dict[str, Any] | None]:
    """Per row, the object of its non-null fields without a column (None when it has none)."""
    rows: list[dict[str, Any] | None] = [None] * n
    if layout.overflow is None:
        return rows
    for field, col in values.items():
        if field in layout.value:
            continue
        for i, v in enumerate(col):
            if v is not None:
                d = rows[i]
                if d is None:
                    d = rows[i] = {}
                d[field] = v
    return rows


def build_arrays(
    layout: Layout,
    values: Mapping[str, list[Any]],
    kinds: Mapping[str, frozenset[str]],
    overflow: list[dict[str, Any] | None] | None = None,
) -> dict[str, pa.Array]:
    """Arrays per column name for the fields in `values`; needs `layout.plan(kinds)` done first.

    The overflow column (when the table has one) holds `overflow`, per row, or
    else the row's fields without a column (`overflow_objects`).
    """
    out: dict[str, pa.Array] = {}
    if layout.overflow is not None:
        n = len(next(iter(values.values()))) if values else 0
        if overflow is None:
            overflow = overflow_objects(layout, values, n)
        if overflow and any(d is not None for d in overflow):
            out[layout.overflow.name] = json_array(overflow)
    for field, col in values.items():
        main = layout.value.get(field)
        if main is None:  # all-null field without a column, or one in the overflow column
            continue
        ok = ACCEPTS[main.kind]
        fb = layout.fallback.get(field)
        try:
            if not kinds[field]:
                out[main.name] = pa.nulls(len(col), main.type)
            elif kinds[field] <= ok:
                out[main.name] = to_array(col, main)
            else:
                fits = [v is None or (kind_of(type(v)) in ok and _fits_timestamp(v)) for v in col]
                out[main.name] = to_array([v if f else None for v, f in zip(col, fits, strict=True)], main)
                out[fb.name] = json_array(  # type: ignore[union-attr]
                    [None if f else v for v, f in zip(col, fits, strict=True)]
                )
                continue
        except _VALUE_ERRORS as e:  # a value no column type holds (an integer past int64, say)
            raise BadData(Reason.DELTA_WRITE_ERROR, f"field {field!r}: {type(e).__name__}: {e}") from e
        if fb is not None:
            out[fb.name] = pa.nulls(len(col), pa.string())
    return out
