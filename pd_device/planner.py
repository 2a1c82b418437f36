"""Settings planner: picks (N, rho, pace) per request class to minimise cloud occupancy subject
to a TTFT target, a maximum TPOT and a quality floor, from measured profiles (a pure function,
also usable by the simulator).

Timing model (seconds from the moment the user submits; P = the band's upper prompt length,
which is the worst case because every profile curve is nondecreasing in tokens):
* the first token reaches the device at T1 = rtt + request bytes / bandwidth + cloud TTFT(P);
* the refined prompt (K = min(P, max(ceil(rho P), W)) kept positions, the cloud's rule in
  pd_serve.engine.refine) arrives with it, its indices
  taking Tr = K * index bytes / bandwidth; cloud tokens then arrive every
  c = max(cloud TPOT, token event bytes / bandwidth);
* the controller shows cloud token k (1..N) at T1 + k * pace (pace >= c, so it never runs dry);
* the device prefills the refined prompt plus the first and the N cloud tokens (K + N + 1
  tokens) in the steps the worker runs (`catchup_steps`: a first chunk of whole blocks while
  cloud tokens are still expected, then the hand-over request in steps of at most the chunk
  size) and has its first own token (sampled by the hand-over step) at T1 + H, with the
  catch-up H = (Tr + sum of the steps' times) (1 + `margin_frac`) + `margin_s`, a step of t
  tokens after c cached ones costing max(D(t), D(c + t) - D(c) + D(1)) (`step_s`: attention
  over the cached context), D = the device's prefill time from an empty cache (profiled as a
  high percentile of engine steps, not the mean); it then
  decodes one token per device decode step (profiled the same way).
Constraints: TTFT = T1 <= target; every gap <= B = max TPOT - `display_jitter_s` (the display
wakes up to that late, so a gap planned within B is shown within max TPOT; the speed controller
caps its gaps at the same B), i.e. pace <= B, decode step <= B and the hand-over gap
H - N * pace <= B (the device catches up before the N cloud tokens run out at the chosen
pace); quality(rho) >= floor, where the quality curve is the class's prompt-length band's
(`Profiles.quality_for`) and holds lower confidence bounds (pd_device.profiles).
Cloud occupancy of a P/D-Device request = cloud TTFT(P) + N * cloud TPOT (its prefill plus N
decode steps); device-only costs 0 and cloud-only the whole output (infinite here, as the
class has no output length).

Choice: device-only when it alone meets the targets; else the feasible (N, rho, pace) of the
grid with the smallest key (occupancy, N, -rho, pace): fewest cloud tokens, then the most
prompt kept, then the smoothest pace. When none is feasible: device-only if the cloud cannot
meet the TTFT target (issue #7 point 6), else cloud-only; `Plan.reason` says why and
`Plan.feasible` whether the fallback itself meets the targets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pd_device.profiles import DeviceProfile, Profiles, finite_number
from pd_device.settings import Settings
from pd_serve.engine.refine import keep_count

DEFAULT_RHOS = tuple(round(0.05 * i, 2) for i in range(2, 21))  # 0.10, 0.15, ..., 1.00
DEFAULT_PACES_S = (0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.125,
                   0.15, 0.2, 0.25, 0.3, 0.4, 0.5)


@dataclass(frozen=True)
class RequestClass:
    """Prompt length band [lo, hi] tokens, link round trip (s) and bandwidth (bits/s; inf for
    loopback) and the device of this class (e.g. `profiles.device.scaled(2.0)`)."""

    prompt_len_band: tuple[int, int]
    rtt_s: float
    bandwidth_bps: float
    device_speed: DeviceProfile

    def __post_init__(self) -> None:
        lo, hi = self.prompt_len_band
        if isinstance(lo, bool) or isinstance(hi, bool) or not isinstance(lo, int) \
                or not isinstance(hi, int) or not 1 <= lo <= hi:
            raise ValueError(f"prompt_len_band must be integers 1 <= lo <= hi, got "
                             f"{self.prompt_len_band!r}")
        finite_number(self.rtt_s, "rtt_s")
        if not self.bandwidth_bps > 0 or math.isnan(self.bandwidth_bps):
            raise ValueError(f"bandwidth_bps must be > 0 (inf allowed), got {self.bandwidth_bps}")


@dataclass(frozen=True)
class Targets:
    """What the user must get: TTFT (s), largest gap between shown tokens (s), quality in
    [0, 1] (fraction of the full-prompt quality, see QualityCurve)."""

    ttft_s: float
    max_tpot_s: float
    quality_floor: float

    def __post_init__(self) -> None:
        finite_number(self.ttft_s, "ttft_s", strict=True)
        finite_number(self.max_tpot_s, "max_tpot_s", strict=True)
        if not 0.0 <= finite_number(self.quality_floor, "quality_floor") <= 1.0:
            raise ValueError(f"quality_floor must be in [0, 1], got {self.quality_floor}")


@dataclass(frozen=True)
class Grid:
    """The search space and the link model's message sizes (bytes): candidate rhos (must
    include 1.0), paces (max TPOT itself is always a candidate), N <= n_max, the refine window
    W, the device's prefill chunking (`chunk_max_tokens`, `block_size`: as DeviceConfig, so
    the catch-up is costed in the steps the worker runs), safety margins on the predicted
    catch-up (`margin_frac` of it plus `margin_s`: scheduling, measurement spread), and
    whether device-only may be chosen when it meets the targets (False: P/D-Device whenever
    it is feasible, e.g. to evaluate it; device-only stays the fallback for a slow cloud).
    `display_jitter_s`: the display's wake-up lateness allowed for below max TPOT (as
    DeviceConfig.display_jitter_s, which the runtime's controller uses)."""

    rhos: tuple[float, ...] = DEFAULT_RHOS
    paces_s: tuple[float, ...] = DEFAULT_PACES_S
    n_max: int = 512
    refine_window: int = 32
    margin_s: float = 0.0
    margin_frac: float = 0.0
    chunk_max_tokens: int = 256
    block_size: int = 16
    request_bytes: float = 600.0  # JSON envelope of the assist request
    bytes_per_prompt_token: float = 6.0  # one id in a JSON list
    bytes_per_index: float = 6.0  # one keep index in the `refined` event
    token_event_bytes: float = 120.0  # one SSE `token` event
    allow_device_only: bool = True
    display_jitter_s: float = 0.01

    def __post_init__(self) -> None:
        if 1.0 not in self.rhos or any(not 0.0 < r <= 1.0 for r in self.rhos):
            raise ValueError(f"rhos must lie in (0, 1] and include 1.0, got {self.rhos}")
        if not self.paces_s or any(not p > 0 or not math.isfinite(p) for p in self.paces_s):
            raise ValueError(f"paces_s must be finite and > 0, got {self.paces_s}")
        if self.n_max < 0 or self.refine_window < 0:
            raise ValueError(f"n_max and refine_window must be >= 0, got {self.n_max}, "
                             f"{self.refine_window}")
        finite_number(self.margin_s, "margin_s")
        finite_number(self.margin_frac, "margin_frac")
        finite_number(self.display_jitter_s, "display_jitter_s")
        if self.block_size < 1 or self.chunk_max_tokens < self.block_size:
            raise ValueError(f"need 1 <= block_size <= chunk_max_tokens, got "
                             f"{self.block_size}, {self.chunk_max_tokens}")


