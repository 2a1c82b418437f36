"""Arrival processes (pd_serve.bench.arrivals): Hypothesis properties — times are monotone and
non-negative, seeded draws repeat, a Poisson process's mean rate is the asked one for large n,
gamma gaps have CV ~ 1/sqrt(shape), vLLM's normalisation puts the last request at n / rate, a
trace's time-scale factor multiplies its offsets — and the spread and rate-fitting of traces."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pd_serve.bench.arrivals import (
    ArrivalSpec,
    constant_times,
    gamma_times,
    native_rate,
    poisson_times,
    schedule,
    trace_times,
)
from pd_serve.bench.traces import TraceRequest

rates = st.floats(0.1, 1000.0)
seeds = st.integers(0, 2**32 - 1)


def _trace(stamps: list[float]) -> list[TraceRequest]:
    return [TraceRequest(t, 10, 5) for t in stamps]


@given(n=st.integers(1, 300), rate=rates, burst=st.floats(0.05, 20.0), seed=seeds,
       normalize=st.booleans())
def test_gamma_times_are_monotone_nonnegative_and_seeded(n: int, rate: float, burst: float,
                                                        seed: int, normalize: bool) -> None:
    times = gamma_times(n, rate, burst, seed, normalize)
    assert len(times) == n
    assert times[0] >= 0 and all(b >= a for a, b in zip(times, times[1:]))
    assert times == gamma_times(n, rate, burst, seed, normalize)
    if normalize:
        assert math.isclose(times[-1], n / rate, rel_tol=1e-9)


@settings(max_examples=25, deadline=None)
@given(rate=rates, seed=seeds)
def test_poisson_mean_rate_for_large_n(rate: float, seed: int) -> None:
    n = 20000
    times = poisson_times(n, rate, seed, normalize=False)
    measured = n / times[-1]
    assert abs(measured - rate) / rate < 0.05  # std of the estimate ~ 1/sqrt(n) = 0.7 %
    gaps = np.diff([0.0, *times])
    assert abs(np.std(gaps) / np.mean(gaps) - 1.0) < 0.05  # exponential: CV 1


@settings(max_examples=25, deadline=None)
@given(rate=rates, shape=st.floats(0.25, 16.0), seed=seeds)
def test_gamma_cv_is_one_over_sqrt_shape(rate: float, shape: float, seed: int) -> None:
    gaps = np.diff([0.0, *gamma_times(20000, rate, shape, seed, normalize=False)])
    assert abs(np.mean(gaps) * rate - 1.0) < 0.06
    cv = float(np.std(gaps) / np.mean(gaps))
    assert abs(cv - 1 / math.sqrt(shape)) < 0.06 / math.sqrt(shape) + 0.02


@given(n=st.integers(0, 50), seed=seeds)
def test_infinite_rate_sends_everything_at_zero(n: int, seed: int) -> None:
    assert gamma_times(n, math.inf, 1.0, seed) == [0.0] * n
    assert constant_times(n, math.inf) == [0.0] * n


@given(n=st.integers(1, 100), rate=rates)
def test_constant_rate(n: int, rate: float) -> None:
    times = constant_times(n, rate)
    assert np.allclose(np.diff([0.0, *times]), 1 / rate)


@given(stamps=st.lists(st.floats(0.0, 1e5), min_size=1, max_size=60),
       factor=st.floats(0.001, 100.0))
def test_trace_time_scale_multiplies_offsets(stamps: list[float], factor: float) -> None:
    stamps = sorted(stamps)
    base = trace_times(_trace(stamps))
    scaled = trace_times(_trace(stamps), factor)
    assert base[0] == 0.0 and all(b >= a for a, b in zip(scaled, scaled[1:]))
    assert np.allclose(scaled, [t * factor for t in base], rtol=1e-9, atol=1e-9)
    assert np.allclose(base, [t - stamps[0] for t in stamps])


@given(ms=st.lists(st.integers(0, 10**7), min_size=2, max_size=60, unique=True),
       rate=st.floats(0.01, 100.0))
def test_trace_fitted_to_a_rate_keeps_its_shape(ms: list[int], rate: float) -> None:
    stamps = sorted(t / 1000 for t in ms)  # trace timestamps: ms resolution
    times = trace_times(_trace(stamps), rate=rate)
    fitted = native_rate(times)
    assert fitted is not None and math.isclose(fitted, rate, rel_tol=1e-6)
    span = stamps[-1] - stamps[0]
    assert np.allclose([t / times[-1] for t in times], [(s - stamps[0]) / span for s in stamps])


def test_a_trace_without_span_is_sent_at_once() -> None:
    assert native_rate([5.0, 5.0]) is None and native_rate([1.0]) is None
    assert trace_times(_trace([5.0, 5.0]), rate=3.0) == [0.0, 0.0]


def test_spread_spreads_quantised_buckets() -> None:
    times = trace_times(_trace([0.0, 0.0, 0.0, 3.0, 3.0]), spread=True, bucket_s=3.0)
    assert times == pytest.approx([0.0, 1.0, 2.0, 3.0, 4.5])
    assert trace_times(_trace([0.0, 0.0, 3.0])) == [0.0, 0.0, 3.0]


def test_schedule_dispatches_by_process() -> None:
    reqs = _trace([10.0, 11.0, 13.0])
    assert schedule(ArrivalSpec("trace", None, time_scale=2.0), reqs) == [0.0, 2.0, 6.0]
    assert schedule(ArrivalSpec("constant", 2.0), reqs) == [0.5, 1.0, 1.5]
    assert schedule(ArrivalSpec("poisson", 3.0, seed=4), reqs) == poisson_times(3, 3.0, 4)
    assert schedule(ArrivalSpec("gamma", 3.0, 0.5, seed=4), reqs) == gamma_times(3, 3.0, 0.5, 4)
    assert schedule(ArrivalSpec("poisson", math.inf), reqs) == [0.0] * 3


@pytest.mark.parametrize("kwargs, message", [
    ({"process": "weibull"}, "arrival process"),
    ({"rate": 0.0}, "rate"),
    ({"process": "poisson", "rate": None}, "needs a rate"),
    ({"burstiness": 0.0}, "burstiness"),
    ({"time_scale": -1.0}, "time_scale"),
])
def test_bad_specs_name_the_field(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ArrivalSpec(**kwargs)  # type: ignore[arg-type]
