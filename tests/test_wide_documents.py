"""Wide documents: a table's column limit, and the `_overflow` JSON column for the fields past it.

Nothing is lost or dead-lettered past the limit: every reader (documents, the changelog's
events, a fresh read, the mirror's rounds) gets the fields back, patches combine with the
stored overflow object, and a restarted writer keeps the table's decision.
"""

from __future__ import annotations

import random
import time
from typing import Any

import pyarrow as pa
import pytest

from dataflow.decode.updates import Update
from dataflow.lake.changelog import Changelog
from dataflow.lake.columnar import split
from dataflow.lake.documents import read_documents
from dataflow.lake.layout import TableLocations
from dataflow.lake.mirror import Mirror
from dataflow.lake.writer import DeltaTableWriter
from dataflow.model import ObjectId
from tests.harness import ev
from tests.test_mirror import COLL, DB, cuts, docs, fresh, history, model


@pytest.fixture
def lake(tmp_path) -> str:
    return str(tmp_path / "lake")


def changelog(lake: str, max_columns: int) -> DeltaTableWriter:
    return DeltaTableWriter(
        TableLocations(lake).uri(DB, COLL, "append"), mode="append", max_columns=max_columns
    )


def mirror(lake: str, max_columns: int, max_rows: int = 250_000) -> Mirror:
    t = TableLocations(lake)
    return Mirror(
        t.uri(DB, COLL, "append"),
        t.uri(DB, COLL, "merge"),
        DB,
        COLL,
        max_rows=max_rows,
        max_columns=max_columns,
    )


def value_fields(w: DeltaTableWriter) -> set[str]:
    return set(w.layout().value)


def test_a_10000_field_document_lands_whole_in_both_tables_and_later_batches_stay_small(lake) -> None:
    wide = {f"f{i}": i for i in range(10_000)}
    wide["f7"] = {"nested": [1, "two"]}
    wide["f9000"] = ObjectId("65a1f0c2e4b0a1b2c3d4e5f6")
    log, m = changelog(lake, 1000), mirror(lake, 1000)

    started = time.perf_counter()
    log.write([ev("w", doc=wide, offset=0), ev("s", doc={"f1": 1, "a": "x"}, offset=1)])
    landed = time.perf_counter() - started
    m.catch_up()
    print(
        f"10,000-field document: changelog {landed:.2f}s, mirror {time.perf_counter() - started - landed:.2f}s"
    )

    for w in (log, m.writer):
        layout = w.layout()
        assert len(layout.value) == 1000 and layout.overflow is not None
        assert layout.overflow.name == "_overflow"
        assert len(pa.schema(w._refresh().schema().to_arrow())) < 1020  # type: ignore[union-attr]
    assert docs(lake)["w"] == wide and docs(lake)["s"] == {"f1": 1, "a": "x"}
    events = Changelog(log.uri, DB, COLL).events(0, log.version)  # type: ignore[arg-type]
    assert [e.doc for e in events] == [wide, {"f1": 1, "a": "x"}]

    # later batches: small documents, a top-level patch setting and removing overflow fields,
    # a patch of a column field only, an update inside an overflow field
    nested = ev("w", "update", offset=5)
    nested.change = Update(set=((("f7", "nested"), "new"),), unset=())
    later = [
        *(ev(f"x{i}", doc={"f1": i, "f9999": -i}, offset=10 + i) for i in range(50)),
        ev("w", "update", updated={"f9999": "z", "f1": 7, "brand_new": True}, removed=("f9998",), offset=2),
        ev("s", "update", updated={"f2": 2}, offset=3),
        ev("w", "update", updated={"f9997": None}, offset=4),  # set to null reads as removed
        nested,
    ]
    started = time.perf_counter()
    log.write(later)
    m.catch_up()
    print(f"a later batch of 54 changes (changelog and mirror round): {time.perf_counter() - started:.2f}s")

    expect = model([ev("w", doc=wide, offset=0), ev("s", doc={"f1": 1, "a": "x"}, offset=1), *later])
    assert (
        expect["w"]["f9999"] == "z" and "f9998" not in expect["w"] and expect["w"]["f7"] == {"nested": "new"}
    )
    assert docs(lake) == expect
    assert fresh(lake) == expect
    assert len(m.writer.layout().value) == 1000  # no column added past the limit


