"""NcclTransport's Python side on CPU: real sockets and threads, a fake NCCL that copies bytes.

torch.cuda is replaced by streams/events that track posted ops, and nccl_lib.Comm by FakeComm:
the two ranks of a unique id pair up, sends and receives match in order and move bytes with
memmove between CPU tensors. This runs the control plane, the reads, the refusals, timeouts and
peers that go away, everything but the GPU (tests/gpu/test_nccl_transport.py does that). Every
test ends with a leak check: nothing registered, no pair, no transport thread left.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import time
import types
from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from pd_serve.kv import nccl, nccl_lib, nccl_peer, nccl_regions
from pd_serve.kv.nccl import NcclConfig, NcclTransport
from pd_serve.kv.transport import Read, TransportError, TransportTimeout

STREAMS: dict[int, FakeStream] = {}


class FakeOp:
    def __init__(self, addr: int, n: int, send: bool) -> None:
        self.addr, self.n, self.send, self.done = addr, n, send, False


class FakeStream:
    def __init__(self, device: Any = None) -> None:
        self.ops: list[FakeOp] = []
        self.cuda_stream = id(self)
        STREAMS[id(self)] = self

    def wait_stream(self, other: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass


class FakeEvent:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.ops: list[FakeOp] = []

    def record(self, stream: FakeStream) -> None:
        self.ops = list(stream.ops)

    def query(self) -> bool:
        return all(op.done for op in self.ops)


class FakeComm:
    """Rank `rank` of the pair named by `uid`; aborting leaves the partner's ops pending, as a
    real kernel would spin for a peer that is gone."""

    lock = threading.Lock()
    pairs: dict[bytes, dict[int, FakeComm]] = {}

    def __init__(self, uid: bytes, rank: int) -> None:
        self.uid, self.rank, self.alive, self.posts = uid, rank, True, 0
        self.queue: deque[FakeOp] = deque()

    @classmethod
    def init(cls, uid: bytes, nranks: int, rank: int) -> FakeComm:
        comm = cls(uid, rank)
        with cls.lock:
            cls.pairs.setdefault(uid, {})[rank] = comm
        return comm

    def in_progress(self) -> bool:
        with self.lock:
            return 1 - self.rank not in self.pairs[self.uid]  # init waits for the partner

    def post(self, recv: bool, base: int, offsets: np.ndarray, lengths: np.ndarray, peer: int,
             stream: int) -> bool:
        assert peer == 1 - self.rank and self.alive
        for off, n in zip(offsets.tolist(), lengths.tolist()):
            op = FakeOp(base + off, n, not recv)
            self.queue.append(op)
            STREAMS[stream].ops.append(op)
        self._match()
        self.posts += 1
        return self.posts % 2 == 1  # every other group "still being enqueued"

    def _match(self) -> None:
        with self.lock:
            pair = self.pairs[self.uid]
            send, recv = pair.get(0), pair.get(1)
            if send is None or recv is None or not (send.alive and recv.alive):
                return
            while send.queue and recv.queue:
                a, b = send.queue.popleft(), recv.queue.popleft()
                assert a.send and not b.send and a.n == b.n, "mismatched send/recv"
                ctypes.memmove(b.addr, a.addr, a.n)
                a.done = b.done = True

    def abort(self) -> None:
        with self.lock:
            self.alive = False
            for op in self.queue:
                op.done = True  # our kernels exit; the partner's keep waiting
            self.queue.clear()


@pytest.fixture(autouse=True)
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    cuda = torch.cuda
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "device_count", lambda: 2)
    monkeypatch.setattr(cuda, "set_device", lambda device: None)
    monkeypatch.setattr(cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(cuda, "Stream", FakeStream)
    monkeypatch.setattr(cuda, "Event", FakeEvent)
    monkeypatch.setattr(cuda, "current_stream", lambda device=None: FakeStream())
    monkeypatch.setattr(cuda, "get_device_properties",
                        lambda device: types.SimpleNamespace(uuid=f"GPU-fake-{device}"))
    monkeypatch.setattr(nccl_lib, "load", lambda: 22805)
    monkeypatch.setattr(nccl_lib, "unique_id", lambda: os.urandom(128))
    monkeypatch.setattr(nccl_peer, "Comm", FakeComm)
    monkeypatch.setattr(nccl_peer, "scratch_tensor",
                        lambda device: torch.zeros(64, dtype=torch.uint8))
    cpu_check = lambda t, device: (int(t.data_ptr()), t.numel() * t.element_size())  # noqa: E731
    monkeypatch.setattr(nccl_regions, "check_tensor", cpu_check)
    monkeypatch.setattr(nccl, "check_tensor", cpu_check)
    yield
    assert [t.name for t in threading.enumerate() if t.name.startswith("pd-nccl")] == []
    STREAMS.clear()
    FakeComm.pairs.clear()


NBYTES = 1 << 20


@pytest.fixture
def pair() -> Iterator[tuple[NcclTransport, NcclTransport, torch.Tensor, int]]:
    """Owner (device 0) serving a patterned region and a reader (device 1)."""
    owner, reader = NcclTransport(NcclConfig(device=0)), NcclTransport(NcclConfig(device=1))
    region = torch.randint(0, 256, (NBYTES,), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))  # [NBYTES]
    handle = owner.register(region)
    yield owner, reader, region, handle
    owner.stall_s = 0.0
    owner.deregister(handle)
    assert owner.num_registered == 0 and reader.num_registered == 0, "test leaked registrations"
    reader.close()
    owner.close()
    assert owner.num_peers == 0 and reader.num_peers == 0


def connect(owner: NcclTransport, reader: NcclTransport, handle: int) -> tuple[Any, Any]:
    peer = reader.connect(owner.conn_id(), 10.0)
    return peer, reader.import_(peer, owner.export(handle))


def test_reads_bulk_per_layer_many_ranges_async_and_raw(pair: Any) -> None:
    owner, reader, region, handle = pair
    peer, remote = connect(owner, reader, handle)
    local = torch.zeros(NBYTES, dtype=torch.uint8)  # [NBYTES]
    h = reader.register(local)
    reader.read_batch(peer, h, remote, [Read(0, 0, NBYTES)], 10.0)
    assert torch.equal(local, region)
    local.zero_()
    eighth = NBYTES // 8  # per-layer style: 8 adjacent ranges
    reader.read_batch(peer, h, remote, [Read(o, o, eighth) for o in range(0, NBYTES, eighth)],
                      10.0)
    assert torch.equal(local, region)
    n = 4096  # 4 groups of MAX_GROUP_OPS, landing in reversed order
    starts = np.arange(n, dtype=np.int64) * (NBYTES // n)
    table = np.stack([starts[::-1], starts, np.full(n, NBYTES // n)], axis=1)
    reader.read_batch(peer, h, remote, table, 10.0)
    assert torch.equal(local.view(n, -1).flip(0).reshape(-1), region)
    read = reader.read_batch_async(peer, h, remote, [Read(0, 0, 64)], 10.0)
    read.wait()
    read.wait()
    owner_peer = owner.accept_peer(5.0)
    raw = torch.zeros(NBYTES, dtype=torch.uint8)  # [NBYTES]
    sender = threading.Thread(target=owner.send_contiguous, args=(owner_peer, region, 10.0))
    sender.start()
    reader.recv_contiguous(peer, raw, 10.0)
    sender.join()
    assert torch.equal(raw, region) and reader.connect(owner.conn_id(), 1.0) is peer
    reader.deregister(h)


def test_bad_input_is_refused_and_the_pair_survives(pair: Any) -> None:
    owner, reader, region, handle = pair
    peer, remote = connect(owner, reader, handle)
    local = torch.zeros(4096, dtype=torch.uint8)  # [4096]
    h = reader.register(local)
    with pytest.raises(TransportError, match="remote range 0 .* outside the 1048576-byte"):
        reader.read_batch(peer, h, remote, [Read(0, NBYTES - 8, 16)], 5.0)
    with pytest.raises(TransportError, match="unknown registration handle 99"):
        reader.read_batch(peer, 99, remote, [Read(0, 0, 16)], 5.0)
    other = NcclTransport(NcclConfig(device=0))
    other_handle = other.register(torch.zeros(8, dtype=torch.uint8))
    with pytest.raises(TransportError, match="another endpoint"):
        reader.import_(peer, other.export(other_handle))
    other.deregister(other_handle)
    other.close()
    with pytest.raises(ValueError, match="timeout_s"):
        reader.read_batch(peer, h, remote, [Read(0, 0, 16)], 0.0)
    reader.read_batch(peer, h, remote, [Read(0, 0, 4096)], 5.0)
    assert torch.equal(local, region[:4096])
    reader.deregister(h)


def test_stale_region_is_refused_by_the_owner_then_a_fresh_pair_works(pair: Any) -> None:
    owner, reader, region, handle = pair
    peer, remote = connect(owner, reader, handle)
    extra = owner.register(torch.zeros(64, dtype=torch.uint8))
    stale = reader.import_(peer, owner.export(extra))
    owner.deregister(extra)
    local = torch.zeros(64, dtype=torch.uint8)  # [64]
    h = reader.register(local)
    with pytest.raises(TransportError, match="reported an error .*unknown registration handle"):
        reader.read_batch(peer, h, stale, [Read(0, 0, 64)], 5.0)
    assert reader.num_peers == 0
    peer, remote = connect(owner, reader, handle)
    reader.read_batch(peer, h, remote, [Read(0, 0, 64)], 5.0)
    assert torch.equal(local, region[:64])
    reader.deregister(h)


def test_silent_owner_times_out_and_nothing_stays_pinned(pair: Any) -> None:
    owner, reader, region, handle = pair
    peer, remote = connect(owner, reader, handle)
    local = torch.zeros(64, dtype=torch.uint8)  # [64]
    h = reader.register(local)
    owner.stall_s = 3.0
    start = time.monotonic()
    with pytest.raises(TransportTimeout, match="timed out"):
        reader.read_batch(peer, h, remote, [Read(0, 0, 64)], 0.5)
    assert 0.5 <= time.monotonic() - start < 2.5 and reader.num_peers == 0
    reader.deregister(h)  # not pinned: returns at once
    owner.stall_s = 0.0
    deadline = time.monotonic() + 10  # the owner drops its side once it notices
    while owner.num_peers and time.monotonic() < deadline:
        time.sleep(0.05)
    assert owner.num_peers == 0


def test_owner_gone_mid_read_is_an_error_not_a_hang() -> None:
    owner, reader = NcclTransport(NcclConfig(device=0)), NcclTransport(NcclConfig(device=1))
    region = torch.ones(4096, dtype=torch.uint8)  # [4096]
    handle = owner.register(region)
    peer, remote = connect(owner, reader, handle)
    local = torch.zeros(4096, dtype=torch.uint8)  # [4096]
    h = reader.register(local)
    owner.stall_s = 1.0
    read = reader.read_batch_async(peer, h, remote, [Read(0, 0, 4096)], 30.0)
    threading.Timer(0.2, owner.close).start()  # as if the process died: sockets close
    start, errors = time.monotonic(), []
    waiter = threading.Thread(target=lambda: errors.append(pytest.raises(TransportError,
                                                                         read.wait)))
    waiter.start()  # another thread than the one that connected watches the socket too
    waiter.join(10.0)
    assert len(errors) == 1 and "closed the control connection" in str(errors[0].value)
    assert not isinstance(errors[0].value, TransportTimeout)
    assert time.monotonic() - start < 5.0 and reader.num_peers == 0
    reader.deregister(h)
    reader.close()
    time.sleep(1.2)  # the owner's serving thread wakes from its stall and exits
    owner.deregister(handle)
    assert owner.num_peers == 0


def test_reader_gone_while_served_releases_the_owner(pair: Any) -> None:
    owner, reader, region, handle = pair
    peer, remote = connect(owner, reader, handle)
    local = torch.zeros(64, dtype=torch.uint8)  # [64]
    h = reader.register(local)
    owner.stall_s = 0.5
    reader.read_batch_async(peer, h, remote, [Read(0, 0, 64)], 30.0)
    peer.close()  # the reader vanishes without waiting
    start = time.monotonic()
    while owner.num_peers and time.monotonic() - start < 10:
        time.sleep(0.05)
    assert owner.num_peers == 0
    reader._regions.unpin(h)  # the abandoned read's pin (a dead process has none)
    reader.deregister(h)


def test_same_device_and_garbage_conn_ids_are_refused() -> None:
    a, b = NcclTransport(NcclConfig(device=0)), NcclTransport(NcclConfig(device=0))
    try:
        with pytest.raises(TransportError, match="NCCL needs two devices"):
            b.connect(a.conn_id(), 5.0)
        with pytest.raises(TransportError, match="not JSON"):
            b.connect(b"cx-tcp/1 127.0.0.1 1 2", 5.0)
    finally:
        a.close()
        b.close()
