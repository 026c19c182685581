"""A single-node Apache Kafka broker in KRaft mode, run from its Maven jars."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from services import CACHE, ROOT
from services.process import free_port, port_open, spawn, stop_pid, wait_until
from services.tls import ServerCert

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


SCRAM = "SCRAM-SHA-512"
SCRAM_TEXT = re.compile(r"[A-Za-z0-9._~@+-]+")


@dataclass
class Kafka:
    """One broker+controller process; its data survives stop() and start().

    With `tls`, the broker also has a SASL_SSL listener on `sasl_port` (SCRAM-SHA-512,
    server certificate from `tls`); `scram_users` (name -> password) are created when
    the log directory is formatted, so they only apply to a new `data_dir`. The PLAINTEXT
    listener stays (the broker talks to itself on it).
    """

    data_dir: Path
    port: int = field(default_factory=free_port)
    controller_port: int = field(default_factory=free_port)
    heap: str = "512m"
    pid: int | None = None
    tls: ServerCert | None = None
    scram_users: dict[str, str] = field(default_factory=dict, repr=False)
    sasl_port: int | None = None

    def __post_init__(self) -> None:
        if self.tls is not None and self.sasl_port is None:
            self.sasl_port = free_port()
        for name, password in self.scram_users.items():
            # StorageTool's `--add-scram` syntax has no escaping: keep to plain characters.
            if not (SCRAM_TEXT.fullmatch(name) and SCRAM_TEXT.fullmatch(password)):
                raise ValueError(f"SCRAM user {name!r}: name and password must match {SCRAM_TEXT.pattern}")

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def sasl_bootstrap(self) -> str:
        if self.sasl_port is None:
            raise RuntimeError("this broker has no SASL_SSL listener (start it with tls=...)")
        return f"127.0.0.1:{self.sasl_port}"

    def client_config(self, username: str, password: str) -> dict[str, str]:
        """confluent-kafka settings for the SASL_SSL listener (add `bootstrap.servers`: sasl_bootstrap)."""
        if self.tls is None:
            raise RuntimeError("this broker has no SASL_SSL listener (start it with tls=...)")
        return {
            "security.protocol": "SASL_SSL",
            "sasl.mechanisms": SCRAM,
            "sasl.username": username,
            "sasl.password": password,
            "ssl.ca.location": str(self.tls.ca_file),
        }

    def _listener_config(self) -> list[str]:
        plain, ctrl = f"PLAINTEXT://127.0.0.1:{self.port}", f"CONTROLLER://127.0.0.1:{self.controller_port}"
        if self.tls is None:
            return [
                f"listeners={plain},{ctrl}",
                f"advertised.listeners={plain}",
                "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            ]
        sasl = f"SASL_SSL://127.0.0.1:{self.sasl_port}"
        return [
            f"listeners={plain},{sasl},{ctrl}",
            f"advertised.listeners={plain},{sasl}",
            "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL",
            f"sasl.enabled.mechanisms={SCRAM}",
            f"listener.name.sasl_ssl.sasl.enabled.mechanisms={SCRAM}",
            f"listener.name.sasl_ssl.{SCRAM.lower()}.sasl.jaas.config="
            "org.apache.kafka.common.security.scram.ScramLoginModule required;",
            # A PEM keystore (key + certificate in one file): no keytool, no store password.
            "listener.name.sasl_ssl.ssl.keystore.type=PEM",
            f"listener.name.sasl_ssl.ssl.keystore.location={self.tls.keystore()}",
            "listener.name.sasl_ssl.ssl.client.auth=none",
        ]

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
                    *self._listener_config(),
                    "controller.listener.names=CONTROLLER",
                    "inter.broker.listener.name=PLAINTEXT",
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
            scram = [
                arg
                for name, password in self.scram_users.items()
                for arg in ("--add-scram", f"{SCRAM}=[name={name},password={password}]")
            ]
            fmt = subprocess.run(
                # `--cluster-id=` form: a random id may start with "-", which would read as an option.
                self._java(
                    "kafka.tools.StorageTool",
                    "format",
                    f"--cluster-id={cluster_id}",
                    "-c",
                    str(props),
                    *scram,
                ),
                capture_output=True,
                text=True,
                timeout=120,
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
            if not md.brokers:
                return False
        except Exception:
            return False
        if self.tls is None:
            return True
        if not port_open(self.sasl_port):
            return False
        if not self.scram_users:
            return True
        # A SCRAM login over TLS works (the users are in the metadata log by now).
        name, password = next(iter(self.scram_users.items()))
        conf = {
            "bootstrap.servers": self.sasl_bootstrap,
            **self.client_config(name, password),
            "log_level": 0,
        }
        try:
            return bool(AdminClient(conf).list_topics(timeout=2).brokers)
        except Exception:
            return False

    def stop(self) -> None:
        if self.pid is not None:
            stop_pid(self.pid, timeout=60)
            self.pid = None
