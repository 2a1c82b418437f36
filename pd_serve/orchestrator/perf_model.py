"""The E2E P/D performance model of P/D-Serve (papers.md §1.4), pure: a scenario's profiled
latencies in, T_p, T_d, per-role capacities and the per-instance throughput Phi out.

    Phi = min(I_t, n_p * b_p / T_p, n_d * b_d / T_d) / (n_p + n_d)
    T_p = TTFT_bs * r_pre          T_d = xi + TPOT_bs * G          E2E = T_p + T_d

A `ScenarioProfile` holds the measurements: T_p (or TTFT and r_pre) and TPOT at a few batch
sizes. Between measured batch sizes the model interpolates linearly; below the smallest and
above the largest it clamps to the end value (no extrapolation: a profile that stops short of
b_p therefore *over*-states prefill capacity, so profile up to b_p and b_d).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

Table = Mapping[int, float]


@dataclass(frozen=True)
class ScenarioProfile:
    """One scenario's profiled P/D latencies (seconds).

    * `tp_by_batch`: prefill batch size -> T_p at that batch (TTFT with the scenario's prefix
      benefit already in it); or `ttft_by_batch` (cold TTFT) with `r_pre` in (0, 1], giving
      T_p = TTFT * r_pre. Exactly one of the two tables; `r_pre` must stay 1 with `tp_by_batch`.
    * `tpot_by_batch`: decode batch size -> time per output token at that batch.
    * `xi`: hand-off (KV transfer) time; `G`: tokens generated in the decode phase (the
      completion tokens minus the first, which prefill emits), so T_d = xi + TPOT * G.
    * `prompt_tokens`, `output_tokens`: workload means, for reports only.
    Tables are stored read-only and sorted by batch size.
    """

    name: str
    b_p: int
    b_d: int
    tpot_by_batch: Table
    xi: float
    G: float
    tp_by_batch: Table | None = None
    ttft_by_batch: Table | None = None
    r_pre: float = 1.0
    prompt_tokens: float | None = None
    output_tokens: float | None = None
    _tp: Table = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("name: expected a non-empty string")
        for key in ("b_p", "b_d"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{key}: expected a positive integer, got {value!r}")
        _check_number("xi", self.xi, allow_zero=True)
        _check_number("G", self.G, allow_zero=False)
        _check_number("r_pre", self.r_pre, allow_zero=False)
        if self.r_pre > 1.0:
            raise ValueError(f"r_pre: expected a value in (0, 1], got {self.r_pre!r}")
        for key in ("prompt_tokens", "output_tokens"):
            if getattr(self, key) is not None:
                _check_number(key, getattr(self, key), allow_zero=True)
        if (self.tp_by_batch is None) == (self.ttft_by_batch is None):
            raise ValueError("tp_by_batch: give exactly one of tp_by_batch and ttft_by_batch")
        if self.tp_by_batch is not None and self.r_pre != 1.0:
            raise ValueError("r_pre: must be 1 with tp_by_batch (T_p already includes the "
                             "prefix benefit); give ttft_by_batch to apply r_pre")
        for key in ("tpot_by_batch", "tp_by_batch", "ttft_by_batch"):
            if getattr(self, key) is not None:
                object.__setattr__(self, key, _table(key, getattr(self, key)))
        tp = self.tp_by_batch if self.tp_by_batch is not None else MappingProxyType(
            {b: v * self.r_pre for b, v in (self.ttft_by_batch or {}).items()})
        object.__setattr__(self, "_tp", tp)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: table keys become strings; absent values are null."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if not f.init:
                continue
            value = getattr(self, f.name)
            out[f.name] = ({str(b): v for b, v in value.items()}
                           if isinstance(value, Mapping) else value)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ScenarioProfile:
        """Inverse of `to_dict`; ValueError names an unknown or missing field."""
        if not isinstance(data, Mapping):
            raise ValueError(f"profile: expected an object, got {type(data).__name__}")
        known = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown profile field (known: {sorted(known)})")
        try:
            return cls(**dict(data))
        except TypeError as exc:  # a missing required field
            raise ValueError(f"profile: {exc}") from exc


def _check_number(key: str, value: Any, allow_zero: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{key}: expected a finite number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{key}: expected a {'non-negative' if allow_zero else 'positive'} "
                         f"number, got {value!r}")


def _table(key: str, raw: Any) -> Table:
    """A non-empty batch -> positive seconds table, keys as ints (JSON gives strings), sorted."""
    if not isinstance(raw, Mapping) or not raw:
        raise ValueError(f"{key}: expected a non-empty mapping batch size -> seconds")
    out: dict[int, float] = {}
    for b, v in raw.items():
        try:
            batch = int(b)
        except (TypeError, ValueError):
            raise ValueError(f"{key}: batch size {b!r} is not an integer") from None
        if isinstance(b, (bool, float)) or batch <= 0 or str(batch) != str(b).strip():
            raise ValueError(f"{key}: batch size {b!r} is not a positive integer")
        if batch in out:
            raise ValueError(f"{key}: batch size {batch} given twice")
        _check_number(f"{key}[{batch}]", v, allow_zero=False)
        out[batch] = float(v)
    return MappingProxyType(dict(sorted(out.items())))


def interpolate(table: Table, b: float) -> float:
    """Linear in the batch size between measured points, clamped to the end values outside."""
    if not math.isfinite(b) or b <= 0:
        raise ValueError(f"batch size: expected a positive number, got {b!r}")
    points = sorted(table.items())
    if b <= points[0][0]:
        return points[0][1]
    for (b0, v0), (b1, v1) in zip(points, points[1:]):
        if b <= b1:
            return v0 + (v1 - v0) * (b - b0) / (b1 - b0)
    return points[-1][1]


def t_p(profile: ScenarioProfile, b: float | None = None) -> float:
    """T_p (seconds) at prefill batch `b` (default b_p), prefix benefit included."""
    return interpolate(profile._tp, profile.b_p if b is None else b)


def tpot(profile: ScenarioProfile, b: float | None = None) -> float:
    """TPOT (seconds) at decode batch `b` (default b_d)."""
    return interpolate(profile.tpot_by_batch, profile.b_d if b is None else b)


def t_d(profile: ScenarioProfile, b: float | None = None) -> float:
    """T_d = xi + TPOT(b) * G at decode batch `b` (default b_d)."""
    return profile.xi + tpot(profile, b) * profile.G


def e2e(profile: ScenarioProfile) -> float:
    """E2E = T_p(b_p) + T_d(b_d)."""
    return t_p(profile) + t_d(profile)


def tp_share(profile: ScenarioProfile) -> float:
    """T_p / E2E, the proportion the online adjuster watches."""
    return t_p(profile) / e2e(profile)


def _count(key: str, n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"{key}: expected a non-negative integer, got {n!r}")
    return n


def prefill_capacity(profile: ScenarioProfile, n_p: int) -> float:
    """Requests per second n_p prefill instances finish: n_p * b_p / T_p(b_p)."""
    return _count("n_p", n_p) * profile.b_p / t_p(profile)


def decode_capacity(profile: ScenarioProfile, n_d: int) -> float:
    """Requests per second n_d decode instances finish: n_d * b_d / T_d(b_d)."""
    return _count("n_d", n_d) * profile.b_d / t_d(profile)


def check_traffic(traffic_rps: float | None) -> float:
    """`traffic_rps` as a float (None: unbounded, +inf); ValueError when negative or NaN."""
    if traffic_rps is None:
        return math.inf
    if isinstance(traffic_rps, bool) or not isinstance(traffic_rps, (int, float)) \
            or math.isnan(traffic_rps) or traffic_rps < 0:
        raise ValueError(f"traffic_rps: expected a non-negative number, got {traffic_rps!r}")
    return float(traffic_rps)


def served_rps(profile: ScenarioProfile, n_p: int, n_d: int,
               traffic_rps: float | None = None) -> float:
    """The numerator of Phi: min(I_t, prefill capacity, decode capacity)."""
    return min(check_traffic(traffic_rps), prefill_capacity(profile, n_p),
               decode_capacity(profile, n_d))


def phi(profile: ScenarioProfile, n_p: int, n_d: int, traffic_rps: float | None = None) -> float:
    """Per-instance throughput (requests/s per instance); `traffic_rps` None: unbounded."""
    if _count("n_p", n_p) + _count("n_d", n_d) == 0:
        raise ValueError("n_p + n_d: expected at least one instance")
    return served_rps(profile, n_p, n_d, traffic_rps) / (n_p + n_d)
