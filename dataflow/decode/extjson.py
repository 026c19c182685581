"""MongoDB Extended JSON (v1 and v2, canonical and relaxed) to Python values, and back.

Connectors hand documents over as Extended JSON; the sink wants plain values with
one fixed mapping (DESIGN.md, type mapping table). This is the hot path, so:

- `loads` skips the walk entirely when the text cannot hold a type wrapper
  (no `"$` and no escaped `$` in it), which is the common relaxed-mode case;
- `decode` walks iteratively (no recursion limit below orjson's depth limit)
  and replaces wrappers *in place* in the freshly parsed containers it is
  given, instead of building a copy of every document;
- the field path of a malformed wrapper is only worked out when one is found.

Decisions where the Extended JSON spec leaves room:

- An object is a type wrapper only when its keys are exactly a wrapper's keys.
  A known wrapper key mixed with other keys (`{"$oid": "..", "x": 1}`) is an
  error. Objects whose `$` keys are not wrapper keys (`{"$foo": 1}`, DBRefs
  `{"$ref", "$id", "$db"}`, the `$regex` / `$type` query operators) are plain
  documents: MongoDB 5.0+ allows `$`-prefixed field names.
- A wrapped value must be what the spec says: a string in `$numberInt`,
  `$numberLong`, `$numberDouble`, `$numberDecimal` (a bare JSON number there
  is a parse error), with one exception: `{"$date": <integer ms>}`, which
  MongoDB's Kafka connector writes for every date by default (its DefaultJson
  formatter is the Java driver's legacy strict mode).
- A `$date` ISO string without an offset is taken as UTC; one finer than a
  millisecond is refused (BSON dates are milliseconds). Dates outside
  `datetime`'s years 1..9999 are `DateMs`: BSON's range is all of int64 ms.
- Every BSON type keeps its type (dataflow/model.py): `ObjectId`, `Uuid`
  (subtype 04 only; subtype 03's byte order depends on the writer), `Binary`
  with its subtype, `bson.Decimal128` in canonical form, and `ExtValue` (the
  canonical object) for regex, code, symbol, minKey/maxKey, dbPointer and
  undefined. `dumps` writes them back as canonical Extended JSON v2.
- Plain JSON integers are taken as orjson parses them (it refuses anything
  beyond 64 bits); values between 2**63 and 2**64, and NUL in field names,
  are refused after decoding (`validate.bson_problem`), only for messages
  whose text can hold them.
"""

from __future__ import annotations

import base64
import json
import math
import re
import reprlib
import uuid
from datetime import UTC, date, datetime, timedelta
from typing import Any

import orjson
from bson.decimal128 import Decimal128

from dataflow import speedups
from dataflow.model import Binary, BsonTimestamp, DateMs, ExtValue, ObjectId, Uuid

__all__ = ["InvalidBson", "canonical", "date_of_ms", "decode", "dumps", "id_text", "loads", "parse_json"]

_HEX = "0123456789abcdefABCDEF"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NAIVE_EPOCH = datetime(1970, 1, 1)
_MS = timedelta(milliseconds=1)
_MIN_MS, _MAX_MS = -62_135_596_800_000, 253_402_300_799_999  # 0001-01-01 .. 9999-12-31T23:59:59.999
_ISO_RE = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]+)?)?(?:Z|[+-][0-9]{2}(?::?[0-9]{2})?)?"
)
_INT32 = (-(2**31), 2**31 - 1)
_INT64 = (-(2**63), 2**63 - 1)
_UINT32_MAX = 2**32 - 1
_SPECIAL_DOUBLES = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}
_DOUBLE_RE = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_DECIMAL_RE = re.compile(
    r"[+-]?(?:(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|inf(?:inity)?|nan)", re.IGNORECASE
)
_WIDE = "an integer past int64, the widest BSON integer"
_PLAIN = object()  # marker: "this object is a plain document, not a type wrapper"
_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 40
_show = _repr.repr


class InvalidBson(ValueError):
    """A malformed Extended JSON type wrapper. `path` names the field ("" is the root)."""

    def __init__(self, problem: str, path: str = "") -> None:
        self.problem = problem
        self.path = path
        super().__init__(f"invalid Extended JSON at {path or '<root>'!s}: {problem}")


