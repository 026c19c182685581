"""`python -m bench.merge_source` at a small size: its MERGEs agree and the key range prunes."""

from __future__ import annotations

import json

from bench import merge_source


def test_the_merge_source_bench_compares_the_three_ways_on_the_same_table(tmp_path) -> None:
    md = tmp_path / "RESULTS.md"
    md.write_text("# Results\n")
    assert (
        merge_source.main(
            [
                "--rows",
                "20000",
                "--updates",
                "3000",
                "--narrow",
                "500",
                "--results",
                str(tmp_path),
                "--markdown",
                str(md),
            ]
        )
        == 0
    )
    (path,) = tmp_path.glob("merge-source-*.json")
    runs = {(r["source"], r["variant"]): r for r in json.loads(path.read_text())["runs"]}
    assert len(runs) == 6
    # every way rewrites the same rows: all 10 files for uniform updates, the one file for narrow ones
    assert {runs[("uniform", v)]["rows_rewritten"] for v in merge_source.VARIANTS} == {20000}
    assert {runs[("narrow", v)]["rows_rewritten"] for v in merge_source.VARIANTS} == {2000}
    # without the key range a streamed source reads every file; with it, only the one it can touch
    assert runs[("narrow", "streamed")]["files_scanned"] == 10
    assert runs[("narrow", "streamed+range")]["files_scanned"] == 1
    assert runs[("narrow", "in-memory")]["files_scanned"] == 1
    assert "## MERGE source" in md.read_text() and "streamed+range" in md.read_text()
