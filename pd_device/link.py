"""Link emulation between the device and the cloud: a TCP proxy on real sockets that adds RTT/2
of delay each way, jitter, a bandwidth cap and loss (as retransmission delay).

Model, per direction (bytes are never dropped or reordered, as over TCP):
* a new connection costs one RTT before its first byte moves (the TCP handshake);
* data is cut into segments of `mss` bytes; a token bucket (`bandwidth_bps`, burst
  `burst_bytes`) gives each segment its departure time;
* a segment arrives RTT/2 + jitter (uniform in [-jitter, +jitter]) after it departs;
* a lost segment (probability `loss`) arrives one retransmission timeout later,
  RTO = max(rto_min_s, RTT + 4 * jitter), as TCP resends it; segments behind it wait
  (in-order delivery: arrival times never decrease, head-of-line blocking included).

Lifecycle of a LinkProxy:
1. `LinkProxy(LinkConfig(...))`; `start()` (or `with`) binds the listening socket, served by
   an event loop on a thread of its own; `url` / `port` tell where;
2. each accepted connection opens one upstream connection and pumps both ways;
3. `cut()` resets every open connection at once (a disconnection mid-stream);
   `set_down(True)` resets new connections as they come (an unreachable cloud);
4. `close()` stops listening and resets what is left.
`python -m pd_device.link` and `pd-device link` run one in the foreground.
"""

from __future__ import annotations

import asyncio
import math
import random
import socket
import struct
import threading
from dataclasses import dataclass, field
from typing import Any

MAX_QUEUED_SEGMENTS = 4096  # per direction; the reader waits beyond this (backpressure)


