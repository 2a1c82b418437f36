"""Where a collective-library transport lives: its device and its control listener."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class P2PConfig:
    """Device and control listener of one transport; NcclConfig / HcclConfig name the fields
    in their errors ("nccl.port ...")."""

    PREFIX: ClassVar[str] = "p2p"
    DEVICE_WORD: ClassVar[str] = "a device index"

    device: int = 0
    bind_host: str = "127.0.0.1"
    advertise_host: str = ""  # what peers dial; "" = bind_host (then not a wildcard)
    port: int = 0  # 0 = any free port
    connect_timeout_s: float = 60.0  # owner side: a reader's hello + communicator init
    max_serve_s: float = 600.0  # owner side: cap on a reader's per-read timeout

    def __post_init__(self) -> None:
        p = self.PREFIX
        if isinstance(self.device, bool) or not isinstance(self.device, int) or self.device < 0:
            raise ValueError(f"{p}.device must be {self.DEVICE_WORD} >= 0, got {self.device!r}")
        if not isinstance(self.bind_host, str) or not self.bind_host:
            raise ValueError(f"{p}.bind_host must be a host name or address, "
                             f"got {self.bind_host!r}")
        if not isinstance(self.advertise_host, str):
            raise ValueError(f"{p}.advertise_host must be a string, got {self.advertise_host!r}")
        if self.bind_host in ("0.0.0.0", "::") and not self.advertise_host:
            raise ValueError(f"{p}.advertise_host is required when bind_host is a wildcard")
        if isinstance(self.port, bool) or not isinstance(self.port, int) \
                or not 0 <= self.port < 65536:
            raise ValueError(f"{p}.port must be in [0, 65536), got {self.port!r}")
        for name in ("connect_timeout_s", "max_serve_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{p}.{name} must be a positive number of seconds, "
                                 f"got {value!r}")
