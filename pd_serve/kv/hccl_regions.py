"""Registered Ascend device memory of one HCCL transport: p2p_regions.Regions that accepts a
torch_npu tensor of the transport's NPU or a DeviceMemory span (any other framework, e.g. a
MindSpore tensor's `data_ptr()` and size). Lifecycle and thread safety as in
pd_serve.kv.p2p_regions."""

from __future__ import annotations

import sys
from typing import Any, NamedTuple

from pd_serve.kv import p2p_regions
from pd_serve.kv.transport import TransportError

__all__ = ["DeviceMemory", "Regions", "check_memory"]


class DeviceMemory(NamedTuple):
    """`nbytes` of device memory at `ptr` on the transport's NPU; `owner` (e.g. the tensor) is
    kept alive while registered. The caller vouches that the span is device memory."""

    ptr: int
    nbytes: int
    owner: Any = None


def _torch_npu_span(tensor: Any, device: int) -> tuple[int, int]:
    if tensor.device.type != "npu" or tensor.device.index != device:
        raise TransportError(f"HcclTransport on npu:{device} cannot register a tensor on "
                             f"{tensor.device}")
    if not tensor.is_contiguous() or tensor.numel() == 0:
        raise TransportError(f"register needs a non-empty contiguous tensor, got shape "
                             f"{tuple(tensor.shape)} (contiguous: {tensor.is_contiguous()})")
    return int(tensor.data_ptr()), int(tensor.numel() * tensor.element_size())


def check_memory(obj: Any, device: int) -> tuple[int, int]:
    """(device address, bytes) of a registrable object; TransportError saying what is wrong."""
    if isinstance(obj, DeviceMemory):
        if isinstance(obj.ptr, bool) or not isinstance(obj.ptr, int) or obj.ptr <= 0:
            raise TransportError(f"DeviceMemory.ptr must be a device address > 0, got {obj.ptr!r}")
        if isinstance(obj.nbytes, bool) or not isinstance(obj.nbytes, int) or obj.nbytes <= 0:
            raise TransportError(f"DeviceMemory.nbytes must be > 0, got {obj.nbytes!r}")
        return obj.ptr, obj.nbytes
    torch = sys.modules.get("torch")  # only a process that imported torch has its tensors
    if torch is not None and isinstance(obj, torch.Tensor):
        return _torch_npu_span(obj, device)
    kind = type(obj).__module__ + "." + type(obj).__name__
    raise TransportError(f"HcclTransport registers Ascend device memory (a torch_npu tensor or "
                         f"DeviceMemory), got {kind} (host memory goes through CannExtTransport)")


class Regions(p2p_regions.Regions):
    """Handle table of registered Ascend memory."""

    def check(self, obj: Any) -> tuple[int, int]:
        return check_memory(obj, self.device)
