"""The common-case decoder against `events.parse`'s general path: same event or same dead letter.

Every case runs through `parse(msg)` (which tries `debezium_fast` on a Debezium
payload) and `parse(msg, fast=False)`; the results must be equal field by
field, and the dead letters word for word.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import orjson
import pytest

from dataflow.decode import debezium_fast
from dataflow.decode import envelopes as events
from dataflow.model import ChangeEvent, DeadLetter, SourceMessage
from services.generate import Generator


def fast_event(m: SourceMessage) -> ChangeEvent | None:
    """What `debezium_fast` makes of a schema-wrapped message's payload (None: it leaves it to parse)."""
    try:
        p = orjson.loads(m.value)["payload"]
    except (orjson.JSONDecodeError, TypeError, KeyError):
        return None
    return debezium_fast.event(m, m.value, p) if type(p) is dict and "op" in p else None


def same(r: object) -> object:
    if isinstance(r, DeadLetter):
        return dataclasses.replace(r, first_failure_ms=0)
    return r


@functools.cache
def _messages() -> tuple[SourceMessage, ...]:
    gen = Generator(seed=11, doc_bytes=200, corrupt_ratio=0.05, drift_collection=True)
    return tuple(
        SourceMessage(m.key, m.value, m.topic, 2, i, (1, 1_700_000_000_000))
        for i, m in enumerate(gen.messages(600))
    )


def _with_payload(value: bytes, change) -> bytes:
    """The message re-written with `change(payload)` applied (the schema kept)."""
    env = orjson.loads(value)
    change(env["payload"])
    return orjson.dumps(env)


def _set(path: tuple[str, ...], v: object):
    def change(p: dict) -> None:
        for k in path[:-1]:
            p = p[k]
        p[path[-1]] = v

    return change


def _drop(path: tuple[str, ...]):
    def change(p: dict) -> None:
        for k in path[:-1]:
            p = p[k]
        p.pop(path[-1], None)

    return change


def _after(change):
    """Edit the Extended JSON document held in `after`."""

    def edit(p: dict) -> None:
        if isinstance(p.get("after"), str):
            doc = orjson.loads(p["after"])
            change(doc)
            p["after"] = orjson.dumps(doc).decode()

    return edit


PAYLOAD_EDITS = [
    _set(("op",), "r"),
    _set(("op",), "d"),
    _set(("op",), "u"),
    _set(("op",), "t"),
    _set(("op",), "x"),
    _set(("op",), ["c"]),
    _set(("op",), None),
    _set(("source", "ord"), None),
    _drop(("source", "ord")),
    _set(("source", "ord"), 1.0),
    _set(("source", "ord"), True),
    _set(("source", "ord"), -1),
    _set(("source", "ord"), 2**31),
    _set(("source", "ts_ms"), -5),
    _set(("source", "ts_ms"), 2**45),
    _set(("source", "ts_ms"), 1.5),
    _drop(("source", "ts_ms")),
    _set(("source", "db"), "bad.db"),
    _set(("source", "db"), ""),
    _set(("source", "db"), 5),
    _drop(("source", "db")),
    _set(("source", "collection"), "a$b"),
    _drop(("source", "collection")),
    _set(("source",), None),
    _set(("source",), "shop"),
    _set(("after",), None),
    _set(("after",), "not json"),
    _set(("after",), "[1, 2]"),
    _set(("after",), {"_id": {"$oid": "65a00001392456de3eb13b90"}, "x": 1}),
    _set(("after",), '{"_id": {"$oid": "zz"}}'),
    _set(("after",), '{"_id": 42, "x": 1}'),
    _set(("after",), '{"_id": "short", "x": 1}'),
    _set(("after",), '{"x": 1}'),
    _after(lambda d: d.update({"": 1})),
    _after(lambda d: d.update({"a\x00b": 1})),
    _after(lambda d: d.update({"when": {"$date": "not a date"}})),
    _after(lambda d: d.update({"_id": {"$oid": "65a0000100000000000000ff"}})),
    _set(("operationType",), "insert"),
    _set(("_id",), "x"),
    _set(("filter",), '{"_id": {"$oid": "65a00001392456de3eb13b90"}}'),
]


def _key_payload(key: bytes, payload: bytes) -> bytes:
    head, sep, _ = key.partition(b'"payload":')
    return head + sep + payload + b"}" if sep else key


KEY_EDITS = [
    lambda k: None,
    lambda k: b"",
    lambda k: k[:-2],
    lambda k: b'{"id": "{\\"$oid\\": \\"65a00001392456de3eb13b90\\"}"}',  # not schema-wrapped
    lambda k: k.replace(b'\\"$oid\\"', b'\\"$numberInt\\"', 1),
    lambda k: k.replace(b'"payload":{"id":', b'"payload":{"idx":', 1),
    lambda k: k.replace(b'"payload":{', b'"payload":"{', 1),
    lambda k: _key_payload(k, b'{"id":"\\"\\""}'),  # the empty string
    lambda k: _key_payload(k, b'{"id":"42"}'),  # an integer
    lambda k: _key_payload(k, b'{"id":"\\"65a00001392456de3eb13b90\\""}'),  # a string, not an ObjectId
]


def _cases() -> list[SourceMessage]:
    cases = list(_messages())
    for m in _messages()[:80]:
        if m.value and m.value.startswith(b'{"schema":'):
            for edit in PAYLOAD_EDITS:
                with contextlib.suppress(KeyError, TypeError):  # an edit some ops have nothing for
                    cases.append(m._replace(value=_with_payload(m.value, edit)))
        if m.key:
            cases += [m._replace(key=edit(m.key)) for edit in KEY_EDITS]
    m = _messages()[0]
    cases += [m._replace(topic=None), m._replace(partition="2"), m._replace(value=m.value + b" ")]
    return cases


def test_the_fast_path_decodes_the_common_messages() -> None:
    plain = [m for m in _messages() if m.value and m.value.startswith(b'{"schema":')]
    decoded = [fast_event(m) for m in plain]
    assert sum(ev is not None for ev in decoded) >= 0.85 * len(plain)
    assert {ev.op for ev in decoded if ev is not None} == {"insert", "update"}
    assert all(
        ev == events.parse(m, fast=False) for ev, m in zip(decoded, plain, strict=True) if ev is not None
    )


def test_it_gives_what_the_general_path_gives_on_every_case() -> None:
    cases = _cases()
    taken = 0
    for m in cases:
        quick = same(events.parse(m))
        full = same(events.parse(m, fast=False))
        assert quick == full, (m, quick, full)
        taken += fast_event(m) is not None
    assert len(cases) > 3000
    results = [events.parse(m, fast=False) for m in cases]
    assert sum(isinstance(r, DeadLetter) for r in results) > 300  # the edits do break things
    assert taken > 0.4 * sum(isinstance(r, ChangeEvent) for r in results)


@pytest.mark.parametrize("max_bytes", [100, 1_000_000])
def test_the_size_limit_is_the_same(max_bytes: int) -> None:
    for m in _messages()[:50]:
        assert same(events.parse(m, max_bytes=max_bytes)) == same(
            events.parse(m, max_bytes=max_bytes, fast=False)
        )
