"""The Kafka offsets recorded in the lake's Delta tables: where to resume without recovery state.

Every changelog commit carries `txn(app_id=<pipeline>:<topic>:<partition>, version=<offset>)`.
Only changelogs count: in merge mode the mirrors record how far into their
changelog they are, not Kafka offsets (mirrors written before the changelog
came first recorded offsets, which are ignored: their changelog starts over).
A topic can feed more than one table, so a partition resumes from the lowest
offset among the changelogs that topic feeds.
"""

from __future__ import annotations

import logging
from pathlib import Path
from urllib.parse import urlparse

from deltalake import DeltaTable
from deltalake.exceptions import TableNotFoundError

from dataflow.lake.layout import CHANGELOG_DIR, name_of
from dataflow.lake.storage import s3_client

log = logging.getLogger(__name__)


def list_tables(lake_uri: str, storage_options: dict[str, str] | None = None) -> list[str]:
    """URIs of the Delta tables at `<lake>/<db>/<coll>` and `<lake>/_changelog/<db>/<coll>`."""
    if lake_uri.startswith(("s3://", "s3a://")):
        return _list_s3(lake_uri, storage_options or {})
    root = Path(lake_uri)
    found = [*root.glob("*/*/_delta_log"), *root.glob(f"{CHANGELOG_DIR}/*/*/_delta_log")]
    return sorted(str(p.parent) for p in found if p.parent.parent.name != CHANGELOG_DIR)


def _list_s3(lake_uri: str, storage_options: dict[str, str]) -> list[str]:
    url = urlparse(lake_uri)
    client = s3_client(storage_options, timeout=30)
    bucket, base = url.netloc, url.path.strip("/")
    base = f"{base}/" if base else ""

    def dirs(prefix: str) -> list[str]:
        return [o.object_name for o in client.list_objects(bucket, prefix=prefix) if o.is_dir]

    tables = []
    for db in dirs(base):
        for coll in dirs(db):
            if db == f"{base}{CHANGELOG_DIR}/":
                tables.extend(dirs(coll))  # _changelog/<db>/<coll>/
            else:
                tables.append(coll)
    return sorted(
        f"s3://{bucket}/{t.rstrip('/')}"
        for t in tables
        if any(True for _ in client.list_objects(bucket, prefix=f"{t}_delta_log/"))
    )


def lake_collections(lake_uri: str, storage_options: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """(db, collection) of every merge-mode changelog in the lake."""
    base = lake_uri.rstrip("/")
    out = []
    for uri in changelogs(lake_uri, storage_options, merge=True):
        _, db, coll = uri[len(base) :].strip("/").split("/")
        out.append((name_of(db), name_of(coll)))
    return out


def collections_in(lake_uri: str, db: str, storage_options: dict[str, str] | None = None) -> list[str]:
    """The collections of database `db` that have a table in the lake (for a dropDatabase)."""
    base = lake_uri.rstrip("/")
    out = []
    for uri in list_tables(lake_uri, storage_options):
        head, _, coll = uri[len(base) :].strip("/").partition("/")
        if head != CHANGELOG_DIR and name_of(head) == db and coll:
            out.append(name_of(coll))
    return out


def is_changelog(uri: str, lake_uri: str) -> bool:
    """Whether a table of the lake is under `_changelog/` (a merge-mode changelog)."""
    return uri[len(lake_uri.rstrip("/")) :].lstrip("/").partition("/")[0] == CHANGELOG_DIR


def changelogs(lake_uri: str, storage_options: dict[str, str] | None = None, *, merge: bool) -> list[str]:
    """The changelog tables of the lake: under `_changelog/` in merge mode, the tables in append mode."""
    return [t for t in list_tables(lake_uri, storage_options) if is_changelog(t, lake_uri) == merge]


def committed_offsets(
    lake_uri: str,
    pipeline: str,
    partitions: dict[str, int],
    storage_options: dict[str, str] | None = None,
    *,
    merge: bool = False,
) -> dict[tuple[str, int], int]:
    """The offset each (topic, partition) may resume from, for those every changelog it feeds has recorded."""
    tables: dict[str, DeltaTable | None] = {}

    def opened(uri: str) -> DeltaTable | None:
        if uri not in tables:
            try:
                tables[uri] = DeltaTable(uri, storage_options=storage_options)
            except TableNotFoundError as e:  # missing, or created without a commit: it recorded nothing
                # Anything else (storage away, a log that does not parse) is not "nothing recorded":
                # it goes to the caller's retry policy, or stops the start.
                level = logging.WARNING if uri in found else logging.INFO
                log.log(level, "no Delta table at %s while looking for committed offsets: %s", uri, e)
                tables[uri] = None
        return tables[uri]

    def versions(uri: str, topic: str) -> dict[int, int | None]:
        table = opened(uri)
        return {
            p: None if table is None else table.transaction_version(f"{pipeline}:{topic}:{p}")
            for p in range(partitions[topic])
        }

    found = changelogs(lake_uri, storage_options, merge=merge)
    out: dict[tuple[str, int], int] = {}
    for topic, count in partitions.items():
        per_table = {uri: versions(uri, topic) for uri in found}
        feeding = {uri: v for uri, v in per_table.items() if any(x is not None for x in v.values())}
        for p in range(count):
            recorded = [v[p] for v in feeding.values()]
            if recorded and all(x is not None for x in recorded):
                out[(topic, p)] = min(recorded)  # type: ignore[type-var]
    return out
