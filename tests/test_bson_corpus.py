"""MongoDB's BSON corpus (tests/data/bson-corpus, see its PROVENANCE.md) through the parse step and the
Delta writer: every valid case lands as the spec writes it, every parse error is dead-lettered.

Each case is a document; it becomes the document of a MongoDB connector message in
`publish.full.document.only` form, with an `_id` added. decodeErrors are about BSON bytes,
which never reach this pipeline (it reads Extended JSON), and are not driven.
"""

from __future__ import annotations

import json
import random
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pytest
from bson.decimal128 import Decimal128
from bytewax.connectors.kafka import KafkaSourceMessage
from deltalake import DeltaTable

from dataflow.decode import extjson
from dataflow.decode.envelopes import Decoder
from dataflow.decode.formats import Format
from dataflow.lake.columns import Layout
from dataflow.lake.documents import read_documents
from dataflow.lake.writer import DeltaTableWriter
from dataflow.model import (
    Binary,
    BsonTimestamp,
    ChangeEvent,
    DateMs,
    DeadLetter,
    ExtValue,
    ObjectId,
    Reason,
    Uuid,
)
from dataflow.source.sample import write_line
from tests.harness import pipeline_env, run_pipeline

CORPUS = Path(__file__).parent / "data" / "bson-corpus"
FILES = sorted(CORPUS.glob("*.json"))
DECODER = Decoder(format=Format.MONGODB_FULL_DOCUMENT_ONLY)

# The one parse error of the spec this pipeline accepts: MongoDB's Kafka connector writes every
# date that way by default (its DefaultJson formatter is the Java driver's legacy strict mode),
# so refusing it would dead-letter every date of the default configuration.
ACCEPTED = {("top.json", '{"a" : {"$date" : 42}}'): {"a": {"$date": {"$numberLong": "42"}}}}

# The README's type mapping: the Arrow type and column kind of each decoded value type.
MAPPING: dict[type, tuple[pa.DataType, str]] = {
    str: (pa.string(), "string"),
    ObjectId: (pa.string(), "objectid"),
    int: (pa.int64(), "int64"),
    float: (pa.float64(), "float64"),
    bool: (pa.bool_(), "bool"),
    datetime: (pa.timestamp("us", tz="UTC"), "timestamp"),
    DateMs: (pa.timestamp("us", tz="UTC"), "timestamp"),
    bytes: (pa.binary(), "binary"),
    Uuid: (pa.string(), "uuid"),
    Decimal128: (pa.string(), "decimal"),
    BsonTimestamp: (pa.struct([("t", pa.int64()), ("i", pa.int64())]), "bsonts"),
    dict: (pa.string(), "json"),
    list: (pa.string(), "json"),
    Binary: (pa.string(), "json"),
    ExtValue: (pa.string(), "json"),
}


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _with_id(text: str, n: int) -> str:
    """The case's document text with `"_id": n` first, the rest byte for byte (unless it has one)."""
    body = text.strip()
    if _has_id(body):
        return body
    assert body.startswith("{"), body
    rest = body[1:].lstrip()
    return f'{{"_id": {n}' + ("" if rest.startswith("}") else ", ") + rest


def _message(text: str, topic: str, n: int) -> KafkaSourceMessage:
    return KafkaSourceMessage(key=None, value=_with_id(text, n).encode(), topic=topic, partition=0, offset=n)


def _relaxed_numbers(v: Any, in_date: bool = False) -> Any:
    """Canonical Extended JSON with int32/int64/finite doubles as plain numbers: what JSON text holds."""
    if type(v) is list:
        return [_relaxed_numbers(x) for x in v]
    if type(v) is not dict:
        return v
    if len(v) == 1:
        [(k, x)] = v.items()
        if k in ("$numberInt", "$numberLong") and not in_date:
            return int(x)
        if k == "$numberDouble" and x not in ("NaN", "Infinity", "-Infinity"):
            return float(x)
        if k == "$date":
            return {k: _relaxed_numbers(x, in_date=True)}
    return {k: _relaxed_numbers(x) for k, x in v.items()}


