"""A fault-injecting HTTP proxy in front of MinIO, on 127.0.0.1.

Each request is forwarded on a fresh upstream connection (`Connection: close`),
or, while faults are on, answered with `503 SlowDown` at the configured rate,
the way S3 throttles. Bounded: it serves only while the test runs.
"""

from __future__ import annotations

import asyncio
import random
import threading

from services.process import free_port

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


class FaultProxy:
    def __init__(self, upstream_port: int, *, fail_ratio: float = 0.0, seed: int = 1) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.fail_ratio = fail_ratio
        self.rng = random.Random(seed)
        self.requests = 0
        self.failed = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", self.port))
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.split(b"\r\n")
                length, chunked = 0, False
                kept = [lines[0]]
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    lname = name.strip().lower()
                    if lname == b"content-length":
                        length = int(value.strip())
                    elif lname == b"transfer-encoding" and b"chunked" in value.lower():
                        chunked = True
                    if lname in (b"connection", b"keep-alive") or not line:
                        continue
                    kept.append(line)
                if chunked:
                    raise ConnectionError("chunked request bodies are not supported by this proxy")
                body = await reader.readexactly(length) if length else b""
                self.requests += 1
                if self.rng.random() < self.fail_ratio:
                    self.failed += 1
                    writer.write(
                        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\n"
                        b"Content-Length: %d\r\nRetry-After: 1\r\n\r\n%s" % (len(SLOW_DOWN), SLOW_DOWN)
                    )
                    await writer.drain()
                    continue
                await self._forward(b"\r\n".join([*kept, b"Connection: close", b"", b""]) + body, writer)
                return  # the upstream answered with Connection: close; so do we
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _forward(self, request: bytes, client: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        try:
            up_writer.write(request)
            await up_writer.drain()
            while chunk := await up_reader.read(65536):
                client.write(chunk)
                await client.drain()
        finally:
            up_writer.close()
