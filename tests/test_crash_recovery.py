"""Crash-safe resume: kill -9 at random moments (some inside a changelog commit, some inside a
mirror's round, some inside table maintenance), lost and garbage recovery stores, SIGTERM, and
two pipelines on the same tables. Nothing is lost or repeated."""

from __future__ import annotations

import random
import re
import shutil
import signal
import threading
import time

import pytest

from services.generate import Generator, produce
from tests import harness
from tests.harness import Model, PipelineProcess, assert_exactly_once

pytestmark = pytest.mark.integration


def lake_env(kafka, s3, gen: Generator, bucket: str, tmp_path, **extra: str) -> dict[str, str]:
    return harness.lake_env(kafka.bootstrap, s3.env, gen.topics, bucket, tmp_path, **extra)


# Background commits: a killed process may have batches closed, out of the batcher, and not yet in Delta.
BACKGROUND = pytest.mark.parametrize("background", ["0", "1"], ids=["commits-in-step", "background-commits"])
# Table maintenance after every commit and between every two rounds, retentions of 0: compaction
# and vacuum race nothing but the kills (the default interval is 10 minutes, past these runs).
EAGER_MAINTENANCE = {
    "CDC_MAINTENANCE_INTERVAL_MINUTES": "0",
    "CDC_COMPACT_MIN_FILES": "3",
    "CDC_VACUUM_RETENTION_HOURS": "0",
    "CDC_CHECKPOINT_EVERY": "4",
    "CDC_LOG_RETENTION_HOURS": "0",
}


