"""Configuration from the environment: defaults, validation messages, table paths."""

from __future__ import annotations

import pytest

from dataflow.runtime.settings import Settings, SettingsError


def test_defaults_run_the_embedded_sample() -> None:
    s = Settings.from_env({})
    assert s.brokers is None and s.stop_at_end
    assert s.table_mode == "merge" and s.batch_max_rows == 10_000
    assert s.materializer == "embedded" and s.mirror_round_rows == 750_000
    assert s.lake.mirror_round_fraction == 0.25 and s.lake.mirror_max_wait_s == 60
    assert s.lake.mirror_defer_backlog == 100_000 and s.lake.mirror_backlog_max_wait_s == 300
    assert (
        Settings.from_env({"CDC_MIRROR_BACKLOG_MAX_WAIT_SECONDS": "30"}).lake.mirror_backlog_max_wait_s == 30
    )
    assert Settings.from_env({"CDC_MIRROR_DEFER_BACKLOG": "0"}).lake.mirror_defer_backlog == 0
    with pytest.raises(SettingsError, match="CDC_MIRROR_DEFER_BACKLOG"):
        Settings.from_env({"CDC_MIRROR_DEFER_BACKLOG": "-1"})
    paced = Settings.from_env({"CDC_MIRROR_ROUND_FRACTION": "0", "CDC_MIRROR_MAX_WAIT_SECONDS": "5"}).lake
    assert paced.mirror_round_fraction == 0 and paced.mirror_max_wait_s == 5
    with pytest.raises(SettingsError, match="CDC_MIRROR_ROUND_FRACTION"):
        Settings.from_env({"CDC_MIRROR_ROUND_FRACTION": "2"})
    assert Settings.from_env({"CDC_TABLE_MODE": "append"}).batch_max_rows == 10_000
    assert Settings.from_env({"CDC_TABLE_MODE": "merge", "CDC_BATCH_MAX_ROWS": "500"}).batch_max_rows == 500
    assert s.lake.tables.uri("shop", "orders", "merge").endswith("/data/lake/shop/orders")


def test_the_column_limit_reaches_the_lake_settings() -> None:
    assert Settings.from_env({}).lake.max_columns == 500
    assert Settings.from_env({"CDC_MAX_COLUMNS": "50"}).lake.max_columns == 50
    with pytest.raises(SettingsError, match="CDC_MAX_COLUMNS"):
        Settings.from_env({"CDC_MAX_COLUMNS": "0"})


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env(
            {
                "CDC_KAFKA_BROKERS": "127.0.0.1:9092",
                "CDC_TABLE_MODE": "upsert",
                "CDC_BATCH_MAX_ROWS": "many",
                "CDC_BATCH_MAX_SECONDS": "-1",
                "CDC_BATCH_MAX_OPEN_ROWS": "0",
                "CDC_LAKE_URI": "s3://lake/x",
            }
        )
    text = str(info.value)
    for name in (
        "CDC_TOPICS",
        "CDC_TABLE_MODE",
        "CDC_BATCH_MAX_ROWS",
        "CDC_BATCH_MAX_SECONDS",
        "CDC_BATCH_MAX_OPEN_ROWS",
        "AWS_ACCESS_KEY_ID",
    ):
        assert name in text


def test_secrets_stay_out_of_repr() -> None:
    env = {
        "CDC_KAFKA_BROKERS": "127.0.0.1:9092",
        "CDC_TOPICS": "a,b",
        "CDC_LAKE_URI": "s3://lake/cdc",
        "AWS_ACCESS_KEY_ID": "key-id",
        "AWS_SECRET_ACCESS_KEY": "very-secret-value",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
    }
    s = Settings.from_env(env)
    assert s.topics == ("a", "b")
    assert s.storage_options["AWS_SECRET_ACCESS_KEY"] == "very-secret-value"
    assert "very-secret-value" not in repr(s)


