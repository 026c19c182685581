"""Configuration from the environment: defaults, validation messages, table paths."""

from __future__ import annotations

import pytest

from dataflow.runtime.settings import Settings, SettingsError


def test_defaults_run_the_embedded_sample() -> None:
    s = Settings.from_env({})
    assert s.embedded and s.stop_at_end
    assert s.table_mode == "merge" and s.batch_max_rows == 25_000
    assert Settings.from_env({"CDC_TABLE_MODE": "append"}).batch_max_rows == 10_000
    assert Settings.from_env({"CDC_TABLE_MODE": "merge", "CDC_BATCH_MAX_ROWS": "500"}).batch_max_rows == 500
    assert s.table_uri("shop", "orders", "merge").endswith("/data/lake/shop/orders")


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


def test_table_paths_are_safe_and_both_mode_separates_the_changelog() -> None:
    s = Settings.from_env({"CDC_LAKE_URI": "/lake", "CDC_TABLE_MODE": "both"})
    assert s.table_uri("shop", "orders", "merge") == "/lake/shop/orders"
    assert s.table_uri("shop", "orders", "append") == "/lake/_changelog/shop/orders"
    assert s.table_uri("shop", "a/b", "merge") == "/lake/shop/a%2Fb"
    assert s.table_uri("shop", "..", "merge") == "/lake/shop/%2E%2E"
    assert s.table_uri("shop", "a.b", "merge") == "/lake/shop/a.b"


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
        ({"CDC_TABLE_MODE": "merge"}, False),
        ({"CDC_TABLE_MODE": "both"}, False),
        ({"CDC_TABLE_MODE": "append", "CDC_BACKGROUND_COMMITS": "0"}, False),
        ({"CDC_TABLE_MODE": "merge", "CDC_BACKGROUND_COMMITS": "true"}, True),
    ],
)
def test_background_commits_default_to_append_mode_only(env: dict[str, str], background: bool) -> None:
    assert Settings.from_env(env).background_commits is background


def test_a_misspelt_switch_is_an_error_not_off() -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"CDC_STOP_AT_END": "ture", "CDC_BACKGROUND_COMMITS": "enabled"})
    assert "CDC_STOP_AT_END='ture' must be 1 or 0" in str(info.value)
    assert "CDC_BACKGROUND_COMMITS='enabled' must be 1 or 0" in str(info.value)
    assert Settings.from_env(
        {"CDC_KAFKA_BROKERS": "k:9092", "CDC_TOPICS": "t", "CDC_STOP_AT_END": "On"}
    ).stop_at_end
