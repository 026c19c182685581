"""Which connector wrote a topic, and which table a topic's messages belong to.

Most envelopes say what they are and name their collection. Two things the
bytes alone cannot always tell, so they are settings:

- `CDC_FORMAT`: `auto` (default) reads every envelope it recognises; a
  bare document (no envelope) is Debezium's `ExtractNewDocumentState` output
  when the message key is Debezium's `{"id": ...}` or the value carries the
  SMT's `__op` / `__deleted` / `__source_*` fields, and MongoDB's
  `publish.full.document.only` output otherwise. Naming the format makes that
  decision for every message of every topic. `debezium-unwrapped-partial`
  says the connector runs in `change_streams` capture mode, where an update
  carries only the fields it changed: such records are merged into the row
  instead of replacing it; nothing in the record says so.
- The table of a message without names in it (a bare document, a tombstone):
  `CDC_TOPIC_TABLES`, a JSON map `{"<topic>": "<db>.<collection>"}` (a
  RegexRouter's output, say), then `CDC_TOPIC_TABLE_REGEX`, a regular
  expression with named groups `db` and `collection` matched against the whole
  topic. By default the connectors' own naming: Debezium's
  `<topic.prefix>.<db>.<collection>`, MongoDB's `<db>.<collection>` (its
  default empty `topic.prefix`). A database name never holds a dot, a
  collection name may (`fs.files`), so the database is the part before the
  first dot after the prefix. A topic no rule fits stops the pipeline
  (`ConfigError`): every message on it would otherwise be misplaced.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from dataflow.runtime.failures import ConfigError

log = logging.getLogger(__name__)


class Format(StrEnum):
    AUTO = "auto"
    DEBEZIUM = "debezium"
    DEBEZIUM_UNWRAPPED = "debezium-unwrapped"
    DEBEZIUM_UNWRAPPED_PARTIAL = "debezium-unwrapped-partial"
    MONGODB = "mongodb"
    MONGODB_FULL_DOCUMENT_ONLY = "mongodb-full-document-only"

    @property
    def unwrapped(self) -> bool:
        return self in (Format.DEBEZIUM_UNWRAPPED, Format.DEBEZIUM_UNWRAPPED_PARTIAL)


DEBEZIUM_TOPIC = r"[^.]+\.(?P<db>[^.]+)\.(?P<collection>.+)"
MONGODB_TOPIC = r"(?P<db>[^.]+)\.(?P<collection>.+)"


def regex_problem(pattern: str) -> str | None:
    """What is wrong with a topic-to-table regex (None: nothing)."""
    try:
        regex = re.compile(pattern)
    except re.error as e:
        return f"is not a valid regex: {e}"
    if not {"db", "collection"} <= set(regex.groupindex):
        return "needs the named groups (?P<db>...) and (?P<collection>...)"
    return None


def _compiled(pattern: str) -> re.Pattern[str]:
    problem = regex_problem(pattern)
    if problem is not None:
        raise ConfigError(f"CDC_TOPIC_TABLE_REGEX {problem}")
    return re.compile(pattern)


@dataclass(frozen=True)
class TopicTables:
    """The documented topic → (db, collection) rule; see the module docstring."""

    mapping: Mapping[str, str] = field(default_factory=dict)
    regex: str | None = None

    def __post_init__(self) -> None:
        for topic, table in self.mapping.items():
            db, dot, coll = table.partition(".")
            if table != "*" and not (db and dot and coll and "*" not in db):
                raise ConfigError(
                    f"CDC_TOPIC_TABLES: {topic!r} maps to {table!r}, not <db>.<collection>, <db>.* or *"
                )
        if self.regex is not None:
            _compiled(self.regex)

    def names(self, topic: str, *, debezium: bool) -> tuple[str, str]:
        """The (db, collection) of a message on `topic` that does not name them itself."""
        table = self.mapping.get(topic)
        if table is not None and not table.endswith("*"):
            db, _, coll = table.partition(".")
            return db, coll
        pattern = self.regex or (DEBEZIUM_TOPIC if debezium else MONGODB_TOPIC)
        m = _compiled(pattern).fullmatch(topic)
        if m is None or not m["db"] or not m["collection"]:
            which = "CDC_TOPIC_TABLE_REGEX" if self.regex else f"the default rule {pattern!r}"
            raise ConfigError(
                f"messages on topic {topic!r} do not name their collection, and {which} does not fit "
                "the topic: set CDC_TOPIC_TABLES or CDC_TOPIC_TABLE_REGEX (README, 'Topics and tables')"
            )
        return m["db"], m["collection"]

    def refuses(self, topic: str, db: str, coll: str) -> str | None:
        """What `topic` may feed, when it is not `db.coll` (None: it may).

        A replayed or injected message must not write to a table its topic does
        not carry. A topic named in CDC_TOPIC_TABLES feeds its table (`<db>.*`:
        any collection of the database; `*`: any table, for a topic that carries
        several, e.g. MongoDB's `topic.namespace.map` to one topic); one that
        CDC_TOPIC_TABLE_REGEX fits feeds the table the regex gives; otherwise a
        topic feeds `<db>.<collection>` when its name ends with it, as both
        connectors name topics (`<prefix>.<db>.<collection>`). A database-wide
        change (no collection) fits a topic holding the database's name.
        """
        table = self.mapping.get(topic)
        if table is not None:
            tdb, _, tcoll = table.partition(".")
            fits = table == "*" or (tdb == db and (tcoll in ("*", coll) or not coll))
            return None if fits else table
        if self.regex is not None:
            m = _compiled(self.regex).fullmatch(topic)
            if m is not None and m["db"] and m["collection"]:
                if m["db"] == db and (m["collection"] == coll or not coll):
                    return None
                return f"{m['db']}.{m['collection']}"
        if coll:
            name = f"{db}.{coll}"
            if topic == name or topic.endswith("." + name):
                return None
            return f"a topic named [<prefix>.]{name}"
        parts = topic.split(".")
        return None if db in parts else f"a topic holding the database name {db!r}"


class Detections:
    """What each topic was found to carry: logged once per topic, and again if it changes."""

    def __init__(self) -> None:
        self.seen: dict[str, str] = {}  # read per message by the decoder, before it calls `saw`
        self._lock = threading.Lock()

    def saw(self, topic: str, what: str) -> None:
        if self.seen.get(topic) == what:
            return
        with self._lock:
            before = self.seen.get(topic)
            if before == what:
                return
            self.seen[topic] = what
        if before is None:
            log.info("topic %s carries %s", topic, what, extra={"topic": topic, "format": what})
        else:
            log.warning(
                "topic %s carried %s and now carries %s",
                topic,
                before,
                what,
                extra={"topic": topic, "format": what},
            )

    def get(self, topic: str) -> str | None:
        return self.seen.get(topic)
