"""The table-size benchmark's own machinery: its model of the collection, its log parsing, its section.

No services and no timing: the model must agree with what the changelog and
the materializer make of the generated messages, or the benchmark's mirror
check would report differences that are the model's.
"""

from __future__ import annotations

from pathlib import Path

import orjson

from bench import report
from bench.table_size import COLLECTION, DB, Collection, check_mirror, rounds_of, write_section
from dataflow.decode.envelopes import parse
from dataflow.lake.mirror import Mirror
from dataflow.lake.writer import DeltaTableWriter
from dataflow.model import ChangeEvent, SourceMessage


def _events(col: Collection, updates: int) -> list[ChangeEvent]:
    out = []
    offsets = [0, 0]
    for m in [*col.seed_messages(), *col.update_messages(updates)]:
        p = int(m.key[-8:-4].hex(), 16) % 2  # any stable choice: one document, one partition
        off = offsets[p]
        offsets[p] += 1
        e = parse(SourceMessage(m.key, m.value, m.topic, p, off, (1, 0)))
        if type(e) is ChangeEvent:
            out.append(e)
    return out


def test_the_model_matches_the_mirror_the_materializer_makes(tmp_path: Path) -> None:
    col = Collection(2_000, prefix="tt")
    events = _events(col, 3_000)
    assert set(col.ops) == {"insert", "update", "partial", "delete"}
    changelog = str(tmp_path / "_changelog" / DB / COLLECTION)
    mirror_uri = str(tmp_path / DB / COLLECTION)
    writer = DeltaTableWriter(changelog, mode="append")
    mirror = Mirror(changelog, mirror_uri, DB, COLLECTION, max_rows=1_500)
    rounds = 0
    for i in range(0, len(events), 700):
        writer.write(events[i : i + 700])
        if i % 2100 == 0:
            rounds += len(mirror.catch_up(max_rounds=1))
        # the lag the benchmark samples (versions counted once) equals one counted afresh
        got, want = mirror.lag(), Mirror(changelog, mirror_uri, DB, COLLECTION).lag()
        assert (got.changes, got.versions, got.applied) == (want.changes, want.versions, want.applied)
    rounds += len(mirror.catch_up(max_rounds=50))
    assert rounds > 2
    assert mirror.lag().caught_up
    result = check_mirror(mirror_uri, None, col, chunk=700)
    assert result["ok"], result
    assert result["live"] == len(col.live) and result["tombstones"] == col.deleted > 0


def test_the_check_finds_a_wrong_value(tmp_path: Path) -> None:
    col = Collection(300, prefix="tt")
    uri = str(tmp_path / DB / COLLECTION)
    DeltaTableWriter(uri, mode="merge").write(_events(col, 200))
    col.ver[col.live[0]] += 1  # the model now expects another version of one document
    result = check_mirror(uri, None, col)
    assert not result["ok"] and result["mismatched"] == 1


def test_round_lines_are_read_from_the_json_log(tmp_path: Path) -> None:
    msg = "mirror bench.docs: changelog versions 3..7, 50000 changes, 250000 rows rewritten in 2.53s; 0 changes behind"
    log = tmp_path / "process-0.log"
    log.write_bytes(
        orjson.dumps({"ts": "2026-12-02T10:45:01.500+00:00", "level": "INFO", "msg": msg})
        + b"\nnot json, changes behind\n"
    )
    [r] = rounds_of(str(log))
    assert (r["first"], r["last"], r["changes"], r["rows"], r["appended"], r["seconds"]) == (
        3,
        7,
        50_000,
        250_000,
        False,
        2.53,
    )


def test_the_section_sits_above_the_kept_one_and_both_survive_a_main_run(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\ntable\n\n## Targets\n\nt\n\n" + report.KEPT + "\n\nby hand\n")
    write_section(path, report.TABLE_SIZE + "\n\nfirst\n")
    write_section(path, report.TABLE_SIZE + "\n\nsecond\n")
    text = path.read_text()
    assert "first" not in text and text.count(report.TABLE_SIZE) == 1
    assert text.index("## Targets") < text.index("second") < text.index(report.KEPT) < text.index("by hand")
    kept = report.kept_section(path)
    assert kept.startswith("\n" + report.TABLE_SIZE) and "by hand" in kept and "## Targets" not in kept
