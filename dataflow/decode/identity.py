"""Which `_id`s are one document: MongoDB's own equality, as a string key for MERGE.

The readable `_id` column is text, and text loses the type: int 42 and string
"42", an ObjectId and the string of its hex, null and "null" all read the same.
MongoDB keeps those apart, and it also makes one `_id` of 42, NumberLong(42),
42.0 and NumberDecimal("42.0"), because numbers compare by value. `id_key`
writes that equality down: two `_id`s get the same key exactly when MongoDB
finds them equal.

A key is a type tag, a colon and the value:

| `_id` | key |
|---|---|
| number (int32, int64, double, decimal128) | `n:` exact value: integral values below 10**34 as their digits (`n:42`, `n:-7`), others as the normalised decimal (`n:2.5`, `n:1E+40`, `n:0.1000000000000000055511151231257827021181583404541015625` for the double 0.1); `n:NaN`, `n:Infinity`, `n:-Infinity`; -0 is `n:0` |
| string, symbol | `s:` the string |
| ObjectId | `o:` 24 lower-case hex digits |
| bool | `b:true`, `b:false` |
| null / undefined | `z:null` / `u:undefined` |
| date | `d:` milliseconds since the epoch |
| timestamp | `t:<seconds>:<increment>` |
| binary, UUID | `x:<subtype, 2 hex digits>:<base64>` |
| minKey / maxKey | `min:` / `max:` |
| regex, code, code with scope, dbPointer | `e:` canonical Extended JSON |
| document | `{` then, per field in order, the JSON string of its name, `:` and the field's key, joined by `,`, then `}` |
| array | `[` the elements' keys joined by `,` `]` |

Symbols compare as strings in MongoDB (one sort class), so they share `s:`.
"""

from __future__ import annotations

import base64
import decimal
import uuid
from datetime import UTC, date, datetime
from typing import Any

import orjson
from bson.decimal128 import Decimal128

from dataflow.decode import extjson
from dataflow.model import Binary, BsonTimestamp, DateMs, ExtValue, ObjectId, Uuid

__all__ = ["id_key", "string_key"]

_EXACT = decimal.Context(prec=10_000, Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN, traps=[])
_INTEGRAL_LIMIT = decimal.Decimal(10) ** 34
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def string_key(text: str) -> str:
    """The key of a string `_id` (also what an event built without a key is keyed by)."""
    return "s:" + text


def _number(d: decimal.Decimal) -> str:
    if d.is_nan():
        return "n:NaN"
    if d.is_infinite():
        return "n:Infinity" if d > 0 else "n:-Infinity"
    if d == d.to_integral_value(context=_EXACT) and abs(d) < _INTEGRAL_LIMIT:
        return f"n:{int(d)}"
    return f"n:{d.normalize(_EXACT)}"


def _ms(d: datetime) -> int:
    delta = d - _EPOCH if d.tzinfo is not None else d - _EPOCH.replace(tzinfo=None)
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def id_key(value: Any) -> str:
    """The MERGE key of a decoded `_id` value (see the module docstring for the form)."""
    t = type(value)
    if t is ObjectId:
        return "o:" + value
    if t is str:
        return "s:" + value
    if t is int:
        return f"n:{value}"
    if t is float:
        if value.is_integer() and abs(value) < 1e34:
            return f"n:{int(value)}"
        return _number(decimal.Decimal(value))
    if t is bool:
        return "b:true" if value else "b:false"
    if value is None:
        return "z:null"
    if t is Decimal128:
        return _number(value.to_decimal())
    if t is dict:
        return "{" + ",".join(orjson.dumps(k).decode() + ":" + id_key(v) for k, v in value.items()) + "}"
    if t is list:
        return "[" + ",".join(id_key(v) for v in value) + "]"
    if t is datetime:
        return f"d:{_ms(value)}"
    if t is DateMs:
        return f"d:{value.ms}"
    if t is bytes:
        return "x:00:" + base64.b64encode(value).decode("ascii")
    if t is Binary:
        return f"x:{value.subtype:02x}:" + base64.b64encode(value.data).decode("ascii")
    if t is Uuid:
        return "x:04:" + base64.b64encode(uuid.UUID(value.text).bytes).decode("ascii")
    if t is BsonTimestamp:
        return f"t:{value.t}:{value.i}"
    if t is date:  # a Kafka Connect Date (schema-wrapped records): midnight UTC
        return f"d:{_ms(datetime(value.year, value.month, value.day, tzinfo=UTC))}"
    if t is ExtValue:
        c = value.canonical
        if "$minKey" in c:
            return "min:"
        if "$maxKey" in c:
            return "max:"
        if "$symbol" in c:
            return "s:" + c["$symbol"]
        if "$undefined" in c:
            return "u:undefined"
        return "e:" + extjson.dumps(c).decode()
    raise TypeError(f"no MongoDB equality key for a {t.__name__} _id")
