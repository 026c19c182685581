"""`python -m dataflow.cli` (also `cdc`): status of the tables, and the dead-letter queue.

    status              per table: Delta version, rows, last commit, committed offsets, lag;
                        per mirror: how far it trails its changelog
    read DB.COLL        the collection as of its last committed batch, one Extended JSON document a line
    materialize         bring the mirrors up to date from their changelogs (once, or --follow)
    maintain            compact, checkpoint, clean the log of and vacuum every table (or those named)
    dlq inspect         dead letters from the DLQ topic or the fallback file, filtered
    dlq replay          send chosen dead letters back to their source topic, once

Configuration comes from the same environment as the pipeline (README).
Replay is idempotent: every replayed source (topic, partition, offset) is
recorded in a compacted ledger topic, `<DLQ topic>.replayed`, and a source
already in the ledger is not sent again.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

import orjson
from bytewax.connectors.kafka import KafkaSourceMessage
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from dataflow.decode.envelopes import Decoder
from dataflow.dlq.writer import FallbackFile
from dataflow.lake.offsets import list_tables
from dataflow.model import REPLAY_HEADER, DeadLetter, Reason
from dataflow.runtime import logs, secrets
from dataflow.runtime.settings import Settings, SettingsError
from dataflow.source.topics import end_offsets, match_topics

log = logging.getLogger("dataflow.cli")


def progress(label: str, done: int, total: int | None = None) -> None:
    """Progress on stderr, so stdout stays clean for --json."""
    suffix = f"/{total}" if total else ""
    end = "\n" if total is not None and done >= total else ""  # the finished line stays, on its own
    print(f"\r{label}: {done}{suffix}", end=end, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- status


def table_status(uri: str, settings: Settings, partitions: dict[str, int], ends: dict) -> dict[str, Any]:
    from deltalake import DeltaTable

    table = DeltaTable(uri, storage_options=settings.storage_options or None)
    actions = table.get_add_actions(flatten=True)
    rows = sum(v for v in actions.column("num_records").to_pylist() if v is not None) if len(actions) else 0
    last = table.history(1)[0]
    offsets = []
    for topic, count in partitions.items():
        for p in range(count):
            version = table.transaction_version(f"{settings.pipeline_name}:{topic}:{p}")
            if version is None:
                continue
            end = ends.get((topic, p))
            lag = None if end is None else max(0, end - 1 - version)
            offsets.append({"topic": topic, "partition": p, "committed": version, "end": end, "lag": lag})
    out = {
        "table": uri,
        "version": table.version(),
        "rows": rows,
        "last_commit": datetime.fromtimestamp(last["timestamp"] / 1000, UTC).isoformat(timespec="seconds"),
        "last_operation": last.get("operation"),
        "offsets": offsets,
        "lag": sum(o["lag"] or 0 for o in offsets),
    }
    if table.metadata().configuration.get("cdc.mode") == "merge":
        out["mirror"] = mirror_status(uri, table, settings)
    return out


def mirror_status(uri: str, table: Any, settings: Settings) -> dict[str, Any]:
    """How far a mirror trails its changelog: changes and seconds behind, the version it applied."""
    from dataflow.lake.layout import CHANGELOG_DIR
    from dataflow.lake.mirror import Mirror

    base = settings.lake_uri.rstrip("/")
    changelog = f"{base}/{CHANGELOG_DIR}/{uri[len(base) :].lstrip('/')}"
    lag = Mirror(
        changelog,
        uri,
        "",
        "",
        pipeline=settings.pipeline_name,
        storage_options=settings.storage_options or None,
    ).lag()
    live = rows_of(table, deleted=False)
    return {
        "applied_version": lag.applied,
        "changes_behind": lag.changes,
        "seconds_behind": round(lag.seconds, 1),
        "versions_behind": lag.versions,
        "documents": live,
    }


def rows_of(table: Any, *, deleted: bool) -> int:
    """Rows of a mirror that are tombstones (`deleted`) or documents (-1: a table without tombstones)."""
    import pyarrow as pa
    from deltalake import QueryBuilder

    if "_deleted" not in pa.schema(table.schema().to_arrow()).names:
        return -1
    which = "" if deleted else "NOT "
    query = QueryBuilder().register("mirror", table)
    found = query.execute(f"SELECT count(*) FROM mirror WHERE {which}coalesce(`_deleted`, false)")
    return int(pa.RecordBatchReader.from_stream(found).read_all().column(0)[0].as_py())


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    partitions: dict[str, int] = {}
    ends: dict = {}
    if settings.brokers:
        topics = list(settings.topics) or match_topics(
            settings.brokers, settings.topic_pattern or ".*", **settings.kafka_config
        )
        try:
            ends = end_offsets(settings.brokers, topics, **settings.kafka_config)
        except Exception as e:  # status still shows the tables without the broker
            log.warning("cannot read end offsets from %s: %s", settings.brokers, e)
        for topic, p in ends:
            partitions[topic] = max(partitions.get(topic, 0), p + 1)
    uris = list_tables(settings.lake_uri, settings.storage_options or None)
    report = []
    for i, uri in enumerate(uris, 1):
        progress("reading tables", i, len(uris))
        report.append(table_status(uri, settings, partitions, ends))
    if uris:
        print(file=sys.stderr)
    if args.json:
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
        return 0
    if not report:
        print(f"no Delta tables under {settings.lake_uri}")
        return 0
    print(f"{'table':<60} {'version':>8} {'rows':>10} {'last commit':<26} {'lag':>8}")
    for t in report:
        print(f"{t['table']:<60} {t['version']:>8} {t['rows']:>10} {t['last_commit']:<26} {t['lag']:>8}")
        for o in t["offsets"]:
            lag = "?" if o["lag"] is None else o["lag"]
            print(f"    {o['topic']}[{o['partition']}] committed {o['committed']}, end {o['end']}, lag {lag}")
        if (m := t.get("mirror")) is not None:
            print(
                f"    mirror: {m['documents']} documents, changelog version {m['applied_version']} applied, "
                f"{m['changes_behind']} changes ({m['seconds_behind']}s) behind"
            )
    return 0


# ---------------------------------------------------------------- mirrors


def cmd_read(settings: Settings, args: argparse.Namespace) -> int:
    from dataflow.decode.extjson import dumps
    from dataflow.lake.read import current_documents

    db, dot, coll = args.table.partition(".")
    if not dot or not db or not coll:
        print(f"cdc read: {args.table!r} is not <db>.<collection>", file=sys.stderr)
        return 2
    docs = current_documents(
        settings.lake_uri,
        db,
        coll,
        storage_options=settings.storage_options or None,
        pipeline=settings.pipeline_name,
        ids=args.id or None,
        deleted=args.deleted,
    )
    out = sys.stdout.buffer
    for n, doc in enumerate(docs.values()):
        if args.limit is not None and n >= args.limit:
            break
        out.write(dumps(doc) + b"\n")
    out.flush()
    return 0


def cmd_materialize(settings: Settings, args: argparse.Namespace) -> int:
    """Bring mirrors up to date; with --follow, keep doing so (CDC_MATERIALIZER=off in the pipeline).

    Following, it tells the materializer what each changelog gained since the
    last look (its row count only grows), as the pipeline's sink does: a busy
    table's rounds are paced the same way run apart as inside the pipeline.
    """
    from dataflow.lake.changelog import Changelog
    from dataflow.lake.offsets import lake_collections
    from dataflow.sink.materializer import new_materializer

    if settings.table_mode == "append":
        print("cdc materialize: CDC_TABLE_MODE=append keeps no mirrors", file=sys.stderr)
        return 2
    so = settings.lake.storage_options or None
    chosen = [tuple(t.split(".", 1)) for t in args.table] if args.table else None

    def tables() -> list[tuple[str, str]]:
        found = lake_collections(settings.lake_uri, so)
        return found if chosen is None else [t for t in found if t in chosen]

    if args.follow and args.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(args.metrics_port)
    m = new_materializer(
        settings.lake, settings.retry, name="materializer", startup=tables, stop_flow_on_error=False
    )
    m.start()
    try:
        if not args.follow:
            m.drain()
            for r in m.rounds:
                log.info("%s", r)
            print(
                f"{len(m.rounds)} rounds, {sum(r.changes for r in m.rounds)} changes applied", file=sys.stderr
            )
            return 0
        seen: dict[tuple[str, str], tuple[Changelog, int]] = {}
        while True:  # new changelogs and new changes: look again every --interval seconds
            time.sleep(args.interval)
            m.check()
            for t in tables():
                if t not in seen:  # a changelog not seen before: its mirror catches up at once
                    changelog = Changelog(settings.lake.tables.uri(*t, "append"), *t, so)
                    seen[t] = (changelog, changelog.row_count())
                    m.notify(*t)
                    continue
                changelog, before = seen[t]
                now = changelog.row_count()
                if now != before:
                    seen[t] = (changelog, now)
                    m.notify(*t, max(0, now - before))
    finally:
        m.stop()


# ---------------------------------------------------------------- maintenance


def cmd_maintain(settings: Settings, args: argparse.Namespace) -> int:
    """Compaction, checkpoints, log clean-up and vacuum of the lake's tables, one after another."""
    import dataclasses

    from dataflow.lake.maintenance import maintain_lake

    policy = settings.maintenance_policy
    if not policy.enabled:
        print("CDC_MAINTENANCE=0: no table maintained", file=sys.stderr)
        return 0
    only = None
    if args.table:
        only = []
        for t in args.table:
            db, dot, coll = t.partition(".")
            if not (db and dot and coll):
                print(f"cdc maintain: {t!r} is not <db>.<collection>", file=sys.stderr)
                return 2
            only.append((db, coll))
    policy = dataclasses.replace(
        policy,
        compact=not args.no_compact,
        vacuum=not args.no_vacuum,
        checkpoint=not args.no_checkpoint,
        clean_logs=not args.no_log_cleanup,
        dry_run=args.dry_run,
    )
    outcomes = maintain_lake(
        settings.lake_uri,
        storage_options=settings.storage_options or None,
        policy=policy,
        pipeline=settings.pipeline_name,
        only=only,
    )
    failed = [o for o in outcomes if o.error is not None]
    if args.json:
        rows = [
            {"table": o.uri, "collection": o.label, "kind": o.kind, "error": o.error}
            | (o.report.as_dict() if o.report else {})
            for o in outcomes
        ]
        print(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
        return 1 if failed else 0
    if not outcomes:
        print(f"no Delta tables to maintain under {settings.lake_uri}")
        return 0 if only is None else 2
    if args.dry_run:
        print("dry run: nothing changed; what would be done")
    print(
        f"{'collection':<32} {'kind':<9} {'version':>7} {'compacted':>12} {'vacuumed':>9} {'bytes':>12} "
        f"{'checkpoint':>10} {'logs':>5} {'seconds':>7}"
    )
    for o in outcomes:
        if (r := o.report) is None:
            print(f"{o.label:<32} {o.kind:<9} failed: {o.error}")
            continue
        compacted = f"{r.files_compacted}->{r.files_added}" if not r.dry_run else str(r.files_compacted)
        checkpoint = "-" if r.checkpoint_version is None else str(r.checkpoint_version)
        print(
            f"{o.label:<32} {o.kind:<9} {r.version:>7} {compacted:>12} {r.files_vacuumed:>9} "
            f"{r.bytes_vacuumed:>12} {checkpoint:>10} {r.log_files_removed:>5} {r.seconds:>7.1f}"
        )
        for key, value in r.properties_set.items():
            print(f"    set {key} = {value!r}")
        for why in r.held_back:
            print(f"    held back: {why}")
    print(
        f"{len(outcomes)} tables, {len(failed)} failed: {sum(o.report.files_compacted for o in outcomes if o.report)}"
        f" files compacted, {sum(o.report.bytes_vacuumed for o in outcomes if o.report)} bytes vacuumed"
    )
    return 1 if failed else 0


# ---------------------------------------------------------------- dead letters


def read_topic(brokers: str, topic: str, config: dict[str, str]) -> Iterator[tuple[DeadLetter, Any]]:
    """Every record on the DLQ topic, from the start to the current end."""
    consumer = Consumer(
        {"bootstrap.servers": brokers, "group.id": "cdc-cli", "enable.auto.commit": False, **config}
    )
    try:
        md = consumer.list_topics(topic, timeout=30).topics.get(topic)
        if md is None or md.error is not None:
            return
        todo = {}
        for p in md.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30)
            if high > low:
                todo[p] = high
        consumer.assign([TopicPartition(topic, p, 0) for p in todo])
        total, done, deadline = sum(todo.values()), 0, time.monotonic() + 600
        while todo and time.monotonic() < deadline:
            for msg in consumer.consume(1000, timeout=1):
                if msg.error() is not None:
                    continue
                done += 1
                if done % 1000 == 0:
                    progress(f"reading {topic}", done, total)
                if msg.offset() >= todo.get(msg.partition(), 0) - 1:
                    todo.pop(msg.partition(), None)
                try:
                    yield DeadLetter.from_json(msg.value()), msg
                except (orjson.JSONDecodeError, KeyError, ValueError) as e:
                    print(
                        f"skipping unreadable DLQ record at {msg.partition()}@{msg.offset()}: {e}",
                        file=sys.stderr,
                    )
        if done >= 1000:
            print(file=sys.stderr)
    finally:
        consumer.close()


