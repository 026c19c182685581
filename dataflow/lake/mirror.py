"""One collection's mirror brought up to date from its changelog, in rounds.

A MERGE rewrites every file it touches, and changes spread over a collection
touch them all, so its cost grows with the table, not with the changes. The
changelog takes every batch in (that commit makes the batch durable); a round
then takes everything the changelog gained since the mirror's mark, collapses
it per document and applies it in one MERGE. While a round runs the next one's
changes pile up, so rounds grow with the table and the rewrite per change stays
bounded. A round holds at most `max_rows` changes (whole changelog versions;
one version at least): a long backlog is worked off in several.

The mirror records how far into the changelog it is in its own txn action
(`<pipeline>:changelog`, version = the last changelog version applied), in the
same commit as the changes: a crash mid-round resumes from the mark, nothing
lost, nothing applied twice. Two materializers on one table are safe too:
delta-rs refuses the second commit of the same mark.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from dataflow.lake.changelog import Changelog, Version
from dataflow.lake.columnar import Direct, split
from dataflow.lake.columns import DEFAULT_MAX_COLUMNS, Layout
from dataflow.lake.writer import DeltaTableWriter, release_arrow_memory
from dataflow.model import ChangeEvent

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_ROUND_ROWS = 750_000


def mark_app(pipeline: str) -> str:
    """The txn app id under which a mirror records the changelog version it has applied."""
    return f"{pipeline}:changelog"


@dataclass(frozen=True, slots=True)
class Lag:
    """How far a mirror trails its changelog."""

    changes: int  # rows committed to the changelog and not applied yet
    seconds: float  # age of the oldest of them (0 when caught up)
    versions: int  # changelog commits not applied yet
    applied: int  # the changelog version the mirror has applied (-1: none)

    @property
    def caught_up(self) -> bool:
        return self.changes == 0


@dataclass(frozen=True, slots=True)
class Round:
    """What one round did."""

    first: int  # changelog versions applied
    last: int
    changes: int  # changelog rows applied
    rows_written: int  # collapsed rows sent to the mirror
    rows_rewritten: int  # rows delta-rs wrote (changed and copied), the round's real cost
    seconds: float
    appended: bool  # only new documents: appended, no MERGE
    lag: Lag  # after the round
    mirror_rows: int = 0  # rows in the mirror afterwards, tombstones included


class Mirror:
    """The changelog and mirror of one collection, and the rounds between them."""

    def __init__(
        self,
        changelog_uri: str,
        mirror_uri: str,
        db: str,
        collection: str,
        *,
        pipeline: str = "cdc",
        storage_options: dict[str, str] | None = None,
        max_rows: int = DEFAULT_ROUND_ROWS,
        target_changelog: Callable[[str, str], DeltaTableWriter] | None = None,
        clock: Callable[[], float] = time.time,
        read: Callable[[Callable[[], T], str], T] | None = None,
        columnar: bool = True,
        max_columns: int = DEFAULT_MAX_COLUMNS,
    ) -> None:
        self.table = f"{db}.{collection}"
        self.changelog = Changelog(changelog_uri, db, collection, storage_options)
        self.writer = DeltaTableWriter(
            mirror_uri,
            mode="merge",
            pipeline=pipeline,
            storage_options=storage_options,
            table_of=target_changelog,
            max_columns=max_columns,
        )
        self.app = mark_app(pipeline)
        self.max_rows = max_rows
        self.clock = clock
        # How each read of the round is made: under the caller's retry policy, so that a read
        # that fails in the store is tried again alone, not the whole round with it.
        self._read = read if read is not None else (lambda fn, _operation: fn())
        self.columnar = columnar  # collapse what can be collapsed column-wise (False: all in Python)

    def applied(self) -> int:
        v = self._read(lambda: self.writer.applied(self.app), "mirror_mark")
        return -1 if v is None else v

    def lag(self) -> Lag:
        applied = self.applied()
        return self._lag(applied, self.changelog.pending(applied)[0])

    def _lag(self, applied: int, pending: list[Version]) -> Lag:
        changes = sum(p.rows for p in pending)
        oldest = min((p.timestamp_ms for p in pending), default=None)
        seconds = 0.0 if oldest is None else max(0.0, self.clock() - oldest / 1000)
        return Lag(changes, seconds, len(pending), applied)

    def round(self, max_rows: int | None = None) -> Round | None:
        """Apply the next round of changelog versions; None when the mirror is caught up.

        `max_rows`: this round's bound, instead of the mirror's own.
        """
        limit = self.max_rows if max_rows is None else max_rows
        started = time.monotonic()
        applied = self.applied()
        pending, latest = self._read(lambda: self.changelog.pending(applied), "changelog_feed")
        if not pending:
            if latest > applied and self.writer.version is not None:
                self.writer.apply([], (self.app, latest))  # commits without rows: only the mark moves
            return None
        take, rows = [], 0
        for p in pending:
            if take and rows + p.rows > limit:
                break
            take.append(p)
            rows += p.rows
        # the round starts after the mark and ends at its last version, or at the latest when it
        # takes every pending version (commits without rows after them need no other round)
        first, last = applied + 1, latest if len(take) == len(pending) else take[-1].version
        log.info(
            "mirror %s: round begin, changelog versions %d..%d, %d changes",
            self.table,
            first,
            last,
            rows,
            extra={"table": self.table, "rows": rows},
        )

        def collapse() -> tuple[list[ChangeEvent], Direct | None, Layout]:
            # called by the writer, which alone holds what it returns: it lets the round's rows go
            # once they are in the MERGE source
            feed = self._read(lambda: self.changelog.rows(first, last), "changelog_feed")
            kinds = self._read(self.changelog.layout, "changelog_feed")
            direct = None
            if self.columnar:
                mirror = self._read(self.writer.layout, "mirror_layout")
                direct, feed = split(feed, kinds, mirror, self.writer.max_columns)
            events = self.changelog.to_events(feed, kinds)
            del feed
            release_arrow_memory()
            return events, direct, kinds

        result = self.writer.apply([], (self.app, last), collapse=collapse)
        release_arrow_memory()  # what the MERGE source held
        metrics = self.writer.last_merge if result.committed else {}
        self.writer.last_merge = {}
        rewritten = int(metrics.get("num_output_rows", 0) or 0)
        appended = result.committed and not metrics and result.rows_written > 0
        seconds = time.monotonic() - started
        # What is left now, not what was left when the round began: the sink goes on committing
        # to the changelog during the round, and a busy table's rounds take everything pending.
        rest, _ = self._read(lambda: self.changelog.pending(last), "changelog_feed")
        return Round(
            first=first,
            last=last,
            changes=result.events,
            rows_written=result.rows_written,
            rows_rewritten=rewritten if not appended else result.rows_written,
            seconds=seconds,
            appended=appended,
            lag=self._lag(last, rest),
            mirror_rows=self.writer.rows(),
        )

    def catch_up(self, *, max_rounds: int | None = None) -> list[Round]:
        """Rounds until caught up (or `max_rounds`)."""
        done: list[Round] = []
        while max_rounds is None or len(done) < max_rounds:
            r = self.round()
            if r is None:
                break
            done.append(r)
        return done