def test_a_restarted_writer_keeps_the_decision_whatever_the_limit_says(lake) -> None:
    uri = TableLocations(lake).uri(DB, COLL, "merge")
    first = DeltaTableWriter(uri, mode="merge", max_columns=3)
    first.write([ev("a", doc={"p": 1, "q": 2, "r": 3, "s": 4, "t": 5}, offset=0)])
    assert value_fields(first) == {"p", "q", "r"}

    again = DeltaTableWriter(uri, mode="merge", max_columns=100)  # a restart, with a raised limit
    layout = again.layout()
    assert set(layout.value) == {"p", "q", "r"} and layout.overflow is not None
    meta = layout.schema().field(layout.overflow.name).metadata
    assert meta[b"cdc.role"] == b"overflow"
    again.write([ev("b", doc={"p": 9, "u": "new"}, offset=1), ev("a", "update", updated={"s": 40}, offset=2)])
    assert value_fields(again) == {"p", "q", "r"}  # a new field still goes to the overflow column
    dt = again._refresh()
    assert dt is not None
    got = read_documents(dt, again.layout())
    assert got == {"a": {"p": 1, "q": 2, "r": 3, "s": 40, "t": 5}, "b": {"p": 9, "u": "new"}}
    assert read_documents(dt, again.layout(), fields=["t", "p"]) == {"a": {"p": 1, "t": 5}, "b": {"p": 9}}


@pytest.mark.parametrize("seed", range(4))
def test_overflowing_tables_equal_the_collection_whatever_the_batches_and_rounds(lake, seed) -> None:
    """The random histories of test_mirror (partial updates, updates inside fields, deletes, values
    of every kind) with room for two columns: most fields live in the overflow objects."""
    rng = random.Random(seed)
    events = history(rng, 250)
    log, m = changelog(lake, 2), mirror(lake, 2, max_rows=rng.choice([1, 5, 1000]))
    done = []
    for batch in cuts(rng, events):
        log.write(batch)
        done += batch
        if rng.random() < 0.4:
            m.round()
        if rng.random() < 0.2:
            assert fresh(lake) == model(done)
    m.catch_up()
    assert log.layout().overflow is not None and len(log.layout().value) == 2
    assert m.writer.layout().overflow is not None and len(m.writer.layout().value) == 2
    assert docs(lake) == model(events)
    assert fresh(lake) == model(events)


def test_a_round_with_overflow_values_goes_the_python_way(lake) -> None:
    log, m = changelog(lake, 2), mirror(lake, 2)
    log.write([ev("a", doc={"x": 1, "y": 2}, offset=0), ev("b", doc={"x": 3}, offset=1)])
    feed = m.changelog.rows(0, log.version)  # type: ignore[arg-type]
    direct, rest = split(feed, m.changelog.layout(), m.writer.layout(), m.writer.max_columns)
    assert direct is not None and rest.num_rows == 0  # no overflow yet: column-wise
    m.catch_up()

    def round_split(events: list[Any]) -> tuple[Any, pa.Table]:
        first = m.applied() + 1
        log.write(events)
        feed = m.changelog.rows(first, log.version)  # type: ignore[arg-type]
        out = split(feed, m.changelog.layout(), m.writer.layout(), m.writer.max_columns)
        m.catch_up()
        return out, feed

    (direct, rest), feed = round_split([ev("c", doc={"x": 4, "z": "past the limit"}, offset=2)])
    assert direct is None and rest.equals(feed)  # a value in the overflow column
    (direct, rest), feed = round_split([ev("c", "update", removed=("z",), offset=3)])
    assert direct is None and rest.equals(feed)  # removes a field without a column
    (direct, rest), feed = round_split([ev("a", "update", updated={"x": 10}, offset=4)])
    assert direct is not None and rest.num_rows == 0  # column fields only: column-wise again
    assert docs(lake) == {"a": {"x": 10, "y": 2}, "b": {"x": 3}, "c": {"x": 4}}


def test_a_mirror_past_its_limit_is_not_fed_column_wise_from_a_wider_changelog(lake) -> None:
    """The changelog has room for every field, the mirror does not: its round must spill them."""
    log, m = changelog(lake, 1000), mirror(lake, 2)
    log.write([ev("a", doc={"x": 1, "y": 2, "z": 3, "w": 4}, offset=0)])
    feed = m.changelog.rows(0, log.version)  # type: ignore[arg-type]
    assert split(feed, m.changelog.layout(), m.writer.layout(), m.writer.max_columns)[0] is None
    m.catch_up()
    log.write([ev("a", "update", updated={"w": 40}, removed=("z",), offset=1)])
    m.catch_up()
    assert len(m.writer.layout().value) == 2 and m.writer.layout().overflow is not None
    assert docs(lake) == {"a": {"x": 1, "y": 2, "w": 40}}
