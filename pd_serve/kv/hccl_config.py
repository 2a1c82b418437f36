"""Configuration and availability check of the HCCL transport (pd_serve.kv.hccl)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from pd_serve.kv import hccl_lib
from pd_serve.kv.p2p_config import P2PConfig
from pd_serve.kv.p2p_wire import PeerInfo


@dataclass(frozen=True)
class HcclConfig(P2PConfig):
    """Where an HCCL transport lives: its NPU (ACL device index) and its control listener."""

    PREFIX = "hccl"
    DEVICE_WORD = "an NPU device index"


def hccl_unavailable_reason(device: int = 0) -> str | None:
    """None when this process can run an HcclTransport on `device`, else why not (the build
    lacks the backend, libascendcl/libhccl do not load, or there is no such NPU)."""
    if not hccl_lib.built():
        return hccl_lib.NOT_BUILT
    try:
        hccl_lib.load()
    except (hccl_lib.CannExtError, OSError) as exc:
        return f"libascendcl/libhccl cannot be loaded: {exc}"
    try:
        count = hccl_lib.device_count()
    except hccl_lib.CannExtError as exc:
        return f"cannot count NPUs: {exc}"
    if not 0 <= device < count:
        return f"NPU device {device} does not exist ({count} visible)"
    return None


def peer_info(host: str, device: int) -> PeerInfo:
    return PeerInfo(host, os.getpid(), device, hccl_lib.device_uuid(device))
