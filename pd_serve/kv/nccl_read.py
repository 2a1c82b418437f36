"""A posted read of the NCCL transport (`NcclTransport.read_batch_async`): p2p_read.P2PRead,
whose `event` is a torch.cuda.Event a compute stream may `wait_event` on."""

from __future__ import annotations

from pd_serve.kv.p2p_read import P2PRead, positive

__all__ = ["NcclRead", "positive"]


class NcclRead(P2PRead):
    """One posted NCCL read batch (see P2PRead)."""
