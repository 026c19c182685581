"""Backoff bounds and jitter, error classification, and the retry loop, on a clock the test controls."""

from __future__ import annotations

import random

import pytest

from dataflow.resilience import Backoff, PermanentError, RetriesExhausted, is_retryable, retry


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


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionError("refused"),
        TimeoutError("read timed out"),
        OSError("Generic S3 error: Error after 10 retries ... connection refused"),
        Exception("Generic S3 error: HTTP status server error (503 Service Unavailable)"),
        Exception("status code: 429, SlowDown"),
        type("CommitFailedError", (Exception,), {})("conflict"),
    ],
)
def test_retryable(exc: Exception) -> None:
    assert is_retryable(exc)


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("bad value"),
        TypeError("unsupported type"),
        PermanentError("no"),
        Exception("status code: 403 Forbidden"),
        Exception("HTTP 404 not found"),
    ],
)
def test_permanent(exc: Exception) -> None:
    assert not is_retryable(exc)


def test_retry_succeeds_after_transient_failures_without_real_sleep() -> None:
    calls, slept = [], []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 4:
            raise ConnectionError("down")
        return "ok"

    assert retry(flaky, backoff=Backoff(jitter=0), sleep=slept.append) == "ok"
    assert slept == [0.5, 1, 2]


def test_permanent_error_is_not_retried() -> None:
    calls = []

    def bad() -> None:
        calls.append(1)
        raise ValueError("schema")

    with pytest.raises(ValueError):
        retry(bad, sleep=lambda s: None)
    assert len(calls) == 1


def test_attempts_and_budget_exhaust() -> None:
    with pytest.raises(RetriesExhausted) as info:
        retry(lambda: (_ for _ in ()).throw(ConnectionError("x")), max_attempts=3, sleep=lambda s: None)
    assert info.value.attempts == 3
    now = [0.0]

    def sleep(s: float) -> None:
        now[0] += s

    with pytest.raises(RetriesExhausted):
        retry(
            lambda: (_ for _ in ()).throw(TimeoutError("x")),
            max_attempts=None,
            budget_s=10,
            backoff=Backoff(jitter=0),
            sleep=sleep,
            clock=lambda: now[0],
        )
    assert now[0] <= 10