def test_table_paths_are_safe_and_merge_mode_separates_the_changelog() -> None:
    for mode in ("merge", "both"):  # `both`: merge mode's older name
        t = Settings.from_env({"CDC_LAKE_URI": "/lake", "CDC_TABLE_MODE": mode}).lake.tables
        assert t.uri("shop", "orders", "merge") == "/lake/shop/orders"
        assert t.uri("shop", "orders", "append") == "/lake/_changelog/shop/orders"
    append = Settings.from_env({"CDC_LAKE_URI": "/lake", "CDC_TABLE_MODE": "append"}).lake.tables
    assert append.uri("shop", "orders", "append") == "/lake/shop/orders" and not append.merge
    s = Settings.from_env({"CDC_LAKE_URI": "/lake"})
    assert s.lake.tables.uri("shop", "a/b", "merge") == "/lake/shop/a~2Fb"
    assert s.lake.tables.uri("shop", "..", "merge") == "/lake/shop/~2E."
    assert s.lake.tables.uri("shop", "a.b", "merge") == "/lake/shop/a.b"


def test_kafka_client_settings_pass_through() -> None:
    s = Settings.from_env(
        {
            "CDC_KAFKA_BROKERS": "h:1",
            "CDC_TOPIC_PATTERN": "cdc\\..*",
            "CDC_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        }
    )
    assert s.kafka_config == {"security.protocol": "SASL_SSL"}


@pytest.mark.parametrize(
    ("env", "background"),
    [
        ({"CDC_TABLE_MODE": "append"}, True),
        ({"CDC_TABLE_MODE": "merge"}, True),  # the sink only appends, to the changelog
        ({"CDC_TABLE_MODE": "both"}, True),
        ({"CDC_TABLE_MODE": "append", "CDC_BACKGROUND_COMMITS": "0"}, False),
        ({"CDC_TABLE_MODE": "merge", "CDC_BACKGROUND_COMMITS": "false"}, False),
    ],
)
def test_background_commits_are_on_unless_switched_off(env: dict[str, str], background: bool) -> None:
    assert Settings.from_env(env).background_commits is background


def test_a_misspelt_switch_is_an_error_not_off() -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"CDC_STOP_AT_END": "ture", "CDC_BACKGROUND_COMMITS": "enabled"})
    assert "CDC_STOP_AT_END='ture' must be 1 or 0" in str(info.value)
    assert "CDC_BACKGROUND_COMMITS='enabled' must be 1 or 0" in str(info.value)
    assert Settings.from_env(
        {"CDC_KAFKA_BROKERS": "k:9092", "CDC_TOPICS": "t", "CDC_STOP_AT_END": "On"}
    ).stop_at_end


def refused(env: dict[str, str]) -> str:
    with pytest.raises(SettingsError) as info:
        Settings.from_env(env)
    return str(info.value)


@pytest.mark.parametrize(
    "name",
    [
        "CDC_BATCH_MAX_SECONDS",
        "CDC_RETRY_MAX_SECONDS",
        "CDC_RETRY_INITIAL_SECONDS",
        "CDC_SNAPSHOT_SECONDS",
        "CDC_BACKUP_SECONDS",
        "CDC_SHUTDOWN_GRACE_SECONDS",
        "CDC_BREAKER_RESET_SECONDS",
    ],
)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN"])
def test_seconds_must_be_finite(name: str, value: str) -> None:
    assert f"{name}={value!r} is not a finite number" in refused({name: value})


def test_retry_initial_must_not_exceed_the_cap() -> None:
    text = refused({"CDC_RETRY_INITIAL_SECONDS": "40"})
    assert "CDC_RETRY_INITIAL_SECONDS=40 must not exceed CDC_RETRY_MAX_SECONDS=30" in text
    assert "CDC_RETRY_INITIAL_SECONDS" in refused({"CDC_RETRY_MAX_SECONDS": "0.1"})
    s = Settings.from_env({"CDC_RETRY_INITIAL_SECONDS": "2", "CDC_RETRY_MAX_SECONDS": "2"})
    assert (s.retry_initial_seconds, s.retry_max_seconds) == (2.0, 2.0)


def test_log_level_and_format() -> None:
    s = Settings.from_env({})
    assert (s.log_level, s.log_format) == ("INFO", "json")
    s = Settings.from_env({"CDC_LOG_LEVEL": "debug", "CDC_LOG_FORMAT": "text"})
    assert (s.log_level, s.log_format) == ("DEBUG", "text")
    assert "CDC_LOG_LEVEL='VERBOSE'" in refused({"CDC_LOG_LEVEL": "VERBOSE"})
    assert "CDC_LOG_FORMAT='jsn'" in refused({"CDC_LOG_FORMAT": "jsn"})