# --- one function per wrapper; each gets the wrapped value and the whole wrapper object


def _oid(v: Any, _d: dict | None = None) -> ObjectId:
    if type(v) is str and len(v) == 24 and not v.strip(_HEX):
        return ObjectId(v.lower())
    raise InvalidBson(f"$oid must be a string of 24 hex digits, got {_show(v)}")


def _integer(v: Any, what: str, bounds: tuple[int, int]) -> int:
    if type(v) is str:
        digits = v[1:] if v[:1] == "-" else v
        # isdigit() alone accepts non-ASCII digits; the length cap keeps int() away
        # from its 4300-digit limit (anything that long is out of range anyway).
        if digits.isascii() and digits.isdigit() and len(digits) <= 25:
            n = int(v)
            if bounds[0] <= n <= bounds[1]:
                return n
            raise InvalidBson(f"{what} {v} is out of range")
    raise InvalidBson(f"{what} must be a decimal integer string, got {_show(v)}")


def _int32(v: Any, _d: dict) -> int:
    if type(v) is str and v.isascii() and v.isdigit() and len(v) <= 9:  # fast path: fits int32
        return int(v)
    return _integer(v, "$numberInt", _INT32)


def _int64(v: Any, _d: dict) -> int:
    if type(v) is str and v.isascii() and v.isdigit() and len(v) <= 18:  # fast path: fits int64
        return int(v)
    return _integer(v, "$numberLong", _INT64)


def _double(v: Any, _d: dict) -> float:
    if type(v) is str:
        special = _SPECIAL_DOUBLES.get(v)
        if special is not None:
            return special
        if _DOUBLE_RE.fullmatch(v):
            return float(v)
    raise InvalidBson(f"$numberDouble must be a number string, NaN, Infinity or -Infinity, got {_show(v)}")


def _decimal(v: Any, _d: dict) -> Decimal128:
    if type(v) is str and _DECIMAL_RE.fullmatch(v):
        try:
            return Decimal128(v)
        except (ArithmeticError, ValueError):  # decimal.Inexact / InvalidOperation, out of range
            raise InvalidBson(f"$numberDecimal {_show(v)} does not fit a Decimal128 exactly") from None
    raise InvalidBson(f"$numberDecimal must be a decimal number string, got {_show(v)}")


def date_of_ms(ms: int) -> datetime | DateMs:
    """A BSON date: a UTC `datetime` in years 1..9999, else `DateMs` (BSON's range is int64 ms)."""
    if _MIN_MS <= ms <= _MAX_MS:
        return _EPOCH + timedelta(milliseconds=ms)
    return DateMs(ms)


