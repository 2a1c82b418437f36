"""NcclTransport between two processes on two GPUs: bit-exact reads (bulk, per layer, many small
ranges), async events, raw send/recv, refusals, a silent owner (timeout) and killed peers
(TransportError within the timeout, nothing leaked on the survivor).

The owner (or, in one test, the reader) runs in tests/gpu/nccl_peer_proc.py on GPU 0; this
process is the other side on GPU 1. Every test ends with a leak check: registrations back to 0,
no pair left, no transport thread alive after close.
"""

from __future__ import annotations

import importlib.util
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pd_serve.kv.layout import KVLayout
from pd_serve.kv.nccl import NcclConfig, NcclTransport, nccl_unavailable_reason
from pd_serve.kv.transport import Read, TransportError, TransportTimeout

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
NBYTES = 64 << 20
_spec = importlib.util.spec_from_file_location("nccl_peer_proc", HERE / "nccl_peer_proc.py")
assert _spec is not None and _spec.loader is not None
peer_proc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(peer_proc)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2,
                       reason=f"needs 2 GPUs, {torch.cuda.device_count()} visible"),
    pytest.mark.skipif(nccl_unavailable_reason() is not None,
                       reason=f"NCCL unavailable: {nccl_unavailable_reason()}"),
]


class PeerProc:
    """A nccl_peer_proc.py process driven by JSON lines over stdin/stdout."""

    def __init__(self, *args: str) -> None:
        env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen([sys.executable, str(HERE / "nccl_peer_proc.py"), *args],
                                     cwd=ROOT, env=env, text=True, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE)
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.ready = self.read(180.0)

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)

    def read(self, timeout_s: float = 120.0) -> dict[str, Any]:
        try:
            return dict(json.loads(self._lines.get(timeout=timeout_s)))
        except queue.Empty:
            raise AssertionError(f"peer process said nothing for {timeout_s} s "
                                 f"(exit code {self.proc.poll()})") from None

    def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def ask(self, **cmd: Any) -> dict[str, Any]:
        self.send(**cmd)
        return self.read()

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def finish(self) -> dict[str, Any]:
        report = self.ask(cmd="quit")
        assert self.proc.wait(60) == 0
        return report


def nccl_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("pd-nccl")]


@pytest.fixture
def owner() -> Iterator[PeerProc]:
    proc = PeerProc("owner", "0", str(NBYTES))
    yield proc
    if proc.proc.poll() is None:
        proc.send(cmd="stall", s=0)
        proc.read()
        report = proc.finish()
        assert report == {"num_registered": 0, "threads": []}, report


@pytest.fixture
def reader() -> Iterator[NcclTransport]:
    transport = NcclTransport(NcclConfig(device=1))
    yield transport
    assert transport.num_registered == 0, "test leaked registrations"
    transport.close()
    assert transport.num_peers == 0 and nccl_threads() == [], nccl_threads()


def expected(nbytes: int = NBYTES) -> torch.Tensor:
    return peer_proc.pattern(nbytes, peer_proc.PATTERN_SEED, "cuda:1")  # [nbytes]


def connect(reader: NcclTransport, owner: PeerProc) -> tuple[Any, Any]:
    peer = reader.connect(owner.ready["conn_id"].encode(), 60.0)
    return peer, reader.import_(peer, owner.ready["region"].encode())


def test_bulk_read_is_bit_exact(owner: PeerProc, reader: NcclTransport) -> None:
    peer, remote = connect(reader, owner)
    local = torch.zeros(NBYTES, dtype=torch.uint8, device="cuda:1")  # [NBYTES]
    handle = reader.register(local)
    reader.read_batch(peer, handle, remote, [Read(0, 0, NBYTES)], 30.0)
    assert torch.equal(local, expected())
    assert reader.connect(owner.ready["conn_id"].encode(), 5.0) is peer  # cached pair
    reader.deregister(handle)


