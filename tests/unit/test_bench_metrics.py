"""Bench metrics (pd_serve.bench.metrics) on hand-built request records against hand-computed
values with vLLM's definitions (TPOT excludes the first token and skips one-token outputs, ITL
pools every gap, population std, linear percentiles, failures excluded from latency but counted),
goodput and SLO attainment with per-scenario SLOs and TTFT bands (pd_serve.bench.slo), edge
cases (empty, all failed, one-token outputs), and the DistServe sweep (pd_serve.bench.sweep)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pd_serve.bench.client import RequestRecord
from pd_serve.bench.metrics import compute_metrics, meets, per_scenario, tpot_s
from pd_serve.bench.slo import SLO, SLOTable, load_slo_file, parse_goodput
from pd_serve.bench.sweep import SweepSpec, geometric_rates, run_sweep
from pd_serve.config import TTFTBand


def rec(index: int, send: float, chunks: tuple[float, ...], out: int, prompt: int = 10,
        scenario: str = "default", error: str = "", status: int | None = 200,
        scheduled: float | None = None) -> RequestRecord:
    done = (chunks[-1] if chunks else send) + 0.001
    return RequestRecord(index, scenario, send if scheduled is None else scheduled, send,
                         chunks, done, prompt, max(out, 1), prompt, out, True, status, error)


# r0..r2 succeed; r3 is an HTTP error, r4 failed after its first chunk
RECORDS = [
    rec(0, 0.0, (0.1, 0.15, 0.25, 0.3), 4, prompt=10, scenario="a"),
    rec(1, 0.5, (0.7, 0.8), 2, prompt=20, scenario="a"),
    rec(2, 1.0, (1.05,), 1, prompt=30, scenario="b"),
    rec(3, 1.0, (), 0, prompt=40, scenario="b", error="HTTP 503: busy", status=503),
    rec(4, 1.1, (1.2,), 0, prompt=50, scenario="b", error="stream error: died"),
]


def test_counts_throughput_and_latency_stats_by_hand() -> None:
    m = compute_metrics(RECORDS, 2.0, percentiles=(90, 99))
    assert (m.completed, m.failed) == (3, 2)
    assert (m.total_input_tokens, m.total_output_tokens) == (60, 7)  # completed requests only
    assert m.request_throughput == pytest.approx(1.5)
    assert m.output_throughput == pytest.approx(3.5)
    assert m.total_token_throughput == pytest.approx(33.5)
    ttft = m.stat("ttft")  # [100, 200, 50] ms
    assert ttft.mean == pytest.approx(350 / 3)
    assert ttft.median == pytest.approx(100)
    assert ttft.std == pytest.approx(math.sqrt(3888.8888889))  # population std
    assert dict(ttft.percentiles) == pytest.approx({90: 180.0, 99: 198.0})  # linear
    tpot = m.stat("tpot")  # (300-100)/3 and (300-200)/1; the one-token request has none
    assert tpot.mean == pytest.approx((200 / 3 + 100) / 2)
    assert dict(tpot.percentiles)[90] == pytest.approx(200 / 3 + 0.9 * (100 - 200 / 3))
    itl = m.stat("itl")  # pooled gaps [50, 100, 50, 100]
    assert (itl.mean, itl.median, itl.std) == pytest.approx((75, 75, 25))
    e2el = m.stat("e2el")  # [300, 300, 50]
    assert (e2el.mean, e2el.median) == pytest.approx((650 / 3, 300))
    assert m.max_output_tokens_per_s == 6  # chunks in [0, 1) s from the first send
    assert m.max_concurrent_requests == 1
    assert m.request_goodput is None and m.slo_attainment is None


def test_result_keys_follow_vllm() -> None:
    d = compute_metrics(RECORDS, 2.0, percentiles=(50, 99.9)).to_dict()
    for key in ("duration", "completed", "failed", "total_input_tokens", "total_output_tokens",
                "request_throughput", "request_goodput", "output_throughput",
                "total_token_throughput", "max_output_tokens_per_s", "max_concurrent_requests",
                "mean_ttft_ms", "median_tpot_ms", "std_itl_ms", "p99.9_e2el_ms", "p50_ttft_ms"):
        assert key in d, key
    json.dumps(d, allow_nan=False)


def test_goodput_and_attainment_with_one_slo() -> None:
    slos = parse_goodput(["ttft:150", "tpot:90"])
    m = compute_metrics(RECORDS, 2.0, slos=slos)
    # r0 good (100 ms, 66.7 ms); r1 TTFT 200 > 150; r2 good (TPOT 0 for one token); failures
    assert m.request_goodput == pytest.approx(1.0)
    assert m.slo_attainment == pytest.approx(2 / 5)  # failed requests count as misses
    assert m.ttft_slo_attainment == pytest.approx(2 / 5)
    strict = compute_metrics(RECORDS, 2.0, slos=parse_goodput(["tpot:60"]))
    assert strict.request_goodput == pytest.approx(0.5)  # only the one-token request
    assert strict.ttft_slo_attainment is None  # no TTFT limit given


def test_slo_limits_are_inclusive() -> None:
    r = rec(0, 0.0, (0.25, 0.5, 0.75), 3)  # TTFT 250, TPOT 250, E2EL 750, exact in binary
    assert meets(r, SLO(250.0, 250.0, 750.0))
    assert not meets(r, SLO(249.0))
    assert not meets(r, SLO(tpot_ms=249.0))
    assert not meets(r, SLO(e2el_ms=749.0))
    assert not meets(rec(1, 0.0, (0.1,), 1, error="cut"), SLO(1000.0))


def test_per_scenario_slos_and_ttft_bands() -> None:
    bands = (TTFTBand(25, 0.01), TTFTBand(None, 0.06))  # r2: 30 prompt tokens -> 60 ms
    slos = SLOTable(SLO(ttft_ms=150.0), (("b", SLO(ttft_slo=bands)),))
    per = per_scenario(RECORDS, 2.0, slos=slos)
    assert set(per) == {"a", "b"}
    assert (per["a"].completed, per["a"].failed) == (2, 0)
    assert per["a"].ttft_slo_attainment == pytest.approx(1 / 2)  # 200 ms > 150
    assert per["b"].ttft_slo_attainment == pytest.approx(1 / 3)  # 50 <= 60; two failed
    assert per["b"].request_throughput == pytest.approx(0.5)  # over the run's duration
    tight = SLOTable(SLO(ttft_ms=150.0), (("b", SLO(ttft_slo=(TTFTBand(None, 0.04),))),))
    assert per_scenario(RECORDS, 2.0, slos=tight)["b"].ttft_slo_attainment == 0.0


def test_edge_cases_empty_all_failed_one_token() -> None:
    empty = compute_metrics([], 0.0, slos=parse_goodput(["ttft:1"]))
    assert (empty.completed, empty.failed, empty.request_throughput) == (0, 0, 0.0)
    assert empty.stat("ttft").mean == 0.0 and empty.slo_attainment is None
    assert empty.request_goodput == 0.0 and empty.max_concurrent_requests == 0
    failed = compute_metrics(RECORDS[3:], 1.0, slos=parse_goodput(["ttft:1000"]))
    assert (failed.completed, failed.failed, failed.slo_attainment) == (0, 2, 0.0)
    assert failed.stat("itl").mean == 0.0
    ones = compute_metrics([rec(0, 0.0, (0.2,), 1), rec(1, 0.0, (0.4,), 1)], 1.0)
    assert ones.stat("tpot").mean == 0.0 and ones.stat("itl").mean == 0.0  # none: 0 as vLLM
    assert ones.stat("ttft").mean == pytest.approx(300.0)
    assert ones.max_concurrent_requests == 2
    assert tpot_s(rec(0, 0.0, (0.2,), 1)) is None


def test_client_queue_time_is_reported_not_in_ttft() -> None:
    r = rec(0, 1.0, (1.1, 1.2), 2, scheduled=0.25)
    m = compute_metrics([r], 2.0)
    assert m.mean_client_queue_ms == pytest.approx(750.0)
    assert m.stat("ttft").mean == pytest.approx(100.0)


def test_slo_file_forms(tmp_path: Path) -> None:
    own = tmp_path / "slo.yaml"
    own.write_text("ttft_ms: 500\ntpot_ms: 50\nscenarios:\n  - name: chat\n    ttft_slo:\n"
                   "      - {max_prompt_tokens: 100, deadline_s: 0.2}\n      - {deadline_s: 2}\n"
                   "  - name: batch\n    e2el_ms: 9000\n")
    table = load_slo_file(own)
    assert table.of("chat").ttft_limit_ms(50) == pytest.approx(200.0)
    assert table.of("chat").ttft_limit_ms(5000) == pytest.approx(2000.0)
    assert table.of("chat").tpot_ms == 50.0
    assert table.of("batch") == SLO(500.0, 50.0, 9000.0)
    assert table.of("other") == SLO(500.0, 50.0)
    deploy = tmp_path / "deploy.json"
    deploy.write_text(json.dumps({"model": {"name": "m"}, "gateway": {"scenarios": [
        {"name": "s", "policy": "fifo", "ttft_slo": [{"deadline_s": 1.5}]}]}}))
    assert load_slo_file(deploy).of("s").ttft_limit_ms(10) == pytest.approx(1500.0)
    bad = tmp_path / "bad.yaml"
    bad.write_text("ttft: 5\n")
    with pytest.raises(ValueError, match="bad.yaml.*unknown key"):
        load_slo_file(bad)


def test_goodput_flags_override_and_validate() -> None:
    base = SLOTable(SLO(ttft_slo=(TTFTBand(None, 3.0),)))
    t = parse_goodput(["ttft:500 tpot:40", "chat:e2e:9000", "chat:ttft:100"], base)
    assert t.of("x") == SLO(500.0, 40.0)  # a flat TTFT flag replaces the file's bands
    assert t.of("chat") == SLO(100.0, 40.0, 9000.0)
    for item in ("ttft", "ttft:x", "speed:5", "a:b:c:d"):
        with pytest.raises(ValueError, match="--goodput"):
            parse_goodput([item])
    with pytest.raises(ValueError, match="ttft_ms"):
        parse_goodput(["ttft:0"])


def _curve(rate: float) -> float:
    return 1.0 if rate <= 5 else max(0.0, 1 - (rate - 5) / 5)


def test_sweep_ladder_stops_at_the_first_miss_and_interpolates() -> None:
    seen: list[float] = []

    def measure(rate: float) -> tuple[float, None]:
        seen.append(rate)
        return _curve(rate), None

    out = run_sweep(SweepSpec((1, 2, 4, 8, 16), instances=2), measure)
    assert seen == [1, 2, 4, 8]
    assert out.max_rate == 4 and out.bounded and out.max_rate_per_instance == 2
    assert out.interpolated_rate == pytest.approx(4 + 0.1 * 4 / 0.6)


def test_sweep_bisection_refines_the_bracket() -> None:
    out = run_sweep(SweepSpec((1, 2, 4, 8), refine=2, instances=2),
                    lambda r: (_curve(r), None))
    assert [p.rate for p in out.points] == [1, 2, 4, 5, 6, 8]
    assert [p.refined for p in out.points] == [False] * 3 + [True, True, False]
    assert out.max_rate == 5 and out.max_rate_per_instance == 2.5
    assert out.interpolated_rate == pytest.approx(5.5)


def test_sweep_without_a_miss_or_a_pass() -> None:
    easy = run_sweep(SweepSpec((1, 2), refine=3), lambda r: (1.0, None))
    assert easy.max_rate == 2 and not easy.bounded and easy.interpolated_rate is None
    hard = run_sweep(SweepSpec((4, 8), refine=2), lambda r: (1.0 if r <= 1.5 else 0.5, None))
    assert [p.rate for p in hard.points] == [1, 2, 4]  # bisected down from (0, 4)
    assert hard.max_rate == 1


def test_geometric_rates_and_bad_sweeps() -> None:
    assert geometric_rates(0.5, 2, 16) == (0.5, 1, 2, 4, 8, 16)
    with pytest.raises(ValueError):
        geometric_rates(1, 1, 4)
    with pytest.raises(ValueError, match="rates"):
        SweepSpec(())
    with pytest.raises(ValueError, match="target"):
        SweepSpec((1,), target=1.5)