def _date(v: Any, _d: dict) -> datetime | DateMs:
    t = type(v)
    if t is str:
        m = _ISO_RE.fullmatch(v)
        if m is None:
            raise InvalidBson(f"$date is not an ISO-8601 date-time: {_show(v)}")
        try:
            dt = datetime.fromisoformat(v)
        except ValueError:
            raise InvalidBson(f"$date is not an ISO-8601 date-time: {_show(v)}") from None
        if dt.microsecond % 1000:
            raise InvalidBson(f"$date {_show(v)} is finer than a millisecond, which BSON dates cannot hold")
        tz = dt.tzinfo
        if tz is UTC:
            return dt
        if tz is None:
            return dt.replace(tzinfo=UTC)
        try:
            return dt.astimezone(UTC)
        except OverflowError:  # the offset moves it past year 1 or 9999
            return DateMs((dt.replace(tzinfo=None) - _NAIVE_EPOCH) // _MS - int(dt.utcoffset() / _MS))
    if t is dict:
        if len(v) != 1 or "$numberLong" not in v:
            raise InvalidBson(f'$date object must be {{"$numberLong": "<ms>"}}, got {_show(v)}')
        ms = _integer(v["$numberLong"], "$date.$numberLong", _INT64)
    elif t is int and _INT64[0] <= v <= _INT64[1]:
        # Not in the spec (it calls this a parse error), but MongoDB's Kafka connector writes dates
        # so by default (its DefaultJson formatter, the Java driver's legacy strict mode).
        ms = v
    else:
        raise InvalidBson(f"$date must be an ISO string, a $numberLong or an integer, got {_show(v)}")
    return date_of_ms(ms)


def _bin(b64: Any, subtype: Any) -> bytes | Binary | Uuid:
    if type(subtype) is not str or not 1 <= len(subtype) <= 2 or subtype.strip(_HEX):
        raise InvalidBson(f"binary subtype must be 1-2 hex digits, got {_show(subtype)}")
    if type(b64) is not str:
        raise InvalidBson(f"binary payload must be a base64 string, got {_show(b64)}")
    try:
        data = base64.b64decode(b64, validate=True)
    except ValueError:  # binascii.Error, or non-ASCII text
        raise InvalidBson(f"binary payload is not valid base64: {_show(b64)}") from None
    sub = int(subtype, 16)
    if sub == 0:
        return data
    if sub == 4 and len(data) == 16:
        return Uuid(str(uuid.UUID(bytes=data)))
    return Binary(data, sub)


def _binary(v: Any, _d: dict) -> bytes | Binary | Uuid:
    if type(v) is dict and len(v) == 2 and "base64" in v and "subType" in v:
        return _bin(v["base64"], v["subType"])
    raise InvalidBson(f'$binary must be {{"base64": .., "subType": ..}} (or v1 with "$type"), got {_show(v)}')


def _uuid(v: Any, _d: dict) -> Uuid:
    if type(v) is str and len(v) == 36:
        try:
            text = str(uuid.UUID(v))
        except ValueError:
            pass
        else:
            if text == v.lower():
                return Uuid(text)
    raise InvalidBson(f"$uuid must be a hyphenated 36-character UUID string, got {_show(v)}")


def _timestamp(v: Any, _d: dict) -> BsonTimestamp:
    if type(v) is dict and len(v) == 2:
        t, i = v.get("t"), v.get("i")
        if type(t) is int and type(i) is int and 0 <= t <= _UINT32_MAX and 0 <= i <= _UINT32_MAX:
            return BsonTimestamp(t, i)
    raise InvalidBson(f'$timestamp must be {{"t": uint32, "i": uint32}}, got {_show(v)}')


def _regex_value(pattern: Any, options: Any) -> ExtValue:
    if type(pattern) is not str or type(options) is not str:
        raise InvalidBson(f"a regular expression needs a pattern and options strings, got {_show(pattern)}")
    if "\x00" in pattern or "\x00" in options:
        raise InvalidBson("a regular expression cannot hold a NUL character (BSON stores it as a C string)")
    return ExtValue({"$regularExpression": {"pattern": pattern, "options": "".join(sorted(options))}})


def _regex(v: Any, _d: dict) -> ExtValue:
    if type(v) is dict and len(v) == 2 and "pattern" in v and "options" in v:
        return _regex_value(v["pattern"], v["options"])
    raise InvalidBson(f'$regularExpression must be {{"pattern": str, "options": str}}, got {_show(v)}')


def _code(v: Any, _d: dict) -> ExtValue:
    if type(v) is str:
        return ExtValue({"$code": v})
    raise InvalidBson(f"$code must be a string, got {_show(v)}")


def _min_max(v: Any, d: dict) -> ExtValue:
    if type(v) is int and v == 1:
        return ExtValue({next(iter(d)): 1})
    raise InvalidBson(f"{next(iter(d))} must be 1, got {_show(v)}")


def _symbol(v: Any, _d: dict) -> ExtValue:
    if type(v) is str:
        return ExtValue({"$symbol": v})
    raise InvalidBson(f"$symbol must be a string, got {_show(v)}")


def _db_pointer(v: Any, _d: dict) -> ExtValue:
    if type(v) is dict and len(v) == 2 and type(v.get("$ref")) is str:
        oid = v.get("$id")
        if type(oid) is dict and len(oid) == 1 and "$oid" in oid:
            return ExtValue({"$dbPointer": {"$ref": v["$ref"], "$id": {"$oid": str(_oid(oid["$oid"]))}}})
    raise InvalidBson(f'$dbPointer must be {{"$ref": str, "$id": {{"$oid": ..}}}}, got {_show(v)}')


def _undefined(v: Any, _d: dict) -> ExtValue:
    if v is True:
        return ExtValue({"$undefined": True})
    raise InvalidBson(f"$undefined must be true, got {_show(v)}")


_SINGLE = {
    "$oid": _oid,
    "$date": _date,
    "$numberInt": _int32,
    "$numberLong": _int64,
    "$numberDouble": _double,
    "$numberDecimal": _decimal,
    "$binary": _binary,
    "$uuid": _uuid,
    "$timestamp": _timestamp,
    "$regularExpression": _regex,
    "$code": _code,
    "$minKey": _min_max,
    "$maxKey": _min_max,
    "$symbol": _symbol,
    "$dbPointer": _db_pointer,
    "$undefined": _undefined,
}
# Keys that only ever appear in a type wrapper. `$regex`, `$options` and `$type`
# are not here: alone (or with other keys) they are query operators, i.e. data.
_WRAPPER_KEYS = frozenset(_SINGLE) | {"$scope"}


def _dollar(d: dict) -> Any:
    """Decode an object that has a `$` key: a wrapper's value, or `_PLAIN`."""
    n = len(d)
    if n == 1:
        k = next(iter(d))
        handler = _SINGLE.get(k)
        if handler is not None:
            return handler(d[k], d)
    elif n == 2:
        if "$binary" in d and "$type" in d:  # v1 binary
            if type(d["$binary"]) is not str:
                raise InvalidBson(
                    f'v1 {{"$binary", "$type"}} needs a base64 string, got {_show(d["$binary"])}'
                )
            return _bin(d["$binary"], d["$type"])
        if "$code" in d and "$scope" in d:
            if type(d["$code"]) is str and type(d["$scope"]) is dict:
                return ExtValue({"$code": d["$code"], "$scope": decode(d["$scope"], path="$scope")})
            raise InvalidBson('{"$code", "$scope"} needs a string and a document')
        if "$regex" in d and "$options" in d:  # v1 regex, unless it is the query operator
            if type(d["$regex"]) is str and type(d["$options"]) is str:
                return _regex_value(d["$regex"], d["$options"])
            return _PLAIN
    for k in d:
        if k in _WRAPPER_KEYS:
            raise InvalidBson(f"{k} wrapper has unexpected keys: {_show(list(d))}")
    return _PLAIN


def _classify(d: dict) -> Any:
    if len(d) == 1:
        [(k, v)] = d.items()
        handler = _SINGLE.get(k)
        if handler is not None:
            return handler(v, d)
        return _dollar(d) if k[:1] == "$" else _PLAIN
    for k in d:
        if k[:1] == "$":
            return _dollar(d)
    return _PLAIN


def _walk(root: dict | list, base: str) -> None:
    """Replace every wrapper under `root` by its value, in place, without recursion."""
    stack: list[Any] = [root]
    push, pop, single = stack.append, stack.pop, _SINGLE.get
    c: Any = root
    k: Any = None
    try:
        while stack:
            c = pop()
            for k, v in c.items() if type(c) is dict else enumerate(c):
                if type(k) is str and "\x00" in k:
                    raise InvalidBson(f"field name {k!r} holds a NUL character")
                t = type(v)
                if t is dict:
                    if len(v) == 1:  # fast path: most wrappers have one key
                        [(wk, wv)] = v.items()
                        handler = single(wk)
                        if handler is not None:
                            c[k] = handler(wv, v)
                            continue
                    r = _classify(v)
                    if r is _PLAIN:
                        if v:
                            push(v)
                    else:
                        c[k] = r
                elif t is list and v:
                    push(v)
                elif t is int and not _INT64[0] <= v <= _INT64[1]:
                    raise InvalidBson(_WIDE)
    except InvalidBson as e:
        raise InvalidBson(e.problem, _join(base, [*_path_to(root, c), k])) from None


def _path_to(root: Any, target: Any) -> list[Any]:
    """Keys from `root` down to the container `target` (error path only)."""
    stack: list[tuple[Any, list[Any]]] = [(root, [])]
    while stack:
        node, path = stack.pop()
        if node is target:
            return path
        for k, v in node.items() if type(node) is dict else enumerate(node):
            if type(v) is dict or type(v) is list:
                stack.append((v, [*path, k]))
    return []


def _join(base: str, keys: list[Any]) -> str:
    out = base
    for k in keys:
        if type(k) is int:
            out += f"[{k}]"
        else:
            out = f"{out}.{k}" if out else str(k)
    return out


def decode(value: Any, *, path: str = "") -> Any:
    """Decode an orjson-parsed Extended JSON value into plain Python values.

    Containers of `value` are reused and modified in place (pass a copy to keep
    the original). `path` prefixes the field path in `InvalidBson` messages.
    """
    t = type(value)
    native = speedups.native
    if native is not None and (t is dict or t is list):
        # The C walk visits containers in the order `_walk` does and calls the same handlers for
        # anything but the usual forms of the common wrappers. When it meets a bad one, all
        # before it has been replaced by leaf values: the Python code below stops at the same
        # wrapper, and names its path.
        holder = [value]
        try:
            unfit = native.walk(holder, _SINGLE, _classify, _PLAIN)
        except InvalidBson:
            pass
        else:
            if unfit == "int64":
                raise InvalidBson(_WIDE, _join(path, _wide_int_path(holder[0])))
            if unfit == "nul":
                where, key = _nul_key_path(holder[0])
                raise InvalidBson(f"field name {key!r} holds a NUL character", _join(path, [*where, key]))
            return holder[0]
    if t is dict:
        try:
            r = _classify(value)
        except InvalidBson as e:
            raise InvalidBson(e.problem, path) from None
        if r is not _PLAIN:
            return r
        if value:
            _walk(value, path)
    elif t is list and value:
        _walk(value, path)
    return value


def _wide_int_path(root: Any) -> list[Any]:
    """Keys down to the integer past int64 `_walk` would meet first under `root` (error path only)."""
    stack: list[tuple[Any, list[Any]]] = [(root, [])]
    while stack:
        node, keys = stack.pop()
        for k, v in node.items() if type(node) is dict else enumerate(node):
            t = type(v)
            if t is int and not _INT64[0] <= v <= _INT64[1]:
                return [*keys, k]
            if (t is dict or t is list) and v:
                stack.append((v, [*keys, k]))
    return []


def _nul_key_path(root: Any) -> tuple[list[Any], str]:
    """Keys down to the first field name with a NUL under `root`, and that name (error path only)."""
    stack: list[tuple[Any, list[Any]]] = [(root, [])]
    while stack:
        node, keys = stack.pop()
        for k, v in node.items() if type(node) is dict else enumerate(node):
            if type(k) is str and "\x00" in k:
                return keys, k
            if (type(v) is dict or type(v) is list) and v:
                stack.append((v, [*keys, k]))
    return [], ""


def parse_json(text: str | bytes | memoryview) -> Any:
    """orjson's parse, also taking the bare `NaN`, `Infinity` and `-Infinity` literals as floats.

    MongoDB's legacy JSON writers (the Kafka connector's default, Debezium's
    legacy mode) print non-finite doubles that way. Only text orjson refuses and
    that holds one of those words takes the slow path, and it must then be
    exactly what orjson accepts besides them (no lone surrogates, no integer
    past 64 bits), checked by writing the result back out with orjson.
    """
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as e:
        raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
        if b"NaN" not in raw and b"Infinity" not in raw:
            raise
        refused = e
    try:
        value = json.loads(raw.decode("utf-8"))
        orjson.dumps(value)
    except (ValueError, RecursionError, orjson.JSONEncodeError):
        raise refused from None
    return value


def loads(text: str | bytes, *, path: str = "") -> Any:
    """Parse Extended JSON text. Raises orjson.JSONDecodeError (a ValueError) or InvalidBson."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        value = parse_json(text)
    if type(value) is not dict and type(value) is not list:
        return value
    if speedups.native is not None:  # walking a document without wrappers costs less than searching it
        return decode(value, path=path)
    if isinstance(text, str):
        maybe = '"$' in text or "\\u0024" in text
    else:
        raw = text if isinstance(text, bytes | bytearray) else bytes(text)
        maybe = b'"$' in raw or b"\\u0024" in raw
    return decode(value, path=path) if maybe else value


# --- writing: canonical Extended JSON v2 for every value JSON has no type for


def _ms_of(d: datetime) -> int:
    d = d.replace(tzinfo=UTC) if d.tzinfo is None else d
    delta = d - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def canonical(o: Any) -> Any:
    """orjson's `default`: the canonical Extended JSON v2 object of a decoded non-JSON value."""
    t = type(o)
    if t is ObjectId:
        return {"$oid": str(o)}
    if t is datetime:
        return {"$date": {"$numberLong": str(_ms_of(o))}}
    if t is DateMs:
        return {"$date": {"$numberLong": str(o.ms)}}
    if t is Decimal128:
        return {"$numberDecimal": str(o)}
    if t is ExtValue:
        return o.canonical
    if t is bytes:
        return {"$binary": {"base64": base64.b64encode(o).decode("ascii"), "subType": "00"}}
    if t is Binary:
        return {
            "$binary": {"base64": base64.b64encode(o.data).decode("ascii"), "subType": f"{o.subtype:02x}"}
        }
    if t is Uuid:
        return {
            "$binary": {"base64": base64.b64encode(uuid.UUID(o.text).bytes).decode("ascii"), "subType": "04"}
        }
    if t is BsonTimestamp:
        return {"$timestamp": {"t": o.t, "i": o.i}}
    if t is date:  # a Kafka Connect Date (schema-wrapped records): midnight UTC, as a BSON date
        return {"$date": {"$numberLong": str(_ms_of(datetime(o.year, o.month, o.day)))}}
    if isinstance(o, bytes | bytearray | memoryview):
        return canonical(bytes(o))
    raise TypeError(f"no Extended JSON form for a {t.__name__} value")


def _finite(v: Any) -> Any:
    """Copy of `v` with NaN/Infinity as `$numberDouble`, since orjson writes them as null."""
    t = type(v)
    if t is float and not math.isfinite(v):
        return {"$numberDouble": "NaN" if v != v else ("Infinity" if v > 0 else "-Infinity")}
    if t is dict:
        return {k: _finite(x) for k, x in v.items()}
    if t is list or t is tuple:
        return [_finite(x) for x in v]
    if t is ExtValue:
        return ExtValue(_finite(v.canonical))
    return v


DUMPS_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_SUBCLASS


def dumps(v: Any) -> bytes:
    """Relaxed JSON for what JSON has (numbers stay numbers), canonical Extended JSON v2 for the rest.

    Raises orjson.JSONEncodeError for what no JSON text can hold (an integer
    past 64 bits, nesting deeper than orjson writes).
    """
    out = orjson.dumps(v, default=canonical, option=DUMPS_OPTIONS)
    if b"null" in out:  # maybe a NaN/Infinity that orjson turned into null: redo the slow way
        out = orjson.dumps(_finite(v), default=canonical, option=DUMPS_OPTIONS)
    return out


def id_text(value: Any) -> str:
    """The decoded `_id` as readable text: the `_id` column (the MERGE key is `identity.id_key`).

    Strings, ObjectIds (their hex) and UUIDs are themselves, Decimal128 its
    canonical string, integers `str(n)`, integral doubles like the integer;
    anything else is its `dumps` text. Distinct `_id`s can share a text (42 and
    "42"): the typed key tells them apart.
    """
    t = type(value)
    if t is str or t is ObjectId:
        return str(value)
    if t is int:
        return str(value)
    if t is float:
        if value.is_integer():
            return str(int(value))
        if value != value:
            return "NaN"
        if value in (float("inf"), float("-inf")):
            return "Infinity" if value > 0 else "-Infinity"
        return repr(value)
    if t is Uuid:
        return value.text
    if t is Decimal128:
        return str(value)
    return dumps(value).decode()
