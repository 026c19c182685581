"""All configuration, read from the environment and validated once at start.

Every problem is reported together, in one message that names the variable,
so a misconfigured deployment fails at once instead of half-way through.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import quote

# In `both` mode the changelog of `<lake>/<db>/<coll>` is `<lake>/_changelog/<db>/<coll>`.
CHANGELOG_DIR = "_changelog"
# Rows per batch unless CDC_BATCH_MAX_ROWS says otherwise. A MERGE rewrites every file its
# updates touch, so merge mode pays per batch far more than append and gains from larger
# ones (1M benchmark events: 25,000 rows merged 1.4x to 1.6x as fast as 10,000).
DEFAULT_BATCH_ROWS = {"append": 10_000, "merge": 25_000, "both": 25_000}

TableMode = Literal["merge", "append", "both"]
SAMPLE = Path(__file__).parent.parent / "sample" / "changes.jsonl"


class SettingsError(ValueError):
    """The environment does not describe a pipeline that can run."""


@dataclass(frozen=True)
class Settings:
    brokers: str | None
    topics: tuple[str, ...]
    topic_pattern: str | None
    lake_uri: str
    table_mode: TableMode
    batch_max_rows: int
    batch_max_bytes: int
    batch_max_seconds: float
    batch_max_open_rows: int | None
    dlq_topic: str
    dlq_fallback: str
    dlq_rate_per_minute: int
    max_document_bytes: int
    stop_at_end: bool
    pipeline_name: str
    sample_path: str
    recovery_dir: str | None = "./data/recovery"
    recovery_partitions: int = 16
    snapshot_seconds: float = 10.0
    backup_seconds: float = 0.0
    shutdown_grace_seconds: float = 60.0
    start_from: str = "delta"
    retry_max_attempts: int = 8
    retry_initial_seconds: float = 0.5
    retry_max_seconds: float = 30.0
    breaker_failures: int = 5
    breaker_reset_seconds: float = 60.0
    background_commits: bool = False
    kafka_config: dict[str, str] = field(default_factory=dict)
    storage_options: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def embedded(self) -> bool:
        """No broker configured: read the bundled sample instead (the demo)."""
        return self.brokers is None

    @property
    def table_modes(self) -> tuple[str, ...]:
        return ("merge", "append") if self.table_mode == "both" else (self.table_mode,)

    def table_uri(self, db: str, collection: str, mode: str) -> str:
        """`<lake>/<db>/<collection>`; with `both`, the changelog lives under `_changelog/`."""
        base = self.lake_uri.rstrip("/")
        path = f"{path_part(db)}/{path_part(collection)}"
        if self.table_mode == "both" and mode == "append":
            return f"{base}/{CHANGELOG_DIR}/{path}"
        return f"{base}/{path}"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        errors: list[str] = []

        def num(name: str, default: float, kind: type = int, minimum: float = 1) -> float:
            raw = env.get(name)
            if raw is None or raw == "":
                return kind(default)
            try:
                value = kind(raw)
            except ValueError:
                errors.append(f"{name}={raw!r} is not a {kind.__name__}")
                return kind(default)
            if value < minimum:
                errors.append(f"{name}={raw!r} must be at least {minimum}")
            return value

        def flag(name: str, default: bool) -> bool:
            raw = (env.get(name) or "").strip().lower()
            if raw == "":
                return default
            if raw in ("1", "true", "yes", "on"):
                return True
            if raw in ("0", "false", "no", "off"):
                return False
            errors.append(f"{name}={env.get(name)!r} must be 1 or 0 (true/false, yes/no, on/off)")
            return default

        brokers = env.get("CDC_KAFKA_BROKERS") or None
        topics = tuple(t.strip() for t in env.get("CDC_TOPICS", "").split(",") if t.strip())
        pattern = env.get("CDC_TOPIC_PATTERN") or None
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as e:
                errors.append(f"CDC_TOPIC_PATTERN={pattern!r} is not a valid regex: {e}")
        if brokers and not topics and not pattern:
            errors.append("with CDC_KAFKA_BROKERS set, give CDC_TOPICS (comma list) or CDC_TOPIC_PATTERN")
        if topics and pattern:
            errors.append("give CDC_TOPICS or CDC_TOPIC_PATTERN, not both")

        mode = env.get("CDC_TABLE_MODE", "merge")
        if mode not in ("merge", "append", "both"):
            errors.append(f"CDC_TABLE_MODE={mode!r} must be merge, append or both")

        start_from = env.get("CDC_START_FROM", "delta")
        if start_from not in ("delta", "beginning"):
            errors.append(f"CDC_START_FROM={start_from!r} must be delta or beginning")

        lake = env.get("CDC_LAKE_URI") or "./data/lake"
        if "://" in lake and not lake.startswith(("s3://", "s3a://", "file://")):
            errors.append(f"CDC_LAKE_URI={lake!r}: use a local path or s3://bucket/prefix")
        storage: dict[str, str] = {}
        if lake.startswith(("s3://", "s3a://")):
            storage = s3_storage_options(env)
            if not storage.get("AWS_ACCESS_KEY_ID") or not storage.get("AWS_SECRET_ACCESS_KEY"):
                errors.append("an s3:// CDC_LAKE_URI needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
        elif lake.startswith("file://"):
            lake = lake[len("file://") :]
        if "://" not in lake:
            lake = str(Path(lake).absolute())

        settings = cls(
            brokers=brokers,
            topics=topics,
            topic_pattern=pattern,
            lake_uri=lake,
            table_mode=mode,  # type: ignore[arg-type]
            batch_max_rows=int(num("CDC_BATCH_MAX_ROWS", DEFAULT_BATCH_ROWS.get(mode, 10_000))),
            batch_max_bytes=int(num("CDC_BATCH_MAX_BYTES", 64 * 1024 * 1024)),
            batch_max_seconds=float(num("CDC_BATCH_MAX_SECONDS", 5.0, float, 0.01)),
            batch_max_open_rows=int(num("CDC_BATCH_MAX_OPEN_ROWS", 0)) or None,
            dlq_topic=env.get("CDC_DLQ_TOPIC") or "cdc.dead_letter_queue",
            dlq_fallback=env.get("CDC_DLQ_FALLBACK") or "./data/dlq/fallback.jsonl",
            dlq_rate_per_minute=int(num("CDC_DLQ_RATE_PER_MINUTE", 10_000)),
            max_document_bytes=int(num("CDC_MAX_DOCUMENT_BYTES", 16 * 1024 * 1024)),
            stop_at_end=flag("CDC_STOP_AT_END", False) or brokers is None,
            pipeline_name=env.get("CDC_PIPELINE_NAME") or "cdc",
            sample_path=env.get("CDC_SAMPLE_PATH") or str(SAMPLE),
            recovery_dir=None
            if env.get("CDC_RECOVERY_DIR", "").lower() in ("off", "none")
            else env.get("CDC_RECOVERY_DIR") or "./data/recovery",
            recovery_partitions=int(num("CDC_RECOVERY_PARTITIONS", 16)),
            snapshot_seconds=float(num("CDC_SNAPSHOT_SECONDS", 10.0, float, 0.1)),
            backup_seconds=float(num("CDC_BACKUP_SECONDS", 0.0, float, 0)),
            shutdown_grace_seconds=float(num("CDC_SHUTDOWN_GRACE_SECONDS", 60.0, float, 1)),
            start_from=start_from,
            retry_max_attempts=int(num("CDC_RETRY_MAX_ATTEMPTS", 8)),
            retry_initial_seconds=float(num("CDC_RETRY_INITIAL_SECONDS", 0.5, float, 0.001)),
            retry_max_seconds=float(num("CDC_RETRY_MAX_SECONDS", 30.0, float, 0.001)),
            breaker_failures=int(num("CDC_BREAKER_FAILURES", 5)),
            breaker_reset_seconds=float(num("CDC_BREAKER_RESET_SECONDS", 60.0, float, 0.1)),
            # Append commits overlap reading for a little memory; a MERGE's working memory is
            # large, and overlapping it took far more memory (1M bench events: 1,373 MiB against
            # 918) for little speed (+4%), so merge tables commit in step unless asked.
            background_commits=flag("CDC_BACKGROUND_COMMITS", mode == "append"),
            kafka_config=kafka_client_config(env),
            storage_options=storage,
        )
        if errors:
            raise SettingsError("invalid configuration:\n  - " + "\n  - ".join(errors))
        return settings


def path_part(name: str) -> str:
    """A database or collection name as one safe path segment.

    MongoDB allows `/` and even `..` in collection names; those must not
    escape the lake or land two collections in one table.
    """
    quoted = quote(name, safe="")
    return quoted.replace(".", "%2E") if set(quoted) <= {"."} else quoted


def s3_storage_options(env: Mapping[str, str]) -> dict[str, str]:
    """delta-rs storage options from the standard AWS_* variables (never logged)."""
    keys = (
        "AWS_ENDPOINT_URL",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_REGION",
        "AWS_ALLOW_HTTP",
    )
    opts = {k: env[k] for k in keys if env.get(k)}
    opts.setdefault("AWS_REGION", "us-east-1")
    if opts.get("AWS_ENDPOINT_URL", "").startswith("http://"):
        opts.setdefault("AWS_ALLOW_HTTP", "true")
    # S3-compatible stores (MinIO) want path-style addressing.
    opts.setdefault("AWS_VIRTUAL_HOSTED_STYLE_REQUEST", "false")
    # Any object-store option, e.g. CDC_STORAGE_MAX_RETRIES=3 -> max_retries.
    opts.update({k[len("CDC_STORAGE_") :].lower(): v for k, v in env.items() if k.startswith("CDC_STORAGE_")})
    # Bound the object store's own retries, so an outage reaches our breaker in seconds,
    # not after minutes inside one attempt.
    opts.setdefault("connect_timeout", "5s")
    opts.setdefault("timeout", "120s")
    opts.setdefault("max_retries", "4")
    opts.setdefault("retry_timeout", "10s")
    return opts


def kafka_client_config(env: Mapping[str, str]) -> dict[str, str]:
    """Extra librdkafka settings: `CDC_KAFKA_<NAME>` becomes `name` (dots for underscores).

    For SASL/TLS, e.g. `CDC_KAFKA_SECURITY_PROTOCOL`, `CDC_KAFKA_SASL_USERNAME`.
    """
    skip = {"CDC_KAFKA_BROKERS"}
    return {
        k[len("CDC_KAFKA_") :].lower().replace("_", "."): v
        for k, v in env.items()
        if k.startswith("CDC_KAFKA_") and k not in skip
    }
