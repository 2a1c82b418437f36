"""Frozen configuration dataclasses per concern, composed into one ServeConfig, with YAML I/O.

Loading is strict: an unknown key or a value of the wrong type raises ValueError naming the
field (`scheduler.max_num_seqs: expected int, got 'x'`). Values discovered at run time (such as
the number of KV blocks that fit in memory) are runtime state, never written back here.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

HANDOFF_MODES = ("bulk", "per_layer", "block_fixed")
TRANSPORTS = ("tcp", "nccl", "hccl")


@dataclass(frozen=True)
class ModelSpec:
    """Which checkpoint to serve and on what."""

    path: str = "models/shakespeare-llama"
    name: str = "shakespeare-llama"  # the id clients pass as `model`
    backend: str = "mindspore"  # mindspore | torch
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.backend not in ("mindspore", "torch"):
            raise ValueError(f"model.backend must be mindspore or torch, got {self.backend!r}")
        if not self.name:
            raise ValueError("model.name must not be empty")
        if self.threads is not None and self.threads <= 0:
            raise ValueError(f"model.threads must be positive, got {self.threads}")


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache: `num_blocks` blocks of `block_size` tokens each."""

    block_size: int = 16
    num_blocks: int = 1024
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"cache.block_size must be a power of two, got {self.block_size}")
        if self.num_blocks <= 0:
            raise ValueError(f"cache.num_blocks must be positive, got {self.num_blocks}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits per engine step."""

    max_num_seqs: int = 16
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the model's max_position_embeddings

    def __post_init__(self) -> None:
        if self.max_num_seqs <= 0:
            raise ValueError(f"scheduler.max_num_seqs must be positive, got {self.max_num_seqs}")
        if self.max_num_batched_tokens <= 0:
            raise ValueError("scheduler.max_num_batched_tokens must be positive, "
                             f"got {self.max_num_batched_tokens}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("scheduler.max_num_batched_tokens must be >= max_num_seqs, got "
                             f"{self.max_num_batched_tokens} < {self.max_num_seqs}")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ValueError(f"scheduler.max_model_len must be positive, got {self.max_model_len}")


@dataclass(frozen=True)
class ServerConfig:
    """HTTP front end."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()  # empty: no authentication
    max_tokens_default: int = 128
    # a directory: every engine appends one JSON line per step to steps-<role>-<pid>.jsonl
    # there (pd_serve.engine.step_trace; `pd-serve sim profile-steps` fits profiles from it)
    step_trace_dir: str | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"server.port must be in 0..65535, got {self.port}")
        if self.max_tokens_default <= 0:
            raise ValueError("server.max_tokens_default must be positive")


@dataclass(frozen=True)
class PDConfig:
    """Disaggregated (P/D) serving: prefill slots, hand-off and timeouts (how many instances of
    each role a scenario has is the orchestrator's: OrchestratorConfig.groups)."""

    b_p: int = 4  # batch slots per prefill instance (each owns one staging buffer)
    handoff_mode: str = "bulk"  # bulk | per_layer | block_fixed
    # Layer-wise hand-off: decode is engaged before the prefill and reads each layer while the
    # next ones compute (torch backend; docs/architecture.md); handoff_mode is then unused.
    handoff_layerwise: bool = False
    # Decode: staging buffers (each max_model_len tokens of KV), so as many KV reads can run at
    # once; more than 1 keeps a layer-wise read, which waits on its prefill, from holding up
    # the hand-offs behind it.
    decode_staging_buffers: int = 1
    transport_host: str = "127.0.0.1"  # where the KV transport binds
    transport: str = "tcp"  # tcp: host buffers over cann_ext TCP | nccl: GPU buffers over NCCL
    #                         | hccl: NPU buffers over HCCL (docs/operations.md section 5)
    device_checksum: str = "i32sum"  # nccl only: per-layer i32sum on the GPU, or none
    handoff_timeout_s: float = 60.0  # prefill frees a slot decode never confirmed
    fetch_timeout_s: float = 30.0  # decode gives up on one KV transfer
    attach_timeout_s: float = 30.0  # decode aborts a request nobody streams
    forward_deadline_s: float = 30.0  # front end: retry rejected requests until then (503)
    retry_interval_s: float = 0.02  # front end: pause after every prefill rejected
    peer_probe_interval_s: float = 0.5  # prefill: GET /health of decode peers it waits on
    peer_probe_timeout_s: float = 2.0  # prefill: one probe slower than this is a failure
    peer_probe_failures: int = 2  # prefill: consecutive failures that mark a decode peer dead
    fetch_delay_s: float = 0.0  # test only: decode waits this long before each KV fetch
    prefill_queue_max: int = 64  # baseline (a): local FIFO places per prefill (queue=true offers)

    def __post_init__(self) -> None:
        for name in ("b_p", "peer_probe_failures", "decode_staging_buffers"):
            if getattr(self, name) <= 0:
                raise ValueError(f"pd.{name} must be positive, got {getattr(self, name)}")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"pd.transport must be one of {TRANSPORTS}, got {self.transport!r}")
        if self.device_checksum not in ("i32sum", "none"):
            raise ValueError(f"pd.device_checksum must be i32sum or none, "
                             f"got {self.device_checksum!r}")
        if self.handoff_mode not in HANDOFF_MODES:
            raise ValueError(f"pd.handoff_mode must be one of {HANDOFF_MODES}, "
                             f"got {self.handoff_mode!r}")
        for name in ("handoff_timeout_s", "fetch_timeout_s", "attach_timeout_s",
                     "forward_deadline_s", "retry_interval_s", "peer_probe_interval_s",
                     "peer_probe_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"pd.{name} must be positive, got {getattr(self, name)}")
        if self.fetch_delay_s < 0:
            raise ValueError(f"pd.fetch_delay_s must be >= 0, got {self.fetch_delay_s}")
        if self.prefill_queue_max < 0:
            raise ValueError(f"pd.prefill_queue_max must be >= 0, got {self.prefill_queue_max}")


GATEWAY_POLICIES = ("forwarding", "fifo", "round_robin")


@dataclass(frozen=True)
class TTFTBand:
    """TTFT deadline for prompts of at most `max_prompt_tokens` tokens (null: any length)."""

    max_prompt_tokens: int | None = None
    deadline_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_prompt_tokens is not None and self.max_prompt_tokens <= 0:
            raise ValueError(f"max_prompt_tokens must be positive, got {self.max_prompt_tokens}")
        if self.deadline_s <= 0:
            raise ValueError(f"deadline_s must be positive, got {self.deadline_s}")


@dataclass(frozen=True)
class ScenarioConfig:
    """One scenario: its prefill instances (URLs or instance names), policy and TTFT SLO bands
    (sorted by `max_prompt_tokens`; a prompt longer than every band gets the last deadline)."""

    name: str = "default"
    prefill: tuple[str, ...] = ()  # empty: every prefill instance the gateway knows
    policy: str = "forwarding"  # forwarding | fifo | round_robin
    ttft_slo: tuple[TTFTBand, ...] = (TTFTBand(),)

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("scenario name must not be empty")
        if self.policy not in GATEWAY_POLICIES:
            raise ValueError(f"scenario {self.name!r}: policy must be one of {GATEWAY_POLICIES},"
                             f" got {self.policy!r}")
        if not self.ttft_slo:
            raise ValueError(f"scenario {self.name!r}: ttft_slo needs at least one band")
        limits = [b.max_prompt_tokens for b in self.ttft_slo]
        bounded = [n for n in limits if n is not None]
        if bounded != sorted(set(bounded)) or None in limits[:-1]:
            raise ValueError(f"scenario {self.name!r}: ttft_slo bands must have increasing "
                             "max_prompt_tokens, an open band (null) only last")
        if len(set(self.prefill)) != len(self.prefill):
            raise ValueError(f"scenario {self.name!r}: prefill lists an instance twice")


@dataclass(frozen=True)
class GatewayConfig:
    """The gateway: scenarios over prefill instances; `default_scenario` serves requests that
    name none. No scenarios: one scenario `default_scenario` over every prefill instance."""

    default_scenario: str = "default"
    scenarios: tuple[ScenarioConfig, ...] = ()
    timeline_capacity: int = 1024  # finished request timelines kept for /debug/requests/{id}
    max_stats_samples: int = 10000  # latency samples per scenario kept for /stats percentiles
    failure_text: str | None = None  # ends a request whose instance failed mid-way (else error)

    def __post_init__(self) -> None:
        names = [s.name for s in self.scenarios]
        if len(set(names)) != len(names):
            raise ValueError(f"gateway.scenarios: duplicate scenario names in {names}")
        if self.scenarios and self.default_scenario not in names:
            raise ValueError(f"gateway.default_scenario {self.default_scenario!r} is not one of "
                             f"the scenarios {names}")
        if self.timeline_capacity <= 0 or self.max_stats_samples <= 0:
            raise ValueError("gateway.timeline_capacity and max_stats_samples must be positive")


@dataclass(frozen=True)
class GroupTarget:
    """The P/D group of one scenario: how many prefill and decode instances it should have."""

    scenario: str = "default"
    prefill: int = 1
    decode: int = 1

    def __post_init__(self) -> None:
        if not self.scenario:
            raise ValueError("orchestrator.groups: scenario must not be empty")
        if self.prefill < 0 or self.decode < 0:
            raise ValueError(f"orchestrator.groups[{self.scenario}]: prefill and decode must be "
                             f">= 0, got {self.prefill}:{self.decode}")


@dataclass(frozen=True)
class OrchestratorConfig:
    """The orchestrator and how instances and gateways reach it: registry URL (`embedded`, an
    orchestrator's http://HOST:PORT, or zk://HOST:PORT[/chroot]), the groups per scenario,
    health checking, and the online adjuster."""

    registry: str = "embedded"
    host: str = "127.0.0.1"
    port: int = 8500
    groups: tuple[GroupTarget, ...] = (GroupTarget(),)
    spares: int = 0  # `pd-serve up`: extra stateless instances kept for recovery
    session_timeout_s: float = 6.0  # registry session: ephemeral nodes vanish after this
    report_interval_s: float = 1.0  # instance health reports into the registry
    health_interval_s: float = 0.5  # orchestrator: GET /health of every instance
    health_failures: int = 3  # consecutive failed checks that mark an instance failed
    drain_timeout_s: float = 120.0  # re-role/release: wait this long for in-flight work
    adjust: bool = False  # online adjuster on
    adjust_interval_s: float = 5.0  # how often the adjuster reads the gateways' metrics
    adjust_window_s: float = 20.0
    adjust_min_samples: int = 10  # a window with fewer finished requests is ignored
    adjust_e2e_rise: float = 0.25  # relative E2E rise over the baseline that counts as "up"
    adjust_share_delta: float = 0.08  # change of the T_p/E2E share that picks the direction
    adjust_hysteresis: int = 2  # consecutive windows a signal must persist
    adjust_cooldown_s: float = 30.0
    min_per_role: int = 1  # the adjuster never takes a role below this

    def __post_init__(self) -> None:
        names = [g.scenario for g in self.groups]
        if len(set(names)) != len(names):
            raise ValueError(f"orchestrator.groups: a scenario appears twice in {names}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"orchestrator.port must be 0..65535, got {self.port}")
        for name in ("session_timeout_s", "report_interval_s", "health_interval_s",
                     "drain_timeout_s", "adjust_interval_s", "adjust_window_s",
                     "adjust_cooldown_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"orchestrator.{name} must be positive, got "
                                 f"{getattr(self, name)}")
        if (self.health_failures <= 0 or self.adjust_hysteresis <= 0 or self.spares < 0
                or self.adjust_min_samples <= 0):
            raise ValueError("orchestrator.health_failures, adjust_hysteresis and "
                             "adjust_min_samples must be positive, spares >= 0")
        if self.min_per_role < 1:
            raise ValueError(f"orchestrator.min_per_role must be >= 1, got {self.min_per_role}")


@dataclass(frozen=True)
class ServeConfig:
    """Everything one serving process needs."""

    model: ModelSpec = field(default_factory=ModelSpec)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    pd: PDConfig = field(default_factory=PDConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    orchestrator: OrchestratorConfig = field(default_factory=OrchestratorConfig)


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Builds dataclass `cls` from plain data, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ValueError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where or cls.__name__}: unknown key(s) {unknown} "
                         f"(allowed: {sorted(names)})")
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise ValueError(f"{where + ': ' if where else ''}{exc}") from exc


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        item = typing.get_args(tp)[0]
        return tuple(_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ValueError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-data view of a config (tuples as lists), suitable for YAML."""
    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(cfg))


def load_yaml(cls: type, path: str | Path) -> Any:
    """Reads a YAML file into `cls`; errors name the file and the field."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read config ({exc})") from exc
    try:
        return from_dict(cls, data)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc


def load_serve_config(path: str | Path) -> ServeConfig:
    return load_yaml(ServeConfig, path)
