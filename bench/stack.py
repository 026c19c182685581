"""The benchmark's own Kafka and MinIO (free ports on 127.0.0.1, a temporary folder) and pipeline commands."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dataflow.runtime.settings import s3_storage_options
from services import admin
from services.kafka import Kafka
from services.minio import MinIO
from services.process import free_port

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "bench"


@dataclass
class Stack:
    tmp: Path
    kafka: Kafka
    minio: MinIO
    bucket: str = BUCKET

    @property
    def brokers(self) -> str:
        return self.kafka.bootstrap

    @property
    def aws_env(self) -> dict[str, str]:
        return self.minio.env()

    @property
    def storage_options(self) -> dict[str, str]:
        return s3_storage_options(self.aws_env)

    def s3(self):
        return admin.s3_client(self.aws_env)

    def lake(self, name: str) -> str:
        return f"s3://{self.bucket}/{name}"

    def table_uri(self, name: str, topic: str) -> str:
        """`<lake>/<db>/<collection>` for a `<prefix>.<db>.<collection>` topic, as the pipeline lays it out."""
        _, db, collection = topic.split(".", 2)
        return f"{self.lake(name)}/{db}/{collection}"


@contextlib.contextmanager
def started(tmp: Path) -> Iterator[Stack]:
    """Kafka and MinIO for the duration of the block; both stopped at its end, whatever happens."""
    minio = MinIO(tmp / "minio-data")
    kafka = Kafka(tmp / "kafka")
    minio.start()
    try:
        kafka.start()
        try:
            stack = Stack(tmp, kafka, minio)
            admin.create_bucket(stack.aws_env, stack.bucket)
            yield stack
        finally:
            kafka.stop()
    finally:
        minio.stop()


def base_env(stack: Stack) -> dict[str, str]:
    """This environment without any CDC_/BYTEWAX_ setting, plus the MinIO credentials."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CDC_", "BYTEWAX_", "AWS_"))}
    env.update(stack.aws_env)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def pipeline_commands(
    stack: Stack,
    name: str,
    topics: list[str],
    *,
    mode: str,
    processes: int = 1,
    stop_at_end: bool = True,
    batch_rows: int | None = None,
    batch_max_seconds: float = 5.0,
    dlq_topic: str = "bench.dlq",
    prefix: list[str] | None = None,
) -> list[tuple[list[str], dict[str, str]]]:
    """`python -m dataflow` (recovery on), once per process, each with the same environment.

    `batch_rows=None` leaves CDC_BATCH_MAX_ROWS to the pipeline's default for the mode.
    """
    work = stack.tmp / name
    work.mkdir(parents=True, exist_ok=True)
    env = base_env(stack) | {
        "CDC_KAFKA_BROKERS": stack.brokers,
        "CDC_TOPICS": ",".join(topics),
        "CDC_LAKE_URI": stack.lake(name),
        "CDC_TABLE_MODE": mode,
        "CDC_STOP_AT_END": "1" if stop_at_end else "0",
        "CDC_RECOVERY_DIR": str(work / "recovery"),
        "CDC_DLQ_TOPIC": dlq_topic,
        "CDC_DLQ_FALLBACK": str(work / "dlq-fallback.jsonl"),
        "CDC_BATCH_MAX_SECONDS": str(batch_max_seconds),
        "CDC_LOG_LEVEL": "WARNING",
    }
    if batch_rows is not None:  # else the pipeline's own default for the mode
        env["CDC_BATCH_MAX_ROWS"] = str(batch_rows)
    argv = [*(prefix or []), sys.executable, "-m", "dataflow"]
    if processes == 1:
        return [(argv, env)]
    ports: set[int] = set()
    while len(ports) < processes:
        ports.add(free_port())
    addresses = ";".join(f"127.0.0.1:{p}" for p in sorted(ports))
    return [([*argv, "-i", str(i), "-a", addresses], env) for i in range(processes)]
