"""The link emulator (pd_device/link.py): bytes arrive intact and in order through delay,
jitter, bandwidth cap and loss; the delays are at least what the model says; cut and down
links look like broken connections; the schedule's properties hold (hypothesis); the command
line runs it as a process."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pd_device.link import Direction, LinkConfig, LinkProxy, TokenBucket, parse_hostport

REPO = Path(__file__).resolve().parents[2]


class FakeEchoServer:
    """Echoes every connection's bytes back until the peer closes (one thread per client)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def echo() -> Iterator[FakeEchoServer]:
    server = FakeEchoServer()
    yield server
    server.close()


def _link(echo: FakeEchoServer, **kw: object) -> LinkProxy:
    return LinkProxy(LinkConfig(upstream_host="127.0.0.1", upstream_port=echo.port,
                                seed=1, **kw))  # type: ignore[arg-type]


def _roundtrip(port: int, payload: bytes, timeout: float = 30.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        got = bytearray()
        sender = threading.Thread(target=s.sendall, args=(payload,))
        sender.start()
        while len(got) < len(payload):
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        sender.join()
        return bytes(got)


def test_bytes_arrive_intact_through_every_impairment(echo: FakeEchoServer) -> None:
    payload = random.Random(0).randbytes(300_000)
    with _link(echo, rtt_s=0.01, jitter_s=0.004, bandwidth_bps=80e6, loss=0.2,
               rto_min_s=0.01) as link:
        assert _roundtrip(link.port, payload) == payload
        time.sleep(0.05)
        assert link.stats.bytes_up == link.stats.bytes_down == len(payload)
    assert link.stats.segments_lost > 0


def test_rtt_and_handshake_are_added(echo: FakeEchoServer) -> None:
    rtt = 0.1
    with _link(echo, rtt_s=rtt) as link, socket.create_connection(
            ("127.0.0.1", link.port), timeout=10) as s:
        t0 = time.monotonic()
        s.sendall(b"x")
        assert s.recv(1) == b"x"
        first = time.monotonic() - t0
        t0 = time.monotonic()
        s.sendall(b"y")
        assert s.recv(1) == b"y"
        second = time.monotonic() - t0
    assert first >= 2 * rtt  # handshake + one round trip
    assert second >= rtt


def test_bandwidth_cap_is_a_lower_bound_on_transfer_time(echo: FakeEchoServer) -> None:
    n, bps, burst = 100_000, 4e6, 16384
    with _link(echo, bandwidth_bps=bps, burst_bytes=burst) as link:
        t0 = time.monotonic()
        assert len(_roundtrip(link.port, bytes(n))) == n
        elapsed = time.monotonic() - t0
    assert elapsed >= (n - burst) * 8 / bps  # each direction is capped; one bound suffices


def test_cut_resets_open_connections(echo: FakeEchoServer) -> None:
    with _link(echo) as link, socket.create_connection(("127.0.0.1", link.port), timeout=10) as s:
        s.sendall(b"ping")
        assert s.recv(4) == b"ping"
        link.cut()
        with pytest.raises(OSError):
            for _ in range(100):  # a reset shows on recv or on a later send
                if not s.recv(1):
                    raise ConnectionResetError("closed")
                s.sendall(b"x")
        assert not link.stats.writers


def test_a_down_link_refuses_new_connections(echo: FakeEchoServer) -> None:
    with _link(echo) as link:
        link.set_down(True)
        # the reset may land before connect() returns to us (seen on a loaded machine), or on
        # the first send or receive after it
        with pytest.raises(OSError), socket.create_connection(
                ("127.0.0.1", link.port), timeout=10) as s:
            s.sendall(b"x")
            if not s.recv(1):
                raise ConnectionResetError("closed")
        link.set_down(False)
        assert _roundtrip(link.port, b"back") == b"back"


def test_unreachable_upstream_resets_the_client() -> None:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    with LinkProxy(LinkConfig("127.0.0.1", port)) as link, pytest.raises(OSError), \
            socket.create_connection(("127.0.0.1", link.port), timeout=10) as s:
        s.sendall(b"x")  # the reset may already come on connect, as for a down link
        if not s.recv(1):
            raise ConnectionResetError("closed")


@given(st.floats(0.0, 0.5), st.floats(0.0, 0.1), st.one_of(st.none(), st.floats(1e3, 1e9)),
       st.floats(0.0, 0.9), st.lists(st.tuples(st.integers(1, 1448), st.floats(0.0, 0.01)),
                                     max_size=50), st.integers(0, 2**32))
def test_schedule_is_in_order_delayed_and_rate_limited(
        rtt: float, jitter: float, bps: float | None, loss: float,
        segs: list[tuple[int, float]], seed: int) -> None:
    cfg = LinkConfig("h", 1, rtt_s=rtt, jitter_s=jitter, bandwidth_bps=bps, loss=loss)
    rate = None if bps is None else bps / 8
    d = Direction(cfg, random.Random(seed), 0.0, TokenBucket(rate, cfg.burst_bytes, 0.0))
    now, last, sent = 0.0, 0.0, 0
    for nbytes, wait in segs:
        now += wait
        t = d.arrival(nbytes, now)
        sent += nbytes
        assert t >= last  # in order
        assert t >= now + max(rtt / 2 - jitter, 0.0) - 1e-9  # never faster than the wire
        if rate is not None:  # what has arrived fits the bucket's budget
            assert sent <= cfg.burst_bytes + rate * t + 1e-6
        last = t


def test_config_and_address_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="loss"):
        LinkConfig("h", 1, loss=1.0)
    with pytest.raises(ValueError, match="rtt_s"):
        LinkConfig("h", 1, rtt_s=-1)
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_hostport("nohost")
    assert parse_hostport(":80") == ("127.0.0.1", 80)


def test_command_line_runs_the_link_as_a_process(echo: FakeEchoServer) -> None:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pd_device.link", "--listen", f"127.0.0.1:{port}", "--upstream",
         f"127.0.0.1:{echo.port}", "--rtt-ms", "20"], cwd=REPO, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert proc.stderr is not None
        assert b"link:" in proc.stderr.readline()
        t0 = time.monotonic()
        assert _roundtrip(port, b"hello") == b"hello"
        assert time.monotonic() - t0 >= 0.04
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
