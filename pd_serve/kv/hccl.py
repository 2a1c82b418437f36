"""The HCCL transport: one-sided READs of Ascend device memory over 2-rank HCCL communicators.

P2PTransport (pd_serve.kv.p2p_transport: the lifecycle, the control plane, the reads) on an
NPU, through cann_ext's HCCL backend (libascendcl and libhccl loaded at run time): `register`
takes a torch_npu tensor of the transport's NPU or a DeviceMemory span (ranges are bytes); host
arrays raise TransportError. The reader makes the HcclRootInfo and joins as rank 0 (HCCL's root),
the owner as rank 1; each read is one HcclBatchSendRecv per group of <= 1024 ranges on both
sides, its completion an aclrtEvent the reader polls. `set_ready_event` and
`read_batch_async(local_ready=...)` take an hccl_lib.Event or a raw aclrtEvent handle; without
`local_ready` nothing orders the transfer stream after the caller's device work on the local
region, so the caller synchronises that work first. Constructing one where the build lacks the
backend, the libraries do not load or the NPU does not exist raises TransportError saying which.
"""

from __future__ import annotations

import socket
from typing import Any

from pd_serve.kv import hccl_lib
from pd_serve.kv.hccl_config import HcclConfig, hccl_unavailable_reason, peer_info
from pd_serve.kv.hccl_peer import HcclPeer
from pd_serve.kv.hccl_regions import DeviceMemory, Regions
from pd_serve.kv.hccl_wire import ConnId, RegionDesc
from pd_serve.kv.p2p_peer import P2PPeer
from pd_serve.kv.p2p_read import P2PRead
from pd_serve.kv.p2p_transport import P2PTransport
from pd_serve.kv.p2p_wire import PeerInfo
from pd_serve.kv.transport import TransportError

__all__ = ["DeviceMemory", "HcclConfig", "HcclRead", "HcclTransport", "hccl_unavailable_reason"]


class HcclRead(P2PRead):
    """One posted HCCL read batch; `event` is an hccl_lib.Event (see P2PRead)."""


class HcclTransport(P2PTransport):
    """The HCCL transport (see the module docstring)."""

    BACKEND = "HCCL"
    DEVICE_NAME = "NPU"
    PEER = HcclPeer
    CONN_ID = ConnId
    REGION_DESC = RegionDesc

    def __init__(self, config: HcclConfig | None = None) -> None:
        super().__init__(config or HcclConfig())

    def _unavailable_reason(self, device: int) -> str | None:
        return hccl_unavailable_reason(device)

    def _new_regions(self, device: int) -> Regions:
        return Regions(device)

    def _peer_info(self, host: str, device: int) -> PeerInfo:
        return peer_info(host, device)

    def _owner_peer(self, sock: socket.socket, label: str) -> HcclPeer:
        return HcclPeer(sock, False, self.device, label)

    def _reader_peer(self, sock: socket.socket, label: str) -> HcclPeer:
        return HcclPeer(sock, True, self.device, label)

    def _make_uid(self) -> bytes:
        try:
            return hccl_lib.root_info(self.device)
        except hccl_lib.CannExtError as exc:
            raise TransportError(f"HcclGetRootInfo failed: {exc}") from exc

    def _wait_local(self, peer: P2PPeer, local_ready: Any) -> None:
        if local_ready is not None:
            peer.wait_for(local_ready)

    def _new_read(self, peer: P2PPeer, event: Any, deadline: float, what: str,
                  local: int) -> P2PRead:
        return HcclRead(peer, event, deadline, what,
                        lambda failed: self._read_done(peer, local, failed))