def test_per_layer_and_many_small_ranges(owner: PeerProc, reader: NcclTransport) -> None:
    layout = KVLayout(8, 8, 128, "bfloat16", 2, 2048)  # 64 MiB: 8 layers x K|V x 2048 tokens
    assert layout.total_bytes == NBYTES
    peer, remote = connect(reader, owner)
    local = torch.zeros(NBYTES, dtype=torch.uint8, device="cuda:1")  # [NBYTES]
    handle = reader.register(local)
    reader.read_batch(peer, handle, remote, [Read(o, o, n) for o, n in layout.layer_ranges()],
                      30.0)
    assert torch.equal(local, expected())
    blocks = layout.block_fixed_ranges(4)  # 8192 ranges of 8 KiB: several NCCL groups
    perm = np.random.default_rng(0).permutation(len(blocks))  # where each block lands
    size = blocks[0][1]
    reads = np.array([(perm[i] * size, off, n) for i, (off, n) in enumerate(blocks)])
    local.zero_()
    reader.read_batch(peer, handle, remote, reads, 60.0)
    got = local.view(len(blocks), size)[torch.as_tensor(perm, device="cuda:1")]
    assert torch.equal(got.reshape(-1), expected())
    reader.deregister(handle)


def test_async_read_event_feeds_a_compute_stream(owner: PeerProc, reader: NcclTransport) -> None:
    peer, remote = connect(reader, owner)
    local = torch.zeros(NBYTES, dtype=torch.uint8, device="cuda:1")  # [NBYTES]
    handle = reader.register(local)
    read = reader.read_batch_async(peer, handle, remote, [Read(0, 0, NBYTES)], 30.0)
    compute = torch.cuda.Stream(device=1)
    with torch.cuda.stream(compute):
        compute.wait_event(read.event)  # no host wait
        copy = local.clone()  # [NBYTES]
    read.wait()
    compute.synchronize()
    assert torch.equal(copy, expected())
    read.wait()  # waiting again is a no-op
    reader.deregister(handle)


def test_raw_send_recv_on_the_same_pair(owner: PeerProc, reader: NcclTransport) -> None:
    peer, _ = connect(reader, owner)
    local = torch.zeros(NBYTES, dtype=torch.uint8, device="cuda:1")  # [NBYTES]
    owner.send(cmd="raw_send")
    reader.recv_contiguous(peer, local, 60.0)
    assert owner.read() == {"ok": True}
    assert torch.equal(local, expected())


def test_bad_ranges_are_refused_before_anything_moves(owner: PeerProc,
                                                      reader: NcclTransport) -> None:
    peer, remote = connect(reader, owner)
    local = torch.zeros(4096, dtype=torch.uint8, device="cuda:1")  # [4096]
    handle = reader.register(local)
    with pytest.raises(TransportError, match="remote range 0 .* outside the 67108864-byte"):
        reader.read_batch(peer, handle, remote, [Read(0, NBYTES - 8, 16)], 10.0)
    with pytest.raises(TransportError, match="local range 0 .* outside the 4096-byte"):
        reader.read_batch(peer, handle, remote, [Read(4090, 0, 16)], 10.0)
    with pytest.raises(TransportError, match="CUDA tensors, got numpy"):
        reader.register(np.zeros(8, np.uint8))
    reader.read_batch(peer, handle, remote, [Read(0, 4096, 4096)], 10.0)  # the pair survived
    assert torch.equal(local, expected()[4096:8192])
    reader.deregister(handle)


def test_stale_region_is_refused_by_the_owner(owner: PeerProc, reader: NcclTransport) -> None:
    peer, _ = connect(reader, owner)
    stale = reader.import_(peer, owner.ask(cmd="stale")["region"].encode())
    local = torch.zeros(4096, dtype=torch.uint8, device="cuda:1")  # [4096]
    handle = reader.register(local)
    start = time.monotonic()
    with pytest.raises(TransportError, match="unknown registration handle"):
        reader.read_batch(peer, handle, stale, [Read(0, 0, 4096)], 30.0)
    assert time.monotonic() - start < 10.0 and reader.num_peers == 0
    peer, remote = connect(reader, owner)  # a fresh pair
    reader.read_batch(peer, handle, remote, [Read(0, 0, 4096)], 30.0)
    assert torch.equal(local, expected()[:4096])
    reader.deregister(handle)