DEFAULT_GRID = Grid()


@dataclass(frozen=True)
class Plan:
    """The chosen settings with why, their cloud occupancy (s; inf for cloud-only), quality,
    and the model's predictions: TTFT, largest gap, device first-own-token time after T1."""

    settings: Settings
    reason: str
    feasible: bool
    occupancy_s: float
    quality: float
    ttft_s: float
    max_gap_s: float
    handover_s: float = 0.0


def kept_tokens(prompt_len: int, rho: float, window: int) -> int:
    """K: prompt tokens the device prefills after refinement (the cloud's keep rule)."""
    return keep_count(prompt_len, rho, window)


def _transfer_s(nbytes: float, bandwidth_bps: float) -> float:
    return 0.0 if math.isinf(bandwidth_bps) else nbytes * 8.0 / bandwidth_bps


def cloud_first_s(cls: RequestClass, profiles: Profiles, grid: Grid = DEFAULT_GRID) -> float:
    """T1: when the cloud's first token reaches the device (the P/D-Device and cloud-only
    TTFT) for the band's longest prompt."""
    p = cls.prompt_len_band[1]
    up = grid.request_bytes + p * grid.bytes_per_prompt_token
    return cls.rtt_s + _transfer_s(up, cls.bandwidth_bps) + profiles.cloud.ttft(p)


def token_interval_s(cls: RequestClass, profiles: Profiles, grid: Grid = DEFAULT_GRID) -> float:
    """c: the steady gap between cloud tokens at the device."""
    return max(profiles.cloud.tpot_s, _transfer_s(grid.token_event_bytes, cls.bandwidth_bps))