def test_sample_must_be_a_readable_file(tmp_path) -> None:
    missing = str(tmp_path / "missing.jsonl")
    assert f"CDC_SAMPLE_PATH={missing!r} is not a readable file" in refused({"CDC_SAMPLE_PATH": missing})
    assert "CDC_SAMPLE_PATH" in refused({"CDC_SAMPLE_PATH": str(tmp_path)})  # a folder
    sample = tmp_path / "changes.jsonl"
    sample.write_text("")
    assert Settings.from_env({"CDC_SAMPLE_PATH": str(sample)}).sample_path == str(sample)
    # With brokers the sample is not read, so it is not checked.
    Settings.from_env({"CDC_KAFKA_BROKERS": "k:9092", "CDC_TOPICS": "t", "CDC_SAMPLE_PATH": missing})


@pytest.mark.parametrize(
    "uri",
    ["s3:/bucket/x", "s3://", "s3:///x", "http://x", "gs://x", "s3://Bad_Bucket/x", "s3://ab/x", "file://"],
)
def test_lake_uri_that_is_neither_a_path_nor_s3_is_refused(uri: str) -> None:
    creds = {"AWS_ACCESS_KEY_ID": "key-id", "AWS_SECRET_ACCESS_KEY": "very-secret-value"}
    text = refused({"CDC_LAKE_URI": uri, **creds})
    assert f"CDC_LAKE_URI={uri!r}" in text
    assert "very-secret-value" not in text


def test_lake_uri_forms_accepted(tmp_path) -> None:
    creds = {"AWS_ACCESS_KEY_ID": "key-id", "AWS_SECRET_ACCESS_KEY": "very-secret-value"}
    s = Settings.from_env({"CDC_LAKE_URI": "s3://my-lake.1/cdc/tables", **creds})
    assert s.lake_uri == "s3://my-lake.1/cdc/tables"
    assert s.storage_options["AWS_ACCESS_KEY_ID"] == "key-id"
    assert s.lake.tables.uri("shop", "orders", "merge") == "s3://my-lake.1/cdc/tables/shop/orders"
    assert Settings.from_env({"CDC_LAKE_URI": "s3a://lake", **creds}).lake_uri == "s3a://lake"
    assert Settings.from_env({"CDC_LAKE_URI": f"file://{tmp_path}/lake"}).lake_uri == f"{tmp_path}/lake"
    assert Settings.from_env({"CDC_LAKE_URI": str(tmp_path)}).storage_options == {}


def test_a_misspelt_kafka_property_is_refused_by_librdkafka() -> None:
    text = refused({"CDC_KAFKA_SECURTY_PROTOCOL": "SSL"})
    assert "CDC_KAFKA_SECURTY_PROTOCOL is refused by librdkafka" in text
    assert 'No such configuration property: "securty.protocol"' in text  # librdkafka's reason
    assert "Traceback" not in text


def test_every_bad_kafka_property_is_reported() -> None:
    text = refused(
        {
            "CDC_KAFKA_SECURITY_PROTOCOL": "BOGUS",
            "CDC_KAFKA_FETCH_MAX_BYTES": "lots",
            "CDC_KAFKA_ENABLE_AUTO_COMMIT": "maybe",
            "CDC_KAFKA_FETCH_WAIT_MAX_MS": "100",  # valid: not reported
        }
    )
    for name in ("CDC_KAFKA_SECURITY_PROTOCOL", "CDC_KAFKA_FETCH_MAX_BYTES", "CDC_KAFKA_ENABLE_AUTO_COMMIT"):
        assert name in text
    assert "CDC_KAFKA_FETCH_WAIT_MAX_MS" not in text


def test_a_refused_kafka_secret_is_never_printed() -> None:
    # A misspelt name (PASSWROD) may not look secret: an unknown property's value is never shown.
    text = refused({"CDC_KAFKA_SASL_PASSWROD": "hunter2-value", "CDC_KAFKA_SASL_TOKEN_X": "tok-value"})
    assert "CDC_KAFKA_SASL_PASSWROD is refused" in text and "CDC_KAFKA_SASL_TOKEN_X is refused" in text
    assert "hunter2-value" not in text and "tok-value" not in text
    # A secret-named property with a bad value: named, value masked, also inside librdkafka's reason.
    text = refused({"CDC_KAFKA_SSL_KEYSTORE_PASSWORD": "pw-value", "CDC_KAFKA_SECURITY_PROTOCOL": "pw-value"})
    assert "CDC_KAFKA_SECURITY_PROTOCOL='pw-value'" not in text
    assert "pw-value" not in text