@dataclass(frozen=True)
class LinkConfig:
    """One emulated link. Times in seconds, bandwidth in bits per second (None: unlimited)."""

    upstream_host: str
    upstream_port: int
    listen_host: str = "127.0.0.1"
    listen_port: int = 0
    rtt_s: float = 0.0
    jitter_s: float = 0.0
    bandwidth_bps: float | None = None
    burst_bytes: int = 16384
    loss: float = 0.0
    rto_min_s: float = 0.2
    mss: int = 1448
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("rtt_s", "jitter_s", "rto_min_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if self.bandwidth_bps is not None and not self.bandwidth_bps > 0:
            raise ValueError(f"bandwidth_bps must be positive, got {self.bandwidth_bps!r}")
        if not 0.0 <= self.loss < 1.0:
            raise ValueError(f"loss must be in [0, 1), got {self.loss!r}")
        if self.mss <= 0 or self.burst_bytes < 0:
            raise ValueError("mss must be positive and burst_bytes >= 0")

    @property
    def rto_s(self) -> float:
        return max(self.rto_min_s, self.rtt_s + 4 * self.jitter_s)


class TokenBucket:
    """Departure times at `rate` bytes/s with a burst of `capacity` bytes; a deficit is paid by
    waiting, so departures keep their order."""

    def __init__(self, rate: float | None, capacity: int, now: float) -> None:
        self.rate, self.capacity = rate, capacity
        self.tokens, self.t = float(capacity), now

    def depart(self, nbytes: int, now: float) -> float:
        if self.rate is None:
            return now
        self.tokens = min(self.capacity, self.tokens + (now - self.t) * self.rate)
        self.t = now
        self.tokens -= nbytes
        return now if self.tokens >= 0 else now + -self.tokens / self.rate


@dataclass
class Direction:
    """Schedule of one direction of one connection: arrival time per segment."""

    cfg: LinkConfig
    rng: random.Random
    not_before: float  # the handshake: nothing moves earlier
    bucket: TokenBucket
    last_arrival: float = 0.0
    lost: int = 0

    def arrival(self, nbytes: int, now: float) -> float:
        cfg = self.cfg
        depart = self.bucket.depart(nbytes, max(now, self.not_before))
        jitter = self.rng.uniform(-cfg.jitter_s, cfg.jitter_s) if cfg.jitter_s else 0.0
        t = depart + max(cfg.rtt_s / 2 + jitter, 0.0)
        if cfg.loss and self.rng.random() < cfg.loss:
            self.lost += 1
            t += cfg.rto_s
        self.last_arrival = max(t, self.last_arrival)
        return self.last_arrival


@dataclass
class LinkStats:
    connections: int = 0
    bytes_up: int = 0  # client -> upstream
    bytes_down: int = 0
    segments_lost: int = 0
    writers: set[asyncio.StreamWriter] = field(default_factory=set)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


class LinkProxy:
    """The emulated link as a TCP proxy (see the module docstring)."""

    def __init__(self, cfg: LinkConfig) -> None:
        self.cfg = cfg
        self.stats = LinkStats()
        self._rng = random.Random(cfg.seed)
        self._down = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{self.cfg.listen_host}:{self.port}"

    def start(self) -> LinkProxy:
        """Serves on a thread of its own (returns once listening)."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="link",
                                        daemon=True)
        self._thread.start()
        self._call(self._listen())
        return self

    def cut(self) -> None:
        """Resets every open connection now."""
        self._call(self._reset_all())

    def set_down(self, down: bool) -> None:
        self._down = down

    def close(self) -> None:
        if self._loop is None or self._thread is None:
            return
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
        self._loop = self._thread = None

    def __enter__(self) -> LinkProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, coro: Any) -> Any:
        if self._loop is None:
            raise RuntimeError("the link proxy is not started")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    # ----- event loop side -------------------------------------------------------------------

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.cfg.listen_host,
                                                  self.cfg.listen_port)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def serve_forever(self) -> None:
        """Foreground use (command line): listen and serve until cancelled."""
        await self._listen()
        assert self._server is not None
        await self._server.serve_forever()

    async def _reset_all(self) -> None:
        for w in list(self.stats.writers):
            _reset(w)
        self.stats.writers.clear()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._reset_all()
        tasks = list(self.stats.tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _accept(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        if self._down:
            _reset(cwriter)
            return
        try:
            ureader, uwriter = await asyncio.open_connection(self.cfg.upstream_host,
                                                             self.cfg.upstream_port)
        except OSError:
            _reset(cwriter)
            return
        self.stats.connections += 1
        self.stats.writers.update((cwriter, uwriter))
        task = asyncio.current_task()
        assert task is not None
        self.stats.tasks.add(task)
        now = asyncio.get_running_loop().time()
        up, down = self._direction(now + self.cfg.rtt_s), self._direction(now)
        try:
            await asyncio.gather(self._pump(creader, uwriter, up, "bytes_up"),
                                 self._pump(ureader, cwriter, down, "bytes_down"))
        finally:
            self.stats.segments_lost += up.lost + down.lost
            self.stats.tasks.discard(task)
            for w in (cwriter, uwriter):
                self.stats.writers.discard(w)
                w.close()

    def _direction(self, not_before: float) -> Direction:
        cfg = self.cfg
        rate = None if cfg.bandwidth_bps is None else cfg.bandwidth_bps / 8
        return Direction(cfg, self._rng, not_before,
                         TokenBucket(rate, cfg.burst_bytes, not_before))

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    d: Direction, counter: str) -> None:
        """Forwards one direction; at EOF (after delivering everything) half-closes the other
        side; a reset on either side ends both."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(MAX_QUEUED_SEGMENTS)
        deliver = asyncio.create_task(_deliver(queue, writer))
        try:
            while data := await reader.read(65536):
                setattr(self.stats, counter, getattr(self.stats, counter) + len(data))
                for i in range(0, len(data), self.cfg.mss):
                    seg = data[i:i + self.cfg.mss]
                    await queue.put((d.arrival(len(seg), loop.time()), seg))
        except (ConnectionError, OSError):
            deliver.cancel()
        finally:
            if not deliver.done():
                await queue.put(None)
        try:
            await deliver
        except (asyncio.CancelledError, ConnectionError, OSError):
            _reset(writer)


async def _deliver(queue: asyncio.Queue[tuple[float, bytes] | None],
                   writer: asyncio.StreamWriter) -> None:
    loop = asyncio.get_running_loop()
    while (item := await queue.get()) is not None:
        t, seg = item
        if t > loop.time():
            await asyncio.sleep(t - loop.time())
        writer.write(seg)
        await writer.drain()
    if writer.can_write_eof() and not writer.is_closing():
        writer.write_eof()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Closes with a TCP reset (SO_LINGER 0), as a broken link looks to both peers."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


def parse_hostport(value: str) -> tuple[str, int]:
    """'HOST:PORT' (or ':PORT', meaning 127.0.0.1); ValueError naming the value otherwise."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host or "127.0.0.1", int(port)


if __name__ == "__main__":
    from pd_device.cli import link_main

    link_main()
