"""The failure vocabulary: four kinds of failure, and what every component does about each.

| kind          | what it means                                | what happens                                     |
|---------------|----------------------------------------------|--------------------------------------------------|
| `CONFIG`      | the deployment is wrong (a setting, a table  | refuse to start, or stop, naming what to fix     |
|               | of the other mode, credentials at start)     |                                                  |
| `BUG`         | an exception nobody planned for: ours        | stop the dataflow with the traceback; the data   |
|               |                                              | stays in Kafka; never dead-lettered              |
| `BAD_DATA`    | the events themselves cannot be stored       | dead-letter exactly the events at fault          |
| `UNAVAILABLE` | storage or the broker does not answer,       | wait (backoff and the breaker), never dead-letter|
|               | throttles, or a commit lost a race           |                                                  |

`classify` decides on the exception's type: ours first, then the types
deltalake, object_store (through delta-rs), minio-py (with S3's error codes)
and confluent-kafka raise. Only
our own `BadData` is bad data: the table writer raises it where converting a
value fails (an integer past int64, say), which is the one place the data
itself can be at fault once it has decoded. Message text is read only for delta-rs' catch-all `DeltaError`, which
carries object-store failures inside a MERGE as text. Anything it does not
recognise is a `BUG`: stopping with the data still in Kafka is recoverable,
dead-lettering good data for our mistake is not.
"""

from __future__ import annotations

import re
from enum import StrEnum

import pyarrow as pa
from circuitbreaker import CircuitBreakerError
from confluent_kafka import KafkaError, KafkaException
from deltalake.exceptions import (
    CommitFailedError,
    DeltaError,
    DeltaProtocolError,
    SchemaMismatchError,
    TableNotFoundError,
)
from minio.error import InvalidResponseError, S3Error, ServerError
from urllib3.exceptions import HTTPError as TransportError

from dataflow.model import Reason


class Kind(StrEnum):
    CONFIG = "config"
    BUG = "bug"
    BAD_DATA = "bad_data"
    UNAVAILABLE = "unavailable"


class ConfigError(Exception):
    """The deployment does not describe a pipeline that can run: refuse, and say what to fix."""


class BadData(Exception):
    """The events in hand cannot be stored as they are; `reason` goes on their dead letters."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Unavailable(Exception):
    """A service we depend on does not answer; waiting is the remedy."""


# delta-rs' catch-all error wraps object-store failures met inside DataFusion (a MERGE's
# reads and writes) as text; nothing else about them is typed.
_STORE_TEXT = re.compile(
    r"object ?store|error sending request|connection|timed? ?out|dns error|broken pipe|"
    r"reset by peer|service unavailable|slow ?down|\b50[234]\b|Generic S3 error",
    re.IGNORECASE,
)
_MISSING_TEXT = re.compile(r"not found|no such file", re.IGNORECASE)
# minio-py (table listing at start, the bucket probe, the CLI) names S3's error codes.
_S3_CODES = {
    **dict.fromkeys(
        (
            "AccessDenied",
            "AllAccessDisabled",
            "InvalidAccessKeyId",
            "InvalidBucketName",
            "NoSuchBucket",
            "SignatureDoesNotMatch",
        ),
        Kind.CONFIG,
    ),
    **dict.fromkeys(
        ("SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "OperationAborted"),
        Kind.UNAVAILABLE,
    ),
}
_KAFKA_UNAVAILABLE = {
    KafkaError._TRANSPORT,
    KafkaError._ALL_BROKERS_DOWN,
    KafkaError._TIMED_OUT,
    KafkaError._MSG_TIMED_OUT,
    KafkaError._RESOLVE,
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.REQUEST_TIMED_OUT,
    KafkaError.BROKER_NOT_AVAILABLE,
    KafkaError.NETWORK_EXCEPTION,
}
_KAFKA_CONFIG = {
    KafkaError._AUTHENTICATION,
    KafkaError.SASL_AUTHENTICATION_FAILED,
    KafkaError.TOPIC_AUTHORIZATION_FAILED,
    KafkaError.CLUSTER_AUTHORIZATION_FAILED,
    KafkaError.GROUP_AUTHORIZATION_FAILED,
    KafkaError._SSL,
    KafkaError._INVALID_ARG,
    KafkaError.UNKNOWN_TOPIC_OR_PART,
}


def classify(exc: BaseException) -> Kind:
    """Which of the four kinds `exc` is (see the module docstring)."""
    if isinstance(exc, ConfigError):
        return Kind.CONFIG
    if isinstance(exc, BadData):
        return Kind.BAD_DATA
    if isinstance(exc, Unavailable | CircuitBreakerError | CommitFailedError):
        # CommitFailedError: a rival commit won (or the log write failed); the next attempt
        # re-reads the table and its txn versions decide what is left to write.
        return Kind.UNAVAILABLE
    if isinstance(exc, KafkaException):
        return _kafka_kind(exc)
    if isinstance(exc, S3Error):
        return _S3_CODES.get(exc.code or "", Kind.BUG)
    if isinstance(exc, ServerError | InvalidResponseError | TransportError):  # 5xx, a proxy's page, no answer
        return Kind.UNAVAILABLE
    if isinstance(exc, FileNotFoundError | TableNotFoundError | DeltaProtocolError | SchemaMismatchError):
        # A table we created, or its log, missing: waiting will not bring it back. A schema
        # mismatch: the writer plans every column before it writes, so the plan was wrong.
        return Kind.BUG
    if isinstance(exc, PermissionError):
        return Kind.CONFIG
    if isinstance(exc, OSError):  # delta-rs' object-store errors; ConnectionError, TimeoutError
        return Kind.UNAVAILABLE
    if type(exc) is DeltaError and _STORE_TEXT.search(str(exc)):
        return Kind.UNAVAILABLE
    if isinstance(exc, pa.ArrowException) and _STORE_TEXT.search(str(exc)):
        # A stream delta-rs hands to pyarrow (the change feed) failed in the store. A file of
        # the table that is not there will not come back by waiting.
        return Kind.BUG if _MISSING_TEXT.search(str(exc)) else Kind.UNAVAILABLE
    return Kind.BUG


def _kafka_kind(exc: KafkaException) -> Kind:
    err = exc.args[0] if exc.args else None
    if not isinstance(err, KafkaError):
        return Kind.BUG
    if err.code() in _KAFKA_CONFIG:
        return Kind.CONFIG
    if err.code() in _KAFKA_UNAVAILABLE or (err.retriable() and not err.fatal()):
        return Kind.UNAVAILABLE
    return Kind.BUG


def describe(exc: BaseException) -> str:
    """How a stop is announced in the log, by kind: the words operators search for."""
    return {
        Kind.CONFIG: "a configuration error",
        Kind.BUG: "an unexpected error (a bug)",
        Kind.BAD_DATA: "bad data",
        Kind.UNAVAILABLE: "a service that stayed away",
    }[classify(exc)]