@BACKGROUND
def test_kill_9_ten_times_with_lost_and_garbage_recovery_stores(kafka, s3, tmp_path, background) -> None:
    rng = random.Random(20261129)
    gen = Generator(collections=3, prefix=f"crash{tmp_path.name[-6:]}", seed=21, doc_bytes=500)
    messages = list(gen.messages(200_000))
    kafka.create_topics(gen.topics, partitions=4)
    model = Model()
    model.apply(messages)
    bucket = s3.bucket("crash")
    maintenance = background == "1"
    extra = EAGER_MAINTENANCE if maintenance else {}
    env = lake_env(kafka, s3, gen, bucket, tmp_path, CDC_BACKGROUND_COMMITS=background, **extra)
    recovery_dir = tmp_path / "recovery"
    log = tmp_path / "pipeline.log"

    # New changes arrive between crashes, and the killed lives never stop at the end of
    # the topic: every life is killed, however fast the pipeline has become.
    lives = 12
    slices = [messages[i * len(messages) // lives : (i + 1) * len(messages) // lives] for i in range(lives)]
    kills = in_commit = in_round = in_maintenance = 0
    deleted_store = garbage_store = False
    deadline = time.monotonic() + 900
    while kills < lives and time.monotonic() < deadline:
        if kills == 4 and not deleted_store:
            shutil.rmtree(recovery_dir)
            deleted_store = True
        if kills == 7 and not garbage_store:
            victim = sorted(recovery_dir.glob("part-*.sqlite3"))[rng.randrange(16)]
            victim.write_bytes(rng.randbytes(4096))
            garbage_store = True
        produce(kafka.bootstrap, iter(slices[kills]))
        p = PipelineProcess({**env, "CDC_STOP_AT_END": "0"}, log)
        if kills % 3 == 0:
            # Aim at the commit window: kill a few milliseconds after a commit begins.
            assert p.commit_begun.wait(timeout=60), "no commit began in 60 s:\n" + p.tail()
            time.sleep(rng.uniform(0.0, 0.15))
            in_commit += 1
        elif kills % 3 == 1:
            # Aim inside a materializer round: its MERGE or append into the mirror, its mark.
            assert p.round_begun.wait(timeout=60), "no mirror round began in 60 s:\n" + p.tail()
            time.sleep(rng.uniform(0.0, 0.4))
            in_round += 1
        elif maintenance:
            # Aim inside maintenance: a compaction, a vacuum or a log clean-up under way.
            assert p.maintenance_begun.wait(timeout=60), "no maintenance began in 60 s:\n" + p.tail()
            time.sleep(rng.uniform(0.0, 0.3))
            in_maintenance += 1
        else:
            time.sleep(rng.uniform(2.0, 8.0))
        assert p.proc.poll() is None, "a pipeline that should run until killed exited:\n" + p.tail()
        p.kill(signal.SIGKILL)
        assert p.wait(30) == -signal.SIGKILL
        kills += 1

    final = PipelineProcess(env, log)
    assert final.wait(900) == 0, final.tail()
    text = log.read_text()
    assert kills == lives, f"only {kills} of {lives} kills in 900 s"
    assert deleted_store and garbage_store
    assert "is missing or empty" in text and "is unusable" in text
    assert "resuming from offset" in text  # partitions resumed from the Delta offsets
    counts = assert_exactly_once(model, gen, bucket, s3.storage_options)
    report = tmp_path.parent / f"crash-report-{background}.txt"
    report.write_text(
        f"kills={kills} in_commit={in_commit} in_round={in_round} in_maintenance={in_maintenance} "
        f"events={len(messages)} changelog={counts}\n"
    )
    print(
        f"\nkill -9 x{kills} ({in_commit} aimed inside a commit, {in_round} inside a mirror round, "
        f"{in_maintenance} inside maintenance), {len(messages)} messages, changelog {counts}"
    )
    assert in_round >= 3
    if maintenance:
        assert in_maintenance >= 3
        done = [line for line in text.splitlines() if "maintained " in line]
        assert any(" 0 files compacted" not in line for line in done), "no compaction happened"
        assert any(" 0 files (0 bytes) vacuumed" not in line for line in done), "no vacuum happened"


@BACKGROUND
def test_sigterm_drains_and_exits_zero_then_resumes(kafka, s3, tmp_path, background) -> None:
    gen = Generator(collections=2, prefix=f"term{tmp_path.name[-6:]}", seed=8, doc_bytes=400)
    messages = list(gen.messages(40_000))
    kafka.create_topics(gen.topics, partitions=3)
    model = Model()
    model.apply(messages)
    bucket = s3.bucket("term")
    # tail: a long-running stream
    env = lake_env(kafka, s3, gen, bucket, tmp_path, CDC_STOP_AT_END="0", CDC_BACKGROUND_COMMITS=background)
    producer = threading.Thread(target=lambda: produce_slowly(kafka.bootstrap, messages, seconds=15))
    producer.start()
    p = PipelineProcess(env, tmp_path / "pipeline.log")
    assert p.commit_begun.wait(timeout=60), "no commit began in 60 s:\n" + p.tail()
    time.sleep(3)
    sent = time.monotonic()
    p.kill(signal.SIGTERM)
    rc = p.wait(90)
    took = time.monotonic() - sent
    assert rc == 0, p.tail()
    assert took < 60
    assert "shutdown on SIGTERM" in "".join(p.lines)
    producer.join()
    again = PipelineProcess(dict(env, CDC_STOP_AT_END="1"), tmp_path / "pipeline.log")
    assert again.wait(300) == 0, again.tail()
    assert_exactly_once(model, gen, bucket, s3.storage_options)


def produce_slowly(bootstrap: str, messages: list, seconds: float) -> None:
    chunks = 30
    size = len(messages) // chunks + 1
    for i in range(chunks):
        produce(bootstrap, iter(messages[i * size : (i + 1) * size]))
        time.sleep(seconds / chunks)


def test_two_pipelines_on_the_same_tables_do_not_corrupt_them(kafka, s3, tmp_path) -> None:
    gen = Generator(collections=2, prefix=f"twin{tmp_path.name[-6:]}", seed=9, doc_bytes=400)
    messages = list(gen.messages(30_000))
    kafka.create_topics(gen.topics, partitions=2)
    produce(kafka.bootstrap, iter(messages))
    model = Model()
    model.apply(messages)
    bucket = s3.bucket("twin")
    runs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        env = lake_env(kafka, s3, gen, bucket, tmp_path / name, CDC_BATCH_MAX_ROWS="1500")
        runs.append(PipelineProcess(env, tmp_path / name / "pipeline.log"))
    for r in runs:
        assert r.wait(600) == 0, r.tail()
    text = "".join(runs[0].lines + runs[1].lines)
    assert_exactly_once(model, gen, bucket, s3.storage_options)
    # They did collide: some commit was refused and retried, or found its events already committed.
    skipped = sum(int(n) for n in re.findall(r"rows, (\d+) skipped", text))
    assert "retrying" in text or skipped > 0
