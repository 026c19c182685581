"""Structured logs: JSON lines with context fields, secrets never printed."""

from __future__ import annotations

import json
import logging

from dataflow.runtime.logs import JsonFormatter, Redactor


def emit(logger_name: str, env: dict[str, str], *args, **kwargs) -> dict:
    record_holder: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            record_holder.append(self.format(record))

    handler = Capture()
    handler.addFilter(Redactor(env))
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        logger.info(*args, **kwargs)
    finally:
        logger.removeHandler(handler)
    return json.loads(record_holder[0])


def test_json_line_carries_context_fields() -> None:
    line = emit(
        "t.ctx",
        {},
        "commit end %s",
        "s3://b/t",
        extra={"table": "shop.orders", "partition": 3, "offset": 42, "batch_id": "b-1"},
    )
    assert line["msg"] == "commit end s3://b/t"
    assert line["level"] == "INFO" and line["logger"] == "t.ctx"
    assert (line["table"], line["partition"], line["offset"], line["batch_id"]) == (
        "shop.orders",
        3,
        42,
        "b-1",
    )


def test_secrets_are_redacted_even_inside_arguments() -> None:
    env = {"AWS_SECRET_ACCESS_KEY": "s3cr3t-value-123"}
    line = emit("t.secret", env, "options: %s", {"AWS_SECRET_ACCESS_KEY": "s3cr3t-value-123"})
    assert "s3cr3t-value-123" not in json.dumps(line)
    assert "***" in line["msg"]
