"""A single-node Apache Kafka broker in KRaft mode, run from its Maven jars."""

from __future__ import annotations

import base64
import shutil
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from services import CACHE, ROOT
from services.process import free_port, port_open, spawn, stop_pid, wait_until

POM = ROOT / "services" / "kafka-jars" / "pom.xml"
LIBS = CACHE / "kafka" / "libs"

LOG4J2 = """\
status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = {log}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
logger.kafka.name = kafka
logger.kafka.level = WARN
logger.apache.name = org.apache.kafka
logger.apache.level = WARN
"""


def install() -> Path:
    """Resolve the broker's jars into the cache once; later calls reuse them."""
    marker = LIBS / ".complete"
    if marker.exists():
        return LIBS
    if shutil.which("mvn") is None or shutil.which("java") is None:
        raise RuntimeError("Kafka needs Java 17+ and Maven (mvn) on PATH")
    tmp = LIBS.with_name("libs.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run(
        [
            "mvn",
            "-q",
            "-B",
            "-f",
            str(POM),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={tmp}",
            "-DincludeScope=runtime",
        ],
        check=True,
    )
    shutil.rmtree(LIBS, ignore_errors=True)
    tmp.rename(LIBS)
    marker.touch()
    return LIBS


@dataclass
class Kafka:
    """One broker+controller process; its data survives stop() and start()."""

    data_dir: Path
    port: int = field(default_factory=free_port)
    controller_port: int = field(default_factory=free_port)
    heap: str = "512m"
    pid: int | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.data_dir / "server.log"

    def _write_config(self) -> Path:
        logs = self.data_dir / "logs"
        props = self.data_dir / "server.properties"
        props.write_text(
            "\n".join(
                [
                    "process.roles=broker,controller",
                    "node.id=1",
                    f"controller.quorum.voters=1@127.0.0.1:{self.controller_port}",
                    f"listeners=PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
                    f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.port}",
                    "controller.listener.names=CONTROLLER",
                    "inter.broker.listener.name=PLAINTEXT",
                    "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
                    f"log.dirs={logs}",
                    "num.partitions=4",
                    "offsets.topic.replication.factor=1",
                    "transaction.state.log.replication.factor=1",
                    "transaction.state.log.min.isr=1",
                    "share.coordinator.state.topic.replication.factor=1",
                    "share.coordinator.state.topic.min.isr=1",
                    "group.initial.rebalance.delay.ms=0",
                    "auto.create.topics.enable=false",
                    "log.retention.hours=-1",
                    "message.max.bytes=33554432",
                    "replica.fetch.max.bytes=33554432",
                    "",
                ]
            )
        )
        (self.data_dir / "log4j2.properties").write_text(LOG4J2.format(log=self.log))
        return props

    def _java(self, *args: str) -> list[str]:
        return [
            "java",
            f"-Xmx{self.heap}",
            f"-Xms{self.heap}",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.data_dir / 'log4j2.properties'}",
            "-cp",
            f"{install()}/*",
            *args,
        ]

    def start(self, timeout: float = 90.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        props = self._write_config()
        if not (self.data_dir / "logs" / "meta.properties").exists():
            cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
            fmt = subprocess.run(
                # `--cluster-id=` form: a random id may start with "-", which would read as an option.
                self._java(
                    "kafka.tools.StorageTool", "format", f"--cluster-id={cluster_id}", "-c", str(props)
                ),
                capture_output=True,
                text=True,
            )
            if fmt.returncode != 0:
                raise RuntimeError(f"formatting the Kafka log directory failed:\n{fmt.stdout}{fmt.stderr}")
        proc = spawn(self._java("kafka.Kafka", str(props)), log=self.data_dir / "stdout.log")
        self.pid = proc.pid
        wait_until(self.ready, timeout=timeout, what="Kafka", proc=proc, log=self.log)

    def ready(self) -> bool:
        """The broker answers a metadata request (not just an open port)."""
        if not port_open(self.port):
            return False
        from confluent_kafka.admin import AdminClient

        try:
            md = AdminClient({"bootstrap.servers": self.bootstrap}).list_topics(timeout=2)
            return bool(md.brokers)
        except Exception:
            return False

    def stop(self) -> None:
        if self.pid is not None:
            stop_pid(self.pid, timeout=60)
            self.pid = None
