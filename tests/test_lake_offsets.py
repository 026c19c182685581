"""Where a partition resumes without recovery state: the offsets the lake's tables recorded."""

from __future__ import annotations

from pathlib import Path

from dataflow.lake.offsets import committed_offsets, list_tables
from dataflow.lake.writer import DeltaTableWriter
from tests.harness import TOPIC, ev

PARTITIONS = {TOPIC: 2}


def write(uri: Path, mode: str, offsets: dict[int, int], topic: str = TOPIC) -> None:
    events = [ev(f"id{p}-{o}", offset=o, partition=p, topic=topic) for p, o in offsets.items()]
    DeltaTableWriter(str(uri), mode=mode, pipeline="cdc").write(events)  # type: ignore[arg-type]


def test_in_merge_mode_only_the_changelogs_say_where_to_resume(tmp_path) -> None:
    # A mirror written before the changelog came first recorded offsets; they no longer count.
    write(tmp_path / "shop" / "orders", "merge", {0: 40, 1: 7})
    assert committed_offsets(str(tmp_path), "cdc", PARTITIONS, merge=True) == {}
    write(tmp_path / "_changelog" / "shop" / "orders", "append", {0: 30, 1: 9})
    assert len(list_tables(str(tmp_path))) == 2
    assert committed_offsets(str(tmp_path), "cdc", PARTITIONS, merge=True) == {(TOPIC, 0): 30, (TOPIC, 1): 9}
    # an append-mode lake's changelogs are its tables
    assert committed_offsets(str(tmp_path), "cdc", PARTITIONS) == {(TOPIC, 0): 40, (TOPIC, 1): 7}


def test_a_partition_resumes_from_the_lowest_offset_its_changelogs_recorded(tmp_path) -> None:
    write(tmp_path / "_changelog" / "shop" / "orders", "append", {0: 40, 1: 7})
    write(tmp_path / "_changelog" / "shop" / "items", "append", {0: 30, 1: 9})
    got = committed_offsets(str(tmp_path), "cdc", PARTITIONS, merge=True)
    assert got == {(TOPIC, 0): 30, (TOPIC, 1): 7}


def test_a_partition_one_changelog_has_not_recorded_resumes_from_the_start(tmp_path) -> None:
    write(tmp_path / "_changelog" / "shop" / "orders", "append", {0: 40, 1: 7})
    write(tmp_path / "_changelog" / "shop" / "items", "append", {0: 40})
    assert committed_offsets(str(tmp_path), "cdc", PARTITIONS, merge=True) == {(TOPIC, 0): 40}
    # a changelog that never recorded this topic is not fed by it
    write(tmp_path / "_changelog" / "shop" / "other", "append", {0: 3}, topic="cdc.shop.other")
    assert committed_offsets(str(tmp_path), "cdc", PARTITIONS, merge=True) == {(TOPIC, 0): 40}
