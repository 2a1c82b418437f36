"""HcclTransport on CPU: the real Python side and the real cann_ext HCCL backend against the fake
libascendcl / libhccl of tests/fake_hccl.py, loaded into this process.

"NPU memory" is host memory (numpy arrays registered as DeviceMemory); the owner (NPU 0) and the
reader (NPU 1) are two transports of this process whose communicators pair up in the fake. This
runs the control plane, the root-info exchange, HCCL's rank order, the join thread, batches of
HcclBatchSendRecv items, events, refusals, timeouts and vanished peers: everything but an NPU.
Every test ends with a leak check: nothing registered, no pair, no transport thread, no
communicator, stream, event or device buffer left in the fake.
"""

from __future__ import annotations

import ctypes
import gc
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pd_serve.kv import hccl_lib
from pd_serve.kv.hccl import DeviceMemory, HcclConfig, HcclTransport
from pd_serve.kv.nccl_wire import ConnId as NcclConnId
from pd_serve.kv.nccl_wire import PeerInfo
from pd_serve.kv.transport import Read, TransportError, TransportTimeout
from tests.fake_hccl import CC, build_fake_hccl

pytestmark = [
    pytest.mark.skipif(CC is None, reason="no C compiler to build the fake libraries"),
    pytest.mark.skipif(not hccl_lib.built(), reason=hccl_lib.NOT_BUILT),
]
NBYTES = 1 << 20


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    acl, hccl = build_fake_hccl(Path(tmp_path_factory.mktemp("fake_hccl")), "full")
    hccl_lib.load(str(acl), str(hccl))  # for the rest of this process: no other copy loads
    lib = ctypes.CDLL(str(hccl))
    lib.fake_acl_live.restype = ctypes.c_int
    return lib


def hccl_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("pd-hccl")]


@pytest.fixture(autouse=True)
def leak_check(fake: ctypes.CDLL) -> Iterator[None]:
    yield
    deadline = time.monotonic() + 10  # detached destroys and stream releases finish
    while time.monotonic() < deadline:
        gc.collect()  # events are destroyed when collected
        if not hccl_threads() and fake.fake_hccl_live() == 0 and fake.fake_acl_live() == 0:
            break
        time.sleep(0.02)
    assert hccl_threads() == []
    assert fake.fake_hccl_live() == 0, "communicators left"
    assert fake.fake_acl_live() == 0, "streams, events or device buffers left"


def memory(array: np.ndarray) -> DeviceMemory:
    return DeviceMemory(array.ctypes.data, array.nbytes, array)


@pytest.fixture
def pair() -> Iterator[tuple[HcclTransport, HcclTransport, np.ndarray, int]]:
    """Owner (NPU 0) serving a patterned region and a reader (NPU 1)."""
    owner, reader = HcclTransport(HcclConfig(device=0)), HcclTransport(HcclConfig(device=1))
    region = np.random.default_rng(0).integers(0, 256, NBYTES, dtype=np.uint8)  # [NBYTES]
    handle = owner.register(memory(region))
    yield owner, reader, region, handle
    owner.stall_s = 0.0
    owner.deregister(handle)
    assert owner.num_registered == 0 and reader.num_registered == 0, "test leaked registrations"
    reader.close()
    owner.close()
    assert owner.num_peers == 0 and reader.num_peers == 0


def connect(owner: HcclTransport, reader: HcclTransport, handle: int) -> tuple[Any, Any]:
    peer = reader.connect(owner.conn_id(), 10.0)
    return peer, reader.import_(peer, owner.export(handle))


