"""Backoff bounds and jitter, error classes, the retry loop and the breaker, on a clock the test controls."""

from __future__ import annotations

import asyncio
import random

import pytest
from circuitbreaker import CircuitBreakerError
from deltalake.exceptions import CommitFailedError, SchemaMismatchError

from dataflow.runtime.retry import (
    Backoff,
    ErrorClass,
    PermanentError,
    RetriesExhausted,
    StorageBreaker,
    classify,
    retry,
    retry_async,
)


def test_backoff_grows_exponentially_and_caps() -> None:
    b = Backoff(initial=0.5, base=2, cap=30, jitter=0)
    assert [b.delay(a) for a in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]


def test_jitter_stays_within_twenty_percent_and_spreads() -> None:
    b = Backoff(initial=1, base=2, cap=30, jitter=0.2)
    rng = random.Random(1)
    delays = [b.delay(3, rng.random) for _ in range(2000)]
    assert min(delays) >= 8 * 0.8 and max(delays) <= 8 * 1.2
    # Spread: both ends of the band are used, so retries from many workers do not align.
    assert min(delays) < 8 * 0.82 and max(delays) > 8 * 1.18
    capped = [b.delay(20, rng.random) for _ in range(500)]
    assert min(capped) >= 30 * 0.8 and max(capped) <= 30 * 1.2


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (ConnectionError("refused"), ErrorClass.OUTAGE),
        (TimeoutError("read timed out"), ErrorClass.OUTAGE),
        (
            OSError(
                "Generic S3 error: Error performing GET ... after 10 retries - HTTP error - error sending request"
            ),
            ErrorClass.OUTAGE,
        ),
        (
            OSError(
                'Generic S3 error: response error "request error", after 3 retries: HTTP status server error (503 Service Unavailable)'
            ),
            ErrorClass.OUTAGE,
        ),
        (Exception("HTTP status 500 Internal Server Error"), ErrorClass.OUTAGE),
        (Exception("status code: 408 Request Timeout"), ErrorClass.OUTAGE),
        (Exception("status code: 403 Forbidden, AccessDenied"), ErrorClass.OUTAGE),
        (Exception("status code: 429, SlowDown"), ErrorClass.TRANSIENT),
        (CommitFailedError("Transaction failed: version already exists"), ErrorClass.TRANSIENT),
        (RuntimeError("something nobody anticipated"), ErrorClass.TRANSIENT),
        (ValueError("bad value"), ErrorClass.PERMANENT),
        (TypeError("unsupported type"), ErrorClass.PERMANENT),
        (OverflowError("Python int too large to convert to C long"), ErrorClass.PERMANENT),
        (SchemaMismatchError("Cannot cast schema"), ErrorClass.PERMANENT),
        (PermanentError("no"), ErrorClass.PERMANENT),
        (Exception("status code: 400 Bad Request"), ErrorClass.PERMANENT),
        (Exception("HTTP 404 not found"), ErrorClass.PERMANENT),
    ],
)
def test_classification(exc: Exception, kind: ErrorClass) -> None:
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


def test_retry_succeeds_after_transient_failures_without_real_sleep() -> None:
    slept: list[float] = []
    fn = Flaky([ConnectionError("down")] * 3)
    assert retry(fn, backoff=Backoff(jitter=0), sleep=slept.append) == "ok"
    assert slept == [0.5, 1, 2] and fn.calls == 4


def test_permanent_error_is_not_retried() -> None:
    fn = Flaky([ValueError("schema")])
    with pytest.raises(ValueError):
        retry(fn, sleep=lambda s: None)
    assert fn.calls == 1


def test_transient_errors_exhaust_but_outages_are_waited_out() -> None:
    with pytest.raises(RetriesExhausted) as info:
        retry(Flaky([CommitFailedError("conflict")] * 10), max_attempts=3, sleep=lambda s: None)
    assert info.value.attempts == 3
    # An outage of 50 attempts outlasts max_attempts=3, and is still waited out.
    fn = Flaky([ConnectionError("down")] * 50)
    assert retry(fn, max_attempts=3, wait_out_outages=True, sleep=lambda s: None) == "ok"
    assert fn.calls == 51


def test_budget_bounds_the_time_spent() -> None:
    now = [0.0]

    def sleep(s: float) -> None:
        now[0] += s

    with pytest.raises(RetriesExhausted):
        retry(
            Flaky([TimeoutError("x")] * 100),
            max_attempts=None,
            budget_s=10,
            backoff=Backoff(jitter=0),
            sleep=sleep,
            clock=lambda: now[0],
        )
    assert now[0] <= 10


def test_async_retry_has_the_same_policy() -> None:
    slept: list[float] = []
    calls = []

    async def fn() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("down")
        return "ok"

    async def sleep(s: float) -> None:
        slept.append(s)

    assert asyncio.run(retry_async(fn, backoff=Backoff(jitter=0), sleep=sleep)) == "ok"
    assert slept == [0.5, 1]

    async def bad() -> None:
        raise TypeError("no")

    with pytest.raises(TypeError):
        asyncio.run(retry_async(bad, sleep=sleep))


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
    with pytest.raises(ValueError):  # storage answered; the data was wrong: not an outage
        breaker.call(lambda: (_ for _ in ()).throw(ValueError("bad row")))
    assert breaker.state == "closed"


def test_breaker_state_is_a_metric() -> None:
    from prometheus_client import REGISTRY

    clock = Clock()
    breaker = StorageBreaker("t3", probe=lambda: True, failure_threshold=1, recovery_timeout=5, clock=clock)

    def state() -> float:
        return REGISTRY.get_sample_value("circuit_breaker_state", {"name": "t3"})

    assert state() == 0
    with pytest.raises(ConnectionError):
        breaker.call(down)
    assert state() == 1
    assert REGISTRY.get_sample_value("circuit_breaker_opens_total", {"name": "t3"}) == 1
    clock.now += 5
    breaker.call(lambda: None)
    assert state() == 0