def read_file(path: str) -> Iterator[DeadLetter]:
    """DLQ records from a JSONL file: the fallback file, or `inspect --json` output (maybe edited).

    A record with a `value` text field (as `inspect --json` prints) replays that
    text instead of the original bytes: that is how a fixed event is replayed.
    """
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            d = orjson.loads(line)
            record = DeadLetter.from_json(line)
            if d.get("value") is not None:
                record.value = d["value"].encode()
            yield record


def table_of(record: DeadLetter) -> str:
    """The table a dead letter belongs to: recorded by the sink, else from the topic name."""
    if table := record.metadata.get("table"):
        return table
    parts = record.topic.split(".")
    return ".".join(parts[-2:]) if len(parts) >= 2 else record.topic


def select(records: Iterable[DeadLetter], args: argparse.Namespace) -> list[DeadLetter]:
    """Filter by reason, table and time; keep one record per source (the DLQ is at-least-once)."""
    since = _time(args.since)
    until = _time(args.until)
    seen: set[tuple[str, int, int]] = set()
    out = []
    for r in records:
        if args.reason and str(r.reason) not in args.reason:
            continue
        if args.table and table_of(r) != args.table:
            continue
        if since is not None and r.first_failure_ms < since:
            continue
        if until is not None and r.first_failure_ms > until:
            continue
        if r.source_id in seen and not getattr(args, "all", False):
            continue
        seen.add(r.source_id)
        out.append(r)
        if args.limit and len(out) >= args.limit:
            break
    return out


