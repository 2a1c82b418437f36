"""One connected pair of the HCCL transport: p2p_peer.P2PPeer on an Ascend NPU.

The reader makes the HcclRootInfo, so it is the root and joins as rank 0; the owner of the
regions joins as rank 1 and sends. The device side, all through cann_ext (no framework needed):
an aclrtStream per pair for the transfers, an aclrtEvent after each posted batch, the
communicator (hccl_lib.Comm: HcclCommInitRootInfo on cann_ext's join thread, polled) and 64
bytes of device memory for the warm-up. Lifecycle, socket rules and locking are P2PPeer's
(pd_serve.kv.p2p_peer); teardown destroys the communicator on a detached thread and frees the
stream and the warm-up bytes once nothing runs on the stream any more.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from contextlib import AbstractContextManager
from typing import Any

from pd_serve.kv import hccl_lib
from pd_serve.kv.hccl_wire import HCCL_WIRE
from pd_serve.kv.p2p_peer import P2PPeer
from pd_serve.kv.transport import TransportError

log = logging.getLogger(__name__)

WARM_UP_BYTES = 64
RELEASE_WAIT_S = 600.0  # a torn-down pair's stream gets this long to drain before it is leaked


class HcclPeer(P2PPeer):
    """One end of an HCCL pair: rank 0 reader (root), rank 1 owner."""

    BACKEND = "HCCL"
    DEVICE_KIND = "npu"

    def __init__(self, sock: socket.socket, reader: bool, device: int, label: str) -> None:
        super().__init__(sock, 0 if reader else 1, reader, device, label, HCCL_WIRE)
        try:
            self.stream = hccl_lib.Stream(device)
        except hccl_lib.CannExtError as exc:
            raise TransportError(f"cannot make an HCCL pair with {label} on npu:{device}: "
                                 f"{exc}") from exc
        try:
            self._scratch = hccl_lib.DeviceBuffer(device, WARM_UP_BYTES)
        except hccl_lib.CannExtError as exc:
            self.stream.destroy()
            raise TransportError(f"cannot make an HCCL pair with {label} on npu:{device}: "
                                 f"{exc}") from exc

    def device_scope(self) -> AbstractContextManager[Any]:
        # Every cx_hccl_* call makes its device current itself.
        return contextlib.nullcontext()

    def _join(self, uid: bytes) -> hccl_lib.Comm:
        return hccl_lib.Comm.init(uid, 2, self.rank, self.device)

    def _stream_handle(self) -> int:
        return self.stream.handle

    def _record(self) -> hccl_lib.Event:
        event = hccl_lib.Event(self.device)
        event.record(self.stream)
        return event

    def wait_for(self, event: Any) -> None:
        """`event`: an hccl_lib.Event or a raw aclrtEvent handle (e.g. from the framework)."""
        self.stream.wait_event(event)

    def _warm_up_buffer(self) -> tuple[int, int]:
        return self._scratch.ptr, WARM_UP_BYTES

    def _release(self) -> None:
        """Frees the stream and the warm-up bytes once nothing runs on the stream: at once
        when idle, else from a helper thread once the torn-down communicator's work ended."""
        if _release_when_idle(self.stream, self._scratch, 0.0, self.label):
            return
        threading.Thread(target=_release_when_idle, daemon=True, name="pd-hccl-release",
                         args=(self.stream, self._scratch, RELEASE_WAIT_S, self.label)).start()


def _release_when_idle(stream: hccl_lib.Stream, scratch: hccl_lib.DeviceBuffer, wait_s: float,
                       label: str) -> bool:
    """Destroys `stream` and frees `scratch` if the stream drains within wait_s; True if so.
    A stream still busy after a real wait is left allocated (freeing memory a transfer may
    still write is worse than a leak)."""
    try:
        if not stream.sync(wait_s):
            if wait_s > 0:
                log.warning("HCCL transfers with %s still queued after %s s: leaving its stream "
                            "and %d bytes of device memory allocated", label, wait_s,
                            WARM_UP_BYTES)
            return False
        stream.destroy()
        scratch.free()
    except hccl_lib.CannExtError as exc:
        log.warning("releasing the HCCL stream with %s: %s", label, exc)
    return True
