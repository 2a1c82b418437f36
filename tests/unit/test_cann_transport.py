"""cann_ext host TCP transport over real loopback sockets: round trips, batches, tags, failures.

Peers are a second endpoint in this process, a spawned process (multiprocessing), or a raw
Python socket that speaks the wire format (to fake a silent or lying peer). Every test ends
with a leak check: registrations back to 0 and the endpoint closes (no live requests).
"""

from __future__ import annotations

import multiprocessing as mp
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from pd_serve.kv import cann_ext
from pd_serve.kv.cann_ext import CannExtError, Endpoint, Xfer, make_xfers

HDR = struct.Struct("<IHHQIIQQ")  # magic, version, op, id, handle, status, offset, length
DESC = struct.Struct("<IHHQIIQ")  # magic, version, kind, nonce, handle, reserved, length
WIRE_MAGIC, DESC_MAGIC = 0x31575843, 0x444D5843
W_HELLO, W_READ_REQ, W_READ_RESP = 1, 2, 3


def random_bytes(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)  # [n]


def close_clean(*eps: Endpoint) -> None:
    for ep in eps:
        ep.close()  # deregisters what is left; raises CX_ERR_BUSY on a live request
        assert ep._arrays == {}


@pytest.fixture
def pair() -> Iterator[tuple[Endpoint, Endpoint, int, int]]:
    """Listener `a` and connector `b`; pa is b as a's peer, pb is a as b's peer."""
    a, b = Endpoint(timeout_ms=5000), Endpoint(timeout_ms=5000)
    pb = b.connect(a.conn_id())
    pa = a.accept()
    yield a, b, pa, pb
    assert a.num_registered == 0 and b.num_registered == 0, "test leaked registrations"
    close_clean(a, b)


def share(owner: Endpoint, user: Endpoint, peer: int, array: np.ndarray) -> tuple[int, int]:
    """Registers `array` on owner and imports it on user; returns (owner handle, remote)."""
    handle = owner.register(array)
    return handle, user.import_(peer, owner.export(handle))


@pytest.mark.parametrize("size", [1, 3, 4097, 1_000_003])
def test_read_and_write_round_trip(pair: tuple[Endpoint, Endpoint, int, int], size: int) -> None:
    a, b, pa, pb = pair
    src, dst = random_bytes(size, seed=size), np.zeros(size + 8, dtype=np.uint8)
    hs, remote = share(a, b, pb, src)
    hd = b.register(dst)
    b.read(pb, hd, 8, remote, 0, size)
    np.testing.assert_array_equal(dst[8:], src)
    dst[8:] = random_bytes(size, seed=size + 1)
    b.write(pb, hd, 8, remote, 0, size)
    np.testing.assert_array_equal(src, dst[8:])
    a.deregister(hs)
    b.deregister(hd)


def test_64_mib_streamed_both_ways(pair: tuple[Endpoint, Endpoint, int, int]) -> None:
    a, b, pa, pb = pair
    size = 64 << 20
    src, dst = random_bytes(size), np.zeros(size, dtype=np.uint8)
    hs, remote = share(a, b, pb, src)
    hd = b.register(dst)
    b.read(pb, hd, 0, remote, 0, size)
    assert np.array_equal(dst, src)
    dst[: 1 << 20] ^= 0xFF
    b.write(pb, hd, 0, remote, 0, size)
    assert np.array_equal(src, dst)
    a.deregister(hs)
    b.deregister(hd)


def test_batched_many_small_ranges(pair: tuple[Endpoint, Endpoint, int, int]) -> None:
    a, b, pa, pb = pair
    rng = np.random.default_rng(3)
    src = random_bytes(1 << 20, seed=3)
    hs, remote = share(a, b, pb, src)
    n = 3000  # disjoint 1..200-byte destination ranges, random sources
    lengths = rng.integers(1, 201, n)
    dst_off = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    src_off = rng.integers(0, src.size - 200, n)
    dst = np.zeros(int(lengths.sum()), dtype=np.uint8)
    hd = b.register(dst)
    b.wait(b.post(pb, "read", make_xfers(hd, dst_off, lengths, remote, src_off)))
    expected = np.concatenate([src[s : s + k] for s, k in zip(src_off, lengths)])
    np.testing.assert_array_equal(dst, expected)
    # The same batch as a list of Xfer tuples, written back in reverse places.
    xfers = [Xfer(hd, int(d), int(k), remote, int(s)) for d, k, s in zip(dst_off, lengths, src_off)]
    src[:] = 0
    request = b.post(pb, "write", xfers)
    b.wait(request)
    np.testing.assert_array_equal(
        np.concatenate([src[s : s + k] for s, k in zip(src_off, lengths)])[-50:], expected[-50:]
    )
    a.deregister(hs)
    b.deregister(hd)


