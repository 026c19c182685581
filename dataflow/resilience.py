"""Retries with exponential backoff and jitter, and which errors deserve them.

An exception that escapes a Bytewax sink stops the whole dataflow, so the
sink decides here what to do: a retryable error (storage down, throttled,
a commit conflict) is waited out; a permanent one (the data itself) is not.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)

RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}
_STATUS = re.compile(r"\b(?:status(?: code)?|HTTP)[:= ]*(\d{3})\b", re.IGNORECASE)
_RETRYABLE_WORDS = re.compile(
    r"timed? ?out|timeout|connection|connect error|broken pipe|reset by peer|temporar|unavailable|"
    r"slow ?down|throttl|too many requests|service unavailable|internal ?error|dns|"
    r"commit ?failed|conflict|version .* already exists|already exists",
    re.IGNORECASE,
)


class PermanentError(Exception):
    """An error that another attempt cannot fix."""


class RetriesExhausted(Exception):
    """A retryable error outlasted the retry budget."""

    def __init__(self, attempts: int, last: BaseException) -> None:
        super().__init__(f"gave up after {attempts} attempts: {type(last).__name__}: {last}")
        self.attempts = attempts
        self.last = last


def is_retryable(exc: BaseException) -> bool:
    """Connection errors, timeouts, HTTP 408/429/5xx, throttling and Delta commit conflicts."""
    if isinstance(exc, PermanentError):
        return False
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    text = f"{type(exc).__name__}: {exc}"
    if type(exc).__name__ == "CommitFailedError":
        return True
    if m := _STATUS.search(text):
        return int(m.group(1)) in RETRYABLE_STATUS
    if isinstance(exc, ValueError | TypeError | KeyError) and type(exc).__name__ not in ("DeltaError",):
        return False
    return bool(_RETRYABLE_WORDS.search(text)) or isinstance(exc, OSError)


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


def retry(
    fn: Callable[[], T],
    *,
    backoff: Backoff = Backoff(),
    max_attempts: int | None = 8,
    budget_s: float | None = None,
    classify: Callable[[BaseException], bool] = is_retryable,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    what: str = "operation",
) -> T:
    """Call `fn` until it succeeds, a permanent error occurs, or attempts/budget run out.

    `max_attempts=None` and `budget_s=None` retry for as long as it takes, which
    is what a sink wants while storage is down: the input stalls, Kafka keeps the data.
    """
    start = clock()
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as exc:
            if not classify(exc):
                raise
            attempt += 1
            wait = backoff.delay(attempt - 1)
            out_of_attempts = max_attempts is not None and attempt >= max_attempts
            out_of_time = budget_s is not None and clock() - start + wait > budget_s
            if out_of_attempts or out_of_time:
                raise RetriesExhausted(attempt, exc) from exc
            log.warning("%s failed (attempt %d), retrying in %.1fs: %s", what, attempt, wait, exc)
            sleep(wait)
