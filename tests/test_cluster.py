"""The dataflow as a cluster of 2 processes x 1 worker, as on Kubernetes, against the real services."""

from __future__ import annotations

import signal
import time

import pytest

from services.generate import Generator, produce
from tests.harness import Model, assert_exactly_once, start_cluster
from tests.test_crash_recovery import lake_env

pytestmark = pytest.mark.integration


def setup(kafka, s3, tmp_path, seed: int, events: int):
    gen = Generator(collections=4, prefix=f"cl{tmp_path.name[-6:]}", seed=seed, doc_bytes=500)
    messages = list(gen.messages(events))
    kafka.create_topics(gen.topics, partitions=6)
    produce(kafka.bootstrap, iter(messages))
    model = Model()
    model.apply(messages)
    bucket = s3.bucket("cluster")
    return gen, model, bucket, lake_env(kafka, s3, gen, bucket, tmp_path)


def test_two_processes_produce_the_model(kafka, s3, tmp_path) -> None:
    gen, model, bucket, env = setup(kafka, s3, tmp_path, seed=51, events=60_000)
    procs = start_cluster(env, tmp_path)
    for p in procs:
        assert p.wait(600) == 0, p.tail()
    assert_exactly_once(model, gen, bucket, s3.storage_options)


def test_one_process_killed_then_both_restarted(kafka, s3, tmp_path) -> None:
    gen, model, bucket, env = setup(kafka, s3, tmp_path, seed=52, events=60_000)
    procs = start_cluster(env, tmp_path)
    deadline = time.monotonic() + 120
    while (commits := sum("commit end" in line for p in procs for line in p.lines)) < 6:
        assert time.monotonic() < deadline, f"only {commits} commits in 120 s before the kill"
        time.sleep(0.1)
    procs[1].kill(signal.SIGKILL)
    assert procs[1].wait(30) == -signal.SIGKILL
    # The survivor cannot go on without its peer; it stops (or is stopped) by itself.
    try:
        procs[0].wait(60)
    except Exception:
        procs[0].kill(signal.SIGKILL)
        procs[0].wait(30)
    for p in start_cluster(env, tmp_path):
        assert p.wait(600) == 0, p.tail()
    assert_exactly_once(model, gen, bucket, s3.storage_options)
