"""The retry policy, the failure classes of real exceptions, and the breaker, on a clock the test controls."""

from __future__ import annotations

import os
import random
import shutil
import socket

import pyarrow as pa
import pytest
from circuitbreaker import CircuitBreakerError
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient
from deltalake import DeltaTable, write_deltalake
from deltalake.exceptions import CommitFailedError, SchemaMismatchError
from minio.error import S3Error

from dataflow.lake.changelog import Changelog
from dataflow.lake.columns import to_json_bytes
from dataflow.lake.storage import s3_client
from dataflow.lake.writer import DeltaTableWriter
from dataflow.model import Reason
from dataflow.runtime.failures import BadData, ConfigError, Kind, Unavailable, classify
from dataflow.runtime.metrics import BREAKER_OPENS, BREAKER_STATE, RETRY_EXHAUSTED
from dataflow.runtime.retry import RetryPolicy, StorageBreaker
from dataflow.runtime.settings import Settings
from tests.harness import ev


def test_delay_grows_exponentially_and_caps() -> None:
    p = RetryPolicy(initial=0.5, cap=30, jitter=0)
    assert [p.delay(a) for a in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert p.delay(10_000) == 30  # no overflow however long an outage lasts


def test_jitter_stays_within_twenty_percent_and_spreads() -> None:
    p = RetryPolicy(initial=1, cap=30, jitter=0.2)
    rng = random.Random(1)
    delays = [p.delay(3, rng.random) for _ in range(2000)]
    assert min(delays) >= 8 * 0.8 and max(delays) <= 8 * 1.2
    # Spread: both ends of the band are used, so retries from many workers do not align.
    assert min(delays) < 8 * 0.82 and max(delays) > 8 * 1.18
    capped = [p.delay(20, rng.random) for _ in range(500)]
    assert min(capped) >= 30 * 0.8 and max(capped) <= 30 * 1.2


def test_worst_case_wait_is_stated_by_the_policy() -> None:
    assert RetryPolicy(initial=0.5, cap=30, jitter=0.2, attempts=8).worst_case_wait == pytest.approx(
        1.2 * (0.5 + 1 + 2 + 4 + 8 + 16 + 30)
    )
    assert RetryPolicy(attempts=None).worst_case_wait is None
    assert RetryPolicy(cap=30, jitter=0.2).longest_wait == pytest.approx(36)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unreachable_s3() -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{closed_port()}",
        "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": "s",
        "AWS_REGION": "us-east-1",
        "AWS_ALLOW_HTTP": "true",
        "max_retries": "0",
    }


def raised(fn) -> BaseException:
    try:
        fn()
    except BaseException as e:
        return e
    raise AssertionError("it did not raise")


