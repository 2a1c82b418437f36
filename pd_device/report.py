"""What the device runtime shows (DisplayEvent) and reports per request (RequestReport)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

REPORT_MODES = ("pd_device", "device_only", "cloud_only", "fallback_device_only")


@dataclass(frozen=True)
class DisplayEvent:
    """One token as the user sees it: stream position `index` (0 is the first token),
    `text` released with it (incremental detokenisation over the whole stream, stop strings
    applied; may be empty), `t_display` in seconds since `generate` was called, and where the
    token was made. `finish_reason` is set on the last event (stop | length | abort | error)."""

    index: int
    token_id: int
    text: str
    t_display: float
    source: str  # cloud | local
    finish_reason: str | None = None


@dataclass
class RequestReport:
    """The outcome of one `DeviceRuntime.generate` call.

    `handover_index`: stream index of the first token made on the device (0 in the device-only
    modes; None when every token came from the cloud). `cloud_tokens_used`: cloud tokens shown.
    `reason`: why the mode is a fallback, or what ended the cloud stream early (None if nothing
    went wrong). Times are seconds; speeds are what the device measured during this request.
    `wake_late_s`: how late the display thread woke after each timed wait (the measure of the
    controller's `jitter_s` allowance).
    """

    mode: str
    ttft_s: float | None = None
    tpot_gaps_s: list[float] = field(default_factory=list)
    handover_index: int | None = None
    cloud_tokens_used: int = 0
    events: list[DisplayEvent] = field(default_factory=list)
    prompt_tokens: int = 0
    refined_tokens: int | None = None  # prompt tokens the device kept (None: not refined)
    cloud_tokens_received: int = 0
    local_prefill_tokens: int = 0  # tokens the device computed in its prefill chunks
    prefill_tps: float = 0.0
    decode_step_s: float = 0.0
    finish_reason: str | None = None
    reason: str | None = None
    e2e_s: float = 0.0
    trace: list[dict[str, Any]] = field(default_factory=list)  # Session.note events, t from 0
    wake_late_s: list[float] = field(default_factory=list)  # display wake-up lateness

    @property
    def token_ids(self) -> list[int]:
        return [e.token_id for e in self.events]

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events)

    @property
    def max_tpot_s(self) -> float:
        return max(self.tpot_gaps_s, default=0.0)

    @property
    def p99_tpot_s(self) -> float:
        if not self.tpot_gaps_s:
            return 0.0
        ordered = sorted(self.tpot_gaps_s)
        return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]

    def summary(self) -> str:
        """One line for the command line and logs."""
        ttft = "-" if self.ttft_s is None else f"{self.ttft_s * 1000:.0f}ms"
        handover = "-" if self.handover_index is None else str(self.handover_index)
        line = (f"mode={self.mode} tokens={len(self.events)} ttft={ttft} "
                f"max_tpot={self.max_tpot_s * 1000:.0f}ms p99_tpot={self.p99_tpot_s * 1000:.0f}ms "
                f"handover={handover} cloud_used={self.cloud_tokens_used}/"
                f"{self.cloud_tokens_received} prompt={self.prompt_tokens}")
        if self.refined_tokens is not None:
            line += f" refined={self.refined_tokens}"
        line += f" finish={self.finish_reason} e2e={self.e2e_s:.2f}s"
        if self.reason:
            line += f" reason={self.reason!r}"
        return line
