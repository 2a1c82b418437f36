"""Unit tests of tools/validate_sim_inrun.py: which runs' steps each fit may use, and the
first-token path terms."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

from validate_sim_inrun import (  # noqa: E402
    fit_runs,
    fit_sets,
    inrun_sims,
    rtt_terms,
    run_samples,
    windows,
)

from pd_serve.sim.latency import DecodeModel, HandoffModel, LatencyProfile, PrefillModel  # noqa: E402
from pd_serve.sim.steps import StepRecord  # noqa: E402

BASE = LatencyProfile(PrefillModel(0.01, 0.0, 1e-4, 0.0), DecodeModel(0.004, 0.001, 0.0),
                      HandoffModel(0.001, 1e9), 1024)


def run_steps(t0: float, k: float) -> list[StepRecord]:
    """20 prefill and 40 decode steps from t0, timed by BASE's models times `k`."""
    out, t = [], t0
    for i in range(20):
        chunks = ((0, 30 + 40 * i),)
        s = k * BASE.prefill.time_of(chunks)
        out.append(StepRecord(t, s, True, "prefill", chunks))
        t += s + 0.5
    for i in range(40):
        ctx = tuple(50 + i + j for j in range(1 + i % 6))
        s = k * BASE.decode.time_of(ctx)
        out.append(StepRecord(t, s, i == 0, "decode", ctx))
        t += s
    return out


def test_each_fit_sees_only_the_runs_it_may() -> None:
    # three runs: a (rate 1, machine fast), b (rate 1 again, slow), c (rate 2, slower)
    steps = run_steps(0.0, 1.0) + run_steps(100.0, 1.5) + run_steps(200.0, 2.0)
    runs = [{"label": "a", "load": 0.3, "t_start": 0.0, "t_end": 99.0},
            {"label": "b", "load": 0.3, "t_start": 100.0, "t_end": 199.0},
            {"label": "c", "load": 0.6, "t_start": 200.0, "t_end": 299.0}]
    wins = windows([*runs, {"label": "old run without a window"}])
    assert set(wins) == {"a", "b", "c"}
    sets = fit_sets(runs, runs[0])
    assert sets == {"other_rates": ["c"], "held_out": ["b", "c"], "inrun": ["a"]}
    samples = run_samples([steps], wins)
    other_rates = fit_runs(samples, BASE, sets["other_rates"])
    assert other_rates.provenance["runs"] == ["c"]
    assert other_rates.decode.time(3, 200) == pytest.approx(2.0 * BASE.decode.time(3, 200))
    held_out = fit_runs(samples, BASE, sets["held_out"])
    assert held_out.provenance["runs"] == ["b", "c"]
    assert held_out.provenance["steps"] == {"prefill": 40, "decode": 80}
    ratio = held_out.prefill.time(1, 500, 0) / BASE.prefill.time(1, 500, 0)
    assert 1.5 < ratio < 2.0  # between the two runs it was fitted on
    assert fit_runs(samples, BASE, sets["inrun"]).decode.time(3, 200) == pytest.approx(
        BASE.decode.time(3, 200))
    with pytest.raises(ValueError, match="0 prefill and 0 decode"):
        fit_runs(samples, BASE, [])


def test_rtt_terms_average_the_probes_before_and_after() -> None:
    before = {"rtt_ms": 9.0, "rtt_loaded_ms": 10.6}
    after = {"rtt_ms": 13.0, "rtt_loaded_ms": 13.0}
    assert rtt_terms(before, None) == pytest.approx((9.0, 1.6))
    assert rtt_terms(before, after) == pytest.approx((11.0, 0.8))
    assert rtt_terms({"rtt_ms": 9.0, "rtt_loaded_ms": 8.0}, None) == (9.0, 0.0)


def test_sessions_without_step_traces_have_no_inrun_simulations(tmp_path: Path) -> None:
    real = {"runs": [{"label": "load0.3-r1"}]}
    assert inrun_sims(real, BASE, {}, None, tmp_path) is None


def test_range_reading_and_verdict() -> None:
    """The second reading: a value outside the band counts when the repeats themselves span
    it; the verdict keeps the band's count beside it."""
    from validate_sim_analyse import METRICS, range_reading, verdict

    def cmp(real: float, sim: float) -> dict[str, float | bool]:
        err = sim / real - 1
        return {"real": real, "sim": sim, "rel_err": err, "pass": abs(err) <= 0.15}

    names = [n for n, _ in METRICS]
    row = {"real_min": dict.fromkeys(names, 16.0), "real_max": dict.fromkeys(names, 30.0),
           "held_out": {"vs_mean": {n: cmp(23.0, 17.0) for n in names},  # -26 %, in range
                        "vs_runs": [{n: cmp(16.0, 17.0) for n in names}]},
           "host": {"vs_mean": {n: cmp(23.0, 12.0) for n in names},  # -48 %, below the range
                    "vs_runs": [{n: cmp(16.0, 12.0) for n in names}]}}
    range_reading(row)
    assert all(c["in_real_range"] for c in row["held_out"]["vs_mean"].values())
    assert not any(c["in_real_range"] for c in row["host"]["vs_mean"].values())
    v = verdict([row])
    assert v["held_out"] == {"vs_mean": [0, 5], "vs_runs": [5, 5], "vs_mean_or_in_range": [5, 5]}
    assert v["host"]["vs_mean_or_in_range"] == [0, 5]
