"""The maintenance benchmark at a tiny size, and its row check and section on their own.

The run is the real one (`bench.maintenance.main`: its own Kafka and MinIO,
the pipeline as a process, `maintain_lake`), with batches of 50 rows so that
3,000 events leave enough small files for compaction to start. Timings are
not asserted; what maintenance must never change is.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pyarrow as pa
import pytest

from bench import maintenance, report
from bench.table_size import write_section

EVENTS = 3_000


@pytest.mark.integration
def test_a_small_run_leaves_fewer_files_the_same_rows_and_its_section(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    md = tmp_path / "RESULTS.md"
    md.write_text(
        "# Benchmark results\n\nmain table\n\n"
        + report.TABLE_SIZE
        + "\n\nsizes\n\n"
        + report.KEPT
        + "\n\nby hand\n"
    )
    rc = maintenance.main(
        ["--events", str(EVENTS), "--batch-rows", "50", "--results", str(tmp_path), "--markdown", str(md)]
    )
    assert rc == 0, capsys.readouterr().out[-3000:]
    [path] = tmp_path.glob("maintenance-*.json")
    results = orjson.loads(path.read_bytes())
    assert results["ok"] and results["pipeline"]["ok"] and not results["maintenance_errors"]
    tables = results["tables"]
    assert len(tables) == 3
    assert sum(t["before"]["rows"] for t in tables) == results["data"]["events"] == EVENTS
    for t in tables:
        before, after, done, check = t["before"], t["after"], t["maintenance"], t["check"]
        assert after["data_files"] < before["data_files"], t
        assert after["referenced_files"] < before["referenced_files"], t
        assert done["files_compacted"] == before["data_files"] and done["files_vacuumed"] > 0, t
        assert done["checkpoint_version"] is not None, t
        assert check["identical"] and check["keys_identical"] and not check["columns_differing"], check
        assert check["rows_before"] == check["rows_after"] == t["expected_rows"] == after["rows"]
        assert before["duplicates"] == check["duplicates_after"] == 0
        assert after["version"] > before["version"]

    text = md.read_text()
    assert text.count(report.MAINTENANCE) == 1
    order = [text.index(s) for s in ("main table", "sizes", report.MAINTENANCE, report.KEPT, "by hand")]
    assert order == sorted(order), text
    section = text[text.index(report.MAINTENANCE) : text.index(report.KEPT)]
    for t in tables:
        assert f"| {t['table']} | {t['before']['rows']:,} | {t['before']['data_files']} / " in section
    assert "**0 hours**" in section and "**NO**" not in section
    assert report.MAINTENANCE in capsys.readouterr().out


def _rows(partitions: list[int], offsets: list[int], values: list[str]) -> pa.Table:
    return maintenance.sorted_rows(
        pa.table({"_source_partition": partitions, "_source_offset": offsets, "v": values})
    )


def test_the_check_finds_a_lost_a_doubled_and_a_changed_row() -> None:
    before = _rows([0, 0, 1], [5, 6, 5], ["a", "b", "c"])
    same = maintenance.compare(before, _rows([1, 0, 0], [5, 6, 5], ["c", "b", "a"]))
    assert same["identical"] and same["duplicates_after"] == 0
    lost = maintenance.compare(before, _rows([0, 1], [5, 5], ["a", "c"]))
    assert not lost["identical"] and not lost["keys_identical"]
    doubled = maintenance.compare(before, _rows([0, 0, 0, 1], [5, 6, 6, 5], ["a", "b", "b", "c"]))
    assert not doubled["identical"] and doubled["duplicates_after"] == 1
    changed = maintenance.compare(before, _rows([0, 0, 1], [5, 6, 5], ["a", "B", "c"]))
    assert changed["keys_identical"] and not changed["identical"] and changed["columns_differing"] == ["v"]


def test_the_section_replaces_its_own_and_survives_the_main_run(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\ntable\n\n## Targets\n\nt\n\n" + report.KEPT + "\n\nby hand\n")
    write_section(path, report.MAINTENANCE + "\n\nfirst\n", report.MAINTENANCE)
    write_section(path, report.TABLE_SIZE + "\n\nsizes\n")
    write_section(path, report.MAINTENANCE + "\n\nsecond\n", report.MAINTENANCE)
    text = path.read_text()
    assert "first" not in text and text.count(report.MAINTENANCE) == 1 and "sizes" in text
    assert text.index("## Targets") < text.index("second") < text.index(report.KEPT)
    kept = report.kept_section(path)  # what `python -m bench` keeps when it rewrites the top
    assert "second" in kept and "sizes" in kept and "by hand" in kept and "## Targets" not in kept
    path.write_text("# Benchmark results\n\n" + report.MAINTENANCE + "\n\nalone\n\n" + report.KEPT + "\n")
    assert report.kept_section(path).startswith("\n" + report.MAINTENANCE)