def test_send_recv_match_by_tag(pair: tuple[Endpoint, Endpoint, int, int]) -> None:
    a, b, pa, pb = pair
    out, inbox = random_bytes(300, seed=5), np.zeros(300, dtype=np.uint8)
    ho, hi = a.register(out), b.register(inbox)
    r2 = b.post(pb, "recv", [Xfer(hi, 100, 200, tag=2)])
    r1 = b.post(pb, "recv", [Xfer(hi, 0, 100, tag=1)])
    a.wait(a.post(pa, "send", [Xfer(ho, 100, 200, tag=2)]))
    assert not b.test(r1)  # tag 1 not sent yet
    a.send(pa, ho, 0, 100, tag=1)
    b.wait(r1)
    b.wait(r2)
    np.testing.assert_array_equal(inbox, out)
    # A length mismatch fails both sides with CX_ERR_OUT_OF_RANGE; the peer keeps working.
    r3 = b.post(pb, "recv", [Xfer(hi, 0, 10, tag=9)])
    with pytest.raises(CannExtError, match="SEND.0. of 20 bytes met a RECV of 10") as err:
        a.send(pa, ho, 0, 20, tag=9)
    assert err.value.status_name == "CX_ERR_OUT_OF_RANGE"
    with pytest.raises(CannExtError, match="peer answered: out of range"):
        b.wait(r3)
    r4 = b.post(pb, "recv", [Xfer(hi, 0, 10, tag=9)])
    a.send(pa, ho, 0, 10, tag=9)
    b.wait(r4)
    a.deregister(ho)
    b.deregister(hi)


def test_refusals_come_back_as_statuses(pair: tuple[Endpoint, Endpoint, int, int]) -> None:
    a, b, pa, pb = pair
    src, dst = random_bytes(1000, seed=7), np.zeros(1000, dtype=np.uint8)
    hs, remote = share(a, b, pb, src)
    hd = b.register(dst)
    # Checked locally before anything moves: one bad range refuses the whole batch.
    with pytest.raises(CannExtError, match=r"xfers\[1\] remote: range \[990, \+20\)") as err:
        b.post(pb, "read", [Xfer(hd, 0, 10, remote, 0), Xfer(hd, 10, 20, remote, 990)])
    assert err.value.status_name == "CX_ERR_OUT_OF_RANGE" and not dst.any()
    with pytest.raises(CannExtError, match="local: range") as err:
        b.read(pb, hd, 999, remote, 0, 2)
    # A descriptor that overstates the length passes the local check; the owner refuses.
    nonce = DESC.unpack(a.export(hs))[3]
    big = b.import_(pb, DESC.pack(DESC_MAGIC, 1, 0, nonce, hs, 0, 1 << 20))
    with pytest.raises(CannExtError, match="peer answered: out of range") as err:
        b.read(pb, hd, 0, big, 999, 2)
    assert err.value.status_name == "CX_ERR_OUT_OF_RANGE"
    with pytest.raises(CannExtError, match="peer answered: out of range"):
        b.write(pb, hd, 0, big, 999, 2)  # its payload is drained: the stream stays framed
    # A deregistered region: unknown handle on the owner's side.
    a.deregister(hs)
    with pytest.raises(CannExtError, match="peer answered: not found") as err:
        b.read(pb, hd, 0, remote, 0, 10)
    assert err.value.status_name == "CX_ERR_NOT_FOUND"
    # The connection still works.
    hs, remote = share(a, b, pb, src)
    b.read(pb, hd, 0, remote, 0, 1000)
    np.testing.assert_array_equal(dst, src)
    a.deregister(hs)
    b.deregister(hd)