def catchup_steps(kept: int, n: int, chunk_max: int, block: int) -> list[int]:
    """Tokens of each device step from the refined prompt's arrival to the first own token,
    as pd_device.worker runs them: while the cloud's n tokens are still expected, a chunk of
    the whole blocks of the refined prompt + the first token (at most `chunk_max`); the rest
    (with every cloud token) in the hand-over request, which the engine splits into steps of
    at most `chunk_max`."""
    steps, rest = [], kept + n + 1
    if n > 0:
        first = (min(kept + 1, chunk_max) // block) * block
        if first >= block:
            steps.append(first)
            rest -= first
    while rest > 0:
        steps.append(min(rest, chunk_max))
        rest -= steps[-1]
    return steps


def step_s(dev: DeviceProfile, context: int, tokens: int) -> float:
    """One prefill step of `tokens` new tokens after `context` cached ones. The profile times
    prefills from an empty cache; a later chunk also attends to the cached context, so it costs
    what the profile adds from `context` to `context + tokens` tokens plus the profile's
    smallest step (the step's fixed cost), never less than the same chunk from empty."""
    alone = dev.prefill_s(tokens)
    if context <= 0:
        return alone
    return max(alone, dev.prefill_s(context + tokens) - dev.prefill_s(context)
               + dev.prefill_s(1))


def steps_s(dev: DeviceProfile, steps: list[int]) -> float:
    """The steps run one after the other over one growing sequence (`step_s` each)."""
    total, context = 0.0, 0
    for t in steps:
        total += step_s(dev, context, t)
        context += t
    return total


def device_prefill_s(dev: DeviceProfile, tokens: int, grid: Grid = DEFAULT_GRID) -> float:
    """The device's prefill of `tokens` in steps of at most `chunk_max_tokens` (device-only
    TTFT)."""
    full, rest = divmod(tokens, grid.chunk_max_tokens)
    return steps_s(dev, [grid.chunk_max_tokens] * full + ([rest] if rest else []))


def catchup_s(cls: RequestClass, n: int, rho: float, grid: Grid = DEFAULT_GRID) -> float:
    """(Tr + the `catchup_steps`' time, `steps_s`) x (1 + margin_frac) + margin_s: from T1
    until the device has its first own token (the hand-over step samples it)."""
    k = kept_tokens(cls.prompt_len_band[1], rho, grid.refine_window)
    work = steps_s(cls.device_speed, catchup_steps(k, n, grid.chunk_max_tokens,
                                                   grid.block_size))
    return ((_transfer_s(k * grid.bytes_per_index, cls.bandwidth_bps) + work)
            * (1.0 + grid.margin_frac) + grid.margin_s)


def gap_bound_s(targets: Targets, grid: Grid = DEFAULT_GRID) -> float:
    """B: the largest gap the plan may schedule, max TPOT less the display's wake-up allowance
    (ValueError when the allowance leaves nothing); rounded to the nanosecond so that a grid
    pace equal to it is the same candidate."""
    bound = round(targets.max_tpot_s - grid.display_jitter_s, 9)
    if bound <= 0:
        raise ValueError(f"display_jitter_s ({grid.display_jitter_s}) must be below max_tpot_s "
                         f"({targets.max_tpot_s})")
    return bound


def pd_feasible(cls: RequestClass, profiles: Profiles, targets: Targets, n: int, rho: float,
                pace_s: float, grid: Grid = DEFAULT_GRID) -> bool:
    """Whether P/D-Device with (n, rho, pace) meets every target under the timing model."""
    gap = gap_bound_s(targets, grid)
    quality = profiles.quality_for(cls.prompt_len_band)(rho)
    if cloud_first_s(cls, profiles, grid) > targets.ttft_s or quality < \
            targets.quality_floor or cls.device_speed.decode_step_s > gap or pace_s > gap:
        return False
    if n > 0 and pace_s < token_interval_s(cls, profiles, grid):
        return False
    return catchup_s(cls, n, rho, grid) <= n * pace_s + gap


def pace_candidates(targets: Targets, grid: Grid = DEFAULT_GRID) -> list[float]:
    """Grid paces up to B (`gap_bound_s`), and B itself, ascending."""
    bound = gap_bound_s(targets, grid)
    return sorted({p for p in grid.paces_s if p <= bound} | {bound})


def plan(cls: RequestClass, profiles: Profiles, targets: Targets,
         grid: Grid = DEFAULT_GRID) -> Settings:
    """The settings for `cls` (see the module docstring); `explain` gives the reasoning."""
    return explain(cls, profiles, targets, grid).settings


def explain(cls: RequestClass, profiles: Profiles, targets: Targets,
            grid: Grid = DEFAULT_GRID) -> Plan:
    """The chosen settings with reason, occupancy and predicted TTFT / gaps."""
    dev = cls.device_speed
    p = cls.prompt_len_band[1]
    t1 = cloud_first_s(cls, profiles, grid)
    dev_ttft = device_prefill_s(dev, p, grid)
    if grid.allow_device_only and dev_ttft <= targets.ttft_s and \
            dev.decode_step_s <= gap_bound_s(targets, grid):
        return _device_only(dev, f"device alone meets the targets (TTFT {dev_ttft:.3f} s <= "
                                 f"{targets.ttft_s:.3f} s): no cloud needed", True, dev_ttft)
    found = _search(cls, profiles, targets, grid)
    if found is not None:
        n, rho, pace = found
        occ = profiles.cloud.ttft(p) + n * profiles.cloud.tpot_s
        catch = catchup_s(cls, n, rho, grid)
        gap = max(pace if n else 0.0, catch - n * pace, dev.decode_step_s)
        return Plan(Settings(n_cloud=n, rho=rho, pace_s=pace, mode="pd_device"),
                    f"P/D-Device: {n} cloud token(s) cover the device's catch-up of "
                    f"{catch:.3f} s at pace {pace * 1e3:.0f} ms", True, occ,
                    profiles.quality_for(cls.prompt_len_band)(rho), t1, gap, catch)
    return _fallback(cls, profiles, targets, grid, t1, dev_ttft)


def _search(cls: RequestClass, profiles: Profiles, targets: Targets,
            grid: Grid) -> tuple[int, float, float] | None:
    """Smallest (occupancy, N, -rho, pace) over the grid: occupancy grows with N alone, so the
    first N with any feasible setting wins, with its largest feasible rho; the hand-over
    condition only gets looser with a larger pace, so the largest pace decides whether a
    (N, rho) is feasible, and then the smallest pace that is feasible is taken."""
    quality = profiles.quality_for(cls.prompt_len_band)
    rhos = sorted(r for r in set(grid.rhos) if quality(r) >= targets.quality_floor)
    paces = pace_candidates(targets, grid)
    if not rhos:
        return None

    def ok(n: int, rho: float, pace: float) -> bool:
        return pd_feasible(cls, profiles, targets, n, rho, pace, grid)

    for n in range(grid.n_max + 1):
        rho = next((r for r in reversed(rhos) if ok(n, r, paces[-1])), None)
        if rho is not None:
            return n, rho, next(q for q in paces if ok(n, rho, q))
    return None


def _device_only(dev: DeviceProfile, reason: str, feasible: bool, ttft_s: float) -> Plan:
    return Plan(Settings(n_cloud=0, rho=1.0, pace_s=dev.decode_step_s, mode="device_only"),
                reason, feasible, 0.0, 1.0, ttft_s, dev.decode_step_s)


def _fallback(cls: RequestClass, profiles: Profiles, targets: Targets, grid: Grid, t1: float,
              dev_ttft: float) -> Plan:
    dev = cls.device_speed
    if t1 > targets.ttft_s:
        return _device_only(dev, f"cloud TTFT {t1:.3f} s exceeds the target "
                                 f"{targets.ttft_s:.3f} s: device-only (TTFT {dev_ttft:.3f} s,"
                                 f" decode step {dev.decode_step_s * 1e3:.1f} ms)", False,
                            dev_ttft)
    c, bound = token_interval_s(cls, profiles, grid), gap_bound_s(targets, grid)
    if dev.decode_step_s > bound:
        why = (f"device decode step {dev.decode_step_s * 1e3:.1f} ms exceeds max TPOT less the "
               f"wake-up allowance, {bound * 1e3:.1f} ms")
    elif c > bound:
        why = (f"cloud tokens arrive every {c * 1e3:.1f} ms, more than max TPOT less the "
               f"wake-up allowance, {bound * 1e3:.1f} ms, and the device cannot take over after "
               f"the first token")
    else:
        why = (f"the device cannot catch up within {grid.n_max} cloud tokens (device TTFT "
               f"{dev_ttft:.3f} s > target {targets.ttft_s:.3f} s)")
    return Plan(Settings(n_cloud=0, rho=1.0, pace_s=c, mode="cloud_only"),
                f"{why}: cloud-only", c <= bound, math.inf, 1.0, t1, c)
