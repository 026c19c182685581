"""Structured logs: JSON lines with context fields, secrets never printed."""

from __future__ import annotations

import json
import logging

from dataflow.runtime.logs import JsonFormatter, RedactingFormatter, Redactor


def emit(logger_name: str, env: dict[str, str], *args, **kwargs) -> dict:
    record_holder: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            record_holder.append(self.format(record))

    handler = Capture()
    handler.setFormatter(RedactingFormatter(JsonFormatter(), Redactor(env)))
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


# Planted secrets: every variable whose name says password, secret, token or key material.
PLANTED = {
    "CDC_KAFKA_SASL_PASSWORD": "kafka-pw-Zq81!x",
    "CDC_KAFKA_SSL_KEYSTORE_PASSWORD": "keystore-pw-77aa",
    "CDC_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET": "oauth-secret-4455",
    "CDC_STORAGE_AWS_SECRET_ACCESS_KEY": "storage-secret-9z9z",
    "MY_API_TOKEN": "token-abc-123456",
}


def _leaks(text: str) -> list[str]:
    return [v for v in PLANTED.values() if v in text]


def test_every_secret_named_variable_is_redacted_in_messages_extra_fields_and_tracebacks() -> None:
    try:
        raise RuntimeError(f"connect failed with password {PLANTED['CDC_KAFKA_SASL_PASSWORD']}")
    except RuntimeError:
        import sys

        exc_info = sys.exc_info()
    record = logging.LogRecord("t", logging.ERROR, __file__, 1, "%s and %r", None, exc_info)
    record.args = (PLANTED["MY_API_TOKEN"], {"k": PLANTED["CDC_STORAGE_AWS_SECRET_ACCESS_KEY"]})
    record.__dict__["reason"] = f"quoted: {json.dumps(PLANTED['CDC_KAFKA_SSL_KEYSTORE_PASSWORD'])}"
    record.__dict__["uri"] = PLANTED["CDC_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET"]
    for inner in (JsonFormatter(), logging.Formatter("%(message)s %(reason)s %(uri)s")):
        out = RedactingFormatter(inner, Redactor(PLANTED)).format(record)
        assert _leaks(out) == [], out
        assert out.count("***") >= 4


def test_values_read_from_secret_files_are_redacted(tmp_path) -> None:
    from dataflow.runtime import secrets

    path = tmp_path / "pw"
    path.write_text("file-held-secret-31\n")
    env = secrets.resolve_files({"CDC_KAFKA_SASL_PASSWORD_FILE": str(path)}, lambda name: True)
    assert env == {"CDC_KAFKA_SASL_PASSWORD": "file-held-secret-31"}
    out = Redactor({}).redact("the value file-held-secret-31 was refused")
    assert out == "the value *** was refused"