def test_classes_of_real_failures(tmp_path) -> None:
    """Each kind from a real cause, raised by the library that raises it in the pipeline."""
    # Storage that does not answer: delta-rs raises OSError.
    down = raised(lambda: DeltaTable("s3://lake/t", storage_options=unreachable_s3()))
    assert isinstance(down, OSError) and classify(down) is Kind.UNAVAILABLE
    # A broker that does not answer: confluent-kafka's transport failure.
    admin = AdminClient({"bootstrap.servers": f"127.0.0.1:{closed_port()}", "log_level": 0})
    kafka_down = raised(lambda: admin.list_topics(timeout=1))
    assert isinstance(kafka_down, KafkaException) and classify(kafka_down) is Kind.UNAVAILABLE
    # A table of the other mode: a configuration error, never the data's fault.
    merge = DeltaTableWriter(str(tmp_path / "t"), mode="merge")
    merge.write([ev("1", doc={"a": 1}, offset=1)])
    mismatch = raised(lambda: DeltaTableWriter(str(tmp_path / "t"), mode="append").write([ev("2", offset=2)]))
    assert isinstance(mismatch, ConfigError) and classify(mismatch) is Kind.CONFIG
    assert "CDC_TABLE_MODE" in str(mismatch)
    # A value no column holds: bad data, with the reason its dead letter gets.
    huge = raised(lambda: to_json_bytes({"n": 2**70}))
    assert isinstance(huge, BadData) and huge.reason is Reason.DELTA_WRITE_ERROR
    assert classify(huge) is Kind.BAD_DATA
    # delta-rs refusing what our own column planning produced: our bug.
    write_deltalake(str(tmp_path / "plain"), pa.table({"a": [1]}))
    schema = raised(lambda: write_deltalake(str(tmp_path / "plain"), pa.table({"b": [1]}), mode="append"))
    assert isinstance(schema, SchemaMismatchError) and classify(schema) is Kind.BUG
    cast = raised(lambda: write_deltalake(str(tmp_path / "plain"), pa.table({"a": ["x"]}), mode="append"))
    assert classify(cast) is Kind.BUG
    # A changelog file gone from under the change feed: waiting will not bring it back.
    log = DeltaTableWriter(str(tmp_path / "log"), mode="append")
    log.write([ev("1", doc={"a": 1}, offset=1)])
    log.write([ev("2", doc={"a": 1}, offset=2)])
    for uri in DeltaTable(str(tmp_path / "log")).file_uris():
        os.remove(uri.removeprefix("file://"))
    feed = raised(lambda: Changelog(str(tmp_path / "log"), "shop", "orders").events(1, 2))
    assert isinstance(feed, pa.ArrowException) and classify(feed) is Kind.BUG
    # A table that vanished under us is not an outage to wait out.
    shutil.rmtree(tmp_path / "plain")
    gone = raised(lambda: DeltaTable(str(tmp_path / "plain")))
    assert classify(gone) is Kind.BUG
    # A bad setting.
    assert classify(raised(lambda: Settings.from_env({"CDC_LOG_LEVEL": "VERBOSE"}))) is Kind.CONFIG
    # Anything nobody planned for.
    assert classify(raised(lambda: None.missing)) is Kind.BUG  # type: ignore[attr-defined]
    assert classify(ValueError("x")) is Kind.BUG and classify(KeyError("x")) is Kind.BUG


@pytest.mark.integration
def test_classes_of_real_s3_answers(s3) -> None:
    """minio-py (table listing at start, the bucket probe): S3's error codes decide."""
    client = s3_client(s3.storage_options)
    missing = raised(lambda: list(client.list_objects("no-such-bucket-here")))
    assert isinstance(missing, S3Error) and missing.code == "NoSuchBucket"
    assert classify(missing) is Kind.CONFIG
    wrong_key = s3_client({**s3.storage_options, "AWS_SECRET_ACCESS_KEY": "not-the-key"})
    denied = raised(lambda: list(wrong_key.list_objects(s3.bucket("denied"))))
    assert isinstance(denied, S3Error) and classify(denied) is Kind.CONFIG
    nobody = s3_client({**s3.storage_options, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{closed_port()}"})
    assert classify(raised(lambda: nobody.bucket_exists("lake"))) is Kind.UNAVAILABLE


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (CommitFailedError("Transaction failed: version already exists"), Kind.UNAVAILABLE),
        (ConnectionError("refused"), Kind.UNAVAILABLE),
        (TimeoutError("read timed out"), Kind.UNAVAILABLE),
        (Unavailable("rival writer"), Kind.UNAVAILABLE),
        (PermissionError("lake folder not writable"), Kind.CONFIG),
        (KafkaException(KafkaError(KafkaError.SASL_AUTHENTICATION_FAILED)), Kind.CONFIG),
        (KafkaException(KafkaError(KafkaError._ALL_BROKERS_DOWN)), Kind.UNAVAILABLE),
        (KafkaException(KafkaError(KafkaError.INVALID_CONFIG)), Kind.BUG),
    ],
)
def test_classification_of_library_types(exc: BaseException, kind: Kind) -> None:
    assert classify(exc) is kind


class Flaky:
    def __init__(self, failures: list[Exception]) -> None:
        self.failures = list(failures)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return "ok"


def test_unavailable_is_retried_with_backoff_without_real_sleep() -> None:
    slept: list[float] = []
    fn = Flaky([ConnectionError("down")] * 3)
    assert RetryPolicy(jitter=0).call(fn, operation="t", sleep=slept.append) == "ok"
    assert slept == [0.5, 1, 2] and fn.calls == 4


@pytest.mark.parametrize(
    "exc", [BadData(Reason.DELTA_WRITE_ERROR, "x"), AttributeError("bug"), ConfigError("bad setting")]
)
def test_only_unavailable_is_retried(exc: Exception) -> None:
    fn = Flaky([exc])
    with pytest.raises(type(exc)):
        RetryPolicy().call(fn, operation="t", sleep=lambda s: None)
    assert fn.calls == 1


