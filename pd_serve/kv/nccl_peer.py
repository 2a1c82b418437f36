"""One connected pair of the NCCL transport: p2p_peer.P2PPeer on a CUDA device.

Rank 0 is the region owner (it sends), rank 1 the reader (it receives; it made the
ncclUniqueId). The device side: a torch.cuda.Stream per pair for the transfers, torch.cuda
events after each posted batch, a non-blocking NCCL communicator (nccl_lib.Comm) joined on the
pair's CUDA device, and 64 bytes of device memory for the warm-up. The lifecycle, the socket
rules and the locking are P2PPeer's (pd_serve.kv.p2p_peer).
"""

from __future__ import annotations

import socket
from contextlib import AbstractContextManager
from typing import Any

from pd_serve.kv.nccl_lib import Comm
from pd_serve.kv.nccl_wire import NCCL_WIRE
from pd_serve.kv.p2p_peer import (
    MAX_GROUP_OPS,
    POLL_STEP_S,
    SOCKET_TIMEOUT_S,
    SPIN_S,
    Backoff,
    P2PPeer,
)

__all__ = ["MAX_GROUP_OPS", "POLL_STEP_S", "SOCKET_TIMEOUT_S", "SPIN_S", "Backoff", "Comm",
           "NcclPeer", "scratch_tensor"]


def scratch_tensor(device: int) -> Any:
    """The 64 bytes a pair's warm-up moves."""
    import torch

    return torch.zeros(64, dtype=torch.uint8, device=f"cuda:{device}")  # [64]


class NcclPeer(P2PPeer):
    """One end of an NCCL pair: rank 0 owner, rank 1 reader."""

    BACKEND = "NCCL"
    DEVICE_KIND = "cuda"

    def __init__(self, sock: socket.socket, rank: int, device: int, label: str) -> None:
        import torch

        super().__init__(sock, rank, rank == 1, device, label, NCCL_WIRE)
        self._torch = torch
        self.stream = torch.cuda.Stream(device=device)
        self._scratch = scratch_tensor(device)

    def device_scope(self) -> AbstractContextManager[Any]:
        return self._torch.cuda.device(self.device)

    def _join(self, uid: bytes) -> Comm:
        return Comm.init(uid, 2, self.rank)

    def _stream_handle(self) -> int:
        return int(self.stream.cuda_stream)

    def _record(self) -> Any:
        event = self._torch.cuda.Event()
        event.record(self.stream)
        return event

    def wait_for(self, event: Any) -> None:
        self.stream.wait_event(event)

    def wait_current_stream(self) -> None:
        """The transfer stream waits for the caller's current stream on this device."""
        self.stream.wait_stream(self._torch.cuda.current_stream(self.device))

    def _warm_up_buffer(self) -> tuple[int, int]:
        return int(self._scratch.data_ptr()), int(self._scratch.numel())