def test_kafka_properties_for_one_client_kind_only_are_accepted() -> None:
    s = Settings.from_env(
        {
            "CDC_KAFKA_LINGER_MS": "5",  # producer only
            "CDC_KAFKA_FETCH_MAX_BYTES": "8388608",  # consumer only
            "CDC_KAFKA_SASL_PASSWORD": "hunter2-value",
        }
    )
    assert s.kafka_config == {
        "linger.ms": "5",
        "fetch.max.bytes": "8388608",
        "sasl.password": "hunter2-value",
    }
    assert "hunter2-value" not in repr(s) and "'sasl.password': '***'" in repr(s)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CDC_BATCH_MAX_ROWS", "5.5"),
        ("CDC_BATCH_MAX_ROWS", "0"),
        ("CDC_BATCH_MAX_BYTES", "lots"),
        ("CDC_RECOVERY_PARTITIONS", "-1"),
        ("CDC_RETRY_MAX_ATTEMPTS", "0"),
        ("CDC_BATCH_MAX_SECONDS", "0"),
        ("CDC_BACKUP_SECONDS", "-1"),
        ("CDC_STOP_AT_END", "t"),
        ("CDC_TABLE_MODE", "upsert"),
        ("CDC_TABLE_MODE", ""),
        ("CDC_START_FROM", "end"),
    ],
)
def test_bad_numbers_switches_and_choices_are_refused(name: str, value: str) -> None:
    assert f"{name}={value!r}" in refused({name: value})


def test_problems_of_every_kind_come_together() -> None:
    text = refused(
        {
            "CDC_KAFKA_BROKERS": "k:9092",
            "CDC_BATCH_MAX_SECONDS": "nan",
            "CDC_LOG_LEVEL": "VERBOSE",
            "CDC_LAKE_URI": "s3:/bucket/x",
            "CDC_KAFKA_SECURTY_PROTOCOL": "SSL",
            "CDC_RETRY_INITIAL_SECONDS": "99",
        }
    )
    for name in (
        "CDC_TOPICS",
        "CDC_BATCH_MAX_SECONDS",
        "CDC_LOG_LEVEL",
        "CDC_LAKE_URI",
        "CDC_KAFKA_SECURTY_PROTOCOL",
        "CDC_RETRY_INITIAL_SECONDS",
    ):
        assert name in text
    assert len(text.splitlines()) == 7  # the heading and one line each


def test_empty_variables_mean_the_defaults() -> None:
    s = Settings.from_env({"CDC_BATCH_MAX_ROWS": "", "CDC_LAKE_URI": "", "CDC_LOG_LEVEL": " "})
    assert s == Settings.from_env({})
    assert s.recovery_dir == "./data/recovery"
    assert Settings.from_env({"CDC_RECOVERY_DIR": "off"}).recovery_dir is None


def test_each_component_gets_its_share() -> None:
    env = {
        "CDC_KAFKA_BROKERS": "k:9092",
        "CDC_TOPICS": "a,b",
        "CDC_KAFKA_SASL_PASSWORD": "hunter2-value",
        "CDC_START_FROM": "beginning",
        "CDC_TABLE_MODE": "merge",
        "CDC_LAKE_URI": "/lake",
        "CDC_BATCH_MAX_OPEN_ROWS": "1000",
        "CDC_RETRY_MAX_ATTEMPTS": "3",
        "CDC_DLQ_TOPIC": "dlq",
        "CDC_RECOVERY_PARTITIONS": "4",
        "CDC_LOG_FORMAT": "text",
    }
    s = Settings.from_env(env)
    assert s.kafka.topics == ("a", "b") and s.kafka.start_from == "beginning" and not s.kafka.stop_at_end
    assert s.kafka.client_config == {"sasl.password": "hunter2-value"}
    assert "hunter2-value" not in repr(s.kafka)
    assert s.lake.tables.merge and s.lake.pipeline_name == "cdc"
    assert s.lake.tables.uri("shop", "orders", "append") == "/lake/_changelog/shop/orders"
    assert s.lake.tables.uri("shop", "orders", "merge") == "/lake/shop/orders"
    assert (s.batch.max_rows, s.batch.max_open_rows) == (10_000, 1000)
    assert (s.retry.max_attempts, s.retry.initial_seconds, s.retry.max_seconds) == (3, 0.5, 30.0)
    assert s.retry.at_start().attempts == 3 and s.retry.for_commits().attempts is None
    assert (s.dlq.topic, s.dlq.rate_per_minute, s.dlq.brokers) == ("dlq", 10_000, "k:9092")
    assert s.dlq.producer_config == {"sasl.password": "hunter2-value"}
    assert "hunter2-value" not in repr(s.dlq)
    assert (s.recovery.dir, s.recovery.partitions) == ("./data/recovery", 4)
    assert (s.logging.level, s.logging.format) == ("INFO", "text")
    with pytest.raises(Exception):  # noqa: B017 - frozen: pydantic's or dataclasses' own error
        s.batch.max_rows = 1  # type: ignore[misc]
    with pytest.raises(Exception):  # noqa: B017
        s.batch_max_rows = 1  # type: ignore[misc]


