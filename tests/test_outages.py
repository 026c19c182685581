"""Real outages: MinIO stopped, MinIO throttling, Delta refusing some events, the broker restarting."""

from __future__ import annotations

import json
import re
import threading
import time
from datetime import datetime
from pathlib import Path

import orjson
import pytest

from dataflow.model import Reason
from services.generate import Generator, Message, produce
from tests.faults import FaultProxy
from tests.harness import (
    Model,
    PipelineProcess,
    assert_exactly_once,
    assert_table_matches,
    lake_env,
    read_dlq,
    table_rows,
)

pytestmark = pytest.mark.integration
REPORT = Path(__file__).resolve().parent.parent / ".cache" / "reports"


def env_for(kafka, s3_env: dict, gen: Generator, bucket: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    return lake_env(
        kafka.bootstrap, s3_env, gen.topics, bucket, tmp_path, **({"CDC_BATCH_MAX_ROWS": "2000"} | extra)
    )


class PeakRss:
    """Samples a process's peak resident memory (VmHWM) until it exits."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak_kib = pid, 0
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                text = Path(f"/proc/{self.pid}/status").read_text()
            except OSError:
                return
            if m := re.search(r"VmHWM:\s+(\d+) kB", text):
                self.peak_kib = max(self.peak_kib, int(m.group(1)))
            time.sleep(0.5)


def commit_rate(lines: list[str], start: float, end: float) -> float:
    """Events committed a second between two wall-clock times, from the pipeline's JSON log."""
    total = 0
    for line in lines:
        if not line.startswith("{") or "commit end" not in line:
            continue
        rec = json.loads(line)
        when = datetime.fromisoformat(rec["ts"]).timestamp()
        if "/_changelog/" not in rec["msg"] and start <= when < end:
            total += rec["rows"]
    return total / max(end - start, 1e-9)


@pytest.mark.parametrize("background", ["0", "1"], ids=["commits-in-step", "background-commits"])
def test_minio_stopped_for_30s_mid_run(kafka, own_s3, tmp_path, background) -> None:
    gen = Generator(collections=3, prefix=f"out{tmp_path.name[-6:]}", seed=31, doc_bytes=600)
    messages = list(gen.messages(100_000))
    kafka.create_topics(gen.topics, partitions=4)
    produce(kafka.bootstrap, iter(messages))
    model = Model()
    model.apply(messages)
    bucket = own_s3.bucket("outage")
    dlq_topic = kafka.topic("dlq", partitions=1)
    env = env_for(
        kafka, own_s3.env, gen, bucket, tmp_path, CDC_BACKGROUND_COMMITS=background, CDC_DLQ_TOPIC=dlq_topic
    )
    p = PipelineProcess(env, tmp_path / "pipeline.log")
    rss = PeakRss(p.proc.pid)
    p.wait_for("commit end", 6, 120)
    before_start = time.time() - 5
    down_at = time.time()
    own_s3.server.stop()
    time.sleep(30)
    own_s3.server.start()
    up_at = time.time()
    assert p.wait(600) == 0, p.tail()
    text = "".join(p.lines)
    assert "circuit breaker storage opened" in text
    assert "circuit breaker storage closed again" in text
    assert_exactly_once(model, gen, bucket, own_s3.storage_options)
    assert not (tmp_path / "fallback.jsonl").exists()  # nothing dead-lettered for an outage
    assert read_dlq(kafka.bootstrap, dlq_topic, 0) == []
    figures = {
        "events": len(messages),
        "outage_seconds": round(up_at - down_at, 1),
        "peak_rss_mib": round(rss.peak_kib / 1024, 1),
        "events_per_s_before": round(commit_rate(p.lines, before_start, down_at), 1),
        "events_per_s_after": round(commit_rate(p.lines, up_at, up_at + 10), 1),
    }
    REPORT.mkdir(parents=True, exist_ok=True)
    name = "minio-outage.json" if background == "0" else "minio-outage-background.json"
    (REPORT / name).write_text(json.dumps(figures, indent=2) + "\n")
    print(f"\nMinIO outage: {figures}")


def test_minio_answering_503_to_a_third_of_requests(kafka, s3, tmp_path) -> None:
    gen = Generator(collections=2, prefix=f"slow{tmp_path.name[-6:]}", seed=32, doc_bytes=400)
    messages = list(gen.messages(20_000))
    kafka.create_topics(gen.topics, partitions=2)
    dlq_topic = kafka.topic("dlq", partitions=1)
    produce(kafka.bootstrap, iter(messages))
    model = Model()
    model.apply(messages)
    bucket = s3.bucket("throttle")
    upstream = int(s3.env["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    with FaultProxy(upstream, fail_ratio=1 / 3) as proxy:
        env = env_for(
            kafka,
            {**s3.env, "AWS_ENDPOINT_URL": proxy.endpoint},
            gen,
            bucket,
            tmp_path,
            CDC_DLQ_TOPIC=dlq_topic,
        )
        p = PipelineProcess(env, tmp_path / "pipeline.log")
        assert p.wait(600) == 0, p.tail()
        requests, failed = proxy.requests, proxy.failed
    assert failed > 50 and 0.25 < failed / requests < 0.42, (failed, requests)
    assert_exactly_once(model, gen, bucket, s3.storage_options)
    assert not (tmp_path / "fallback.jsonl").exists()
    assert read_dlq(kafka.bootstrap, dlq_topic, 0) == []
    print(f"\n503 proxy: {failed} of {requests} requests refused")


def test_only_the_events_delta_refuses_reach_the_dlq(kafka, s3, tmp_path) -> None:
    gen = Generator(collections=1, prefix=f"refuse{tmp_path.name[-6:]}", seed=33, doc_bytes=300)
    messages = list(gen.messages(5_000))
    refused: list[Message] = []
    # 20 inserts carry a sub-document nested 300 deep: it decodes, but no JSON text holds it
    # (orjson writes 254 levels), so Delta refuses exactly those events.
    deep = "".join(f'{{"l{n}":' for n in range(300)) + "1" + "}" * 300
    for m in messages[100::250]:
        if m.change is None or m.change.op != "insert":
            continue
        env = orjson.loads(m.value)
        after = env["payload"]["after"]
        env["payload"]["after"] = after[:-1] + ', "deep": ' + deep + "}"
        m.value = orjson.dumps(env)
        m.change = None  # the model does not expect it
        refused.append(m)
    kafka.create_topics(gen.topics, partitions=2)
    dlq_topic = kafka.topic("dlq", partitions=1)
    produce(kafka.bootstrap, iter(messages))
    bucket = s3.bucket("refuse")
    env = env_for(
        kafka,
        s3.env,
        gen,
        bucket,
        tmp_path,
        CDC_DLQ_TOPIC=dlq_topic,
        CDC_TABLE_MODE="append",
        CDC_BATCH_MAX_ROWS="1000",
    )
    p = PipelineProcess(env, tmp_path / "pipeline.log")
    assert p.wait(600) == 0, p.tail()
    dead = read_dlq(kafka.bootstrap, dlq_topic, len(refused))
    assert sorted(d.value for d in dead) == sorted(m.value for m in refused)
    assert {d.reason for d in dead} == {Reason.DELTA_WRITE_ERROR}
    rows = table_rows(f"s3://{bucket}/lake/{gen.db}/{gen.names[0]}", s3.storage_options)
    expected = sum(1 for m in messages if m.change is not None)
    assert len(rows) == expected
    assert len({(r["_source_partition"], r["_source_offset"]) for r in rows}) == expected


def test_kafka_broker_restarted_mid_run(own_kafka, s3, tmp_path) -> None:
    gen = Generator(collections=2, prefix=f"kr{tmp_path.name[-6:]}", seed=34, doc_bytes=500)
    messages = list(gen.messages(60_000))
    own_kafka.create_topics(gen.topics, partitions=3)
    produce(own_kafka.bootstrap, iter(messages))
    model = Model()
    model.apply(messages)
    bucket = s3.bucket("brokerrestart")
    p = PipelineProcess(
        env_for(own_kafka, s3.env, gen, bucket, tmp_path, CDC_BATCH_MAX_ROWS="1000"),
        tmp_path / "pipeline.log",
    )
    p.wait_for("commit end", 4, 120)
    own_kafka.server.stop()
    time.sleep(8)
    own_kafka.server.start()
    assert p.wait(600) == 0, p.tail()
    assert_exactly_once(model, gen, bucket, s3.storage_options)
    for coll, expected in model.tables.items():
        assert_table_matches(f"s3://{bucket}/lake/{gen.db}/{coll}", expected, s3.storage_options)
