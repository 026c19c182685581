"""The recovery store's life cycle: created, checked, replaced when unusable, refused when foreign."""

from __future__ import annotations

import logging

import pytest

from dataflow.runtime.recovery import RecoveryStoreMismatch, prepare

FP = {"pipeline": "cdc", "topics": {"cdc.shop.orders": 4}}


def test_created_then_resumed(tmp_path) -> None:
    store = tmp_path / "recovery"
    assert prepare(store, partitions=8, fingerprint=FP) == "created"
    assert len(list(store.glob("part-*.sqlite3"))) == 8
    assert prepare(store, partitions=8, fingerprint=FP) == "resumed"


@pytest.mark.parametrize("damage", ["garbage", "truncated", "deleted_one"])
def test_unusable_store_is_moved_aside_and_replaced(tmp_path, caplog, damage: str) -> None:
    store = tmp_path / "recovery"
    prepare(store, partitions=4, fingerprint=FP)
    victim = store / "part-2.sqlite3"
    if damage == "garbage":
        victim.write_bytes(b"\x00garbage" * 500)
    elif damage == "truncated":
        victim.write_bytes(victim.read_bytes()[:1000])
    else:
        victim.unlink()
    with caplog.at_level(logging.ERROR):
        assert prepare(store, partitions=4, fingerprint=FP) == "replaced"
    assert (
        "is unusable" in caplog.text
        and "resumes from the offsets committed in the Delta tables" in caplog.text
    )
    assert len(list(store.glob("part-*.sqlite3"))) == 4
    assert [p.name for p in tmp_path.glob("recovery.unusable-*")]  # kept for inspection
    assert prepare(store, partitions=4, fingerprint=FP) == "resumed"


def test_store_of_other_topics_or_partition_counts_is_refused(tmp_path) -> None:
    store = tmp_path / "recovery"
    prepare(store, partitions=4, fingerprint=FP)
    for other in (
        {"pipeline": "cdc", "topics": {"cdc.shop.orders": 6}},
        {"pipeline": "cdc", "topics": {"cdc.shop.orders": 4, "cdc.shop.users": 4}},
    ):
        with pytest.raises(RecoveryStoreMismatch, match="delete .*CDC_RECOVERY_DIR"):
            prepare(store, partitions=4, fingerprint=other)
    assert prepare(store, partitions=4, fingerprint=FP) == "resumed"


def test_the_store_is_owner_only_whatever_the_umask(tmp_path) -> None:
    """It holds pickles (run as code at a restore) and documents: nobody else may read or write it."""
    import os

    store = tmp_path / "store"
    old = os.umask(0o022)
    try:
        prepare(store, partitions=2, fingerprint=FP)
        (store / "extra.sqlite3-wal").write_bytes(b"x")  # what a writer may add with a loose umask
        prepare(store, partitions=2, fingerprint=FP)
    finally:
        os.umask(old)
    assert store.stat().st_mode & 0o777 == 0o700
    files = [f for f in store.iterdir() if f.is_file()]
    assert files and all(f.stat().st_mode & 0o777 == 0o600 for f in files)
