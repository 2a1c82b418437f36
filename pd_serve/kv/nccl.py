"""The NCCL transport: one-sided READs of CUDA tensors between GPUs over 2-rank communicators.

P2PTransport (pd_serve.kv.p2p_transport: the lifecycle, the control plane, the reads) on CUDA:
`register` takes a contiguous CUDA tensor of the transport's device (any dtype; ranges are
bytes); host arrays raise TransportError. The reader makes the ncclUniqueId and joins as rank
1, the owner as rank 0; both communicators are non-blocking (NCCL_NVLS_ENABLE=0 unless set).
`set_ready_event` and `read_batch_async(local_ready=...)` take torch.cuda.Event objects; without
`local_ready` the transfer stream waits for the caller's current stream. The read's `event` is a
torch.cuda.Event a compute stream may wait on.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from pd_serve.kv import nccl_lib
from pd_serve.kv.nccl_config import NcclConfig, nccl_unavailable_reason, peer_info
from pd_serve.kv.nccl_peer import NcclPeer
from pd_serve.kv.nccl_read import NcclRead
from pd_serve.kv.nccl_regions import Regions, check_tensor
from pd_serve.kv.nccl_wire import ConnId, PeerInfo, RegionDesc
from pd_serve.kv.p2p_peer import P2PPeer
from pd_serve.kv.p2p_read import P2PRead
from pd_serve.kv.p2p_transport import P2PTransport
from pd_serve.kv.transport import TransportError

__all__ = ["NcclConfig", "NcclRead", "NcclTransport", "nccl_unavailable_reason"]


class NcclTransport(P2PTransport):
    """The NCCL transport (see the module docstring)."""

    BACKEND = "NCCL"
    DEVICE_NAME = "GPU"
    PEER = NcclPeer
    CONN_ID = ConnId
    REGION_DESC = RegionDesc

    def __init__(self, config: NcclConfig | None = None) -> None:
        super().__init__(config or NcclConfig())

    def _unavailable_reason(self, device: int) -> str | None:
        reason = nccl_unavailable_reason(device)
        if reason is None:
            # Point-to-point communicators never use NVLink SHARP; its multicast buffers would
            # cost GPU memory per pair (and some hosts must not use it at all).
            os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        return reason

    def _new_regions(self, device: int) -> Regions:
        return Regions(device)

    def _peer_info(self, host: str, device: int) -> PeerInfo:
        return peer_info(host, device)

    def _owner_peer(self, sock: socket.socket, label: str) -> NcclPeer:
        import torch

        torch.cuda.set_device(self.device)  # the serving thread's kernels run there
        return NcclPeer(sock, 0, self.device, label)

    def _reader_peer(self, sock: socket.socket, label: str) -> NcclPeer:
        return NcclPeer(sock, 1, self.device, label)

    def _make_uid(self) -> bytes:
        try:
            return nccl_lib.unique_id()
        except nccl_lib.CannExtError as exc:
            raise TransportError(f"ncclGetUniqueId failed: {exc}") from exc

    def _wait_local(self, peer: P2PPeer, local_ready: Any) -> None:
        assert isinstance(peer, NcclPeer)
        if local_ready is not None:
            peer.wait_for(local_ready)
        else:
            peer.wait_current_stream()

    def _span(self, obj: Any) -> tuple[int, int]:
        return check_tensor(obj, self.device)

    def _new_read(self, peer: P2PPeer, event: Any, deadline: float, what: str,
                  local: int) -> P2PRead:
        return NcclRead(peer, event, deadline, what,
                        lambda failed: self._read_done(peer, local, failed))

    def read_batch_async(self, peer: Any, local: int, remote: Any, reads: Any,
                         timeout_s: float, local_ready: Any = None) -> NcclRead:
        """Posts the reads and returns at once. The transfer stream first waits for
        `local_ready` (a torch.cuda.Event) if given, else for the caller's current stream, so
        earlier work on the local region (a scatter of the last read) cannot race the new
        bytes. `reads`: Read tuples or an [n, 3] int64 array of the same columns."""
        read = super().read_batch_async(peer, local, remote, reads, timeout_s, local_ready)
        assert isinstance(read, NcclRead)
        return read
