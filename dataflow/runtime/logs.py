"""Structured logs: one JSON object a line, level from the environment, secrets redacted.

Context such as the table, topic, partition, offset and batch id goes in
`extra={...}` and becomes top-level fields, so log pipelines can filter on them.
`CDC_LOG_FORMAT=text` gives plain lines for a terminal.
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import UTC, datetime

import orjson

CONTEXT_FIELDS = ("table", "topic", "partition", "offset", "batch_id", "uri", "version", "rows", "reason")
SECRET_VARS = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "CDC_KAFKA_SASL_PASSWORD",
    "CDC_KAFKA_SSL_KEY_PASSWORD",
)


class Redactor(logging.Filter):
    """Replaces the values of secret variables wherever they would appear in a log line."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        super().__init__()
        env = os.environ if env is None else env
        self.secrets = [v for k in SECRET_VARS if len(v := env.get(k, "")) >= 4]

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            record.msg = self.redact(record.getMessage())
            record.args = None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            if (value := record.__dict__.get(name)) is not None:
                out[name] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def configure(level: str | None = None, fmt: str | None = None) -> None:
    """Set up the root logger once for the process (idempotent).

    A level or format it does not know is an error naming the variable, not a quiet default.
    """
    given_level = level or os.environ.get("CDC_LOG_LEVEL") or "INFO"
    given_fmt = fmt or os.environ.get("CDC_LOG_FORMAT") or "json"
    level, fmt = (given_level.strip() or "INFO").upper(), (given_fmt.strip() or "json").lower()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError(f"CDC_LOG_LEVEL={given_level!r} must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
    if fmt not in ("json", "text"):
        raise ValueError(f"CDC_LOG_FORMAT={given_fmt!r} must be json or text")
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(Redactor())
    handler.setFormatter(
        JsonFormatter()
        if fmt == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
