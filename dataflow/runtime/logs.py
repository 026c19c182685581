"""Structured logs: one JSON object a line, level from the environment, secrets redacted.

Context such as the table, topic, partition, offset and batch id goes in
`extra={...}` and becomes top-level fields, so log pipelines can filter on them.
`CDC_LOG_FORMAT=text` gives plain lines for a terminal.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import traceback
from datetime import UTC, datetime

import orjson

from dataflow.runtime.secrets import secret_values

CONTEXT_FIELDS = ("table", "topic", "partition", "offset", "batch_id", "uri", "version", "rows", "reason")


class Redactor:
    """Replaces every secret this process knows (`secrets.secret_values`) wherever it appears.

    Applied to whole formatted lines, so the message, its arguments, `extra`
    fields and tracebacks are all covered; a secret is also caught as JSON
    escapes it, and as `repr` would print it.
    """

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.env = env

    def _forms(self) -> list[str]:
        forms: list[str] = []
        for v in secret_values(self.env):
            for form in (v, orjson.dumps(v).decode()[1:-1], repr(v)[1:-1]):
                if form not in forms:
                    forms.append(form)
        return forms

    def redact(self, text: str) -> str:
        for secret in self._forms():
            if secret in text:
                text = text.replace(secret, "***")
        return text


class RedactingFormatter(logging.Formatter):
    """Any formatter's output with the secrets taken out."""

    def __init__(self, inner: logging.Formatter, redactor: Redactor | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.redactor = redactor or Redactor()

    def format(self, record: logging.LogRecord) -> str:
        return self.redactor.redact(self.inner.format(record))


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
    inner = (
        JsonFormatter()
        if fmt == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    )
    handler.setFormatter(RedactingFormatter(inner))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    install_excepthooks()


def install_excepthooks() -> None:
    """Uncaught exceptions (Bytewax prints a failed flow's that way) go out redacted."""
    redactor = Redactor()

    def hook(exc_type, exc, tb) -> None:  # noqa: ANN001 - sys.excepthook's signature
        text = "".join(traceback.format_exception(exc_type, exc, tb))
        sys.stderr.write(redactor.redact(text))

    def thread_hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        text = "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback))
        sys.stderr.write(f"Exception in thread {getattr(args.thread, 'name', '?')}:\n{redactor.redact(text)}")

    sys.excepthook = hook
    threading.excepthook = thread_hook
