"""A round's lag is what is left when it ends, commits made to the changelog during the round included."""

from __future__ import annotations

from dataflow.lake.mirror import Mirror
from dataflow.lake.writer import DeltaTableWriter
from tests.harness import ev


def test_changes_committed_during_a_round_count_in_its_lag(tmp_path) -> None:
    changelog = DeltaTableWriter(str(tmp_path / "_changelog" / "shop" / "orders"), mode="append")
    changelog.write([ev(f"d{i}", doc={"n": i}, offset=i) for i in range(5)])
    mirror = Mirror(changelog.uri, str(tmp_path / "shop" / "orders"), "shop", "orders")
    apply = mirror.writer.apply

    def apply_while_the_sink_commits(*args, **kwargs):
        changelog.write([ev(f"d{i}", "replace", {"n": -i}, offset=i) for i in range(5, 8)])
        return apply(*args, **kwargs)

    mirror.writer.apply = apply_while_the_sink_commits  # type: ignore[method-assign]
    r = mirror.round()
    assert r is not None and r.changes == 5
    assert (r.lag.changes, r.lag.versions) == (3, 1)
    assert r.lag.seconds >= 0 and not r.lag.caught_up
    mirror.writer.apply = apply  # type: ignore[method-assign]
    r = mirror.round()
    assert r is not None and r.changes == 3 and r.lag.caught_up
    assert mirror.round() is None
