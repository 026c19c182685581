"""The Kafka offsets recorded in the lake's Delta tables: where to resume without recovery state.

Every commit carries `txn(app_id=<pipeline>:<topic>:<partition>, version=<offset>)`.
A topic can feed more than one table (`both` mode writes a table and a
changelog), and a crash can fall between their commits, so a partition resumes
from the lowest offset among the tables that topic feeds.
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


def collections_in(lake_uri: str, db: str, storage_options: dict[str, str] | None = None) -> list[str]:
    """The collections of database `db` that have a table in the lake (for a dropDatabase)."""
    base = lake_uri.rstrip("/")
    out = []
    for uri in list_tables(lake_uri, storage_options):
        head, _, coll = uri[len(base) :].strip("/").partition("/")
        if head != CHANGELOG_DIR and name_of(head) == db and coll:
            out.append(name_of(coll))
    return out


def twin_of(uri: str, lake_uri: str) -> str:
    """In `both` mode, the changelog of a table and the table of a changelog."""
    base = lake_uri.rstrip("/")
    rel = uri[len(base) :].lstrip("/")
    head, _, rest = rel.partition("/")
    return f"{base}/{rest}" if head == CHANGELOG_DIR else f"{base}/{CHANGELOG_DIR}/{rel}"


def committed_offsets(
    lake_uri: str,
    pipeline: str,
    partitions: dict[str, int],
    storage_options: dict[str, str] | None = None,
    *,
    paired: bool = False,
) -> dict[tuple[str, int], int]:
    """The offset each (topic, partition) may resume from, for those every table it feeds has recorded.

    With `paired` (`both` mode), a table and its changelog are written in two
    commits: when one recorded a topic, the other must have too, and a twin
    that is missing or recorded nothing means "resume from the start", never
    from the other's offset (that would skip the batch the crash cut in two).
    """
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

    found = list_tables(lake_uri, storage_options)
    out: dict[tuple[str, int], int] = {}
    for topic, count in partitions.items():
        per_table = {uri: versions(uri, topic) for uri in found}
        feeding = {uri: v for uri, v in per_table.items() if any(x is not None for x in v.values())}
        if paired:
            for uri in list(feeding):
                twin = twin_of(uri, lake_uri)
                if twin not in feeding:
                    feeding[twin] = per_table[twin] if twin in per_table else versions(twin, topic)
        for p in range(count):
            recorded = [v[p] for v in feeding.values()]
            if recorded and all(x is not None for x in recorded):
                out[(topic, p)] = min(recorded)  # type: ignore[type-var]
    return out
