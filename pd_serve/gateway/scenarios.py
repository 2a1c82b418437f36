"""Scenario tables of the gateway: which prefill instances, policy and TTFT bands each scenario
has (from GatewayConfig and the instances the gateway was given), and which scenario a request
names (header `X-PD-Scenario`, else body `metadata.scenario`, else the default)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pd_serve.api.errors import APIError, bad_request
from pd_serve.config import GatewayConfig, ScenarioConfig, TTFTBand

SCENARIO_HEADER = "x-pd-scenario"


@dataclass(frozen=True)
class Scenario:
    name: str
    instances: tuple[str, ...]  # prefill URLs
    policy: str
    ttft_slo: tuple[TTFTBand, ...]


def build_scenarios(cfg: GatewayConfig, instances: Mapping[str, str],
                    fallback_deadline_s: float = 30.0,
                    dynamic: bool = False) -> dict[str, Scenario]:
    """`instances`: prefill instance name -> URL (a URL may name itself). A scenario with no
    `prefill` list gets every instance; ValueError names an unknown instance. No scenarios
    configured: one, `default_scenario`, forwarding over every instance with one TTFT deadline
    of `fallback_deadline_s` (pd.forward_deadline_s). `dynamic`: the orchestrator's meta info
    fills in the instances later (`instances` is ignored; every scenario starts empty)."""
    if dynamic:
        instances = {}
    elif not instances:
        raise ValueError("the gateway needs at least one prefill instance")
    urls = {u.rstrip("/") for u in instances.values()}
    configured = cfg.scenarios or (ScenarioConfig(
        name=cfg.default_scenario, ttft_slo=(TTFTBand(None, fallback_deadline_s),)),)
    out: dict[str, Scenario] = {}
    for sc in configured:
        chosen = () if dynamic else (sc.prefill or tuple(instances))
        resolved: list[str] = []
        for ref in chosen:
            url = instances.get(ref) or (ref.rstrip("/") if ref.rstrip("/") in urls else None)
            if url is None:
                raise ValueError(f"gateway.scenarios: scenario {sc.name!r} names prefill "
                                 f"instance {ref!r}, which is not one of {sorted(instances)}")
            resolved.append(url.rstrip("/"))
        out[sc.name] = Scenario(sc.name, tuple(dict.fromkeys(resolved)), sc.policy, sc.ttft_slo)
    return out


def parse_instances(specs: list[str]) -> dict[str, str]:
    """`name=url` or plain `url` (named by itself) -> {name: url}."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, url = spec.partition("=")
        name, url = (name.strip(), url.strip()) if sep else (spec.strip(), spec.strip())
        if not name or not url.startswith(("http://", "https://")):
            raise ValueError(f"--prefill: expected NAME=URL or URL, got {spec!r}")
        if name in out:
            raise ValueError(f"--prefill: instance {name!r} given twice")
        out[name] = url.rstrip("/")
    return out


def scenario_of(headers: Mapping[str, str], body: Mapping[str, Any], default: str,
                known: Mapping[str, Scenario]) -> Scenario:
    """The scenario a request names; 400 for a malformed name, 404 for an unknown one."""
    name: Any = headers.get(SCENARIO_HEADER)
    param = "X-PD-Scenario"
    if name is None:
        meta = body.get("metadata")
        if meta is not None and not isinstance(meta, dict):
            raise bad_request("metadata: expected an object", param="metadata",
                              code="invalid_value")
        name = (meta or {}).get("scenario")
        param = "metadata.scenario"
    if name is None:
        return known[default]
    if not isinstance(name, str) or not name.strip():
        raise bad_request(f"{param}: expected a non-empty scenario name", param=param,
                          code="invalid_value")
    sc = known.get(name.strip())
    if sc is None:
        raise APIError(404, f"The scenario `{name}` does not exist (known: "
                       f"{', '.join(sorted(known))}).", param=param, code="scenario_not_found")
    return sc