def test_reads_bulk_per_layer_many_ranges_async_and_raw(pair: Any) -> None:
    owner, reader, region, handle = pair
    peer, remote = connect(owner, reader, handle)
    assert (peer.rank, peer.reader) == (0, True)  # the reader made the root info: rank 0
    local = np.zeros(NBYTES, np.uint8)  # [NBYTES]
    h = reader.register(memory(local))
    reader.read_batch(peer, h, remote, [Read(0, 0, NBYTES)], 10.0)
    assert np.array_equal(local, region)
    local[:] = 0
    eighth = NBYTES // 8  # per-layer style: 8 adjacent ranges
    reader.read_batch(peer, h, remote, [Read(o, o, eighth) for o in range(0, NBYTES, eighth)],
                      10.0)
    assert np.array_equal(local, region)
    n = 4096  # 4 HcclBatchSendRecv calls of 1024 items, landing in reversed order
    starts = np.arange(n, dtype=np.int64) * (NBYTES // n)
    table = np.stack([starts[::-1], starts, np.full(n, NBYTES // n)], axis=1)
    reader.read_batch(peer, h, remote, table, 10.0)
    assert np.array_equal(local.reshape(n, -1)[::-1].reshape(-1), region)
    read = reader.read_batch_async(peer, h, remote, [Read(0, 0, 64)], 10.0,
                                   local_ready=hccl_lib.Event(1))
    read.wait()
    read.wait()
    assert read.event.query()
    owner_peer = owner.accept_peer(5.0)
    assert (owner_peer.rank, owner_peer.reader) == (1, False)
    raw = np.zeros(NBYTES, np.uint8)  # [NBYTES]
    sender = threading.Thread(target=owner.send_contiguous,
                              args=(owner_peer, memory(region), 10.0))
    sender.start()
    reader.recv_contiguous(peer, memory(raw), 10.0)
    sender.join()
    assert np.array_equal(raw, region) and reader.connect(owner.conn_id(), 1.0) is peer
    reader.deregister(h)


def test_bad_input_is_refused_and_the_pair_survives(pair: Any) -> None:
    owner, reader, region, handle = pair
    peer, remote = connect(owner, reader, handle)
    local = np.zeros(4096, np.uint8)  # [4096]
    h = reader.register(memory(local))
    with pytest.raises(TransportError, match="remote range 0 .* outside the 1048576-byte"):
        reader.read_batch(peer, h, remote, [Read(0, NBYTES - 8, 16)], 5.0)
    with pytest.raises(TransportError, match="unknown registration handle 99"):
        reader.read_batch(peer, 99, remote, [Read(0, 0, 16)], 5.0)
    with pytest.raises(TransportError, match="Ascend device memory .* got numpy.ndarray"):
        reader.register(local)
    with pytest.raises(TransportError, match="overlaps registration"):
        reader.register(DeviceMemory(local.ctypes.data + 8, 8, local))
    with pytest.raises(ValueError, match="timeout_s"):
        reader.read_batch(peer, h, remote, [Read(0, 0, 16)], 0.0)
    reader.read_batch(peer, h, remote, [Read(0, 0, 4096)], 5.0)
    assert np.array_equal(local, region[:4096])
    reader.deregister(h)


def test_stale_region_is_refused_by_the_owner_then_a_fresh_pair_works(pair: Any) -> None:
    owner, reader, region, handle = pair
    peer, remote = connect(owner, reader, handle)
    extra_mem = np.zeros(64, np.uint8)
    extra = owner.register(memory(extra_mem))
    stale = reader.import_(peer, owner.export(extra))
    owner.deregister(extra)
    local = np.zeros(64, np.uint8)  # [64]
    h = reader.register(memory(local))
    with pytest.raises(TransportError, match="reported an error .*unknown registration handle"):
        reader.read_batch(peer, h, stale, [Read(0, 0, 64)], 5.0)
    assert reader.num_peers == 0
    peer, remote = connect(owner, reader, handle)
    reader.read_batch(peer, h, remote, [Read(0, 0, 64)], 5.0)
    assert np.array_equal(local, region[:64])
    reader.deregister(h)


def test_silent_owner_times_out_and_nothing_stays_pinned(pair: Any) -> None:
    owner, reader, region, handle = pair
    peer, remote = connect(owner, reader, handle)
    local = np.zeros(64, np.uint8)  # [64]
    h = reader.register(memory(local))
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
    owner, reader = HcclTransport(HcclConfig(device=0)), HcclTransport(HcclConfig(device=1))
    region = np.ones(4096, np.uint8)  # [4096]
    handle = owner.register(memory(region))
    peer, remote = connect(owner, reader, handle)
    local = np.zeros(4096, np.uint8)  # [4096]
    h = reader.register(memory(local))
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
    local = np.zeros(64, np.uint8)  # [64]
    h = reader.register(memory(local))
    owner.stall_s = 0.5
    reader.read_batch_async(peer, h, remote, [Read(0, 0, 64)], 30.0)
    peer.close()  # the reader vanishes without waiting
    start = time.monotonic()
    while owner.num_peers and time.monotonic() - start < 10:
        time.sleep(0.05)
    assert owner.num_peers == 0
    reader._regions.unpin(h)  # the abandoned read's pin (a dead process has none)
    reader.deregister(h)


def test_failed_join_same_device_and_foreign_ids_are_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = HcclTransport(HcclConfig(device=0)), HcclTransport(HcclConfig(device=0))
    c = HcclTransport(HcclConfig(device=1))
    try:
        with pytest.raises(TransportError, match="on this reader's NPU .*HCCL needs two devices"):
            b.connect(a.conn_id(), 5.0)
        nccl_id = NcclConnId("127.0.0.1", 1, PeerInfo("h", 1, 0, ""), "n").encode()
        with pytest.raises(TransportError, match="not an HCCL connection id .*'pd-nccl/1'"):
            c.connect(nccl_id, 5.0)
        # The reader's join fails; the owner's waits until the reader hangs up, then its
        # abandoned join thread ends after FAKE_HCCL_JOIN_S and frees the record.
        monkeypatch.setenv("FAKE_HCCL_INIT_FAIL", "11")
        monkeypatch.setenv("FAKE_HCCL_FAIL_RANK", "0")
        monkeypatch.setenv("FAKE_HCCL_JOIN_S", "1")
        with pytest.raises(TransportError, match="HCCL error with owner pid .*HcclCommInitRoot"
                                                 "Info failed: HcclResult 11, TCP connect"):
            c.connect(a.conn_id(), 5.0)
        assert c.num_peers == 0
    finally:
        for t in (a, b, c):
            t.close()