def _time(text: str | None) -> int | None:
    if not text:
        return None
    when = datetime.fromisoformat(text)
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


def load_records(settings: Settings, args: argparse.Namespace) -> list[DeadLetter]:
    if args.file:
        source: Iterable[DeadLetter] = read_file(args.file)
    elif args.fallback:
        source = FallbackFile(settings.dlq_fallback).read()
    else:
        if not settings.brokers:
            raise SettingsError("reading the DLQ topic needs CDC_KAFKA_BROKERS (or use --file/--fallback)")
        source = (
            r
            for r, _ in read_topic(settings.brokers, args.topic or settings.dlq_topic, settings.kafka_config)
        )
    return select(source, args)


def as_json(r: DeadLetter) -> bytes:
    d = orjson.loads(r.to_json())
    with contextlib.suppress(UnicodeDecodeError):  # editable text, for fixing
        d["value"] = None if r.value is None else r.value.decode("utf-8")
    d["table"] = table_of(r)
    return orjson.dumps(d)


def cmd_inspect(settings: Settings, args: argparse.Namespace) -> int:
    records = load_records(settings, args)
    if args.json:
        for r in records:
            sys.stdout.buffer.write(as_json(r) + b"\n")
        return 0
    print(f"{'when (UTC)':<20} {'reason':<27} {'source':<40} {'retries':>7}  error")
    for r in records:
        when = datetime.fromtimestamp(r.first_failure_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")
        source = f"{r.topic}[{r.partition}]@{r.offset}"
        print(f"{when:<20} {r.reason!s:<27} {source:<40} {r.retry_count:>7}  {r.error[:80]}")
    print(f"{len(records)} dead letters")
    return 0


def ledger_topic(settings: Settings, args: argparse.Namespace) -> str:
    return args.ledger or f"{args.topic or settings.dlq_topic}.replayed"


def read_ledger(settings: Settings, topic: str) -> set[str]:
    admin = AdminClient({"bootstrap.servers": settings.brokers, **settings.kafka_config})
    futures = admin.create_topics(
        [NewTopic(topic, 1, 1, config={"cleanup.policy": "compact"})], operation_timeout=30
    )
    for fut in futures.values():
        try:
            fut.result(timeout=60)
        except KafkaException as e:
            if e.args[0].name() != "TOPIC_ALREADY_EXISTS":
                raise
    consumer = Consumer(
        {"bootstrap.servers": settings.brokers, "group.id": "cdc-cli-ledger", **settings.kafka_config}
    )
    try:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=30)
        done: set[str] = set()
        if high <= low:
            return done
        consumer.assign([TopicPartition(topic, 0, low)])
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            msgs = consumer.consume(1000, timeout=1)
            for m in msgs:
                if m.error() is None and m.key() is not None:
                    done.add(m.key().decode())
            if msgs and msgs[-1].offset() >= high - 1:
                break
        return done
    finally:
        consumer.close()


