"""Configuration of one simulation: instance shape, gateway timing, scenarios with their groups
and SLOs, deployment mode and the optional online adjuster (frozen dataclasses; a bad value
raises ValueError naming the field)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pd_serve.config import GATEWAY_POLICIES, TTFTBand
from pd_serve.orchestrator.adjuster import AdjusterConfig

MODES = ("disaggregated", "aggregated")


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if isinstance(value, bool) or not ok:
        raise ValueError(f"{name}: expected a {'non-negative' if allow_zero else 'positive'} "
                         f"number, got {value!r}")


@dataclass(frozen=True)
class InstanceSpec:
    """One instance's engine (every instance alike). `b_p`: prefill slots; `max_num_seqs`:
    decode batch places (an aggregated instance's admission slots); `kv_blocks` of
    `block_size` tokens: decode / aggregated KV capacity; `prefix_cache_blocks`: LRU capacity
    of a prefill instance's prefix cache in trace hash blocks of `hash_block_tokens` (0: off)."""

    b_p: int = 4
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 2048
    kv_blocks: int = 4096
    block_size: int = 16
    prefill_queue_max: int = 64
    prefix_cache_blocks: int = 0
    hash_block_tokens: int = 512

    def __post_init__(self) -> None:
        for name in ("b_p", "max_num_seqs", "max_num_batched_tokens", "kv_blocks",
                     "block_size", "hash_block_tokens"):
            _positive(f"instance.{name}", getattr(self, name))
        for name in ("prefill_queue_max", "prefix_cache_blocks"):
            _positive(f"instance.{name}", getattr(self, name), allow_zero=True)


@dataclass(frozen=True)
class GatewaySpec:
    """`rtt_s`: one offer's round trip (gateway -> instance -> gateway; every other control
    message takes half of it); `retry_interval_s`: the policy's Wait. `park_waiters`: requests
    in the waiting line behind its head are not woken every retry interval to get the same
    Wait again, only when they become the head or the policy would terminate them (exact: those
    decisions change no state)."""

    rtt_s: float = 0.001
    retry_interval_s: float = 0.02
    park_waiters: bool = True

    def __post_init__(self) -> None:
        _positive("gateway.rtt_s", self.rtt_s, allow_zero=True)
        _positive("gateway.retry_interval_s", self.retry_interval_s)


@dataclass(frozen=True)
class ScenarioSpec:
    """A scenario's group (n_p prefill, n_d decode; aggregated mode runs n_p + n_d aggregated
    instances, equal hardware), its gateway policy and SLOs (TTFT bands, which are also the
    gateway's forwarding deadline; TPOT and E2E limits optional)."""

    name: str
    n_p: int
    n_d: int
    policy: str = "forwarding"
    ttft_slo: tuple[TTFTBand, ...] = (TTFTBand(),)
    tpot_slo_s: float | None = None
    e2e_slo_s: float | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("scenario.name: must not be empty")
        if self.policy not in GATEWAY_POLICIES:
            raise ValueError(f"scenario {self.name!r}: policy must be one of "
                             f"{GATEWAY_POLICIES}, got {self.policy!r}")
        for key in ("n_p", "n_d"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"scenario {self.name!r}: {key} must be an integer >= 0")
        if self.n_p + self.n_d == 0:
            raise ValueError(f"scenario {self.name!r}: needs at least one instance")
        if not self.ttft_slo:
            raise ValueError(f"scenario {self.name!r}: ttft_slo needs at least one band")
        for key in ("tpot_slo_s", "e2e_slo_s"):
            if getattr(self, key) is not None:
                _positive(f"scenario {self.name!r}: {key}", getattr(self, key))


@dataclass(frozen=True)
class AdjustSpec:
    """The online adjuster (pd_serve.orchestrator.adjuster) fed every `interval_s` with the
    finished requests' (TTFT, E2E); a re-roled instance drains, then switches in `switch_s`."""

    adjuster: AdjusterConfig = field(default_factory=AdjusterConfig)
    interval_s: float = 5.0
    switch_s: float = 5.0

    def __post_init__(self) -> None:
        _positive("adjust.interval_s", self.interval_s)
        _positive("adjust.switch_s", self.switch_s, allow_zero=True)


@dataclass(frozen=True)
class HostSpec:
    """Shared hosts (pd_serve.sim.host): instances placed `size` to a host in id order; while k
    co-located instances compute, a prefill step stretches by 1 + (prefill_factor - 1) k and a
    decode step by 1 + (decode_factor - 1) k (factors measured, >= 1; 1: no slowdown), and a
    first token that leaves a prefill instance while a neighbour computes takes
    `first_token_delay_s` longer to reach the gateway (the host's event loops and relays are
    busy with the neighbour's stream)."""

    size: int = 2
    prefill_factor: float = 1.0
    decode_factor: float = 1.0
    first_token_delay_s: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"host.size: expected an integer >= 1, got {self.size!r}")
        for name in ("prefill_factor", "decode_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (math.isfinite(value) and value >= 1):
                raise ValueError(f"host.{name}: expected a finite number >= 1, got {value!r}")
        _positive("host.first_token_delay_s", self.first_token_delay_s, allow_zero=True)

    def factor(self, role: str) -> float:
        if role == "prefill":
            return self.prefill_factor
        if role == "decode":
            return self.decode_factor
        raise ValueError(f"host: no co-location factor for role {role!r}")


@dataclass(frozen=True)
class SimConfig:
    scenarios: tuple[ScenarioSpec, ...]
    mode: str = "disaggregated"
    instance: InstanceSpec = field(default_factory=InstanceSpec)
    gateway: GatewaySpec = field(default_factory=GatewaySpec)
    spares: int = 0  # stateless instances the orchestrator may assign (disaggregated)
    adjust: AdjustSpec | None = None
    noise_cv: float = 0.0  # lognormal noise on step and hand-off times (0: deterministic)
    seed: int = 0
    host: HostSpec | None = None  # shared hosts (None: every instance has its own)

    def __post_init__(self) -> None:
        if not self.scenarios:
            raise ValueError("scenarios: at least one scenario")
        names = [s.name for s in self.scenarios]
        if len(set(names)) != len(names):
            raise ValueError(f"scenarios: duplicate names in {names}")
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {self.mode!r}")
        if self.mode == "aggregated" and self.adjust is not None:
            raise ValueError("adjust: the P/D adjuster needs mode 'disaggregated'")
        if self.mode == "aggregated" and self.host is not None:
            raise ValueError("host: shared hosts are modelled for mode 'disaggregated' only")
        if isinstance(self.spares, bool) or not isinstance(self.spares, int) or self.spares < 0:
            raise ValueError(f"spares: expected an integer >= 0, got {self.spares!r}")
        _positive("noise_cv", self.noise_cv, allow_zero=True)