def test_stale_descriptor_and_conn_id_refused(pair: tuple[Endpoint, Endpoint, int, int]) -> None:
    a, b, pa, pb = pair
    with Endpoint() as other:
        h = other.register(np.zeros(8, dtype=np.uint8))
        with pytest.raises(CannExtError, match="stale descriptor") as err:
            b.import_(pb, other.export(h))
        assert err.value.status_name == "CX_ERR_NOT_FOUND"
        cid = a.conn_id()
        stale = cid[:-16] + b"%016x" % (int(cid[-16:], 16) ^ 1)
        with pytest.raises(CannExtError, match="stale connection id") as err:
            b.connect(stale)
        assert err.value.status_name == "CX_ERR_CONNECTION"
    with pytest.raises(CannExtError, match="not a host TCP connection id"):
        b.connect(b"tcp:nowhere")


def test_python_argument_checks(pair: tuple[Endpoint, Endpoint, int, int]) -> None:
    a, b, pa, pb = pair
    with pytest.raises(ValueError, match="op must be one of"):
        b.post(pb, "copy", [Xfer(1, 0, 1)])
    with pytest.raises(ValueError, match=r"xfers\[0\].length = -1"):
        b.post(pb, "read", [Xfer(1, 0, -1)])
    with pytest.raises(TypeError, match="must be an int"):
        b.post(pb, "read", [Xfer(1, 0, 1.5)])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one"):
        b.post(pb, "read", [])
    with pytest.raises(ValueError, match="C-contiguous"):
        b.register(np.zeros((4, 4), dtype=np.uint8)[:, ::2])
    with pytest.raises(CannExtError, match="no peer 99"):
        b.post(99, "recv", [Xfer(1, 0, 1)])


def test_destroy_busy_rules_and_pins(pair: tuple[Endpoint, Endpoint, int, int]) -> None:
    a, b, pa, pb = pair
    buf = np.zeros(64, dtype=np.uint8)
    h = b.register(buf)
    lib = cann_ext._lib()
    assert lib.cx_endpoint_destroy(b._ep) == 7  # CX_ERR_BUSY: a registration is live
    assert b"1 registration(s) still live" in lib.cx_last_error()
    request = b.post(pb, "recv", [Xfer(h, 0, 8, tag=4)])
    with pytest.raises(CannExtError, match="in use by 1 posted transfer") as err:
        b.deregister(h)  # the pending RECV pins it
    assert err.value.status_name == "CX_ERR_BUSY"
    with pytest.raises(CannExtError, match="CX_ERR_TIMEOUT"):
        b.wait(request, timeout_ms=50)  # the request stays live
    src = a.register(np.full(8, 3, dtype=np.uint8))
    a.send(pa, src, 0, 8, tag=4)
    a.deregister(src)
    deadline = time.monotonic() + 5
    while b.num_registered:  # the RECV unpins once its bytes landed
        try:
            b.deregister(h)
        except CannExtError:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    assert lib.cx_endpoint_destroy(b._ep) == 7  # CX_ERR_BUSY: the request is not reaped
    assert b"1 request(s) not yet reaped" in lib.cx_last_error()
    b.wait(request)
    assert buf[:8].tolist() == [3] * 8 and not buf[8:].any()


class RawPeer:
    """A listening Python socket that answers HELLO, then runs `script(conn)`: a fake peer."""

    NONCE = 0x5EED

    def __init__(self, script: Callable[[socket.socket], None]) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        port = self.sock.getsockname()[1]
        self.conn_id = f"cx-tcp/1 127.0.0.1 {port} {self.NONCE:016x}".encode()
        self.desc = DESC.pack(DESC_MAGIC, 1, 0, self.NONCE, 1, 0, 1 << 20)
        self.thread = threading.Thread(target=self._run, args=(script,), daemon=True)
        self.thread.start()

    def _run(self, script: Callable[[socket.socket], None]) -> None:
        conn, _ = self.sock.accept()
        with conn:
            hello = HDR.unpack(recv_exact(conn, HDR.size))
            assert hello[:3] == (WIRE_MAGIC, 1, W_HELLO) and hello[6] == self.NONCE
            conn.sendall(HDR.pack(WIRE_MAGIC, 1, W_HELLO, self.NONCE, 0, 0, 0, 0))
            script(conn)
        self.sock.close()


def recv_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        assert chunk, "peer closed"
        data += chunk
    return data


