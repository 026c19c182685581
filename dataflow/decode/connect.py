"""Values of a schema-wrapped Kafka Connect record, typed by its schema's logical types.

Debezium's `ExtractNewDocumentState` turns a document into a Connect struct;
the JSON converter with `schemas.enable=true` then writes the schema beside
the payload, and only the schema says that an int64 is a date. Mapping:

| Connect schema                               | payload          | value                         |
|----------------------------------------------|------------------|-------------------------------|
| `org.apache.kafka.connect.data.Timestamp`    | ms since epoch   | datetime (UTC): timestamp[us] |
| `org.apache.kafka.connect.data.Date`         | days since epoch | date: Delta date              |
| `org.apache.kafka.connect.data.Time`         | ms since midnight| "HH:MM:SS.mmm" text (Delta has no time type) |
| `org.apache.kafka.connect.data.Decimal`      | base64 two's-complement bytes, or a number (`decimal.format=NUMERIC`); `scale` parameter | canonical decimal text, like Decimal128 |
| type `bytes` (no logical name)               | base64           | bytes                         |

Structs, arrays and maps are walked; anything else is the payload's own JSON value.
"""

from __future__ import annotations

import base64
import binascii
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_DAY = date(1970, 1, 1)
TIMESTAMP = "org.apache.kafka.connect.data.Timestamp"
DATE = "org.apache.kafka.connect.data.Date"
TIME = "org.apache.kafka.connect.data.Time"
DECIMAL = "org.apache.kafka.connect.data.Decimal"


class ConnectValueError(ValueError):
    """A payload value its schema does not describe."""


def _int(v: Any, what: str, path: str) -> int:
    if type(v) is not int:
        raise ConnectValueError(f"{path}: {what} must be an integer, not {type(v).__name__}")
    return v


def _logical(name: str, schema: dict, v: Any, path: str) -> Any:
    try:
        if name == TIMESTAMP:
            return _EPOCH + timedelta(milliseconds=_int(v, "a Connect Timestamp", path))
        if name == DATE:
            return _EPOCH_DAY + timedelta(days=_int(v, "a Connect Date", path))
        if name == TIME:
            ms = _int(v, "a Connect Time", path)
            if not 0 <= ms < 86_400_000:
                raise ConnectValueError(f"{path}: Connect Time {ms} is not within a day")
            t = (datetime.min + timedelta(milliseconds=ms)).time()
            return time.isoformat(t, timespec="milliseconds")
    except OverflowError:
        raise ConnectValueError(f"{path}: {name} value {v} is out of range") from None
    # Decimal
    params = schema.get("parameters") or {}
    try:
        scale = int(params.get("scale", 0))
    except (TypeError, ValueError):
        raise ConnectValueError(f"{path}: Connect Decimal scale {params.get('scale')!r}") from None
    if type(v) in (int, float):
        d = Decimal(repr(v)) if type(v) is float else Decimal(v)
    elif type(v) is str:
        try:
            unscaled = int.from_bytes(base64.b64decode(v, validate=True), "big", signed=True)
        except (binascii.Error, ValueError):
            try:  # decimal.format=NUMERIC with a string payload
                d = Decimal(v)
            except InvalidOperation:
                raise ConnectValueError(
                    f"{path}: Connect Decimal {v[:40]!r} is neither base64 nor a number"
                ) from None
        else:
            d = Decimal(unscaled).scaleb(-scale)
    else:
        raise ConnectValueError(f"{path}: Connect Decimal must be base64 text or a number")
    return str(d)


def convert(value: Any, schema: Any, path: str = "") -> Any:
    """`value` with every logical-typed part turned into its Python value; containers are rebuilt."""
    if value is None or type(schema) is not dict:
        return value
    name = schema.get("name")
    if name in (TIMESTAMP, DATE, TIME, DECIMAL):
        return _logical(name, schema, value, path or "<root>")
    kind = schema.get("type")
    if kind == "struct" and type(value) is dict:
        fields = {f.get("field"): f for f in schema.get("fields") or () if type(f) is dict}
        return {k: convert(v, fields.get(k), f"{path}.{k}" if path else k) for k, v in value.items()}
    if kind == "array" and type(value) is list:
        items = schema.get("items")
        return [convert(v, items, f"{path}.{i}") for i, v in enumerate(value)]
    if kind == "map" and type(value) is dict:
        vs = schema.get("values")
        return {k: convert(v, vs, f"{path}.{k}") for k, v in value.items()}
    if kind == "bytes" and type(value) is str:
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ConnectValueError(f"{path or '<root>'}: Connect bytes value is not base64") from None
    return value


def has_logical_types(schema: Any) -> bool:
    """Whether converting with this schema can change anything (else the payload stands as is)."""
    if type(schema) is not dict:
        return False
    if schema.get("name") in (TIMESTAMP, DATE, TIME, DECIMAL) or schema.get("type") == "bytes":
        return True
    return any(
        has_logical_types(s)
        for s in (*(schema.get("fields") or ()), schema.get("items"), schema.get("values"))
        if s is not None
    )
