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

from dataflow.storage import s3_client

log = logging.getLogger(__name__)


def list_tables(lake_uri: str, storage_options: dict[str, str] | None = None) -> list[str]:
    """URIs of the Delta tables at `<lake>/<db>/<coll>` and `<lake>/_changelog/<db>/<coll>`."""
    if lake_uri.startswith(("s3://", "s3a://")):
        return _list_s3(lake_uri, storage_options or {})
    root = Path(lake_uri)
    found = [*root.glob("*/*/_delta_log"), *root.glob("_changelog/*/*/_delta_log")]
    return sorted(str(p.parent) for p in found if p.parent.parent.name != "_changelog")


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
            if db == f"{base}_changelog/":
                tables.extend(dirs(coll))  # _changelog/<db>/<coll>/
            else:
                tables.append(coll)
    return sorted(
        f"s3://{bucket}/{t.rstrip('/')}"
        for t in tables
        if any(True for _ in client.list_objects(bucket, prefix=f"{t}_delta_log/"))
    )


def committed_offsets(
    lake_uri: str,
    pipeline: str,
    partitions: dict[str, int],
    storage_options: dict[str, str] | None = None,
) -> dict[tuple[str, int], int]:
    """The offset each (topic, partition) may resume from, for those any table has recorded."""
    per_topic: dict[str, list[dict[int, int | None]]] = {t: [] for t in partitions}
    for uri in list_tables(lake_uri, storage_options):
        try:
            table = DeltaTable(uri, storage_options=storage_options)
        except Exception as e:  # a half-created table: it recorded nothing
            log.warning("cannot open %s while looking for committed offsets: %s", uri, e)
            continue
        for topic, count in partitions.items():
            versions = {p: table.transaction_version(f"{pipeline}:{topic}:{p}") for p in range(count)}
            if any(v is not None for v in versions.values()):
                per_topic[topic].append(versions)
    out: dict[tuple[str, int], int] = {}
    for topic, tables in per_topic.items():
        for p in range(partitions[topic]):
            recorded = [t.get(p) for t in tables]
            if recorded and all(v is not None for v in recorded):
                out[(topic, p)] = min(recorded)  # type: ignore[type-var]
    return out
