"""A loopback link emulator: a TCP proxy on 127.0.0.1 that makes the edge-cloud link worse on command.

Put between an edge and a replica's gRPC port (`LinkEmulator(target).start()`, then connect to its
`address`), it adds a one-way latency to every byte each way, caps the bandwidth of each direction
(bytes queue behind each other, as on a slow uplink), and on `outage()` cuts every connection and
refuses new ones until `restore()`, as a lost route does. It counts the bytes it delivers each way,
so tests and the benchmark read what crossed the wire (gRPC and TLS framing included). It runs its
own asyncio loop on a daemon thread; the settings may change while connections are open and apply
to bytes read from then on.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import dataclass

CHUNK = 64 * 1024


@dataclass(frozen=True)
class LinkConditions:
    latency_s: float = 0.0  # one way: a round trip takes twice this
    bandwidth_bytes_per_s: float | None = None  # per direction; None: as fast as loopback

    def __post_init__(self) -> None:
        if self.latency_s < 0 or (self.bandwidth_bytes_per_s is not None and self.bandwidth_bytes_per_s <= 0):
            raise ValueError(f"latency must be >= 0 and bandwidth > 0, got {self}")


def delivery_time(read_at: float, size: int, busy_until: float, conditions: LinkConditions) -> tuple[float, float]:
    """When bytes read at `read_at` arrive, and until when the direction is busy sending them:
    they wait for the bytes ahead (`busy_until`), take size / bandwidth to send, then the latency."""
    sent = read_at if conditions.bandwidth_bytes_per_s is None else max(read_at, busy_until) + size / conditions.bandwidth_bytes_per_s
    return sent + conditions.latency_s, sent


class LinkEmulator:
    def __init__(self, target: str, conditions: LinkConditions = LinkConditions()) -> None:
        host, _, port = target.rpartition(":")
        self.target = (host or "127.0.0.1", int(port))
        self.conditions = conditions
        self.bytes_up = 0  # towards the target (the edge's uplink)
        self.bytes_down = 0
        self.connections = 0  # accepted while the link was up
        self._down = False
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> LinkEmulator:
        started = threading.Event()

        def run() -> None:
            loop = self._loop
            asyncio.set_event_loop(loop)
            self._server = loop.run_until_complete(asyncio.start_server(self._accept, "127.0.0.1", 0))
            self.port = self._server.sockets[0].getsockname()[1]
            started.set()
            loop.run_forever()
            tasks = asyncio.all_tasks(loop)  # the connections' tasks: cancelled, then awaited, then the loop closes
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.close()

        self._thread = threading.Thread(target=run, name="collm-link-emulator", daemon=True)
        self._thread.start()
        started.wait()
        return self

    def set(self, conditions: LinkConditions) -> None:
        self.conditions = conditions

    def outage(self) -> None:
        """Cut every open connection and refuse new ones until restore()."""
        self._down = True
        self._call(self._cut_all)

    def restore(self) -> None:
        self._down = False

    def stop(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._call(self._shutdown)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    def __enter__(self) -> LinkEmulator:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _call(self, coroutine_function) -> None:
        asyncio.run_coroutine_threadsafe(coroutine_function(), self._loop).result(timeout=10)

    async def _cut_all(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._cut_all()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._down:
            writer.transport.abort()
            return
        try:
            target_reader, target_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.connections += 1
        self._writers |= {writer, target_writer}
        pipes = [asyncio.create_task(self._pipe(reader, target_writer, up=True)), asyncio.create_task(self._pipe(target_reader, writer, up=False))]
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)  # one side closed: close both
        finally:
            for task in pipes:
                task.cancel()
            for w in (writer, target_writer):
                self._writers.discard(w)
                w.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, up: bool) -> None:
        """Copy one direction, each chunk delivered at its `delivery_time`, in order."""
        loop = asyncio.get_running_loop()
        pending: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        busy_until = 0.0

        async def deliver() -> None:
            while (item := await pending.get()) is not None:
                at, data = item
                if (delay := at - loop.time()) > 0:
                    await asyncio.sleep(delay)
                writer.write(data)
                await writer.drain()
                if up:
                    self.bytes_up += len(data)
                else:
                    self.bytes_down += len(data)

        sender = asyncio.create_task(deliver())
        try:
            while data := await reader.read(CHUNK):
                at, busy_until = delivery_time(loop.time(), len(data), busy_until, self.conditions)
                pending.put_nowait((at, data))
            pending.put_nowait(None)
            await sender
        except (ConnectionError, OSError):
            pass
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                await sender
