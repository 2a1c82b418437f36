"""DeviceConfig: the device's model, compute limits, cloud endpoint and display bounds."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from pd_serve.backends import BACKENDS


@dataclass(frozen=True)
class DeviceConfig:
    """How one device runs. Invalid values raise ValueError naming the field.

    `threads` limits the host threads of the model (1 or 2 play a phone-class CPU); `slowdown`
    stretches every engine step by sleeping (slowdown - 1) times its own work (the smaller of its
    wall time and the process's CPU time, so time lost to other processes on a shared host is
    not multiplied), to emulate a slower device with the small demo model (1.0: none).
    `cloud_url` is the gateway's base URL (None: device-only). `model_name` is the id the
    gateway serves (default: the model directory's name). `ttft_target_s`: no first cloud
    token by then -> device-only.
    `max_gap_s`: the speed controller's bound on the gap between two shown tokens;
    `display_jitter_s`: the display's wake-up lateness it allows for (gaps are planned up to
    `max_gap_s - display_jitter_s`; must be below `max_gap_s`).
    `chunk_max_tokens` bounds one local prefill chunk (the device re-plans between chunks).
    `warmup_context`: static-shape backends (MindSpore) compile their decode graphs for contexts
    up to this many tokens at start (each new shape otherwise compiles on first use, seconds on
    a CPU, in the middle of a stream). `reuse_prefix_cache`: keep the device's prefix cache
    from one request to the next (a chat's earlier turns); off, every request starts cold, as
    the evaluation's comparisons of modes on the same prompt need. `handover_after` (tests):
    hand over right after cloud token k (0 = the first), whatever the device's speed; None: as
    soon as the device has caught up.
    """

    model_dir: str
    backend: str = "mindspore"
    threads: int | None = 2
    device: str = "cpu"
    cloud_url: str | None = None
    model_name: str | None = None
    block_size: int = 16
    num_blocks: int = 512
    max_model_len: int | None = None
    chunk_max_tokens: int = 256
    ttft_target_s: float = 2.0
    max_gap_s: float = 0.25
    margin_s: float | None = None  # controller margin; None: one measured decode step
    display_jitter_s: float = 0.01
    connect_timeout_s: float = 3.0
    refine_window: int = 32
    slowdown: float = 1.0
    warmup: bool = True
    warmup_context: int = 256
    reuse_prefix_cache: bool = False
    handover_after: int | None = None

    def __post_init__(self) -> None:
        if not Path(self.model_dir).is_dir():
            raise ValueError(f"model_dir: no model directory at {self.model_dir}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.threads is not None and self.threads <= 0:
            raise ValueError(f"threads must be positive, got {self.threads}")
        if self.chunk_max_tokens < self.block_size:
            raise ValueError(f"chunk_max_tokens ({self.chunk_max_tokens}) must be at least "
                             f"block_size ({self.block_size})")
        for name in ("ttft_target_s", "max_gap_s", "connect_timeout_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if self.margin_s is not None and not (math.isfinite(self.margin_s)
                                              and self.margin_s >= 0):
            raise ValueError(f"margin_s must be a number >= 0, got {self.margin_s!r}")
        if not (math.isfinite(self.display_jitter_s)
                and 0.0 <= self.display_jitter_s < self.max_gap_s):
            raise ValueError(f"display_jitter_s must be >= 0 and below max_gap_s "
                             f"({self.max_gap_s!r}), got {self.display_jitter_s!r}")
        if self.refine_window < 0:
            raise ValueError(f"refine_window must be >= 0, got {self.refine_window}")
        if not math.isfinite(self.slowdown) or self.slowdown < 1.0:
            raise ValueError(f"slowdown must be >= 1.0, got {self.slowdown!r}")
        if self.warmup_context < 0:
            raise ValueError(f"warmup_context must be >= 0, got {self.warmup_context}")
        if self.handover_after is not None and self.handover_after < 0:
            raise ValueError(f"handover_after must be >= 0, got {self.handover_after}")

    @property
    def served_name(self) -> str:
        return self.model_name or Path(self.model_dir).resolve().name
