"""`python -m services start|stop|status`: Kafka and MinIO for a laptop session.

`start` runs both in the background with their data under `.cache/run/` and
writes `.services.env` (shell `export` lines) for the pipeline, the tests and
the benchmarks to source. `stop` shuts them down cleanly; data is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

from services import CACHE, ROOT
from services.kafka import Kafka
from services.minio import MinIO
from services.process import pid_alive, port_open, stop_pid

RUN = CACHE / "run"
STATE = RUN / "services.json"
ENV_FILE = ROOT / ".services.env"


def _load() -> dict | None:
    try:
        state = json.loads(STATE.read_text())
    except (OSError, ValueError):
        return None
    return state if all(pid_alive(p) for p in state["pids"].values()) else None


def _port(var: str, default: int) -> int:
    port = int(os.environ.get(var, default))
    if port_open(port):
        raise SystemExit(f"port {port} is taken; set {var} to another port")
    return port


def start() -> None:
    if (state := _load()) is not None:
        print(f"services already running: {ENV_FILE} ({', '.join(state['pids'])})")
        return
    RUN.mkdir(parents=True, exist_ok=True)
    minio_creds = RUN / "minio-credentials.json"
    minio = MinIO(
        RUN / "minio-data", port=_port("MINIO_PORT", 9000), console_port=_port("MINIO_CONSOLE_PORT", 9001)
    )
    # Credentials are generated once per data folder and kept beside it (not in git).
    if minio_creds.exists():
        creds = json.loads(minio_creds.read_text())
        minio.access_key, minio.secret_key = creds["access_key"], creds["secret_key"]
    else:
        minio_creds.write_text(json.dumps({"access_key": minio.access_key, "secret_key": minio.secret_key}))
        minio_creds.chmod(0o600)
    kafka = Kafka(
        RUN / "kafka", port=_port("KAFKA_PORT", 9092), controller_port=_port("KAFKA_CONTROLLER_PORT", 9093)
    )
    print("starting MinIO ...", flush=True)
    minio.start()
    print("starting Kafka ...", flush=True)
    try:
        kafka.start()
    except BaseException:
        minio.stop()
        raise
    env = {"CDC_KAFKA_BROKERS": kafka.bootstrap, **minio.env()}
    ENV_FILE.write_text("".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items()))
    ENV_FILE.chmod(0o600)
    STATE.write_text(json.dumps({"pids": {"kafka": kafka.pid, "minio": minio.pid}}))
    print(f"Kafka on {kafka.bootstrap}, MinIO on {minio.endpoint}; `source {ENV_FILE.name}` to use them")


def stop() -> None:
    try:
        state = json.loads(STATE.read_text())
    except (OSError, ValueError):
        print("no services recorded as running")
        return
    for name, pid in state["pids"].items():
        print(f"stopping {name} (pid {pid})", flush=True)
        stop_pid(pid)
    STATE.unlink(missing_ok=True)
    ENV_FILE.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["start", "stop", "install", "status"])
    args = parser.parse_args(argv)
    if args.command == "install":
        from services import kafka, minio

        print(kafka.install())
        print(minio.install())
    elif args.command == "start":
        start()
    elif args.command == "stop":
        stop()
    else:
        state = _load()
        print("running" if state else "not running")
        return 0 if state else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
