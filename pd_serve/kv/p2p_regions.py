"""Registered device memory of one collective-library transport: handles, overlap checks, pins.

Backend-neutral: a subclass's `check` says what may be registered (nccl_regions: CUDA tensors of
the transport's device; hccl_regions: Ascend memory) and returns its address and size.
Lifecycle of a region:
1. `add(obj)` checks it (non-empty device memory of the transport's device that overlaps no
   other registration) and returns a fresh handle; the table keeps `obj` alive;
2. transfers `pin` it while the library may touch its bytes (a local read in flight, or a
   peer's read being served) and `unpin` it when that finished or failed;
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
    tensor: Any  # the registered object (a tensor, or DeviceMemory), kept alive while registered
    ptr: int
    nbytes: int
    pins: int = 0
    ready: Any = None  # an event the serving stream waits for first, or None


class Regions:
    """Handle table of registered device memory (see the module docstring)."""

    def __init__(self, device: int) -> None:
        self.device = device
        self._cv = threading.Condition()
        self._regions: dict[int, Region] = {}
        self._handles = itertools.count(1)

    def check(self, obj: Any) -> tuple[int, int]:
        """(device address, bytes) of a registrable object; TransportError saying what is
        wrong (subclasses)."""
        raise NotImplementedError

    def add(self, obj: Any) -> int:
        ptr, nbytes = self.check(obj)
        with self._cv:
            for handle, other in self._regions.items():
                if ptr < other.ptr + other.nbytes and other.ptr < ptr + nbytes:
                    raise TransportError(f"memory at {ptr:#x} (+{nbytes} bytes) overlaps "
                                         f"registration {handle}")
            handle = next(self._handles)
            self._regions[handle] = Region(obj, ptr, nbytes)
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
