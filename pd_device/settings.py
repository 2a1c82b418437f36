"""Per-request P/D-Device settings: how many cloud tokens, how much of the prompt, what pace."""

from __future__ import annotations

import math
from dataclasses import dataclass

MODES = ("pd_device", "device_only", "cloud_only")


@dataclass(frozen=True)
class Settings:
    """What one request asks of the cloud and of the display (spec section 4).

    `n_cloud` (N): tokens the cloud generates after its first one; `rho`: fraction of the prompt
    the cloud keeps for the device (1.0: the whole prompt); `pace_s`: the display's target gap
    between tokens while the device catches up; `mode`: pd_device | device_only | cloud_only.
    The planner (pd_device/planner.py) chooses these per request class; invalid values raise
    ValueError naming the field.
    """

    n_cloud: int = 16
    rho: float = 1.0
    pace_s: float = 0.05
    mode: str = "pd_device"

    def __post_init__(self) -> None:
        if isinstance(self.n_cloud, bool) or not isinstance(self.n_cloud, int) \
                or self.n_cloud < 0:
            raise ValueError(f"n_cloud must be an integer >= 0, got {self.n_cloud!r}")
        if not isinstance(self.rho, (int, float)) or not 0.0 < self.rho <= 1.0:
            raise ValueError(f"rho must be in (0, 1], got {self.rho!r}")
        if not isinstance(self.pace_s, (int, float)) or not math.isfinite(self.pace_s) \
                or self.pace_s < 0:
            raise ValueError(f"pace_s must be a finite number >= 0, got {self.pace_s!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
