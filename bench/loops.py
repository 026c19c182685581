"""The two reference loops, each run as its own process: `python -m bench.loops floor|baseline ...`.

floor     a plain confluent-kafka consume loop over every partition, from the beginning to the
          end offsets read at start, parsing each value with orjson and doing nothing else.
baseline  what a user would write by hand: the same loop, a row per event from the Debezium
          `payload.after` JSON (or the partial update's fields) with trivial Extended JSON
          unwrapping, plus op/partition/offset; a pyarrow table and `write_deltalake(mode="append")`
          per 10,000 events per collection. No dead letters, recovery or retries.

Each writes a JSON summary (events, tombstones, value bytes, rows written) to `--out`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import orjson


def consume_all(brokers: str, topics: list[str], timeout_s: float) -> Iterator[Any]:
    """Every message of `topics` from the beginning up to the end offsets seen at start."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer(
        {
            "bootstrap.servers": brokers,
            "group.id": f"bench-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    try:
        md = consumer.list_topics(timeout=30)
        remaining: dict[tuple[str, int], int] = {}  # partition -> last offset to read
        assignment = []
        for t in topics:
            for p in md.topics[t].partitions:
                low, high = consumer.get_watermark_offsets(TopicPartition(t, p), timeout=30)
                if high > low:
                    remaining[(t, p)] = high - 1
                assignment.append(TopicPartition(t, p, OFFSET_BEGINNING))
        consumer.assign(assignment)
        deadline = time.monotonic() + timeout_s
        while remaining and time.monotonic() < deadline:
            for msg in consumer.consume(5000, timeout=0.5):
                if msg.error() is not None:
                    continue
                yield msg
                tp = (msg.topic(), msg.partition())
                if tp in remaining and msg.offset() >= remaining[tp]:
                    del remaining[tp]
        if remaining:
            raise TimeoutError(f"partitions not read to the end in {timeout_s:.0f}s: {sorted(remaining)}")
    finally:
        consumer.close()


def floor(args: argparse.Namespace) -> dict[str, Any]:
    events = tombstones = nbytes = 0
    for msg in consume_all(args.brokers, args.topics, args.timeout):
        value = msg.value()
        if value is None:
            tombstones += 1
            continue
        orjson.loads(value)
        events += 1
        nbytes += len(value)
    return {"events": events, "tombstones": tombstones, "value_bytes": nbytes, "rows_written": 0}


def trivial(v: Any) -> Any:
    """The Extended JSON a user would unwrap by hand; nested documents and arrays as JSON text."""
    if isinstance(v, dict):
        if len(v) == 1:
            ((k, x),) = v.items()
            if k == "$oid":
                return x
            if k in ("$numberInt", "$numberLong"):
                return int(x)
            if k == "$numberDouble":
                return float(x)
            if k == "$date":
                ms = int(x["$numberLong"]) if isinstance(x, dict) else int(x)
                return datetime.fromtimestamp(ms / 1000, UTC)
        return orjson.dumps(v).decode()
    if isinstance(v, list):
        return orjson.dumps(v).decode()
    return v


def row_of(msg: Any, value: bytes) -> dict[str, Any]:
    p = orjson.loads(value)["payload"]
    if p.get("after"):
        doc = orjson.loads(p["after"])
    elif (ud := p.get("updateDescription")) and ud.get("updatedFields"):
        doc = orjson.loads(ud["updatedFields"])
    else:
        doc = {}
    row = {k: trivial(v) for k, v in doc.items()}
    if "_id" not in row:  # deletes and partial updates: the key has it
        row["_id"] = trivial(orjson.loads(orjson.loads(msg.key())["payload"]["id"]))
    row["_op"] = p["op"]
    row["_partition"] = msg.partition()
    row["_offset"] = msg.offset()
    return row


def to_table(rows: list[dict[str, Any]]):
    """Columns in order of first appearance; a column null throughout this batch is left out."""
    import pyarrow as pa

    names: dict[str, None] = {}
    for r in rows:
        names.update(dict.fromkeys(r))
    arrays = {}
    for name in names:
        arr = pa.array([r.get(name) for r in rows])
        if not pa.types.is_null(arr.type):
            arrays[name] = arr
    return pa.table(arrays)


def storage_options() -> dict[str, str]:
    keys = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_ALLOW_HTTP")
    return {k: os.environ[k] for k in keys if os.environ.get(k)}


def baseline(args: argparse.Namespace) -> dict[str, Any]:
    from deltalake import write_deltalake

    opts = storage_options()
    buffers: dict[str, list[dict[str, Any]]] = {}
    written = 0

    def flush(topic: str) -> None:
        nonlocal written
        rows = buffers.pop(topic, [])
        if rows:
            uri = f"{args.lake.rstrip('/')}/{topic.split('.')[-2]}/{topic.split('.')[-1]}"
            write_deltalake(uri, to_table(rows), mode="append", schema_mode="merge", storage_options=opts)
            written += len(rows)

    events = tombstones = nbytes = 0
    for msg in consume_all(args.brokers, args.topics, args.timeout):
        value = msg.value()
        if value is None:
            tombstones += 1
            continue
        events += 1
        nbytes += len(value)
        rows = buffers.setdefault(msg.topic(), [])
        rows.append(row_of(msg, value))
        if len(rows) >= args.batch_rows:
            flush(msg.topic())
    for topic in list(buffers):
        flush(topic)
    return {"events": events, "tombstones": tombstones, "value_bytes": nbytes, "rows_written": written}


LOOPS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {"floor": floor, "baseline": baseline}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loops", description=__doc__.splitlines()[0])
    parser.add_argument("loop", choices=sorted(LOOPS))
    parser.add_argument("--brokers", required=True)
    parser.add_argument("--topics", required=True, type=lambda s: s.split(","))
    parser.add_argument("--lake", help="s3://bucket/prefix (baseline)")
    parser.add_argument("--batch-rows", type=int, default=10_000)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.loop == "baseline" and not args.lake:
        parser.error("baseline needs --lake")
    started = time.monotonic()
    result = LOOPS[args.loop](args)
    result["loop_seconds"] = time.monotonic() - started
    with open(args.out, "wb") as f:
        f.write(orjson.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
