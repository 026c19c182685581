"""The pipeline's own maintenance (dataflow/sink/upkeep.py): each table maintained by the thread
that writes it, between its commits, at most once an interval.

Local tables: what is on disk (data files, referenced or not), the rows, the committed
offsets, and the mirror, after commits with maintenance between them.
"""

from __future__ import annotations

import random
from pathlib import Path

from deltalake import DeltaTable

from dataflow.lake.layout import TableLocations
from dataflow.lake.maintenance import MaintenancePolicy
from dataflow.lake.writer import DeltaTableWriter
from dataflow.runtime.retry import RetryPolicy
from dataflow.sink.materializer import Materializer
from dataflow.sink.upkeep import Upkeep
from tests.harness import TOPIC, ev
from tests.test_mirror import COLL, DB, cuts, docs, history, model

EAGER = MaintenancePolicy(
    min_small_files=4, vacuum_retention_hours=0, checkpoint_every=5, log_retention_hours=0
)


def on_disk(uri: str) -> set[str]:
    return {str(p.relative_to(uri)) for p in Path(uri).rglob("*.parquet") if "_delta_log" not in p.parts}


def referenced(uri: str) -> set[str]:
    dt = DeltaTable(uri)
    return set(dt.get_add_actions(flatten=True).column("path").to_pylist())


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_changelog_maintained_between_its_commits_keeps_every_row_and_offset(tmp_path) -> None:
    lake = str(tmp_path / "lake")
    uri = TableLocations(lake, "append").uri(DB, COLL, "append")
    writer = DeltaTableWriter(uri, mode="append")
    clock = Clock()
    upkeep = Upkeep(lake, policy=EAGER, interval_s=60, clock=clock)
    offset, ran, logs_removed = 0, [], 0
    for b in range(40):
        batch = [
            ev(f"d{offset + i}", doc={"n": offset + i}, offset=offset + i, partition=b % 2) for i in range(5)
        ]
        offset += len(batch)
        writer.write(batch)
        clock.now += 10  # a commit every 10 s: maintenance every 6th commit at most
        if (report := upkeep.after_commit(uri, "changelog", f"{DB}.{COLL}")) is not None:
            ran.append(b)
            logs_removed += report.log_files_removed
            assert (
                report.files_compacted >= EAGER.min_small_files or report.small_files < EAGER.min_small_files
            )
    assert ran and all(b - a >= 6 for a, b in zip(ran, ran[1:], strict=False)), ran
    # what is on disk is what the table references: the compacted files were vacuumed
    assert on_disk(uri) == referenced(uri) and len(referenced(uri)) < 40
    assert logs_removed > 0  # the log was cleaned up to a checkpoint, though delta-rs' own hook is off
    rows = DeltaTable(uri).to_pyarrow_table(columns=["_source_partition", "_source_offset"]).to_pylist()
    assert sorted(r["_source_offset"] for r in rows) == list(range(offset))
    assert DeltaTableWriter(uri, mode="append").committed_offsets([(TOPIC, 0), (TOPIC, 1)]) == {
        (TOPIC, 0): 39 * 5 - 5 + 4,
        (TOPIC, 1): 39 * 5 + 4,
    }


def test_a_failed_run_is_counted_and_tried_again_an_interval_later(tmp_path) -> None:
    clock = Clock()
    upkeep = Upkeep(str(tmp_path), policy=EAGER, interval_s=30, clock=clock)
    missing = str(tmp_path / "no-such-table")
    assert upkeep.after_commit(missing, "changelog", "x.y") is None  # first sight: the interval starts
    clock.now = 31
    assert upkeep.after_commit(missing, "changelog", "x.y") is None  # ran, failed, logged
    uri = str(tmp_path / "t")
    DeltaTableWriter(uri, mode="append").write([ev("a", doc={"n": 1}, offset=0)])
    clock.now = 40
    assert upkeep.after_commit(uri, "changelog", "x.y") is None  # first sight of this one
    clock.now = 71
    report = upkeep.after_commit(uri, "changelog", "x.y")
    assert report is not None and report.version >= 0


def test_mirrors_maintained_between_rounds_equal_the_model(tmp_path) -> None:
    """The materializer maintains each mirror between its rounds, while the changelog is
    maintained between its commits (its mirror trailing): the mirror still equals the model."""
    rng = random.Random(5)
    events = history(rng, 600, documents=60)
    lake = str(tmp_path / "lake")
    t = TableLocations(lake)
    log = DeltaTableWriter(t.uri(DB, COLL, "append"), mode="append")
    sink_upkeep = Upkeep(lake, policy=EAGER, interval_s=0)
    logs_removed = 0
    m = Materializer(
        t,
        pipeline="cdc",
        storage_options=None,
        retry=RetryPolicy(initial=0.01, cap=0.05),
        round_rows=50,
        tombstone_retention_s=3600,
        upkeep=Upkeep(lake, policy=EAGER, interval_s=0),
        idle_seconds=0.05,
    )
    m.start()
    try:
        for batch in cuts(rng, events):
            log.write(batch)
            m.notify(DB, COLL)
            if (report := sink_upkeep.after_commit(log.uri, "changelog", f"{DB}.{COLL}")) is not None:
                logs_removed += report.log_files_removed
        m.drain(timeout=300)
    finally:
        m.stop()
    assert docs(lake) == model(events)
    assert logs_removed > 0  # behind the mirror's mark, never past it
    mirror = t.uri(DB, COLL, "merge")
    assert on_disk(mirror) == referenced(mirror)  # what MERGEs rewrote was vacuumed
    assert len(DeltaTable(mirror).history()) > 0