def test_a_waiting_policy_outlasts_any_outage_and_a_bounded_one_gives_up() -> None:
    fn = Flaky([ConnectionError("down")] * 200)
    assert RetryPolicy(attempts=None).call(fn, operation="t", sleep=lambda s: None) == "ok"
    assert fn.calls == 201
    before = RETRY_EXHAUSTED.labels("bounded")._value.get()
    fn = Flaky([ConnectionError("down")] * 10)
    slept: list[float] = []
    policy = RetryPolicy(jitter=0, attempts=3)
    with pytest.raises(ConnectionError):
        policy.call(fn, operation="bounded", sleep=slept.append)
    assert fn.calls == 3 and sum(slept) == policy.worst_case_wait
    assert RETRY_EXHAUSTED.labels("bounded")._value.get() == before + 1


def test_while_the_breaker_is_open_the_policy_waits_for_it_not_for_the_backoff() -> None:
    clock = Clock()
    breaker = StorageBreaker("t0", probe=lambda: True, failure_threshold=2, recovery_timeout=20, clock=clock)
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        clock.now += s

    fn = Flaky([ConnectionError("down")] * 2)
    assert RetryPolicy(jitter=0).call(fn, operation="t", breaker=breaker, sleep=sleep) == "ok"
    # The second failure opens the breaker: the next wait is its whole open period, then it closes.
    assert slept == [0.5, 20] and fn.calls == 3
    assert breaker.state == "closed"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def down() -> None:
    raise ConnectionError("storage down")


def test_breaker_opens_after_five_outage_failures_then_probes_before_closing() -> None:
    clock = Clock()
    healthy = [False]
    breaker = StorageBreaker("t1", probe=lambda: healthy[0], clock=clock)
    for _ in range(4):
        with pytest.raises(ConnectionError):
            breaker.call(down)
    assert breaker.state == "closed" and breaker.failure_count == 4
    with pytest.raises(ConnectionError):
        breaker.call(down)
    assert breaker.state == "open"
    # While open, storage is not called at all.
    calls = []
    with pytest.raises(CircuitBreakerError):
        breaker.call(lambda: calls.append(1))
    assert calls == []
    clock.now += 59
    assert breaker.state == "open"
    clock.now += 1
    assert breaker.state == "half_open"
    # Half-open, but the probe says the bucket is unreachable: stays open for another period.
    with pytest.raises(CircuitBreakerError):
        breaker.call(lambda: calls.append(1))
    assert calls == [] and breaker.state == "open"
    clock.now += 60
    healthy[0] = True
    assert breaker.call(lambda: "written") == "written"
    assert breaker.state == "closed" and breaker.failure_count == 0


def test_a_failure_while_half_open_reopens_and_data_errors_do_not_count() -> None:
    clock = Clock()
    breaker = StorageBreaker("t2", probe=lambda: True, failure_threshold=2, recovery_timeout=10, clock=clock)
    for _ in range(2):
        with pytest.raises(ConnectionError):
            breaker.call(down)
    clock.now += 10
    assert breaker.state == "half_open"
    with pytest.raises(ConnectionError):
        breaker.call(down)
    assert breaker.state == "open"
    clock.now += 10
    with pytest.raises(BadData):  # storage answered; the data was wrong: not an outage
        breaker.call(lambda: (_ for _ in ()).throw(BadData(Reason.DELTA_WRITE_ERROR, "bad row")))
    assert breaker.state == "closed"


def test_breaker_state_is_a_metric() -> None:
    from prometheus_client import REGISTRY

    clock = Clock()
    breaker = StorageBreaker("t3", probe=lambda: True, failure_threshold=1, recovery_timeout=5, clock=clock)

    def state() -> float:
        return REGISTRY.get_sample_value(BREAKER_STATE._name, {"name": "t3"})

    assert state() == 0
    with pytest.raises(ConnectionError):
        breaker.call(down)
    assert state() == 1
    assert REGISTRY.get_sample_value(f"{BREAKER_OPENS._name}_total", {"name": "t3"}) == 1
    clock.now += 5
    breaker.call(lambda: None)
    assert state() == 0