def _variants(case: dict[str, Any]) -> list[str]:
    return [case[k] for k in ("canonical_extjson", "relaxed_extjson", "degenerate_extjson") if k in case]


def _valid(path: Path) -> list[dict[str, Any]]:
    return _load(path).get("valid", [])


def _parse_errors(path: Path) -> list[str]:
    data = _load(path)
    out = []
    for case in data.get("parseErrors", []):
        s = case["string"]
        if data["bson_type"] == "0x13":  # a Decimal128 string
            s = orjson.dumps({"d": {"$numberDecimal": s}}).decode()
        out.append(s)
    return out


def _parsed(text: str, topic: str, n: int) -> ChangeEvent | DeadLetter:
    got = DECODER.parse(_message(text, topic, n))
    assert not isinstance(got, tuple)
    return got  # type: ignore[return-value]


def _has_id(text: str) -> bool:
    try:
        return "_id" in orjson.loads(text)
    except orjson.JSONDecodeError:
        return False


def _without_id(doc: dict[str, Any]) -> dict[str, Any]:
    """The case's own fields: the `_id` the test added is left out (the corpus' own is kept)."""
    if type(doc.get("_id")) is int:
        return {k: v for k, v in doc.items() if k != "_id"}
    return doc


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_every_valid_case_decodes_to_the_spec_and_is_written_canonically(path: Path) -> None:
    """All spellings of a case decode to one value, and JSON text writes it as canonical Extended JSON."""
    for n, case in enumerate(_valid(path)):
        texts = {extjson.dumps(_without_id(_event(text, path, n).doc)) for text in _variants(case)}
        assert len(texts) == 1, (case["description"], texts)
        expected = _relaxed_numbers(orjson.loads(case["canonical_extjson"]))
        assert orjson.loads(texts.pop()) == expected, case["description"]
        assert orjson.dumps(
            orjson.loads(extjson.dumps(_without_id(_event(case["canonical_extjson"], path, n).doc)))
        ) == orjson.dumps(expected)


def _event(text: str, path: Path, n: int) -> ChangeEvent:
    got = _parsed(text, f"corpus.{path.stem}", n)
    assert isinstance(got, ChangeEvent), (path.name, text, got)
    return got


@pytest.mark.parametrize("path", [p for p in FILES if _parse_errors(p)], ids=lambda p: p.stem)
def test_every_parse_error_is_invalid_bson(path: Path) -> None:
    for n, text in enumerate(_parse_errors(path)):
        got = _parsed(text, f"corpus.{path.stem}", n)
        if (path.name, text) in ACCEPTED:
            assert isinstance(got, ChangeEvent)
            assert orjson.loads(extjson.dumps(_without_id(got.doc))) == ACCEPTED[(path.name, text)]
            continue
        assert isinstance(got, DeadLetter), (text, got)
        assert got.reason is Reason.INVALID_BSON, (text, got.error)


def _write(uri: str, events: list[ChangeEvent], sizes: list[int]) -> tuple[pa.Schema, dict[str, bytes]]:
    w = DeltaTableWriter(uri, mode="merge")
    start = 0
    for size in sizes:
        w.write(events[start : start + size])
        start += size
    assert start >= len(events)
    dt = DeltaTable(uri)
    schema = pa.schema(dt.schema().to_arrow())
    docs = read_documents(dt, Layout.from_schema(schema, {}), by="_key")
    return schema, {k: extjson.dumps(d) for k, d in docs.items()}


def _fields(doc: dict[str, Any]) -> dict[str, Any]:
    """What a mirror row holds of a document as fields: `_id` lives in the `_id` and `_key` columns,
    and a null field reads as absent."""
    return {k: v for k, v in doc.items() if k != "_id" and v is not None}


