"""Measured profiles the settings planner reads: device prefill time vs tokens and decode step
time, cloud TTFT vs prompt tokens and TPOT, and quality vs refinement ratio, with JSON I/O.

Curves are piecewise linear through measured points. Time curves are made nondecreasing (the
running maximum of the measured times: a longer prompt never takes less time in the model, so
measurement noise cannot make the planner prefer a longer prefill) and are extrapolated past
their last point with the slope of their last segment; below their first point they hold the
first time (a conservative floor). The quality curve always holds (1.0, 1.0) (keeping the whole
prompt is the reference), is a step function (a rho gets the quality measured at the nearest
measured rho at or below it: keeping more of the prompt is never credited with more than was
measured) and is 0.0 below its smallest measured rho: a refinement nobody measured is never
trusted. Its points are meant to be lower confidence bounds (tools/bench_device_lib.py,
QUALITY_DEFINITION), so the planner's quality floor holds against the bound, not the mean.

Quality depends on the prompt's length (a long prompt refined to the same rho loses more), so
`Profiles.quality_bands` may hold one curve per prompt-length band, each measured on held-out
prompts of that band's lengths; `Profiles.quality_for(band)` gives the curve a request class
plans with: the pointwise minimum of the curves of every measured band its band overlaps, else
the curve of the nearest measured band (ties: the longer prompts', the pessimistic side), and
`Profiles.quality` when no band was measured.

Files written by tools/profile_device.py load with `Profiles.load(path)`.
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROFILES_VERSION = 1
Point = tuple[float, float]


def finite_number(value: float, name: str, minimum: float = 0.0, strict: bool = False) -> float:
    """`value` as float if finite and >= minimum (> with `strict`), else ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v) or v < minimum or (strict and v == minimum):
        op = ">" if strict else ">="
        raise ValueError(f"{name} must be finite and {op} {minimum}, got {value!r}")
    return v


def _points(points: Sequence[Sequence[float]], name: str) -> tuple[Point, ...]:
    if len(points) < 1:
        raise ValueError(f"{name} needs at least one (x, y) point")
    out: list[Point] = []
    for i, p in enumerate(points):
        if len(p) != 2:
            raise ValueError(f"{name}[{i}] must be an (x, y) pair, got {p!r}")
        out.append((finite_number(p[0], f"{name}[{i}].x"), finite_number(p[1], f"{name}[{i}].y")))
    if any(b[0] <= a[0] for a, b in zip(out, out[1:])):
        raise ValueError(f"{name}: x values must be strictly increasing, got "
                         f"{[p[0] for p in out]}")
    return tuple(out)


def _interp(xs: Sequence[float], ys: Sequence[float], x: float, extrapolate: bool) -> float:
    if x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        if not extrapolate or len(xs) == 1:
            return ys[-1]
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        return ys[-1] + slope * (x - xs[-1])
    i = bisect.bisect_right(xs, x)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


