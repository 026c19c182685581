"""Retries with exponential backoff and jitter, and which errors deserve them.

An exception that escapes a Bytewax sink stops the whole dataflow, so the
sink decides here what to do: a retryable error (storage down, throttled,
a commit conflict) is waited out; a permanent one (the data itself) is not.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar

from circuitbreaker import STATE_CLOSED, STATE_HALF_OPEN, STATE_OPEN, CircuitBreaker, CircuitBreakerError

from dataflow.runtime.metrics import (
    BREAKER_FAILURES,
    BREAKER_OPENS,
    BREAKER_STATE,
    RETRY_ATTEMPTS,
    RETRY_DURATION,
    RETRY_EXHAUSTED,
    RETRY_SUCCESS,
)

T = TypeVar("T")
log = logging.getLogger(__name__)

RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}
# Storage refusing us as a whole (credentials, a missing bucket) is waited out
# like an outage: dead-lettering every batch would flood the DLQ for a config error.
ACCESS_STATUS = {401, 403}
_STATUS = re.compile(r"\b(?:status(?: code)?|HTTP(?:/1\.1)?|response)[:= ]*\(?(\d{3})\b", re.IGNORECASE)
_OUTAGE_WORDS = re.compile(
    r"timed? ?out|timeout|connection|connect error|error sending request|broken pipe|reset by peer|"
    r"temporar|unavailable|internal ?error|dns|no route|refused|NoSuchBucket|AccessDenied|InvalidAccessKeyId|"
    r"SignatureDoesNotMatch",
    re.IGNORECASE,
)
_TRANSIENT_WORDS = re.compile(
    r"slow ?down|throttl|too many requests|commit ?failed|conflict|concurrent|version .* already exists",
    re.IGNORECASE,
)


class ErrorClass(StrEnum):
    """What to do about an error.

    OUTAGE: storage (or the network to it) is unavailable; wait as long as it takes.
    TRANSIENT: another attempt will likely work (throttling, a commit conflict); bounded retries.
    PERMANENT: the data or the request is at fault; do not retry.
    """

    OUTAGE = "outage"
    TRANSIENT = "transient"
    PERMANENT = "permanent"


class PermanentError(Exception):
    """An error that another attempt cannot fix."""


class RetriesExhausted(Exception):
    """A retryable error outlasted the retry budget."""

    def __init__(self, attempts: int, last: BaseException) -> None:
        super().__init__(f"gave up after {attempts} attempts: {type(last).__name__}: {last}")
        self.attempts = attempts
        self.last = last


def classify(exc: BaseException) -> ErrorClass:
    """Connection errors, timeouts and HTTP 408/5xx are outages; 429, throttling and Delta commit
    conflicts are transient; validation and type errors and other 4xx are permanent."""
    name = type(exc).__name__
    if isinstance(exc, PermanentError):
        return ErrorClass.PERMANENT
    if name == "CircuitBreakerError" or isinstance(exc, ConnectionError | TimeoutError):
        return ErrorClass.OUTAGE
    if name == "CommitFailedError":
        return ErrorClass.TRANSIENT
    text = f"{name}: {exc}"
    if m := _STATUS.search(text):
        status = int(m.group(1))
        if status == 429:
            return ErrorClass.TRANSIENT
        if status in RETRYABLE_STATUS or status in ACCESS_STATUS:
            return ErrorClass.OUTAGE
        if 400 <= status < 500:
            return ErrorClass.PERMANENT
    if isinstance(exc, ValueError | TypeError | KeyError | ArithmeticError) or name in (
        "ArrowInvalid",
        "ArrowTypeError",
        "SchemaMismatchError",
        "DeltaProtocolError",
    ):
        return ErrorClass.PERMANENT
    if _TRANSIENT_WORDS.search(text):
        return ErrorClass.TRANSIENT
    if _OUTAGE_WORDS.search(text) or isinstance(exc, OSError):
        return ErrorClass.OUTAGE
    return ErrorClass.TRANSIENT  # unknown: a few more tries, then MAX_RETRIES_EXCEEDED


def is_retryable(exc: BaseException) -> bool:
    return classify(exc) is not ErrorClass.PERMANENT


@dataclass(frozen=True)
class Backoff:
    """delay = initial x base^attempt, capped, then spread by +/- jitter."""

    initial: float = 0.5
    base: float = 2.0
    cap: float = 30.0
    jitter: float = 0.2

    def delay(self, attempt: int, rng: Callable[[], float] = random.random) -> float:
        raw = min(self.cap, self.initial * self.base**attempt)
        return raw * (1 - self.jitter + 2 * self.jitter * rng())


@dataclass
class _Attempts:
    """The bookkeeping shared by the sync and async retry loops."""

    backoff: Backoff
    max_attempts: int | None
    budget_s: float | None
    wait_out_outages: bool
    classifier: Callable[[BaseException], ErrorClass]
    clock: Callable[[], float]
    operation: str
    attempt: int = 0
    first_failure: float | None = None

    def next_delay(self, exc: BaseException) -> float:
        """Seconds to wait before the next attempt; raises if there is to be none."""
        kind = self.classifier(exc)
        if kind is ErrorClass.PERMANENT:
            raise exc
        now = self.clock()
        if self.first_failure is None:
            self.first_failure = now
        self.attempt += 1
        wait = self.backoff.delay(self.attempt - 1)
        unlimited = kind is ErrorClass.OUTAGE and self.wait_out_outages
        out_of_attempts = self.max_attempts is not None and self.attempt >= self.max_attempts
        out_of_time = self.budget_s is not None and now - self.first_failure + wait > self.budget_s
        if not unlimited and (out_of_attempts or out_of_time):
            RETRY_EXHAUSTED.labels(self.operation).inc()
            RETRY_DURATION.labels(self.operation).observe(now - self.first_failure)
            raise RetriesExhausted(self.attempt, exc) from exc
        RETRY_ATTEMPTS.labels(self.operation).inc()
        log.warning(
            "%s failed (%s, attempt %d), retrying in %.1fs: %s", self.operation, kind, self.attempt, wait, exc
        )
        return wait

    def succeeded(self) -> None:
        if self.first_failure is not None:
            RETRY_SUCCESS.labels(self.operation).inc()
            RETRY_DURATION.labels(self.operation).observe(self.clock() - self.first_failure)


def retry(
    fn: Callable[[], T],
    *,
    backoff: Backoff | None = None,
    max_attempts: int | None = 8,
    budget_s: float | None = None,
    wait_out_outages: bool = False,
    classifier: Callable[[BaseException], ErrorClass] = classify,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    operation: str = "operation",
) -> T:
    """Call `fn` until it succeeds, a permanent error occurs, or attempts/budget run out.

    With `wait_out_outages`, an outage is retried for as long as it lasts, which
    is what a sink wants while storage is down: the input stalls, Kafka keeps the data.
    """
    state = _Attempts(
        backoff or Backoff(), max_attempts, budget_s, wait_out_outages, classifier, clock, operation
    )
    while True:
        try:
            result = fn()
        except Exception as exc:
            sleep(state.next_delay(exc))
            continue
        state.succeeded()
        return result


async def retry_async(
    fn: Callable[[], Awaitable[T]],
    *,
    backoff: Backoff | None = None,
    max_attempts: int | None = 8,
    budget_s: float | None = None,
    wait_out_outages: bool = False,
    classifier: Callable[[BaseException], ErrorClass] = classify,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
    operation: str = "operation",
) -> T:
    """`retry` for coroutines: the same policy, awaiting instead of blocking."""
    state = _Attempts(
        backoff or Backoff(), max_attempts, budget_s, wait_out_outages, classifier, clock, operation
    )
    while True:
        try:
            result = await fn()
        except Exception as exc:
            await sleep(state.next_delay(exc))
            continue
        state.succeeded()
        return result


class StorageBreaker(CircuitBreaker):
    """The `circuitbreaker` package's breaker around storage calls, with three additions:

    - before it lets the first call through after the open period, it probes storage
      (is the bucket reachable?) and stays open if not, so a dead endpoint is not
      hammered with full commits;
    - its state is exported as metrics;
    - its clock is injectable, so tests drive the state machine without sleeping.
    """

    def __init__(
        self,
        name: str,
        *,
        probe: Callable[[], object],
        failure_threshold: int = 5,
        recovery_timeout: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(
            failure_threshold=failure_threshold,
            recovery_timeout=recovery_timeout,
            expected_exception=lambda _type, exc: classify(exc) is ErrorClass.OUTAGE,
            name=name,
        )
        self.probe = probe
        self.clock = clock
        self._opened = clock()
        self._export()

    @property
    def open_remaining(self) -> float:
        return self._opened + self._recovery_timeout - self.clock()

    def __exit__(self, exc_type, exc_value, tb) -> bool:
        before = self.state
        super().__exit__(exc_type, exc_value, tb)
        if self._state == STATE_OPEN and before != STATE_OPEN:
            self._trip()
        self._export()
        return False

    def _trip(self) -> None:
        self._opened = self.clock()
        BREAKER_OPENS.labels(self.name).inc()
        log.error(
            "circuit breaker %s opened after %d failures: %s",
            self.name,
            self.failure_count,
            self.last_failure,
        )

    def call(self, func, *args, **kwargs):
        state = self.state
        if state == STATE_OPEN:
            raise CircuitBreakerError(self)
        if state == STATE_HALF_OPEN:
            try:
                healthy = self.probe() is not False
            except Exception as e:  # the probe failing is the answer
                healthy, self._last_failure = False, e
            if not healthy:
                self._trip()
                self._export()
                raise CircuitBreakerError(self)
            log.warning("circuit breaker %s half-open: storage answers, trying a real call", self.name)
        result = super().call(func, *args, **kwargs)
        if state == STATE_HALF_OPEN:
            log.warning("circuit breaker %s closed again", self.name)
        return result

    def _export(self) -> None:
        BREAKER_STATE.labels(self.name).set({STATE_CLOSED: 0, STATE_OPEN: 1, STATE_HALF_OPEN: 2}[self.state])
        BREAKER_FAILURES.labels(self.name).set(self.failure_count)