def test_owner_that_never_answers_times_out(owner: PeerProc, reader: NcclTransport) -> None:
    peer, remote = connect(reader, owner)
    local = torch.zeros(4096, dtype=torch.uint8, device="cuda:1")  # [4096]
    handle = reader.register(local)
    assert owner.ask(cmd="stall", s=8) == {"ok": True}
    start = time.monotonic()
    with pytest.raises(TransportTimeout, match="timed out"):
        reader.read_batch(peer, handle, remote, [Read(0, 0, 4096)], 2.0)
    assert 2.0 <= time.monotonic() - start < 6.0
    assert reader.num_peers == 0
    reader.deregister(handle)  # not pinned any more
    assert owner.ask(cmd="stall", s=0) == {"ok": True}
    handle = reader.register(local)
    peer, remote = connect(reader, owner)
    reader.read_batch(peer, handle, remote, [Read(0, 0, 4096)], 30.0)
    assert torch.equal(local, expected()[:4096])
    reader.deregister(handle)


def test_owner_killed_mid_transfer(owner: PeerProc, reader: NcclTransport) -> None:
    peer, remote = connect(reader, owner)
    local = torch.zeros(NBYTES, dtype=torch.uint8, device="cuda:1")  # [NBYTES]
    handle = reader.register(local)
    assert owner.ask(cmd="stall", s=30) == {"ok": True}
    read = reader.read_batch_async(peer, handle, remote, [Read(0, 0, NBYTES)], 60.0)
    time.sleep(1.0)
    owner.kill()
    start = time.monotonic()
    with pytest.raises(TransportError) as err:
        read.wait()
    assert not isinstance(err.value, TransportTimeout), err.value
    assert time.monotonic() - start < 10.0
    assert reader.num_peers == 0
    reader.deregister(handle)


def test_owner_killed_during_a_large_batch(owner: PeerProc, reader: NcclTransport) -> None:
    peer, remote = connect(reader, owner)
    local = torch.zeros(NBYTES, dtype=torch.uint8, device="cuda:1")  # [NBYTES]
    handle = reader.register(local)
    starts = np.arange(0, NBYTES, 4096, dtype=np.int64)  # 16 Ki ranges of 4 KiB
    table = np.stack([starts, starts, np.full_like(starts, 4096)], axis=1)  # [n, 3]
    read = reader.read_batch_async(peer, handle, remote, table, 60.0)
    owner.kill()
    start = time.monotonic()
    try:
        read.wait()  # it may have finished before the kill landed
    except TransportError:
        assert reader.num_peers == 0
    assert time.monotonic() - start < 30.0
    reader.deregister(handle)


def test_reader_killed_while_the_owner_serves() -> None:
    owner = NcclTransport(NcclConfig(device=0))
    region = peer_proc.pattern(NBYTES, 1, "cuda:0")  # [NBYTES]
    torch.cuda.synchronize(0)
    handle = owner.register(region)
    owner.stall_s = 3.0
    proc = PeerProc("reader", "1", owner.conn_id().decode(), owner.export(handle).decode(),
                    str(NBYTES))
    assert proc.ready == {"connected": True}
    proc.send(cmd="read", chunk=NBYTES)
    assert proc.read() == {"posted": True}
    proc.kill()
    start = time.monotonic()
    owner.deregister(handle)  # waits until the serving thread let go of the region
    while owner.num_peers and time.monotonic() - start < 20.0:
        time.sleep(0.1)
    assert owner.num_peers == 0 and owner.num_registered == 0
    assert time.monotonic() - start < 20.0
    owner.close()
    assert nccl_threads() == []


def test_same_gpu_is_refused(owner: PeerProc) -> None:
    same = NcclTransport(NcclConfig(device=0))
    try:
        with pytest.raises(TransportError, match="NCCL needs two devices"):
            same.connect(owner.ready["conn_id"].encode(), 10.0)
    finally:
        same.close()
