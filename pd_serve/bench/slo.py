"""Service-level objectives of a benchmark: TTFT / TPOT / E2E limits in ms, overall and per
scenario, with TTFT optionally banded by prompt length exactly like the gateway's `ttft_slo`.

Sources, later ones overriding earlier ones key by key:
1. an SLO file (YAML or JSON), either of the bench's own form
       ttft_ms: 2000            # every scenario (all keys optional)
       tpot_ms: 100
       e2el_ms: 30000
       scenarios:
         - name: chat
           ttft_slo: [{max_prompt_tokens: 256, deadline_s: 1.0}, {deadline_s: 4.0}]
           tpot_ms: 80
   or a pd-serve deployment config, whose `gateway.scenarios[*].ttft_slo` bands are used;
2. `--goodput` flags as vLLM's (`ttft:500 tpot:50 e2el:8000`, `e2e` accepted for `e2el`), or
   `SCENARIO:KEY:MS` for one scenario.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from pd_serve.config import TTFTBand, from_dict

KEYS = {"ttft": "ttft_ms", "tpot": "tpot_ms", "e2el": "e2el_ms", "e2e": "e2el_ms"}


@dataclass(frozen=True)
class SLO:
    """Limits (ms, inclusive); None: not part of the SLO. `ttft_slo` bands (by prompt tokens,
    gateway semantics: first band the prompt fits, longer than all: the last) win over
    `ttft_ms`."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None
    ttft_slo: tuple[TTFTBand, ...] = ()

    def __post_init__(self) -> None:
        for key in ("ttft_ms", "tpot_ms", "e2el_ms"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise ValueError(f"{key} must be > 0 ms, got {value}")

    @property
    def empty(self) -> bool:
        return self.ttft_ms is None and self.tpot_ms is None and self.e2el_ms is None \
            and not self.ttft_slo

    @property
    def has_ttft(self) -> bool:
        return self.ttft_ms is not None or bool(self.ttft_slo)

    def ttft_limit_ms(self, prompt_tokens: int) -> float | None:
        for band in self.ttft_slo:
            if band.max_prompt_tokens is None or prompt_tokens <= band.max_prompt_tokens:
                return band.deadline_s * 1000.0
        if self.ttft_slo:
            return self.ttft_slo[-1].deadline_s * 1000.0
        return self.ttft_ms

    def over(self, base: SLO) -> SLO:
        """This SLO with every unset key taken from `base`."""
        return SLO(self.ttft_ms if self.ttft_ms is not None else base.ttft_ms,
                   self.tpot_ms if self.tpot_ms is not None else base.tpot_ms,
                   self.e2el_ms if self.e2el_ms is not None else base.e2el_ms,
                   self.ttft_slo or (() if self.ttft_ms is not None else base.ttft_slo))

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: v for k, v in (("ttft_ms", self.ttft_ms),
                                                 ("tpot_ms", self.tpot_ms),
                                                 ("e2el_ms", self.e2el_ms)) if v is not None}
        if self.ttft_slo:
            out["ttft_slo"] = [{"max_prompt_tokens": b.max_prompt_tokens,
                                "deadline_s": b.deadline_s} for b in self.ttft_slo]
        return out


@dataclass(frozen=True)
class ScenarioSLO:
    name: str
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None
    ttft_slo: tuple[TTFTBand, ...] = ()

    def slo(self) -> SLO:
        return SLO(self.ttft_ms, self.tpot_ms, self.e2el_ms, self.ttft_slo)


@dataclass(frozen=True)
class SLOFile:
    """The bench SLO file's schema (strict: unknown keys are errors)."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None
    ttft_slo: tuple[TTFTBand, ...] = ()
    scenarios: tuple[ScenarioSLO, ...] = ()


@dataclass(frozen=True)
class SLOTable:
    """The SLO of every scenario: its own keys over the default's."""

    default: SLO = SLO()
    scenarios: tuple[tuple[str, SLO], ...] = ()

    def of(self, scenario: str) -> SLO:
        own = dict(self.scenarios).get(scenario)
        return own.over(self.default) if own is not None else self.default

    @property
    def empty(self) -> bool:
        return self.default.empty and all(s.empty for _, s in self.scenarios)

    def describe(self) -> dict[str, Any]:
        return {"default": self.default.describe(),
                "scenarios": {n: self.of(n).describe() for n, _ in self.scenarios}}


def load_slo_file(path: str | Path) -> SLOTable:
    """An SLO file (see the module docstring); ValueError naming the file and field."""
    try:
        text = Path(path).read_text()
        data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read SLO file ({exc})") from exc
    data = data or {}
    try:
        if isinstance(data, dict) and "gateway" in data:
            gateway = data["gateway"] or {}
            data = {"scenarios": [{"name": s["name"], "ttft_slo": s.get("ttft_slo", [])}
                                  for s in gateway.get("scenarios", [])]}
        f: SLOFile = from_dict(SLOFile, data)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: {exc}") from exc
    default = SLO(f.ttft_ms, f.tpot_ms, f.e2el_ms, f.ttft_slo)
    return SLOTable(default, tuple((s.name, s.slo()) for s in f.scenarios))


def parse_goodput(items: Iterable[str], base: SLOTable | None = None) -> SLOTable:
    """`KEY:MS` (every scenario) or `SCENARIO:KEY:MS` items, each possibly a comma- or
    space-separated list, applied over `base`."""
    table = base or SLOTable()
    default, per = table.default, dict(table.scenarios)
    for item in (p for raw in items for p in raw.replace(",", " ").split()):
        parts = item.split(":")
        if len(parts) not in (2, 3) or parts[-2].lower() not in KEYS:
            raise ValueError(f"--goodput: expected KEY:MS or SCENARIO:KEY:MS with KEY one of "
                             f"ttft, tpot, e2el; got {item!r}")
        try:
            ms = float(parts[-1])
        except ValueError:
            raise ValueError(f"--goodput: {parts[-1]!r} in {item!r} is not a number") from None
        field = KEYS[parts[-2].lower()]
        if len(parts) == 2:
            default = _with(default, field, ms)
        else:
            per[parts[0]] = _with(per.get(parts[0], SLO()), field, ms)
    return SLOTable(default, tuple(per.items()))


def _with(slo: SLO, field: str, ms: float) -> SLO:
    """`slo` with one limit set (a flat TTFT limit replaces any bands)."""
    if field == "ttft_ms":
        return replace(slo, ttft_ms=ms, ttft_slo=())
    if field == "tpot_ms":
        return replace(slo, tpot_ms=ms)
    return replace(slo, e2el_ms=ms)
