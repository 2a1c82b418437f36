"""Configuration and availability check of the NCCL transport (pd_serve.kv.nccl)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from pd_serve.kv import nccl_lib
from pd_serve.kv.nccl_wire import PeerInfo
from pd_serve.kv.p2p_config import P2PConfig


@dataclass(frozen=True)
class NcclConfig(P2PConfig):
    """Where an NCCL transport lives: its CUDA device and its control listener."""

    PREFIX = "nccl"
    DEVICE_WORD = "a CUDA device index"


def nccl_unavailable_reason(device: int = 0) -> str | None:
    """None when this process can run an NcclTransport on `device`, else why not."""
    reasons = []
    try:
        import torch
    except ImportError:
        reasons.append("torch is not installed")
    else:
        if not torch.cuda.is_available():
            reasons.append(f"CUDA is not available (torch {torch.__version__})")
        elif not 0 <= device < torch.cuda.device_count():
            reasons.append(f"CUDA device {device} does not exist "
                           f"({torch.cuda.device_count()} visible)")
    try:
        nccl_lib.load()
    except (nccl_lib.CannExtError, RuntimeError, OSError) as exc:
        reasons.append(f"libnccl cannot be loaded: {exc}")
    return "; ".join(reasons) or None


def peer_info(host: str, device: int) -> PeerInfo:
    import torch

    props = torch.cuda.get_device_properties(device)
    return PeerInfo(host, os.getpid(), device, str(getattr(props, "uuid", "") or ""))
