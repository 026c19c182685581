"""Running benchmark processes and measuring them: wall, CPU (user+sys), peak RSS, files written."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from deltalake import DeltaTable


@dataclass
class Proc:
    """One finished process: its exit code and resource use (its own and its waited-for children's)."""

    argv: list[str]
    rc: int | None = None
    user_s: float = 0.0
    sys_s: float = 0.0
    peak_rss_mib: float = 0.0  # VmHWM, sampled from /proc every 200 ms (ru_maxrss if never sampled)
    log: str = ""
    timed_out: bool = False
    rss_timeline: list[tuple[float, int]] = field(
        default_factory=list
    )  # (seconds since start, MiB) each ~1 s

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s


@dataclass
class Run:
    """Processes started together; `wall_s` runs from the first start to the last exit."""

    procs: list[Proc] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return all(p.rc == 0 and not p.timed_out for p in self.procs)

    @property
    def cpu_s(self) -> float:
        return sum(p.cpu_s for p in self.procs)

    @property
    def peak_rss_mib(self) -> float:
        """The largest single process (the 1 GiB target is per process)."""
        return max((p.peak_rss_mib for p in self.procs), default=0.0)

    @property
    def total_rss_mib(self) -> float:
        return sum(p.peak_rss_mib for p in self.procs)


def _vm_kib(pid: int) -> tuple[int, int] | None:
    """(VmHWM, VmRSS) in KiB, None once the process is gone."""
    hwm = rss = None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
                elif line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
    except OSError:
        return None
    return (hwm, rss) if hwm is not None and rss is not None else None


class Running:
    """Started processes, sampled every 200 ms, reaped with `os.wait4` for their rusage."""

    def __init__(self, commands: list[tuple[list[str], dict[str, str]]], log_dir: Path, cwd: Path) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        self.popens: list[subprocess.Popen] = []
        self.procs: list[Proc] = []
        self.hwm: dict[int, int] = {}
        for i, (argv, env) in enumerate(commands):
            log = log_dir / f"process-{i}.log"
            with open(log, "ab") as out:
                p = subprocess.Popen(
                    argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
                )
            self.popens.append(p)
            self.procs.append(Proc(argv=argv, log=str(log)))
        self._done = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        next_mark = 0.0
        while not self._done.is_set():
            elapsed = time.monotonic() - self.started
            for p, rec in zip(self.popens, self.procs, strict=True):
                if rec.rc is None and (v := _vm_kib(p.pid)) is not None:
                    self.hwm[p.pid] = max(self.hwm.get(p.pid, 0), v[0])
                    if elapsed >= next_mark:
                        rec.rss_timeline.append((round(elapsed, 1), v[1] // 1024))
            if elapsed >= next_mark:
                next_mark = elapsed + 1.0
            self._done.wait(0.2)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        for p, rec in zip(self.popens, self.procs, strict=True):
            if rec.rc is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, sig)

    def alive(self) -> bool:
        self._reap(block=False)
        return any(rec.rc is None for rec in self.procs)

    def _reap(self, block: bool) -> None:
        for p, rec in zip(self.popens, self.procs, strict=True):
            if rec.rc is not None:
                continue
            try:
                pid, status, ru = os.wait4(p.pid, 0 if block else os.WNOHANG)
            except ChildProcessError:
                rec.rc = p.returncode if p.returncode is not None else -1
                continue
            if pid == 0:
                continue
            rec.rc = os.waitstatus_to_exitcode(status)
            p.returncode = rec.rc  # reaped here, so Popen must not wait for it again
            rec.user_s, rec.sys_s = ru.ru_utime, ru.ru_stime
            # VmHWM belongs to the process's own memory map after exec. ru_maxrss does not: Linux
            # carries the pre-exec high-water mark over, i.e. the size of this (forking) process.
            rec.peak_rss_mib = (self.hwm.get(p.pid) or ru.ru_maxrss) / 1024  # KiB

    def wait(self, timeout: float) -> Run:
        """Until every process exits; past `timeout`, SIGTERM, then SIGKILL 30 s later."""
        deadline = self.started + timeout
        try:
            while self.alive() and time.monotonic() < deadline:
                time.sleep(0.05)
        except BaseException:  # ^C or an error in the benchmark: leave no process behind
            self.signal(signal.SIGKILL)
            self._reap(block=True)
            raise
        if self.alive():
            for rec in self.procs:
                rec.timed_out = rec.rc is None
            self.signal(signal.SIGTERM)
            kill_at = time.monotonic() + 30
            while self.alive() and time.monotonic() < kill_at:
                time.sleep(0.1)
            self.signal(signal.SIGKILL)
            self._reap(block=True)
        wall = time.monotonic() - self.started
        self._done.set()
        self._sampler.join(timeout=2)
        return Run(self.procs, wall)


def run_processes(
    commands: list[tuple[list[str], dict[str, str]]], *, log_dir: Path, cwd: Path, timeout: float
) -> Run:
    return Running(commands, log_dir, cwd).wait(timeout)


@dataclass
class Files:
    data_files: int = 0
    data_bytes: int = 0
    log_files: int = 0
    log_bytes: int = 0


def list_files(s3, bucket: str, prefix: str) -> Files:
    """Objects under `bucket/prefix`: Parquet data files apart from the `_delta_log`."""
    out = Files()
    for obj in s3.list_objects(bucket, prefix=prefix.rstrip("/") + "/", recursive=True):
        if "/_delta_log/" in obj.object_name:
            out.log_files += 1
            out.log_bytes += obj.size or 0
        elif obj.object_name.endswith(".parquet"):
            out.data_files += 1
            out.data_bytes += obj.size or 0
    return out


def delta_rows(uri: str, storage_options: dict[str, str]) -> int | None:
    """Rows in the table's current version, from the add actions' statistics (no data read)."""
    try:
        actions = DeltaTable(uri, storage_options=storage_options).get_add_actions(flatten=True)
    except Exception:
        return None
    column = actions.column("num_records")
    return int(sum(v for v in column.to_pylist() if v is not None))
