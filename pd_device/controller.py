"""Speed controller: when to show the next buffered token so the stream stays smooth until the
device has taken over (pure: state in, decision out, the clock passed in).

The rule (docs/pd_device.md, "Speed controller", has the derivation):

* The first token is shown at once (`last_display is None`): that is the TTFT.
* Nothing buffered: wait (None); a token that arrives late is shown on arrival.
* Until the device has shown that it decodes (`local_started`: its first local token exists),
  estimate `T`, the time from now until the device shows its first local token,
  and `S`, the tokens that will be available to show before then (buffered plus cloud tokens
  arriving in time). Spreading them evenly over the time left needs the gap
  `g_need = (now - last_display + T) / (S + 1)` (S tokens and then the first local token). The
  gap is `max(pace_s, g_need)` capped (below): the pace when comfortable, slower (never
  beyond the cap) to avoid running dry before the hand-over.
* Once the device has caught up (`local_started`) the gap is `min(pace_s, decode_step_s)`:
  tokens are not held longer than the device needs to make its next one.
* Every gap is capped at `bound = max_gap_s - jitter_s`, the pace too: the display thread
  wakes up to `jitter_s` late (scheduling, the GIL held by the worker's model step), so a gap
  planned up to `bound` is shown within `max_gap_s` even when it wakes that late.
* The token is shown at `max(now, last_display + gap)`: display times are monotone and, while a
  token is buffered, no planned gap exceeds `bound` (no shown gap `max_gap_s`, wake-up included).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ControllerConfig:
    """`pace_s`: target gap when comfortable; `max_gap_s`: the bound on any shown gap while a
    token is buffered; `margin_s`: added to the hand-over estimate (chunk granularity,
    scheduling); `jitter_s`: the allowance for the display's wake-up lateness, kept free
    below `max_gap_s` (must be smaller than it)."""

    pace_s: float
    max_gap_s: float
    margin_s: float = 0.0
    jitter_s: float = 0.0

    def __post_init__(self) -> None:
        for name in ("pace_s", "max_gap_s", "margin_s", "jitter_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.max_gap_s <= 0:
            raise ValueError(f"max_gap_s must be positive, got {self.max_gap_s!r}")
        if self.jitter_s >= self.max_gap_s:
            raise ValueError(f"jitter_s ({self.jitter_s!r}) must be below max_gap_s "
                             f"({self.max_gap_s!r})")

    @property
    def bound_s(self) -> float:
        """The largest gap the controller plans: `max_gap_s - jitter_s`."""
        return self.max_gap_s - self.jitter_s


@dataclass(frozen=True)
class ControllerState:
    """What the runtime knows at `now` (seconds on one monotonic clock).

    `buffered`: tokens received (cloud or local) and not yet shown; `last_display`: when the last
    token was shown (None before the first); `prefill_tps`: measured device prefill speed
    (tokens/s); `decode_step_s`: measured device decode step time; `to_prefill`: tokens the device
    still has to prefill before it can take over (the hand-over step's own tokens included);
    `cloud_expected`: cloud tokens still to come that the device may take; `cloud_gap_s`:
    measured gap between cloud tokens (None: unknown, the expected tokens count as if already
    here); `local_started`: the device has made its first local token (it has caught up).
    """

    now: float
    last_display: float | None
    buffered: int
    prefill_tps: float
    decode_step_s: float
    to_prefill: int
    cloud_expected: int
    cloud_gap_s: float | None = None
    local_started: bool = False


def prefill_eta_s(state: ControllerState) -> float:
    """Seconds until the device has prefilled everything it takes from the cloud (fluid model).

    The device works at `prefill_tps` on `to_prefill` tokens while cloud tokens keep arriving
    every `cloud_gap_s`. If it is faster than the cloud it catches up after
    `to_prefill / (P - 1/c)` seconds, unless the cloud's `cloud_expected` tokens run out first;
    then it finishes after `(to_prefill + cloud_expected) / P`."""
    p = max(state.prefill_tps, 1e-9)
    x, e = max(state.to_prefill, 0), max(state.cloud_expected, 0)
    c = state.cloud_gap_s
    if c is not None and c > 0 and e > 0 and p * c > 1.0:
        t = x * c / (p * c - 1.0)
        if t <= e * c:
            return t
    return (x + e) / p


def supply_before(state: ControllerState, eta_s: float) -> int:
    """Tokens available to show before the device takes over: buffered plus cloud arrivals."""
    e = max(state.cloud_expected, 0)
    c = state.cloud_gap_s
    if c is None or c <= 0 or eta_s >= e * c:
        return max(state.buffered, 0) + e
    arriving = min(e, int(eta_s / c))
    return max(state.buffered, 0) + arriving


def target_gap(state: ControllerState, cfg: ControllerConfig) -> float:
    """The gap to keep after the last display (see the module docstring)."""
    if state.local_started:
        return min(cfg.pace_s, max(state.decode_step_s, 0.0), cfg.bound_s)
    eta = prefill_eta_s(state)
    takeover = eta + max(state.decode_step_s, 0.0) + cfg.margin_s
    elapsed = 0.0 if state.last_display is None else max(state.now - state.last_display, 0.0)
    need = (elapsed + takeover) / (supply_before(state, eta) + 1)
    return min(max(cfg.pace_s, need), cfg.bound_s)


def next_display_time(state: ControllerState, cfg: ControllerConfig) -> float | None:
    """When to show the next buffered token (never before `now`), or None: nothing to show."""
    if state.buffered <= 0:
        return None
    if state.last_display is None:
        return state.now
    return max(state.now, state.last_display + target_gap(state, cfg))