def still_bad(r: DeadLetter, decoder: Decoder) -> str | None:
    """Why the record would be dead-lettered again, if it would (read as the pipeline reads it)."""
    result = decoder.parse(
        KafkaSourceMessage(r.key, r.value, topic=r.topic, partition=r.partition, offset=r.offset)
    )
    if not isinstance(result, DeadLetter):
        return None
    return f"{result.reason}: {result.error}"


def replay_topics(settings: Settings, extra: list[str]) -> Callable[[str], bool]:
    """The topics a replay may write to: those the pipeline reads, and any allowed by hand.

    A dead-letter record names its own topic, and a record can be edited or
    made up: without this, a replay could write any message to any topic.
    """
    names = set(settings.topics) | set(extra)
    pattern = re.compile(settings.topic_pattern) if settings.topic_pattern else None
    return lambda topic: topic in names or (pattern is not None and pattern.fullmatch(topic) is not None)


def cmd_replay(settings: Settings, args: argparse.Namespace) -> int:
    if not settings.brokers:
        raise SettingsError("replay sends records to their source topics: set CDC_KAFKA_BROKERS")
    records = load_records(settings, args)
    ledger = ledger_topic(settings, args)
    done = read_ledger(settings, ledger)
    producer = Producer(
        {
            "bootstrap.servers": settings.brokers,
            "enable.idempotence": True,
            "acks": "all",
            **settings.kafka_config,
        }
    )
    failures: list[str] = []
    sent = skipped = bad = refused = 0
    decoder = settings.decoder
    allowed = replay_topics(settings, args.allow_topic or [])
    for i, r in enumerate(records, 1):
        source = f"{r.topic}:{r.partition}:{r.offset}"
        if source in done:
            skipped += 1
            continue
        if not allowed(r.topic):
            refused += 1
            print(
                f"not replaying {source}: topic {r.topic!r} is not one this pipeline reads "
                f"(CDC_TOPICS, CDC_TOPIC_PATTERN); --allow-topic {r.topic} allows it",
                file=sys.stderr,
            )
            continue
        if not args.force and (why := still_bad(r, decoder)):
            bad += 1
            print(
                f"not replaying {source}: it would be dead-lettered again ({why}); fix it or use --force",
                file=sys.stderr,
            )
            continue
        if args.dry_run:
            sent += 1
            continue
        producer.produce(
            r.topic,
            key=r.key,
            value=r.value,
            headers=[(REPLAY_HEADER, source.encode())],
            on_delivery=lambda err, _m, s=source: failures.append(f"{s}: {err}") if err else None,
        )
        if producer.flush(30) != 0:
            failures.append(f"{source}: not confirmed")
            break
        # Only a confirmed replay is recorded, so a failure can be retried without duplicates.
        producer.produce(
            ledger, key=source.encode(), value=orjson.dumps({"replayed_ms": int(time.time() * 1000)})
        )
        sent += 1
        if i % 100 == 0:
            progress("replaying", i, len(records))
    if producer.flush(30) != 0:
        failures.append("ledger records not confirmed")
    verb = "would replay" if args.dry_run else "replayed"
    print(
        f"{verb} {sent}, already replayed {skipped}, still bad {bad}, refused {refused}, failed {len(failures)}"
    )
    for f in failures[:20]:
        print(f"  failed: {f}", file=sys.stderr)
    return 1 if failures else 0