def _cuts(n: int, seed: int) -> list[int]:
    rng, sizes = random.Random(seed), []
    while sum(sizes) < n:
        sizes.append(rng.randint(1, max(1, n // 4)))
    return sizes


@pytest.mark.parametrize("path", [p for p in FILES if _valid(p)], ids=lambda p: p.stem)
def test_every_valid_case_lands_in_delta_with_its_value_and_type_in_any_batch_composition(
    path: Path, tmp_path: Path
) -> None:
    events = [_event(case["canonical_extjson"], path, n) for n, case in enumerate(_valid(path))]
    compositions = [[len(events)], _cuts(len(events), 1), _cuts(len(events), 2)]
    if len(events) <= 25:
        compositions.append([1] * len(events))
    results = [_write(str(tmp_path / str(i)), events, sizes) for i, sizes in enumerate(compositions)]
    schema, docs = results[0]
    for other in results[1:]:
        assert other == results[0]  # the same columns, kinds and values however the batches fell

    # Every value as the case has it (a null field reads as absent).
    expected = {e.key: extjson.dumps(_fields(e.doc)) for e in events}
    assert docs == expected

    # Every field's column has the type the README's mapping gives its first value.
    meta = {f.name: {k.decode(): v.decode() for k, v in (f.metadata or {}).items()} for f in schema}
    firsts: dict[str, Any] = {}
    for e in events:
        for k, v in _fields(e.doc).items():
            firsts.setdefault(k, v)
    for name, v in firsts.items():
        column = next(
            f for f in schema if meta[f.name].get("cdc.field") == name and meta[f.name]["cdc.role"] == "value"
        )
        assert (column.type, meta[column.name]["cdc.kind"]) == MAPPING[type(v)], (path.name, name, v)


def test_the_corpus_through_the_pipeline(tmp_path: Path) -> None:
    """Every valid case and parse error as Kafka messages through `python -m bytewax.run`: each
    file's valid cases are its collection's documents, each parse error one dead letter."""
    sample = tmp_path / "messages.jsonl"
    expected: dict[str, dict[str, bytes]] = {}
    dead = 0
    offset = 0
    with sample.open("wb") as f:
        for path in FILES:
            topic = f"corpus.{path.stem}"
            for case in _valid(path):
                text = _with_id(case["canonical_extjson"], offset)
                f.write(write_line(topic, None, text.encode()))
                ev = _event(case["canonical_extjson"], path, offset)
                expected.setdefault(path.stem, {})[ev.key] = extjson.dumps(_fields(ev.doc))
                offset += 1
            for text in _parse_errors(path):
                f.write(write_line(topic, None, _with_id(text, offset).encode()))
                if (path.name, text) in ACCEPTED:
                    expected[path.stem][f"n:{offset}"] = orjson.dumps(ACCEPTED[(path.name, text)])
                else:
                    dead += 1
                offset += 1
    lake = tmp_path / "lake"
    env = pipeline_env(
        CDC_SAMPLE_PATH=str(sample),
        CDC_LAKE_URI=str(lake),
        CDC_TABLE_MODE="merge",
        CDC_FORMAT="mongodb-full-document-only",
        CDC_RECOVERY_DIR="off",
        CDC_DLQ_FALLBACK=str(tmp_path / "dlq.jsonl"),
        CDC_BATCH_MAX_ROWS="97",
    )
    run_pipeline(env, timeout=600)
    for stem, docs in expected.items():
        dt = DeltaTable(str(lake / "corpus" / stem))
        stored = read_documents(dt, Layout.from_schema(pa.schema(dt.schema().to_arrow()), {}), by="_key")
        assert {k: extjson.dumps(d) for k, d in stored.items()} == docs, stem
    letters = [DeadLetter.from_json(line) for line in (tmp_path / "dlq.jsonl").read_bytes().splitlines()]
    assert len(letters) == dead
    assert {d.reason for d in letters} == {Reason.INVALID_BSON}
