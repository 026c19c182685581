"""A file of recorded Kafka messages as a resumable Bytewax source (the embedded demo).

Each line of the JSONL file is one message: `topic`, and `key`/`value` as text
(or `key_b64`/`value_b64` for bytes that are not UTF-8; `null` for a
tombstone). Every topic is one partition; the offset is the message's index
within its topic, and the resume state is the next offset to read.
"""

from __future__ import annotations

import base64
from collections import defaultdict
from pathlib import Path

import orjson
from bytewax.connectors.kafka import KafkaSourceMessage
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition

from dataflow.runtime.shutdown import Stoppable


def _field(line: dict, name: str) -> bytes | None:
    if line.get(f"{name}_b64") is not None:
        return base64.b64decode(line[f"{name}_b64"])
    value = line.get(name)
    return None if value is None else value.encode()


def read_messages(path: str | Path) -> dict[str, list[tuple[bytes | None, bytes | None]]]:
    by_topic: dict[str, list[tuple[bytes | None, bytes | None]]] = defaultdict(list)
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                d = orjson.loads(line)
                by_topic[d["topic"]].append((_field(d, "key"), _field(d, "value")))
    return dict(by_topic)


def write_line(topic: str, key: bytes | None, value: bytes | None) -> bytes:
    """The file format `read_messages` reads, for the sample generator."""
    out: dict = {"topic": topic}
    for name, data in (("key", key), ("value", value)):
        try:
            out[name] = None if data is None else data.decode("utf-8")
        except UnicodeDecodeError:
            out[f"{name}_b64"] = base64.b64encode(data).decode()
    return orjson.dumps(out) + b"\n"


class _TopicPartition(StatefulSourcePartition[KafkaSourceMessage, int]):
    def __init__(self, topic: str, messages: list, next_offset: int, batch_size: int) -> None:
        self.topic, self.messages, self.offset, self.batch_size = topic, messages, next_offset, batch_size

    def next_batch(self) -> list[KafkaSourceMessage]:
        if self.offset >= len(self.messages):
            raise StopIteration
        start, self.offset = self.offset, min(self.offset + self.batch_size, len(self.messages))
        return [
            KafkaSourceMessage(key=k, value=v, topic=self.topic, partition=0, offset=i)
            for i, (k, v) in enumerate(self.messages[start : self.offset], start)
        ]

    def snapshot(self) -> int:
        return self.offset


class SampleFileSource(FixedPartitionedSource[KafkaSourceMessage, int]):
    """Reads a recorded message file as if it were one partition per topic."""

    def __init__(self, path: str | Path, batch_size: int = 500) -> None:
        self.path = Path(path)
        self.batch_size = batch_size

    def list_parts(self) -> list[str]:
        return sorted(read_messages(self.path))

    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> Stoppable:
        messages = read_messages(self.path)[for_part]
        return Stoppable(_TopicPartition(for_part, messages, resume_state or 0, self.batch_size))
