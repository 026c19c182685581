"""Running the real pipeline as a separate process, and an independent model to check it against."""

from __future__ import annotations

import collections
import math
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import yaml
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition
from deltalake import DeltaTable

from dataflow.model import ChangeEvent, DeadLetter
from services.generate import Change, Generator, Message, ObjectId

ROOT = Path(__file__).resolve().parent.parent


def pipeline_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDC_")}
    env.update({"CDC_STOP_AT_END": "1", "CDC_LOG_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1"})
    env.update(overrides)
    return env


def run_pipeline(
    env: dict[str, str], *, timeout: float = 600, args: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    """`python -m bytewax.run dataflow.main:flow` to completion; fails the test on a non-zero exit."""
    proc = subprocess.run(
        [sys.executable, "-m", "bytewax.run", "dataflow.main:flow", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"pipeline exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
        )
    return proc


def cli(env: dict[str, str], *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    """`python -m dataflow.cli <args>` to completion; fails the test on a non-zero exit unless not `ok`."""
    proc = subprocess.run(
        [sys.executable, "-m", "dataflow.cli", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if ok:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def lake_env(
    brokers: str, s3_env: dict[str, str], topics: list[str], bucket: str, tmp_path: Path, **extra: str
) -> dict[str, str]:
    """A pipeline that reads `topics` into `s3://<bucket>/lake` in merge mode (changelogs and mirrors),
    with recovery in tmp_path."""
    settings = dict(
        CDC_KAFKA_BROKERS=brokers,
        CDC_TOPICS=",".join(topics),
        CDC_LAKE_URI=f"s3://{bucket}/lake",
        CDC_TABLE_MODE="merge",
        CDC_DLQ_FALLBACK=str(tmp_path / "fallback.jsonl"),
        CDC_RECOVERY_DIR=str(tmp_path / "recovery"),
        CDC_BATCH_MAX_ROWS="4000",
        CDC_BATCH_MAX_SECONDS="1",
        CDC_SNAPSHOT_SECONDS="2",
        CDC_LOG_LEVEL="INFO",
        CDC_BREAKER_RESET_SECONDS="5",
        CDC_RETRY_INITIAL_SECONDS="0.2",
        CDC_RETRY_MAX_SECONDS="2",
        CDC_STORAGE_MAX_RETRIES="2",
        CDC_STORAGE_RETRY_TIMEOUT="3s",
        **s3_env,
    )
    return pipeline_env(**(settings | extra))


class Model:
    """The collections' expected state, computed from the generator's logical changes alone."""

    def __init__(self) -> None:
        self.tables: dict[str, dict[str, dict[str, Any]]] = {}
        self.events: dict[str, int] = {}

    def apply(self, messages: list[Message]) -> None:
        for m in messages:
            if m.change is not None:
                self._apply(m.change)

    def _apply(self, c: Change) -> None:
        table = self.tables.setdefault(c.collection, {})
        self.events[c.collection] = self.events.get(c.collection, 0) + 1
        if c.op == "delete":
            table.pop(c.id, None)
        elif c.op == "partial":
            doc = {k: v for k, v in table.get(c.id, {"_id": ObjectId(c.id)}).items() if k not in c.removed}
            table[c.id] = doc | c.updated
        else:
            table[c.id] = dict(c.doc)


def plain(value: Any) -> Any:
    """Model values as JSON would carry them, for comparing with JSON-text columns."""
    if isinstance(value, ObjectId):
        return value.hex
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, datetime):
        return value.astimezone(UTC)
    return value


def same(stored: Any, expected: Any) -> bool:
    """Does a stored Delta value equal the model's value under the documented type mapping?"""
    expected = plain(expected)
    if stored is None or expected is None:
        return stored is None and expected is None
    if isinstance(stored, bool) or isinstance(expected, bool):
        return stored is expected
    if isinstance(expected, float) and math.isnan(expected):
        return isinstance(stored, float) and math.isnan(stored)
    if isinstance(expected, datetime) and isinstance(stored, datetime):
        return stored.astimezone(UTC) == expected
    return stored == expected


def table_rows(uri: str, storage_options: dict[str, str] | None = None) -> list[dict[str, Any]]:
    return DeltaTable(uri, storage_options=storage_options).to_pyarrow_table().to_pylist()


def assert_table_matches(uri: str, expected: dict[str, dict[str, Any]], storage_options=None) -> int:
    """Every live row equals the model's document, column by column; no row missing or extra.

    Tombstones (`_deleted`, a deleted document's key and sequence) are no document: they
    must hold no field value, and they are left out.
    """
    table = DeltaTable(uri, storage_options=storage_options)
    json_columns = {f.name for f in table.schema().fields if (f.metadata or {}).get("cdc.kind") == "json"}
    rows = []
    for r in table.to_pyarrow_table().to_pylist():
        if not r.get("_deleted"):
            rows.append(r)
            continue
        values = {k: v for k, v in r.items() if not k.startswith("_") and v is not None}
        assert not values, f"{uri}: the tombstone of {r['_id']} holds values {values}"
    by_id = {r["_id"]: r for r in rows}
    assert len(by_id) == len(rows), f"{uri}: duplicate _id rows"
    assert set(by_id) == set(expected), (
        f"{uri}: {len(set(expected) - set(by_id))} rows missing, {len(set(by_id) - set(expected))} extra"
    )
    mismatches = []
    for _id, doc in expected.items():
        row = by_id[_id]
        for col, stored in row.items():
            if col.startswith("_") and col != "_id" or col.endswith("__json"):
                continue  # pipeline metadata (_seq, _op, _ts, ...) and drift companions
            if col in json_columns and stored is not None:
                stored = orjson.loads(stored)  # a JSON-text column: nested values, or a drifting field
            elif stored is None and row.get(f"{col}__json") is not None:
                stored = orjson.loads(row[f"{col}__json"])  # a value that did not fit the column's type
            want = ObjectId(_id).hex if col == "_id" else doc.get(col)
            if not same(stored, want):
                mismatches.append((_id, col, stored, plain(want)))
        missing_cols = set(doc) - set(row)
        if missing_cols:
            mismatches.append((_id, "missing columns", sorted(missing_cols), None))
    assert not mismatches, f"{uri}: {len(mismatches)} mismatches, first: {mismatches[:5]}"
    return len(rows)


class PipelineProcess:
    """`python -m dataflow` in the background, its output watched line by line for markers."""

    def __init__(self, env: dict[str, str], log: Path, args: tuple[str, ...] = ()) -> None:
        import threading

        self.log = log
        self.lines: list[str] = []
        self.commit_begun = threading.Event()
        self.round_begun = threading.Event()  # a materializer round has begun (merge mode)
        self.maintenance_begun = threading.Event()  # compaction, vacuum... of a table has begun
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dataflow", *args],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with open(self.log, "a") as out:
            for line in self.proc.stdout:
                out.write(line)
                self.lines.append(line)
                if "commit begin" in line:
                    self.commit_begun.set()
                if "round begin" in line:
                    self.round_begun.set()
                if "maintenance begin" in line:
                    self.maintenance_begun.set()

    def wait_for(self, marker: str, count: int, timeout: float) -> None:
        """Until `count` lines hold `marker`; fails the test if that does not happen in time."""
        deadline = time.monotonic() + timeout
        while (seen := sum(marker in line for line in self.lines)) < count:
            assert self.proc.poll() is None, (
                f"the pipeline exited after {seen} of {count} {marker!r} lines:\n{self.tail()}"
            )
            assert time.monotonic() < deadline, (
                f"only {seen} of {count} {marker!r} lines in {timeout:.0f}s:\n{self.tail()}"
            )
            time.sleep(0.1)

    def kill(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        rc = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=10)
        return rc

    def tail(self, n: int = 40) -> str:
        return "".join(self.lines[-n:])


def start_cluster(env: dict[str, str], log_dir: Path, processes: int = 2) -> list[PipelineProcess]:
    """`python -m dataflow -i N -a ...`: one Bytewax cluster of `processes` processes on 127.0.0.1."""
    from services.process import free_port

    addresses = ";".join(f"127.0.0.1:{free_port()}" for _ in range(processes))
    return [
        PipelineProcess(env, log_dir / f"process-{i}.log", args=("-i", str(i), "-a", addresses))
        for i in range(processes)
    ]


# ---------------------------------------------------------------- shared checks


def read_topic(
    bootstrap: str, topic: str, expected: int, timeout: float = 60, config: dict[str, str] | None = None
) -> list[Any]:
    """Every message on `topic`, read to the end of each partition (confluent-kafka messages).

    Fails when fewer than `expected` have arrived by `timeout`. Partitions are
    assigned, not subscribed, so an empty answer is never a group still joining.
    `config` adds client settings (TLS, SASL).
    """
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"check-{topic}",
            "enable.partition.eof": True,
            **(config or {}),
        }
    )
    out: list[Any] = []
    try:
        partitions = consumer.list_topics(topic, timeout=30).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        at_end: set[int] = set()
        deadline = time.monotonic() + timeout
        while len(at_end) < len(partitions) or len(out) < expected:
            assert time.monotonic() < deadline, f"{len(out)} of {expected} messages on {topic} in {timeout}s"
            for m in consumer.consume(1000, timeout=0.5):
                if m.error() is None:
                    out.append(m)
                    at_end.discard(m.partition())
                elif m.error().code() == KafkaError._PARTITION_EOF:
                    at_end.add(m.partition())
                else:
                    raise AssertionError(f"reading {topic}: {m.error()}")
    finally:
        consumer.close()
    return out


def read_dlq(
    bootstrap: str, topic: str, expected: int, timeout: float = 60, config: dict[str, str] | None = None
) -> list[DeadLetter]:
    """Every dead letter on the DLQ topic (see `read_topic`)."""
    return [DeadLetter.from_json(m.value()) for m in read_topic(bootstrap, topic, expected, timeout, config)]


def assert_exactly_once(model: Model, gen: Generator, bucket: str, so: dict[str, str]) -> dict[str, int]:
    """Tables equal the model; the changelog holds each (topic, partition, offset) once."""
    counts = {}
    for coll, expected in model.tables.items():
        assert_table_matches(f"s3://{bucket}/lake/{gen.db}/{coll}", expected, so)
    for coll, n in model.events.items():
        rows = table_rows(f"s3://{bucket}/lake/_changelog/{gen.db}/{coll}", so)
        seen = collections.Counter(
            (r["_source_topic"], r["_source_partition"], r["_source_offset"]) for r in rows
        )
        dupes = [k for k, c in seen.items() if c > 1]
        assert not dupes, f"{coll}: {len(dupes)} offsets twice in the changelog, e.g. {dupes[:3]}"
        assert len(rows) == n, f"{coll}: changelog has {len(rows)} rows, the model {n} changes"
        counts[coll] = len(rows)
    return counts


# ---------------------------------------------------------------- events

TOPIC = "cdc.shop.orders"
BASE_MS = 1_700_000_000_000


def ev(
    id: str,
    op: str = "insert",
    doc: dict[str, Any] | None = None,
    *,
    offset: int,
    partition: int = 0,
    ts_ms: int | None = None,
    ord: int = 0,
    updated: dict[str, Any] | None = None,
    removed: tuple[str, ...] = (),
    topic: str = TOPIC,
) -> ChangeEvent:
    """A change event; by default its cluster time grows with the offset."""
    if op in ("insert", "replace") and doc is None:
        doc = {}
    if doc is not None:
        doc = {"_id": id, **doc}
    return ChangeEvent(
        db="shop",
        collection="orders",
        id=id,
        op=op,  # type: ignore[arg-type]
        doc=doc,
        ts_ms=BASE_MS + offset * 1000 if ts_ms is None else ts_ms,
        ord=ord,
        topic=topic,
        partition=partition,
        offset=offset,
        size=100,
        updated=updated,
        removed=removed,
    )


# ---------------------------------------------------------------- YAML


class StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (as promtool and
    kubectl do) instead of keeping the last one silently."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"duplicate key {key!r}",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)
