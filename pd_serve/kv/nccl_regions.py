"""Registered CUDA tensors of one NCCL transport: handles, overlap checks and pins.

Lifecycle of a region:
1. `add(tensor)` checks it (a contiguous, non-empty CUDA tensor of the transport's device that
   overlaps no other registration) and returns a fresh handle; the table keeps the tensor alive;
2. transfers `pin` it while NCCL may touch its bytes (a local read in flight, or a peer's read
   being served) and `unpin` it when that finished or failed;
3. `remove(handle)` forgets it once unpinned (waits up to `wait_s`, else TransportError).
Thread-safe: the owner's serving threads and the caller's thread share one table.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass
from typing import Any

from pd_serve.kv.transport import TransportError


@dataclass
class Region:
    tensor: Any  # torch.Tensor, kept alive while registered
    ptr: int
    nbytes: int
    pins: int = 0
    ready: Any = None  # torch.cuda.Event the serving stream waits for first, or None


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


class Regions:
    """Handle table of registered tensors (see the module docstring)."""

    def __init__(self, device: int) -> None:
        self.device = device
        self._cv = threading.Condition()
        self._regions: dict[int, Region] = {}
        self._handles = itertools.count(1)

    def add(self, tensor: Any) -> int:
        ptr, nbytes = check_tensor(tensor, self.device)
        with self._cv:
            for handle, other in self._regions.items():
                if ptr < other.ptr + other.nbytes and other.ptr < ptr + nbytes:
                    raise TransportError(f"tensor at {ptr:#x} (+{nbytes} bytes) overlaps "
                                         f"registration {handle}")
            handle = next(self._handles)
            self._regions[handle] = Region(tensor, ptr, nbytes)
            return handle

    def get(self, handle: int) -> Region:
        with self._cv:
            return self._get(handle)

    def _get(self, handle: int) -> Region:
        region = self._regions.get(handle) if isinstance(handle, int) else None
        if region is None:
            raise TransportError(f"unknown registration handle {handle!r}")
        return region

    def pin(self, handle: int) -> Region:
        with self._cv:
            region = self._get(handle)
            region.pins += 1
            return region

    def unpin(self, handle: int) -> None:
        with self._cv:
            region = self._regions.get(handle)
            if region is not None and region.pins > 0:
                region.pins -= 1
                self._cv.notify_all()

    def set_ready(self, handle: int, event: Any) -> None:
        with self._cv:
            self._get(handle).ready = event

    def remove(self, handle: int, wait_s: float) -> None:
        deadline = time.monotonic() + wait_s
        with self._cv:
            while self._get(handle).pins:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TransportError(f"registration {handle} is busy: "
                                         f"{self._regions[handle].pins} transfer(s) still use it")
                self._cv.wait(left)
            del self._regions[handle]

    def __len__(self) -> int:
        with self._cv:
            return len(self._regions)