# ---------------------------------------------------------------- entry point


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m dataflow.cli", description=__doc__.splitlines()[0])
    sub = top.add_subparsers(dest="command", required=True)
    status = sub.add_parser("status", help="per table: version, rows, last commit, offsets and lag")
    status.add_argument("--json", action="store_true")
    read = sub.add_parser("read", help="a collection as of its last committed batch (mirror + changelog)")
    read.add_argument("table", metavar="DB.COLLECTION")
    read.add_argument("--id", action="append", help="only this _id (its text; repeatable)")
    read.add_argument("--deleted", action="store_true", help="tombstones too, with _deleted: true")
    read.add_argument("--limit", type=int)
    mat = sub.add_parser("materialize", help="bring the mirrors up to date from their changelogs")
    mat.add_argument("table", nargs="*", metavar="DB.COLLECTION", help="only these (default: all)")
    mat.add_argument("--follow", action="store_true", help="keep them up to date until stopped")
    mat.add_argument("--interval", type=float, default=2.0, help="--follow: seconds between looks")
    mat.add_argument("--metrics-port", type=int, default=3030, help="--follow: Prometheus port (0: none)")
    maint = sub.add_parser("maintain", help="compact, checkpoint, clean the log of and vacuum the tables")
    maint.add_argument("table", nargs="*", metavar="DB.COLLECTION", help="only these (default: all)")
    maint.add_argument("--dry-run", action="store_true", help="say what would be done, change nothing")
    maint.add_argument("--no-compact", action="store_true", help="no compaction of small files")
    maint.add_argument("--no-vacuum", action="store_true", help="delete no unreferenced files")
    maint.add_argument("--no-checkpoint", action="store_true", help="write no checkpoint")
    maint.add_argument("--no-log-cleanup", action="store_true", help="delete no old commit files")
    maint.add_argument("--json", action="store_true", help="one JSON report per table")
    dlq = sub.add_parser("dlq", help="inspect or replay dead letters")
    dsub = dlq.add_subparsers(dest="dlq_command", required=True)
    for name in ("inspect", "replay"):
        p = dsub.add_parser(name)
        src = p.add_mutually_exclusive_group()
        src.add_argument(
            "--file", help="a JSONL file of dead letters (fallback file or `inspect --json` output)"
        )
        src.add_argument("--fallback", action="store_true", help="read CDC_DLQ_FALLBACK")
        src.add_argument("--topic", help="the DLQ topic (default CDC_DLQ_TOPIC)")
        p.add_argument("--reason", action="append", choices=[str(r) for r in Reason])
        p.add_argument("--table", help="db.collection")
        p.add_argument("--since", help="ISO time, UTC unless it says otherwise")
        p.add_argument("--until", help="ISO time")
        p.add_argument("--limit", type=int)
        if name == "inspect":
            p.add_argument(
                "--json", action="store_true", help="one JSON record a line, with an editable `value`"
            )
            p.add_argument("--all", action="store_true", help="keep repeated records of the same source")
        else:
            p.add_argument("--ledger", help="ledger topic (default <DLQ topic>.replayed)")
            p.add_argument("--dry-run", action="store_true")
            p.add_argument(
                "--force", action="store_true", help="replay without checking records would decode now"
            )
            p.add_argument(
                "--allow-topic",
                action="append",
                metavar="TOPIC",
                help="a topic to replay to besides those the pipeline reads (repeatable)",
            )
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    os.umask(0o077)  # files it writes (a DLQ file, the CA bundle) are owner-only
    logs.configure(os.environ.get("CDC_LOG_LEVEL") or "WARNING", os.environ.get("CDC_LOG_FORMAT") or "text")
    redact = logs.Redactor().redact
    try:
        settings = Settings.from_env()
        secrets.trust_storage_ca()
        if args.command == "status":
            return cmd_status(settings, args)
        if args.command == "read":
            return cmd_read(settings, args)
        if args.command == "materialize":
            return cmd_materialize(settings, args)
        if args.command == "maintain":
            return cmd_maintain(settings, args)
        if args.dlq_command == "inspect":
            return cmd_inspect(settings, args)
        return cmd_replay(settings, args)
    except (SettingsError, secrets.SecretFileError) as e:
        print(redact(str(e)), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # a broker or store refusing, say: one line, no secret, no raw traceback
        log.debug("cdc %s failed", args.command, exc_info=True)
        print(redact(f"cdc {args.command}: {type(e).__name__}: {e}"), file=sys.stderr)
        return 1


def run() -> None:
    """The `cdc` command: `main`, then out without the interpreter's teardown.

    After reading tables on S3 through pyarrow, the teardown of its and delta-rs'
    threads can abort the process ("terminate called without an active
    exception") and turn a finished command's exit code into 134.
    """
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