@dataclass(frozen=True)
class TimeCurve:
    """Seconds vs tokens through measured (tokens, seconds) points, nondecreasing (see the
    module docstring); `raw` keeps the points as given."""

    raw: tuple[Point, ...]
    _xs: tuple[float, ...] = field(init=False, repr=False, compare=False)
    _ys: tuple[float, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        pts = _points(self.raw, "time curve")
        ys, top = [], 0.0
        for _, y in pts:
            top = max(top, y)
            ys.append(top)
        object.__setattr__(self, "raw", pts)
        object.__setattr__(self, "_xs", tuple(x for x, _ in pts))
        object.__setattr__(self, "_ys", tuple(ys))

    def __call__(self, tokens: float) -> float:
        return _interp(self._xs, self._ys, float(tokens), extrapolate=True)

    @classmethod
    def sample(cls, fn: Callable[[int], float], tokens: Sequence[int]) -> TimeCurve:
        """A curve through `fn` at `tokens` (e.g. the simulator's fitted latency model)."""
        return cls(tuple((float(n), float(fn(n))) for n in tokens))

    def scaled(self, factor: float) -> TimeCurve:
        """Every time times `factor` (> 0; > 1 is a slower machine)."""
        f = finite_number(factor, "factor", strict=True)
        return TimeCurve(tuple((x, y * f) for x, y in self.raw))

    def to_list(self) -> list[list[float]]:
        return [[x, y] for x, y in self.raw]


@dataclass(frozen=True)
class DeviceProfile:
    """The device: prefill time of n prompt tokens from an empty cache (one call), decode
    step time (one token, at the context the profile was measured at), and a label."""

    prefill: TimeCurve
    decode_step_s: float
    name: str = "device"

    def __post_init__(self) -> None:
        finite_number(self.decode_step_s, "decode_step_s", strict=True)

    def prefill_s(self, tokens: float) -> float:
        return self.prefill(tokens)

    def scaled(self, factor: float, name: str | None = None) -> DeviceProfile:
        """A device `factor` times slower (< 1: faster) in prefill and decode alike."""
        f = finite_number(factor, "factor", strict=True)
        return DeviceProfile(self.prefill.scaled(f), self.decode_step_s * f,
                             name or f"{self.name} x{f:g}")


@dataclass(frozen=True)
class CloudProfile:
    """The cloud as the device sees it without the link: TTFT vs prompt tokens (request in to
    first token out, which is also how long the prefill holds the cloud) and TPOT."""

    ttft: TimeCurve
    tpot_s: float

    def __post_init__(self) -> None:
        finite_number(self.tpot_s, "tpot_s", strict=True)


@dataclass(frozen=True)
class QualityCurve:
    """Quality (1.0 = same as the full prompt) vs refinement ratio rho, a step function of
    measured (rho, quality) points (see the module docstring); (1.0, 1.0) is always part of it
    (a measured point at 1.0 is replaced by it) and rhos below the smallest measured one have
    quality 0.0."""

    raw: tuple[Point, ...] = ((1.0, 1.0),)
    _xs: tuple[float, ...] = field(init=False, repr=False, compare=False)
    _ys: tuple[float, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        pts = [p for p in (_points(self.raw, "quality curve") if self.raw else ())
               if p[0] != 1.0]
        for i, (r, q) in enumerate(pts):
            if not 0.0 < r <= 1.0 or q > 1.0:
                raise ValueError(f"quality curve[{i}]: rho must be in (0, 1] and quality in "
                                 f"[0, 1], got ({r}, {q})")
        pts.append((1.0, 1.0))
        object.__setattr__(self, "raw", tuple(pts))
        object.__setattr__(self, "_xs", tuple(x for x, _ in pts))
        object.__setattr__(self, "_ys", tuple(y for _, y in pts))

    def __call__(self, rho: float) -> float:
        i = bisect.bisect_right(self._xs, float(rho))
        return 0.0 if i == 0 else self._ys[i - 1]


    @classmethod
    def minimum(cls, curves: Sequence[QualityCurve]) -> QualityCurve:
        """The pointwise minimum of step curves (a step curve on the union of their points)."""
        xs = sorted({x for c in curves for x in c._xs if x != 1.0})
        return cls(tuple((x, min(c(x) for c in curves)) for x in xs))


@dataclass(frozen=True)
class QualityBand:
    """The quality curve measured on prompts of `lo`..`hi` tokens (`prompts` of them)."""

    lo: int
    hi: int
    curve: QualityCurve
    prompts: int = 0

    def __post_init__(self) -> None:
        if any(isinstance(v, bool) or not isinstance(v, int) for v in (self.lo, self.hi)) \
                or not 1 <= self.lo <= self.hi:
            raise ValueError(f"quality band must be integers 1 <= lo <= hi, got "
                             f"({self.lo!r}, {self.hi!r})")

    def distance(self, lo: int, hi: int) -> int:
        """Tokens between this band and [lo, hi] (0 when they overlap)."""
        return max(self.lo - hi, lo - self.hi, 0)


@dataclass(frozen=True)
class Profiles:
    """Everything the planner reads, plus where it was measured (`provenance`);
    `quality_bands`: quality per prompt-length band, disjoint, ascending (see the module
    docstring), `quality` the curve over all prompts."""

    device: DeviceProfile
    cloud: CloudProfile
    quality: QualityCurve = field(default_factory=QualityCurve)
    provenance: dict[str, Any] = field(default_factory=dict)
    quality_bands: tuple[QualityBand, ...] = ()

    def __post_init__(self) -> None:
        b = self.quality_bands
        if any(not isinstance(x, QualityBand) for x in b) or \
                any(y.lo <= x.hi for x, y in zip(b, b[1:])):
            raise ValueError("quality_bands must be QualityBands, disjoint and ascending, got "
                             f"{[(x.lo, x.hi) for x in b if isinstance(x, QualityBand)]}")

    def quality_for(self, band: tuple[int, int]) -> QualityCurve:
        """The quality curve for prompts of band[0]..band[1] tokens (module docstring)."""
        if not self.quality_bands:
            return self.quality
        lo, hi = band
        near = min(self.quality_bands, key=lambda x: (x.distance(lo, hi), -x.lo))
        if near.distance(lo, hi) > 0:
            return near.curve
        over = [x.curve for x in self.quality_bands if x.distance(lo, hi) == 0]
        return over[0] if len(over) == 1 else QualityCurve.minimum(over)

    def to_dict(self) -> dict[str, Any]:
        return {"version": PROFILES_VERSION, "provenance": self.provenance,
                "device": {"name": self.device.name, "prefill_s": self.device.prefill.to_list(),
                           "decode_step_s": self.device.decode_step_s},
                "cloud": {"ttft_s": self.cloud.ttft.to_list(), "tpot_s": self.cloud.tpot_s},
                "quality": [[r, q] for r, q in self.quality.raw],
                "quality_bands": [{"band": [b.lo, b.hi], "prompts": b.prompts,
                                   "quality": [[r, q] for r, q in b.curve.raw]}
                                  for b in self.quality_bands]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Profiles:
        if data.get("version") != PROFILES_VERSION:
            raise ValueError(f"profiles version: expected {PROFILES_VERSION}, "
                             f"got {data.get('version')!r}")
        try:
            dev, cloud = data["device"], data["cloud"]
            device = DeviceProfile(TimeCurve(tuple(map(tuple, dev["prefill_s"]))),
                                   dev["decode_step_s"], str(dev.get("name", "device")))
            cloud_p = CloudProfile(TimeCurve(tuple(map(tuple, cloud["ttft_s"]))),
                                   cloud["tpot_s"])
            quality = QualityCurve(tuple(map(tuple, data.get("quality", [[1.0, 1.0]]))))
            bands = tuple(QualityBand(int(b["band"][0]), int(b["band"][1]),
                                      QualityCurve(tuple(map(tuple, b["quality"]))),
                                      int(b.get("prompts", 0)))
                          for b in data.get("quality_bands", []))
        except (KeyError, TypeError, IndexError) as exc:
            raise ValueError(f"profiles: missing or malformed field ({exc!r})") from exc
        return cls(device, cloud_p, quality, dict(data.get("provenance", {})), bands)

    def save(self, path: str | Path) -> None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Profiles:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: cannot read profiles ({exc})") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{path}: profiles are a JSON object")
        try:
            return cls.from_dict(data)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc
