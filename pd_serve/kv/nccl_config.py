"""Configuration and availability check of the NCCL transport (pd_serve.kv.nccl)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from pd_serve.kv import nccl_lib
from pd_serve.kv.nccl_wire import PeerInfo


@dataclass(frozen=True)
class NcclConfig:
    """Where an NCCL transport lives: its CUDA device and its control listener."""

    device: int = 0
    bind_host: str = "127.0.0.1"
    advertise_host: str = ""  # what peers dial; "" = bind_host (then not a wildcard)
    port: int = 0  # 0 = any free port
    connect_timeout_s: float = 60.0  # owner side: a reader's hello + communicator init
    max_serve_s: float = 600.0  # owner side: cap on a reader's per-read timeout

    def __post_init__(self) -> None:
        if isinstance(self.device, bool) or not isinstance(self.device, int) or self.device < 0:
            raise ValueError(f"nccl.device must be a CUDA device index >= 0, got {self.device!r}")
        if not isinstance(self.bind_host, str) or not self.bind_host:
            raise ValueError(f"nccl.bind_host must be a host name or address, "
                             f"got {self.bind_host!r}")
        if not isinstance(self.advertise_host, str):
            raise ValueError(f"nccl.advertise_host must be a string, got {self.advertise_host!r}")
        if self.bind_host in ("0.0.0.0", "::") and not self.advertise_host:
            raise ValueError("nccl.advertise_host is required when bind_host is a wildcard")
        if isinstance(self.port, bool) or not isinstance(self.port, int) \
                or not 0 <= self.port < 65536:
            raise ValueError(f"nccl.port must be in [0, 65536), got {self.port!r}")
        for name in ("connect_timeout_s", "max_serve_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"nccl.{name} must be a positive number of seconds, "
                                 f"got {value!r}")


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