def test_a_variable_from_a_file_and_its_refusals(tmp_path) -> None:
    """`<NAME>_FILE` gives NAME (as mounted secrets do); both set, or a file unreadable, is refused
    naming the variable and never the content."""
    pw = tmp_path / "pw"
    pw.write_text("file-pw-123456\n")
    base = {"CDC_LAKE_URI": "/lake"}
    s = Settings.from_env({**base, "CDC_KAFKA_SASL_PASSWORD_FILE": str(pw)})
    assert s.kafka_config["sasl.password"] == "file-pw-123456"
    assert "file-pw-123456" not in repr(s) + repr(s.kafka) + repr(s.dlq)
    with pytest.raises(SettingsError, match="CDC_KAFKA_SASL_PASSWORD and CDC_KAFKA_SASL_PASSWORD_FILE") as e:
        Settings.from_env(
            {**base, "CDC_KAFKA_SASL_PASSWORD_FILE": str(pw), "CDC_KAFKA_SASL_PASSWORD": "other-pw-99"}
        )
    assert "other-pw-99" not in str(e.value) and "file-pw-123456" not in str(e.value)
    with pytest.raises(SettingsError, match="AWS_SECRET_ACCESS_KEY_FILE=.*cannot be read"):
        Settings.from_env({**base, "AWS_SECRET_ACCESS_KEY_FILE": str(tmp_path / "missing")})
    s3 = Settings.from_env({"CDC_LAKE_URI": "s3://bucket/l", "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY_FILE": str(pw),
                            "CDC_STORAGE_CA_FILE": "/ca.pem"})  # fmt: skip
    assert s3.storage_options["AWS_SECRET_ACCESS_KEY"] == "file-pw-123456"
    assert "ca_file" not in s3.storage_options  # ours, not a delta-rs option


def test_maintenance_settings_make_the_policy() -> None:
    p = Settings.from_env({}).maintenance_policy
    assert p.enabled and (p.vacuum_retention_hours, p.log_retention_hours, p.checkpoint_every) == (
        168,
        720,
        100,
    )
    assert (p.target_bytes, p.min_small_files) == (100 * 1024 * 1024, 10)
    p = Settings.from_env(
        {
            "CDC_MAINTENANCE": "off",
            "CDC_COMPACT_TARGET_BYTES": "33554432",
            "CDC_COMPACT_MIN_FILES": "4",
            "CDC_VACUUM_RETENTION_HOURS": "0",
            "CDC_CHECKPOINT_EVERY": "20",
            "CDC_LOG_RETENTION_HOURS": "48",
        }
    ).maintenance_policy
    assert not p.enabled and (p.target_bytes, p.min_small_files, p.checkpoint_every) == (33554432, 4, 20)
    assert (p.vacuum_retention_hours, p.log_retention_hours) == (0, 48)
    with pytest.raises(SettingsError) as info:
        Settings.from_env(
            {"CDC_MAINTENANCE": "of", "CDC_COMPACT_MIN_FILES": "0", "CDC_VACUUM_RETENTION_HOURS": "-1"}
        )
    for name in ("CDC_MAINTENANCE", "CDC_COMPACT_MIN_FILES", "CDC_VACUUM_RETENTION_HOURS"):
        assert name in str(info.value)
