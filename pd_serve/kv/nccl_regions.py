"""Registered CUDA tensors of one NCCL transport: p2p_regions.Regions that accepts only
contiguous, non-empty CUDA tensors of the transport's device (lifecycle and thread safety as in
pd_serve.kv.p2p_regions)."""

from __future__ import annotations

from typing import Any

from pd_serve.kv import p2p_regions
from pd_serve.kv.p2p_regions import Region
from pd_serve.kv.transport import TransportError

__all__ = ["Region", "Regions", "check_tensor"]


def check_tensor(tensor: Any, device: int) -> tuple[int, int]:
    """(data pointer, bytes) of a registrable tensor; TransportError saying what is wrong."""
    try:
        import torch
    except ImportError as exc:
        raise TransportError("NcclTransport needs torch") from exc
    if not isinstance(tensor, torch.Tensor):
        kind = type(tensor).__module__ + "." + type(tensor).__name__
        raise TransportError(f"NcclTransport registers CUDA tensors, got {kind} (host memory "
                             f"goes through CannExtTransport)")
    if not tensor.is_cuda or tensor.device.index != device:
        raise TransportError(f"NcclTransport on cuda:{device} cannot register a tensor on "
                             f"{tensor.device}")
    if not tensor.is_contiguous() or tensor.numel() == 0:
        raise TransportError(f"register needs a non-empty contiguous tensor, got shape "
                             f"{tuple(tensor.shape)} (contiguous: {tensor.is_contiguous()})")
    return int(tensor.data_ptr()), int(tensor.numel() * tensor.element_size())


class Regions(p2p_regions.Regions):
    """Handle table of registered CUDA tensors."""

    def check(self, obj: Any) -> tuple[int, int]:
        return check_tensor(obj, self.device)
