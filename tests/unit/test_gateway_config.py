"""GatewayConfig validation (strict YAML, errors naming the field) and scenario resolution
(header, body metadata, default; unknown -> 404, malformed -> 400)."""

from __future__ import annotations

from typing import Any

import pytest

from pd_serve.api.errors import APIError
from pd_serve.config import GatewayConfig, ScenarioConfig, ServeConfig, TTFTBand, from_dict
from pd_serve.gateway.scenarios import build_scenarios, parse_instances, scenario_of

INSTANCES = {"prefill-0": "http://h:1", "prefill-1": "http://h:2"}


def gw(data: dict[str, Any]) -> GatewayConfig:
    cfg: ServeConfig = from_dict(ServeConfig, {"gateway": data})
    return cfg.gateway


def test_yaml_shape_loads() -> None:
    cfg = gw({"default_scenario": "chat", "scenarios": [
        {"name": "chat", "prefill": ["prefill-0"], "policy": "forwarding",
         "ttft_slo": [{"max_prompt_tokens": 512, "deadline_s": 1}, {"deadline_s": 4.0}]},
        {"name": "batch", "policy": "round_robin"}]})
    assert cfg.scenarios[0].ttft_slo == (TTFTBand(512, 1.0), TTFTBand(None, 4.0))
    assert cfg.scenarios[1].prefill == () and cfg.scenarios[1].policy == "round_robin"


@pytest.mark.parametrize(("data", "match"), [
    ({"scenarios": [{"name": "x", "policy": "random"}], "default_scenario": "x"},
     r"gateway\.scenarios\[0\].*policy must be one of"),
    ({"scenarios": [{"name": "x"}]}, "default_scenario 'default' is not one of"),
    ({"scenarios": [{"name": "x"}, {"name": "x"}], "default_scenario": "x"}, "duplicate"),
    ({"scenarios": [{"name": "x", "ttft_slo": []}], "default_scenario": "x"}, "at least one band"),
    ({"scenarios": [{"name": "x", "ttft_slo": [{"deadline_s": 1}, {"max_prompt_tokens": 5}]}],
      "default_scenario": "x"}, "open band"),
    ({"scenarios": [{"name": "x",
                     "ttft_slo": [{"max_prompt_tokens": 9}, {"max_prompt_tokens": 5}]}],
      "default_scenario": "x"}, "increasing"),
    ({"scenarios": [{"name": "x", "ttft_slo": [{"deadline_s": 0}]}], "default_scenario": "x"},
     "deadline_s must be positive"),
    ({"scenarios": [{"name": "x", "prefill": ["a", "a"]}], "default_scenario": "x"}, "twice"),
    ({"scenarios": [{"name": "x", "bogus": 1}], "default_scenario": "x"}, r"unknown key.*bogus"),
    ({"scenarios": [{"name": "x", "ttft_slo": [{"deadline_s": "1"}]}], "default_scenario": "x"},
     r"deadline_s: expected float"),
])
def test_bad_config_names_the_field(data: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        gw(data)


def test_no_scenarios_gives_default_over_every_instance_with_fallback_deadline() -> None:
    table = build_scenarios(GatewayConfig(), INSTANCES, fallback_deadline_s=7.0)
    assert list(table) == ["default"]
    assert table["default"].instances == ("http://h:1", "http://h:2")
    assert table["default"].ttft_slo == (TTFTBand(None, 7.0),)


def test_scenarios_over_subsets_by_name_or_url() -> None:
    cfg = GatewayConfig("a", (ScenarioConfig("a", ("prefill-0",)),
                              ScenarioConfig("b", ("http://h:2/",), "fifo")))
    table = build_scenarios(cfg, INSTANCES)
    assert table["a"].instances == ("http://h:1",) and table["b"].instances == ("http://h:2",)


def test_unknown_instance_is_an_error() -> None:
    cfg = GatewayConfig("a", (ScenarioConfig("a", ("prefill-9",)),))
    with pytest.raises(ValueError, match="prefill-9"):
        build_scenarios(cfg, INSTANCES)


def test_parse_instances() -> None:
    assert parse_instances(["p=http://x:1/", "http://y:2"]) == {"p": "http://x:1",
                                                               "http://y:2": "http://y:2"}
    with pytest.raises(ValueError, match="NAME=URL"):
        parse_instances(["p=ftp://x"])


TABLE = build_scenarios(GatewayConfig("a", (ScenarioConfig("a"), ScenarioConfig("b"))), INSTANCES)


@pytest.mark.parametrize(("headers", "body", "name"), [
    ({}, {}, "a"),
    ({"x-pd-scenario": "b"}, {}, "b"),
    ({}, {"metadata": {"scenario": "b"}}, "b"),
    ({"x-pd-scenario": "a"}, {"metadata": {"scenario": "b"}}, "a"),  # the header wins
    ({}, {"metadata": {"user": "u"}}, "a"),
])
def test_scenario_resolution(headers: dict[str, str], body: dict[str, Any], name: str) -> None:
    assert scenario_of(headers, body, "a", TABLE).name == name


@pytest.mark.parametrize(("headers", "body", "status", "code"), [
    ({"x-pd-scenario": "zzz"}, {}, 404, "scenario_not_found"),
    ({}, {"metadata": {"scenario": "zzz"}}, 404, "scenario_not_found"),
    ({}, {"metadata": {"scenario": 3}}, 400, "invalid_value"),
    ({}, {"metadata": "b"}, 400, "invalid_value"),
    ({"x-pd-scenario": " "}, {}, 400, "invalid_value"),
])
def test_bad_scenario_is_a_clear_error(headers: dict[str, str], body: dict[str, Any],
                                       status: int, code: str) -> None:
    with pytest.raises(APIError) as info:
        scenario_of(headers, body, "a", TABLE)
    assert info.value.status == status and info.value.code == code
    assert info.value.body()["error"]["message"]
