"""Large values never reach the commit log: string statistics are cut, binary ones are never there.

delta-rs copies each data file's min/max into the commit's `add` action; a 20 MB string once
made a 42 MB commit, which every reader of the table then loads. The `_key` statistics the
mirror's MERGE and `_all_new` prune by must stay, and stay right.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from dataflow.lake.changelog import Changelog
from dataflow.lake.layout import TableLocations
from dataflow.lake.writer import DeltaTableWriter
from tests.harness import ev
from tests.test_mirror import COLL, DB, docs, fresh, mirror

MB20 = 20 * 1024 * 1024
BOUND = 64 * 1024


@pytest.fixture
def lake(tmp_path: Path) -> str:
    return str(tmp_path / "lake")


def last_commit(uri: str) -> tuple[int, list[dict]]:
    """Size of the table's newest commit file, and the statistics of the files it adds."""
    log = sorted(Path(uri, "_delta_log").glob("*.json"))[-1]
    adds = [json.loads(line)["add"] for line in log.read_text().splitlines() if line.startswith('{"add"')]
    return os.path.getsize(log), [json.loads(a["stats"]) for a in adds if a.get("stats")]


def test_a_20_mb_string_and_binary_make_small_commits_in_the_changelog_and_the_mirror(lake) -> None:
    big, blob = "é" + "z" * MB20, b"\xff" * MB20
    t = TableLocations(lake)
    log, m = DeltaTableWriter(t.uri(DB, COLL, "append"), mode="append"), mirror(lake)

    # the key past the cut length: its max statistic must still be >= the key
    long_id = "k" * 300 + "\U0010ffff" * 3
    started = time.perf_counter()
    log.write(
        [ev(long_id, doc={"s": big, "b": blob}, offset=0), ev("c", doc={"s": "x", "b": b"y"}, offset=1)]
    )
    print(f"20 MB values, changelog append: {time.perf_counter() - started:.2f}s")
    size, stats = last_commit(log.uri)
    assert size < BOUND, size
    assert all("_key" in s["minValues"] and "_key" in s["maxValues"] for s in stats)
    assert all(s["maxValues"]["_key"] >= "s:" + long_id for s in stats)  # rounded up, never down
    events = Changelog(log.uri, DB, COLL).events(0, log.version)  # type: ignore[arg-type]
    assert events[0].doc == {"s": big, "b": blob}

    started = time.perf_counter()
    m.catch_up()  # a new table: appended
    print(f"20 MB values, mirror append: {time.perf_counter() - started:.2f}s")
    assert last_commit(m.writer.uri)[0] < BOUND

    # a MERGE over them: a replace with another large value, and an update of the other document
    log.write(
        [
            ev(long_id, "replace", doc={"s": big + "!", "b": blob + b"!"}, offset=2),
            ev("c", "update", updated={"s": "y"}, offset=3),
        ]
    )
    started = time.perf_counter()
    rounds = m.catch_up()
    print(f"20 MB values, mirror MERGE: {time.perf_counter() - started:.2f}s")
    assert not rounds[-1].appended
    size, stats = last_commit(m.writer.uri)
    assert size < BOUND, size
    assert all("_key" in s["maxValues"] for s in stats)
    assert (
        docs(lake) == fresh(lake) == {long_id: {"s": big + "!", "b": blob + b"!"}, "c": {"s": "y", "b": b"y"}}
    )
