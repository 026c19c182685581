"""Where a partition resumes without recovery state: the offsets the lake's tables recorded."""

from __future__ import annotations

from pathlib import Path

from dataflow.lake.offsets import committed_offsets, list_tables, twin_of
from dataflow.lake.writer import DeltaTableWriter
from tests.harness import TOPIC, ev

PARTITIONS = {TOPIC: 2}


def write(uri: Path, mode: str, offsets: dict[int, int], topic: str = TOPIC) -> None:
    events = [ev(f"id{p}-{o}", offset=o, partition=p, topic=topic) for p, o in offsets.items()]
    DeltaTableWriter(str(uri), mode=mode, pipeline="cdc").write(events)  # type: ignore[arg-type]


def test_twins_pair_a_table_with_its_changelog(tmp_path) -> None:
    lake = str(tmp_path)
    assert twin_of(f"{lake}/shop/orders", lake) == f"{lake}/_changelog/shop/orders"
    assert twin_of(f"{lake}/_changelog/shop/orders", lake + "/") == f"{lake}/shop/orders"


def test_a_partition_resumes_from_the_lowest_offset_its_tables_recorded(tmp_path) -> None:
    write(tmp_path / "shop" / "orders", "merge", {0: 40, 1: 7})
    write(tmp_path / "_changelog" / "shop" / "orders", "append", {0: 30, 1: 9})
    assert len(list_tables(str(tmp_path))) == 2
    got = committed_offsets(str(tmp_path), "cdc", PARTITIONS, paired=True)
    assert got == {(TOPIC, 0): 30, (TOPIC, 1): 7}


def test_a_crash_between_the_table_and_its_first_changelog_commit_resumes_from_the_start(tmp_path) -> None:
    # `both` mode commits the table, then the changelog; kill -9 in between leaves no changelog.
    write(tmp_path / "shop" / "orders", "merge", {0: 40, 1: 7})
    assert committed_offsets(str(tmp_path), "cdc", PARTITIONS, paired=True) == {}
    # Nor may a changelog that exists but never recorded this topic be ignored.
    write(tmp_path / "_changelog" / "shop" / "orders", "append", {0: 3}, topic="cdc.shop.other")
    assert len(list_tables(str(tmp_path))) == 2
    assert committed_offsets(str(tmp_path), "cdc", PARTITIONS, paired=True) == {}
    # A single-table layout has no twin to wait for.
    assert committed_offsets(str(tmp_path), "cdc", PARTITIONS) == {(TOPIC, 0): 40, (TOPIC, 1): 7}


def test_a_partition_one_table_has_not_recorded_resumes_from_the_start(tmp_path) -> None:
    write(tmp_path / "shop" / "orders", "merge", {0: 40, 1: 7})
    write(tmp_path / "_changelog" / "shop" / "orders", "append", {0: 40})
    assert committed_offsets(str(tmp_path), "cdc", PARTITIONS, paired=True) == {(TOPIC, 0): 40}
