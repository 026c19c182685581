"""All configuration, read from the environment and validated once at start.

`Settings` is a pydantic model with one field per setting, each aliased to its
environment variable, so the rules (minimums, finite numbers, choices, and the
few that tie two settings together) are declared next to the setting. Every
problem is reported together, in one `SettingsError` whose lines each name the
variable and its value (`'***'` for secrets), so a misconfigured deployment
fails at once instead of half-way through.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError, PydanticUseDefault

from dataflow.batch.tables import BatchLimits
from dataflow.decode.envelopes import Decoder
from dataflow.decode.formats import Format, TopicTables, regex_problem
from dataflow.dlq.writer import DLQConfig
from dataflow.lake.columns import DEFAULT_MAX_COLUMNS
from dataflow.lake.layout import TableLocations, TableMode
from dataflow.lake.maintenance import DEFAULT_TARGET_BYTES, MaintenancePolicy
from dataflow.lake.mirror import DEFAULT_ROUND_ROWS
from dataflow.runtime.failures import ConfigError
from dataflow.runtime.retry import RetryPolicy
from dataflow.runtime.secrets import STORAGE_CA, SecretFileError, is_secret, resolve_files

# Rows per batch unless CDC_BATCH_MAX_ROWS says otherwise. A MERGE rewrites every file its
# updates touch, so merge mode gains from larger batches (bench/RESULTS.md, "Merge batch size").
DEFAULT_BATCH_ROWS = {"append": 10_000, "merge": 10_000, "both": 10_000}  # every batch is an append now

StartFrom = Literal["delta", "beginning"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
LogFormat = Literal["json", "text"]
SAMPLE = Path(__file__).parent.parent / "sample" / "changes.jsonl"

# What librdkafka is asked to build when it checks the CDC_KAFKA_* properties: a consumer
# without bootstrap.servers, which connects nowhere; log_level 0 keeps its warnings about
# producer-only properties (valid, just for the other client) off stderr.
KAFKA_CHECK_CONFIG = {"group.id": "cdc-settings-check", "log_level": 0}


class SettingsError(ConfigError):
    """The environment does not describe a pipeline that can run."""


def _bad(reason: str) -> PydanticCustomError:
    """A bad value: reported as `NAME='value' <reason>`."""
    return PydanticCustomError("bad_value", reason)


def _conflict(line: str) -> PydanticCustomError:
    """A problem between settings, or several: reported as given, which names the variables."""
    return PydanticCustomError("conflict", line)


# Reusable parts of the field declarations --------------------------------------------------


def _blank_is_default(value: Any) -> Any:
    """An empty variable means the default, as if it were not set."""
    if isinstance(value, str) and not value.strip():
        raise PydanticUseDefault()
    return value


def _flag(value: Any) -> Any:
    """On/off switches: 1/0, true/false, yes/no, on/off; anything else is a mistake, not off."""
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise _bad("must be 1 or 0 (true/false, yes/no, on/off)")


def _comma_list(value: Any) -> Any:
    if isinstance(value, str):
        return tuple(t.strip() for t in value.split(",") if t.strip())
    return value


def _json_map(value: Any) -> Any:
    """`CDC_TOPIC_TABLES`: a JSON object of topic -> "<db>.<collection>" (or "<db>.*", "*")."""
    if not isinstance(value, str):
        return value
    try:
        parsed = json.loads(value)
    except ValueError as e:
        raise _bad(f'is not a JSON object {{"<topic>": "<db>.<collection>"}}: {e}') from None
    if not isinstance(parsed, dict) or not all(isinstance(v, str) for v in parsed.values()):
        raise _bad('must be a JSON object {"<topic>": "<db>.<collection>"}')
    for topic, table in parsed.items():
        db, dot, coll = table.partition(".")
        if table != "*" and not (db and dot and coll and "*" not in db):
            raise _bad(f"maps {topic!r} to {table!r}, which is not <db>.<collection>, <db>.* or *")
    return parsed


def _off_is_none(value: Any) -> Any:
    return None if isinstance(value, str) and value.strip().lower() in ("off", "none") else value


def _upper(value: Any) -> Any:
    return value.strip().upper() if isinstance(value, str) else value


def _lower(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


DEFAULT = BeforeValidator(_blank_is_default)
Text = Annotated[str, DEFAULT]
Count = Annotated[int, Field(ge=1), DEFAULT]
Flag = Annotated[bool, BeforeValidator(_flag), DEFAULT]


def _var(name: str, **kwargs: Any) -> Any:
    """A field read from the environment variable `name`."""
    return Field(alias=name, **kwargs)


# Each component's share of the settings ----------------------------------------------------


@dataclass(frozen=True)
class KafkaSettings:
    brokers: str | None
    topics: tuple[str, ...]
    topic_pattern: str | None
    client_config: dict[str, str] = field(repr=False)
    start_from: StartFrom = "delta"
    stop_at_end: bool = False


@dataclass(frozen=True)
class LakeSettings:
    tables: TableLocations
    storage_options: dict[str, str] = field(repr=False)
    pipeline_name: str = "cdc"
    materializer: Literal["embedded", "off"] = "embedded"
    mirror_round_rows: int = DEFAULT_ROUND_ROWS
    mirror_round_fraction: float = 0.25
    mirror_max_wait_s: float = 60.0
    mirror_defer_backlog: int = 100_000  # unread input events; 0: rounds never wait for the input
    mirror_backlog_max_wait_s: float = 300.0
    tombstone_retention_hours: float = 168.0
    maintenance: MaintenancePolicy = field(default_factory=MaintenancePolicy)
    maintenance_interval_s: float = 600.0  # per table, by the thread that writes it
    max_columns: int = DEFAULT_MAX_COLUMNS


@dataclass(frozen=True)
class RetrySettings:
    max_attempts: int
    initial_seconds: float
    max_seconds: float
    breaker_failures: int
    breaker_reset_seconds: float

    def for_commits(self) -> RetryPolicy:
        """Commits wait out an outage however long it lasts: Kafka keeps the data meanwhile."""
        return RetryPolicy(initial=self.initial_seconds, cap=self.max_seconds)

    def at_start(self) -> RetryPolicy:
        """Look-ups at start give up after CDC_RETRY_MAX_ATTEMPTS: a clear refusal beats a silent hang."""
        return RetryPolicy(initial=self.initial_seconds, cap=self.max_seconds, attempts=self.max_attempts)


@dataclass(frozen=True)
class RecoverySettings:
    dir: str | None
    partitions: int
    snapshot_seconds: float
    backup_seconds: float


@dataclass(frozen=True)
class LogSettings:
    level: LogLevel
    format: LogFormat


class Settings(BaseModel):
    """The whole configuration. Fields are checked in order, so a rule may read earlier ones."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        validate_by_alias=True,
        validate_by_name=True,
        hide_input_in_errors=True,
    )

    brokers: Annotated[str | None, DEFAULT] = _var("CDC_KAFKA_BROKERS", default=None)
    topics: Annotated[tuple[str, ...], BeforeValidator(_comma_list), DEFAULT] = _var("CDC_TOPICS", default=())
    topic_pattern: Annotated[str | None, DEFAULT] = _var(
        "CDC_TOPIC_PATTERN", default=None, validate_default=True
    )
    table_mode: TableMode = _var("CDC_TABLE_MODE", default="merge")
    format: Annotated[Format, BeforeValidator(_lower), DEFAULT] = _var("CDC_FORMAT", default=Format.AUTO)
    topic_tables: Annotated[dict[str, str], BeforeValidator(_json_map), DEFAULT] = _var(
        "CDC_TOPIC_TABLES", default_factory=dict
    )
    topic_table_regex: Annotated[str | None, DEFAULT] = _var("CDC_TOPIC_TABLE_REGEX", default=None)
    start_from: StartFrom = _var("CDC_START_FROM", default="delta")
    # Filled by from_env from AWS_* and CDC_STORAGE_* for an s3:// lake; never shown.
    storage_options: dict[str, str] = Field(default_factory=dict, repr=False)
    lake_uri: Text = _var("CDC_LAKE_URI", default="./data/lake", validate_default=True)
    # None: the table mode's default (DEFAULT_BATCH_ROWS).
    batch_max_rows: Annotated[Annotated[int, Field(ge=1)] | None, DEFAULT] = _var(
        "CDC_BATCH_MAX_ROWS", default=None, validate_default=True
    )
    batch_max_bytes: Count = _var("CDC_BATCH_MAX_BYTES", default=64 * 1024 * 1024)
    batch_max_seconds: Annotated[float, Field(ge=0.01, allow_inf_nan=False), DEFAULT] = _var(
        "CDC_BATCH_MAX_SECONDS", default=5.0
    )
    batch_max_open_rows: Annotated[Annotated[int, Field(ge=1)] | None, DEFAULT] = _var(
        "CDC_BATCH_MAX_OPEN_ROWS", default=None
    )
    dlq_topic: Text = _var("CDC_DLQ_TOPIC", default="cdc.dead_letter_queue")
    dlq_fallback: Text = _var("CDC_DLQ_FALLBACK", default="./data/dlq/fallback.jsonl")
    dlq_rate_per_minute: Count = _var("CDC_DLQ_RATE_PER_MINUTE", default=10_000)
    max_document_bytes: Count = _var("CDC_MAX_DOCUMENT_BYTES", default=16 * 1024 * 1024)
    # Always on without brokers: the bundled sample is read to its end.
    stop_at_end: Flag = _var("CDC_STOP_AT_END", default=False, validate_default=True)
    pipeline_name: Text = _var("CDC_PIPELINE_NAME", default="cdc")
    sample_path: Text = _var("CDC_SAMPLE_PATH", default=str(SAMPLE))
    recovery_dir: Annotated[str | None, BeforeValidator(_off_is_none), DEFAULT] = _var(
        "CDC_RECOVERY_DIR", default="./data/recovery"
    )
    recovery_partitions: Count = _var("CDC_RECOVERY_PARTITIONS", default=16)
    snapshot_seconds: Annotated[float, Field(ge=0.1, allow_inf_nan=False), DEFAULT] = _var(
        "CDC_SNAPSHOT_SECONDS", default=10.0
    )
    backup_seconds: Annotated[float, Field(ge=0, allow_inf_nan=False), DEFAULT] = _var(
        "CDC_BACKUP_SECONDS", default=0.0
    )
    shutdown_grace_seconds: Annotated[float, Field(ge=1, allow_inf_nan=False), DEFAULT] = _var(
        "CDC_SHUTDOWN_GRACE_SECONDS", default=60.0
    )
    retry_max_attempts: Count = _var("CDC_RETRY_MAX_ATTEMPTS", default=8)
    retry_max_seconds: Annotated[float, Field(ge=0.001, allow_inf_nan=False), DEFAULT] = _var(
        "CDC_RETRY_MAX_SECONDS", default=30.0
    )
    retry_initial_seconds: Annotated[float, Field(ge=0.001, allow_inf_nan=False), DEFAULT] = _var(
        "CDC_RETRY_INITIAL_SECONDS", default=0.5, validate_default=True
    )
    breaker_failures: Count = _var("CDC_BREAKER_FAILURES", default=5)
    breaker_reset_seconds: Annotated[float, Field(ge=0.1, allow_inf_nan=False), DEFAULT] = _var(
        "CDC_BREAKER_RESET_SECONDS", default=60.0
    )
    # None: on. The sink only appends (to the changelog, in both modes); MERGEs run in the
    # materializer, whose working memory no longer overlaps the open batches'.
    background_commits: Annotated[bool | None, BeforeValidator(_flag), DEFAULT] = _var(
        "CDC_BACKGROUND_COMMITS", default=None, validate_default=True
    )
    # merge mode: where the mirrors are brought up to date ("embedded": by the workers,
    # "off": by `cdc materialize`, run apart)
    materializer: Literal["embedded", "off"] = _var("CDC_MATERIALIZER", default="embedded")
    mirror_round_rows: Count = _var("CDC_MIRROR_ROUND_ROWS", default=DEFAULT_ROUND_ROWS)
    mirror_round_fraction: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False), DEFAULT] = _var(
        "CDC_MIRROR_ROUND_FRACTION", default=0.25
    )
    mirror_max_wait_seconds: Annotated[float, Field(ge=0, allow_inf_nan=False), DEFAULT] = _var(
        "CDC_MIRROR_MAX_WAIT_SECONDS", default=60.0
    )
    # While this many events or more wait unread in Kafka, a busy table's round waits for them,
    # at most the backlog's max wait
    mirror_defer_backlog: Annotated[int, Field(ge=0), DEFAULT] = _var(
        "CDC_MIRROR_DEFER_BACKLOG", default=100_000
    )
    mirror_backlog_max_wait_seconds: Annotated[float, Field(ge=0, allow_inf_nan=False), DEFAULT] = _var(
        "CDC_MIRROR_BACKLOG_MAX_WAIT_SECONDS", default=300.0
    )
    tombstone_retention_hours: Annotated[float, Field(ge=0, allow_inf_nan=False), DEFAULT] = _var(
        "CDC_TOMBSTONE_RETENTION_HOURS", default=168.0
    )
    # Value columns a table gets; the fields past them go, whole, into one JSON overflow column
    max_columns: Count = _var("CDC_MAX_COLUMNS", default=DEFAULT_MAX_COLUMNS)
    # Table maintenance (`cdc maintain`): compaction, vacuum, checkpoints, log clean-up
    maintenance: Flag = _var("CDC_MAINTENANCE", default=True)
    compact_target_bytes: Annotated[int, Field(ge=1024 * 1024), DEFAULT] = _var(
        "CDC_COMPACT_TARGET_BYTES", default=DEFAULT_TARGET_BYTES
    )
    compact_min_files: Count = _var("CDC_COMPACT_MIN_FILES", default=10)
    vacuum_retention_hours: Annotated[int, Field(ge=0), DEFAULT] = _var(
        "CDC_VACUUM_RETENTION_HOURS", default=168
    )
    checkpoint_every: Count = _var("CDC_CHECKPOINT_EVERY", default=100)
    log_retention_hours: Annotated[int, Field(ge=0), DEFAULT] = _var("CDC_LOG_RETENTION_HOURS", default=720)
    maintenance_interval_minutes: Annotated[float, Field(ge=0, allow_inf_nan=False), DEFAULT] = _var(
        "CDC_MAINTENANCE_INTERVAL_MINUTES", default=10.0
    )
    log_level: Annotated[LogLevel, BeforeValidator(_upper), DEFAULT] = _var("CDC_LOG_LEVEL", default="INFO")
    log_format: Annotated[LogFormat, BeforeValidator(_lower), DEFAULT] = _var(
        "CDC_LOG_FORMAT", default="json"
    )
    # librdkafka properties; from_env passes the CDC_KAFKA_* variables, turned into names here.
    kafka_config: dict[str, str] = Field(default_factory=dict)

    # Rules ------------------------------------------------------------------------------

    @field_validator("topic_pattern")
    @classmethod
    def _one_way_to_name_topics(cls, pattern: str | None, info: ValidationInfo) -> str | None:
        brokers, topics = info.data.get("brokers"), info.data.get("topics")
        if topics and pattern is not None:
            raise _conflict("give CDC_TOPICS or CDC_TOPIC_PATTERN, not both")
        if brokers and not topics and pattern is None:
            raise _conflict("with CDC_KAFKA_BROKERS set, give CDC_TOPICS (comma list) or CDC_TOPIC_PATTERN")
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as e:
                raise _bad(f"is not a valid regex: {e}") from None
        return pattern

    @field_validator("topic_table_regex")
    @classmethod
    def _regex_names_the_table(cls, pattern: str | None) -> str | None:
        if pattern is not None and (problem := regex_problem(pattern)) is not None:
            raise _bad(problem)
        return pattern

    @field_validator("lake_uri")
    @classmethod
    def _lake_is_local_or_s3(cls, uri: str, info: ValidationInfo) -> str:
        if s3 := _S3_URI.fullmatch(uri):
            bucket = s3["bucket"]
            if not bucket:
                raise _bad("names no bucket: use s3://bucket/prefix")
            if not _S3_BUCKET.fullmatch(bucket):
                raise _bad(
                    f"names bucket {bucket!r}, not a valid S3 bucket name "
                    "(3 to 63 lowercase letters, digits, dots and hyphens)"
                )
            storage = info.data.get("storage_options") or {}
            if not storage.get("AWS_ACCESS_KEY_ID") or not storage.get("AWS_SECRET_ACCESS_KEY"):
                raise _bad("is on S3 and needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
            return uri
        if uri.startswith("file://"):
            uri = uri[len("file://") :]
            if not uri:
                raise _bad("names no path: use file:///absolute/path or file://relative/path")
        elif _URI_SCHEME.match(uri):
            raise _bad("must be a local path, file://path or s3://bucket/prefix (or s3a://)")
        return str(Path(uri).absolute())

    @field_validator("batch_max_rows")
    @classmethod
    def _rows_per_mode(cls, rows: int | None, info: ValidationInfo) -> int:
        return rows if rows is not None else DEFAULT_BATCH_ROWS.get(info.data.get("table_mode", ""), 10_000)

    @field_validator("stop_at_end")
    @classmethod
    def _embedded_stops_at_end(cls, stop: bool, info: ValidationInfo) -> bool:
        return stop or info.data.get("brokers") is None

    @field_validator("sample_path")
    @classmethod
    def _sample_is_readable(cls, path: str, info: ValidationInfo) -> str:
        if info.data.get("brokers") is None and not (os.path.isfile(path) and os.access(path, os.R_OK)):
            raise _bad("is not a readable file")
        return path

    @field_validator("retry_initial_seconds")
    @classmethod
    def _initial_within_max(cls, initial: float, info: ValidationInfo) -> float:
        cap = info.data.get("retry_max_seconds")
        if cap is not None and initial > cap:
            raise _conflict(
                f"CDC_RETRY_INITIAL_SECONDS={initial:g} must not exceed CDC_RETRY_MAX_SECONDS={cap:g}"
            )
        return initial

    @field_validator("background_commits")
    @classmethod
    def _background_by_default(cls, background: bool | None, info: ValidationInfo) -> bool:
        return background if background is not None else True

    @field_validator("kafka_config")
    @classmethod
    def _librdkafka_accepts(cls, config: dict[str, str]) -> dict[str, str]:
        # Keys are CDC_KAFKA_* variables from from_env, or already property names.
        named = {
            (key, kafka_property(key)) if key.startswith("CDC_KAFKA_") else (kafka_variable(key), key): value
            for key, value in config.items()
        }
        if problems := librdkafka_problems(named):
            raise _conflict("\n  - ".join(problems))
        return {prop: value for (_, prop), value in named.items()}

    # Reading ----------------------------------------------------------------------------

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        known = set(_variables(cls))
        try:  # `<NAME>_FILE` gives NAME from a mounted file (a Kubernetes or Docker secret)
            env = resolve_files(env, lambda name: name in known or name.startswith(_FILE_PREFIXES))
        except SecretFileError as e:
            raise SettingsError(f"invalid configuration:\n  - {e}") from None
        data: dict[str, Any] = {name: env[name] for name in _variables(cls) if name in env}
        lake = env.get("CDC_LAKE_URI") or ""
        data["storage_options"] = s3_storage_options(env) if lake.startswith(("s3://", "s3a://")) else {}
        data["kafka_config"] = {
            k: v for k, v in env.items() if k.startswith("CDC_KAFKA_") and k != "CDC_KAFKA_BROKERS"
        }
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            lines = [_problem(error, data) for error in e.errors(include_url=False)]
            raise SettingsError("invalid configuration:\n  - " + "\n  - ".join(lines)) from None

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            if name == "kafka_config":
                value = {k: "***" if is_secret(k) else v for k, v in value.items()}
            yield name, value

    # What each component needs ----------------------------------------------------------

    @property
    def kafka(self) -> KafkaSettings:
        return KafkaSettings(
            brokers=self.brokers,
            topics=self.topics,
            topic_pattern=self.topic_pattern,
            client_config=dict(self.kafka_config),
            start_from=self.start_from,
            stop_at_end=self.stop_at_end,
        )

    @property
    def decoder(self) -> Decoder:
        return Decoder(
            format=self.format,
            tables=TopicTables(dict(self.topic_tables), self.topic_table_regex),
            max_bytes=self.max_document_bytes,
        )

    @property
    def lake(self) -> LakeSettings:
        return LakeSettings(
            tables=TableLocations(self.lake_uri, self.table_mode),
            storage_options=dict(self.storage_options),
            pipeline_name=self.pipeline_name,
            materializer=self.materializer,
            mirror_round_rows=self.mirror_round_rows,
            mirror_round_fraction=self.mirror_round_fraction,
            mirror_max_wait_s=self.mirror_max_wait_seconds,
            mirror_defer_backlog=self.mirror_defer_backlog,
            mirror_backlog_max_wait_s=self.mirror_backlog_max_wait_seconds,
            tombstone_retention_hours=self.tombstone_retention_hours,
            maintenance=self.maintenance_policy,
            maintenance_interval_s=self.maintenance_interval_minutes * 60,
            max_columns=self.max_columns,
        )

    @property
    def maintenance_policy(self) -> MaintenancePolicy:
        return MaintenancePolicy(
            enabled=self.maintenance,
            target_bytes=self.compact_target_bytes,
            min_small_files=self.compact_min_files,
            vacuum_retention_hours=self.vacuum_retention_hours,
            checkpoint_every=self.checkpoint_every,
            log_retention_hours=self.log_retention_hours,
        )

    @property
    def batch(self) -> BatchLimits:
        return BatchLimits(
            max_rows=self.batch_max_rows,  # type: ignore[arg-type]  # always filled in
            max_bytes=self.batch_max_bytes,
            max_seconds=self.batch_max_seconds,
            max_open_rows=self.batch_max_open_rows,
        )

    @property
    def retry(self) -> RetrySettings:
        return RetrySettings(
            max_attempts=self.retry_max_attempts,
            initial_seconds=self.retry_initial_seconds,
            max_seconds=self.retry_max_seconds,
            breaker_failures=self.breaker_failures,
            breaker_reset_seconds=self.breaker_reset_seconds,
        )

    @property
    def dlq(self) -> DLQConfig:
        return DLQConfig(
            brokers=self.brokers,
            topic=self.dlq_topic,
            fallback_path=self.dlq_fallback,
            rate_per_minute=self.dlq_rate_per_minute,
            producer_config=dict(self.kafka_config),
        )

    @property
    def recovery(self) -> RecoverySettings:
        return RecoverySettings(
            dir=self.recovery_dir,
            partitions=self.recovery_partitions,
            snapshot_seconds=self.snapshot_seconds,
            backup_seconds=self.backup_seconds,
        )

    @property
    def logging(self) -> LogSettings:
        return LogSettings(level=self.log_level, format=self.log_format)


_S3_URI = re.compile(r"s3a?://(?P<bucket>[^/]*)(?P<prefix>/.*)?", re.DOTALL)
_S3_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_URI_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:")  # two letters at least: C:\ is a path


def _variables(model: type[BaseModel]) -> list[str]:
    return [f.alias for f in model.model_fields.values() if f.alias]


# How pydantic's reasons read after `NAME='value'`.
_REASONS = {
    "int_parsing": "is not an integer",
    "int_from_float": "is not an integer",
    "float_parsing": "is not a number",
    "finite_number": "is not a finite number",
    "greater_than_equal": "must be at least {ge}",
    "literal_error": "must be {expected}",
}


def _problem(error: Mapping[str, Any], data: Mapping[str, Any]) -> str:
    """One line of the SettingsError: the variable, its value (unless secret), the reason."""
    if error["type"] == "conflict":
        return error["msg"]
    name = str(error["loc"][0]) if error["loc"] else "settings"
    reason = _REASONS.get(error["type"], "").format(**error.get("ctx", {})) or error["msg"].replace(
        "Input should be", "must be"
    )
    if name not in data:
        return f"{name} {reason}"
    return f"{name}={shown(name, data[name])} {reason}"


def shown(name: str, value: Any) -> str:
    return "'***'" if is_secret(name) else repr(value)


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
    opts.update(
        {
            k[len("CDC_STORAGE_") :].lower(): v
            for k, v in env.items()
            if k.startswith("CDC_STORAGE_") and k not in _NOT_STORAGE_OPTIONS
        }
    )
    # Bound the object store's own retries, so an outage reaches our breaker in seconds,
    # not after minutes inside one attempt.
    opts.setdefault("connect_timeout", "5s")
    opts.setdefault("timeout", "120s")
    opts.setdefault("max_retries", "4")
    opts.setdefault("retry_timeout", "10s")
    return opts


# CDC_STORAGE_* variables that are ours, not object-store options (dataflow.runtime.secrets).
_NOT_STORAGE_OPTIONS = frozenset({STORAGE_CA, "CDC_STORAGE_CA_BUNDLE_FOR"})
_FILE_PREFIXES = ("CDC_KAFKA_", "CDC_STORAGE_", "AWS_")


def kafka_property(variable: str) -> str:
    """`CDC_KAFKA_<NAME>` -> librdkafka property `name`, dots for underscores."""
    return variable[len("CDC_KAFKA_") :].lower().replace("_", ".")


def kafka_variable(prop: str) -> str:
    """The variable that sets librdkafka property `prop` (the inverse of kafka_property)."""
    return "CDC_KAFKA_" + prop.replace(".", "_").upper()


def librdkafka_refusal(props: Mapping[str, str]) -> str | None:
    """librdkafka's reason for refusing a property name or value among these, or None.

    It is asked to build a consumer without bootstrap.servers, which checks every name and
    value and connects nowhere. A property meant only for producers passes (librdkafka would
    only warn), as does one meant only for consumers. A failure to build the client from
    valid properties ("Failed to create consumer: ...", e.g. a SASL mechanism this build
    lacks, a certificate file missing here) is left to the real clients at start: it
    depends on the machine, not on what the variables say.
    """
    from confluent_kafka import Consumer

    try:
        Consumer({**KAFKA_CHECK_CONFIG, **props}).close()
    except Exception as e:  # KafkaException mostly; TypeError/ValueError for a Python-side option
        error = e.args[0] if e.args else e
        reason = error.str() if hasattr(error, "str") else str(error)
        return None if reason.startswith("Failed to create") else reason
    return None


def librdkafka_problems(config: Mapping[tuple[str, str], str]) -> list[str]:
    """One line per refused `(variable, property): value`, naming the variable, never a secret."""
    if not config or (together := librdkafka_refusal({p: v for (_, p), v in config.items()})) is None:
        return []
    secrets = [v for (var, _), v in config.items() if is_secret(var) and v]

    def scrub(reason: str) -> str:
        for secret in secrets:
            reason = reason.replace(secret, "***")
        return reason

    # librdkafka stops at the first bad property; ask about each to report them all. For an
    # unknown name the value is left out: a misspelt secret's name may not look secret.
    problems = []
    for (var, prop), value in config.items():
        if (reason := librdkafka_refusal({prop: value})) is not None:
            unknown = reason.startswith("No such configuration property")
            named = var if unknown else f"{var}={shown(var, scrub(value))}"
            problems.append(f"{named} is refused by librdkafka: {scrub(reason)}")
    names = ", ".join(var for var, _ in config)
    return problems or [f"{names}: librdkafka refuses these together: {scrub(together)}"]
