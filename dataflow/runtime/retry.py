"""One retry policy for every call to storage or the broker, and the circuit breaker beside it.

Only failures `classify` calls UNAVAILABLE are retried; bad data, our bugs and
configuration errors go straight back to the caller, who knows what to do with
them (`dataflow.runtime.failures`). Waits grow exponentially from `initial`,
are capped at `cap`, and are spread by +/- `jitter`, so that workers that
failed together do not retry together. tenacity runs the loop.

A policy either gives up after `attempts` (start-up look-ups: refusing to start
with a clear error beats hanging) or, with `attempts=None`, waits as long as
the service is away (commits: Kafka keeps the data, and the input stalls
meanwhile). The breaker beside a waiting policy keeps it from hammering a dead
endpoint: while open, the next attempt waits for the breaker, not the backoff.
The worst-case stall of each operation is in the README's outage section.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import tenacity
from circuitbreaker import STATE_CLOSED, STATE_HALF_OPEN, STATE_OPEN, CircuitBreaker, CircuitBreakerError

from dataflow.runtime.failures import Kind, classify
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


def _unavailable(exc: BaseException) -> bool:
    return classify(exc) is Kind.UNAVAILABLE


@dataclass(frozen=True)
class RetryPolicy:
    """delay(n) = min(cap, initial x 2^n), spread by +/- jitter; `attempts=None` retries for ever."""

    initial: float = 0.5
    cap: float = 30.0
    jitter: float = 0.2
    attempts: int | None = None

    def delay(self, attempt: int, rng: Callable[[], float] = random.random) -> float:
        """The wait after the `attempt`-th failure (0-based)."""
        raw = min(self.cap, self.initial * 2.0 ** min(attempt, 64))
        return raw * (1 - self.jitter + 2 * self.jitter * rng())

    @property
    def longest_wait(self) -> float:
        """The longest single wait between two attempts."""
        return self.cap * (1 + self.jitter)

    @property
    def worst_case_wait(self) -> float | None:
        """All waits before giving up, at their longest; None when the policy never gives up."""
        if self.attempts is None:
            return None
        return sum(self.delay(i, rng=lambda: 1.0) for i in range(self.attempts - 1))

    def call(
        self,
        fn: Callable[[], T],
        *,
        operation: str,
        breaker: StorageBreaker | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> T:
        """`fn()` until it returns, raises something other than UNAVAILABLE, or attempts run out.

        Running out re-raises the last failure, still UNAVAILABLE: the caller
        decides (at start-up, refusing to start).
        """
        first_failure: list[float] = []

        def wait(state: tenacity.RetryCallState) -> float:
            if breaker is not None and breaker.state == STATE_OPEN:
                return max(0.05, breaker.open_remaining)  # no attempt can pass before that
            return self.delay(state.attempt_number - 1)

        def before_sleep(state: tenacity.RetryCallState) -> None:
            if not first_failure:
                first_failure.append(time.monotonic())
            RETRY_ATTEMPTS.labels(operation).inc()
            exc = state.outcome.exception() if state.outcome else None
            log.warning(
                "%s unavailable (attempt %d), retrying in %.1fs: %s: %s",
                operation,
                state.attempt_number,
                state.upcoming_sleep,
                type(exc).__name__,
                exc,
            )

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(_unavailable),
            stop=tenacity.stop_never if self.attempts is None else tenacity.stop_after_attempt(self.attempts),
            wait=wait,
            sleep=sleep,
            before_sleep=before_sleep,
            reraise=True,
        )
        attempt = fn if breaker is None else (lambda: breaker.call(fn))
        try:
            result = retrying(attempt)
        except BaseException as exc:
            if first_failure and _unavailable(exc):
                RETRY_EXHAUSTED.labels(operation).inc()
                RETRY_DURATION.labels(operation).observe(time.monotonic() - first_failure[0])
            raise
        if first_failure:
            RETRY_SUCCESS.labels(operation).inc()
            RETRY_DURATION.labels(operation).observe(time.monotonic() - first_failure[0])
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
            expected_exception=lambda _type, exc: _unavailable(exc),
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