def test_silent_peer_times_out_then_connection_error() -> None:
    release = threading.Event()

    def silent(conn: socket.socket) -> None:
        recv_exact(conn, HDR.size)  # the READ request, never answered
        release.wait(10)

    raw = RawPeer(silent)
    with Endpoint(timeout_ms=5000) as ep:
        peer = ep.connect(raw.conn_id)
        remote = ep.import_(peer, raw.desc)
        h = ep.register(np.zeros(100, dtype=np.uint8))
        request = ep.post(peer, "read", [Xfer(h, 0, 100, remote, 0)])
        start = time.monotonic()
        with pytest.raises(CannExtError, match="not done after 200 ms") as err:
            ep.wait(request, timeout_ms=200)
        assert err.value.status_name == "CX_ERR_TIMEOUT" and time.monotonic() - start < 2
        assert not ep.test(request)
        release.set()  # the raw peer hangs up
        with pytest.raises(CannExtError, match="peer closed the connection") as err:
            ep.wait(request)
        assert err.value.status_name == "CX_ERR_CONNECTION"
        with pytest.raises(CannExtError, match="is gone"):
            ep.post(peer, "read", [Xfer(h, 0, 1, remote, 0)])
        ep.deregister(h)
        assert ep.num_registered == 0


def test_truncated_payload_detected() -> None:
    def liar(conn: socket.socket) -> None:
        req = HDR.unpack(recv_exact(conn, HDR.size))
        assert req[2] == W_READ_REQ and req[7] == 1000
        conn.sendall(HDR.pack(WIRE_MAGIC, 1, W_READ_RESP, req[3], req[4], 0, req[6], 1000))
        conn.sendall(b"x" * 300)  # then hang up: 700 bytes short

    raw = RawPeer(liar)
    with Endpoint(timeout_ms=5000) as ep:
        peer = ep.connect(raw.conn_id)
        remote = ep.import_(peer, raw.desc)
        h = ep.register(np.zeros(1000, dtype=np.uint8))
        with pytest.raises(CannExtError, match="partial transfer: got 300 of 1000") as err:
            ep.read(peer, h, 0, remote, 0, 1000)
        assert err.value.status_name == "CX_ERR_CONNECTION"
        ep.deregister(h)


def test_connect_and_accept_timeouts() -> None:
    raw = socket.create_server(("127.0.0.1", 0))  # accepts in the kernel, never says HELLO
    cid = f"cx-tcp/1 127.0.0.1 {raw.getsockname()[1]} {1:016x}".encode()
    with Endpoint() as ep:
        with pytest.raises(CannExtError, match="did not answer HELLO in 100 ms") as err:
            ep.connect(cid, timeout_ms=100)
        assert err.value.status_name == "CX_ERR_TIMEOUT"
        with pytest.raises(CannExtError, match="call cx_endpoint_conn_id first"):
            ep.accept(timeout_ms=10)
        ep.conn_id()
        with pytest.raises(CannExtError, match="no connection within 50 ms"):
            ep.accept(timeout_ms=50)
    raw.close()


def serve_in_child(conn: mp.connection.Connection, size: int, seed: int) -> None:
    """Child process: registers `size` random bytes, publishes them, serves until told/killed."""
    with Endpoint(timeout_ms=5000) as ep:
        h = ep.register(random_bytes(size, seed))
        conn.send((ep.conn_id(), ep.export(h)))
        conn.recv()


def test_peer_in_another_process_then_killed_mid_transfer() -> None:
    size = 32 << 20
    parent, child = mp.get_context("spawn").Pipe()
    proc = mp.get_context("spawn").Process(target=serve_in_child, args=(child, size, 11))
    proc.start()
    try:
        assert parent.poll(30), "child did not start"
        cid, desc = parent.recv()
        with Endpoint(timeout_ms=10_000) as ep:
            peer = ep.connect(cid)
            remote = ep.import_(peer, desc)
            dst = np.zeros(size, dtype=np.uint8)
            h = ep.register(dst)
            ep.read(peer, h, 0, remote, 0, size)
            assert np.array_equal(dst, random_bytes(size, 11))
            # 64 reads of 32 MiB (2 GiB) take seconds; the peer dies a moment in.
            request = ep.post(peer, "read", make_xfers(h, np.zeros(64, np.int64), size, remote))
            time.sleep(0.05)
            proc.kill()
            start = time.monotonic()
            with pytest.raises(CannExtError) as err:
                ep.wait(request, timeout_ms=5000)
            assert err.value.status_name == "CX_ERR_CONNECTION", err.value
            assert time.monotonic() - start < 5
            ep.deregister(h)
    finally:
        proc.kill()
        proc.join(10)
