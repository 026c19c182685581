"""delta-rs' jemalloc takes the pipeline's default decay, or the operator's own setting."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dataflow.runtime import allocator

ROOT = Path(__file__).resolve().parents[1]

# Import the package (which sets the default), then ask jemalloc to print its options at exit,
# then make delta-rs allocate: the printed options are the ones its allocator runs with.
PROBE = """
import os, sys, tempfile
import dataflow
os.environ["_RJEM_MALLOC_CONF"] += ",stats_print:true,stats_print_opts:mdablxe"
import pyarrow as pa
from deltalake import write_deltalake
write_deltalake(tempfile.mkdtemp(), pa.table({"a": list(range(1000))}))
"""


def dirty_decay_ms(env: dict[str, str]) -> int:
    done = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    found = re.search(r"opt\.dirty_decay_ms: (-?\d+)", done.stderr + done.stdout)
    assert found, "jemalloc printed no options: is deltalake still built with jemalloc?"
    return int(found.group(1))


@pytest.fixture
def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != allocator.ENV}
    env["PYTHONPATH"] = str(ROOT)
    return env


def test_delta_rs_returns_freed_memory_after_one_second_by_default(clean_env: dict[str, str]) -> None:
    assert dirty_decay_ms(clean_env) == 1000


def test_an_operators_setting_is_kept(clean_env: dict[str, str]) -> None:
    assert dirty_decay_ms(clean_env | {allocator.ENV: "dirty_decay_ms:5000"}) == 5000


def test_configure_only_fills_in_what_is_unset() -> None:
    env: dict[str, str] = {}
    assert allocator.configure(env) == allocator.DEFAULT
    assert allocator.configure({allocator.ENV: "narenas:2"}) == "narenas:2"
