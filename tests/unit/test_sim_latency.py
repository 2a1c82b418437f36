"""Latency models of the simulator: fits recover known coefficients from synthetic samples,
the non-negative fit drops a feature that would come out negative, profiles round-trip through
JSON with their provenance, and the profiling pipeline measures and fits a runner (a fake one
on a fake clock, so the expected coefficients are exact)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from pd_serve.sim.latency import (
    DecodeModel,
    DecodeSample,
    HandoffModel,
    HandoffSample,
    LatencyProfile,
    PrefillModel,
    PrefillSample,
    fit_decode,
    fit_handoff,
    fit_prefill,
)
from pd_serve.sim.profile import (
    ProfileGrid,
    fit_profile,
    handoff_samples,
    measure_decode,
    measure_prefill,
)

PREFILL = PrefillModel(0.004, 0.001, 2e-4, 3e-8)
DECODE = DecodeModel(0.005, 3e-4, 2e-6)


def _prefill_samples(model: PrefillModel, n: int = 60) -> list[PrefillSample]:
    rng = random.Random(0)
    out = []
    for _ in range(n):
        chunks = tuple((rng.choice([0, 256, 512]), rng.randint(1, 1024))
                       for _ in range(rng.randint(1, 4)))
        out.append(PrefillSample(chunks, model.time_of(chunks)))
    return out


def _decode_samples(model: DecodeModel, n: int = 40) -> list[DecodeSample]:
    rng = random.Random(1)
    out = []
    for _ in range(n):
        ctx = tuple(rng.randint(1, 2000) for _ in range(rng.randint(1, 32)))
        out.append(DecodeSample(ctx, model.time_of(ctx)))
    return out


@pytest.mark.parametrize("padded", [False, True])
def test_fit_prefill_recovers_coefficients(padded: bool) -> None:
    truth = PrefillModel(0.004, 0.001, 2e-4, 3e-8, padded)
    fit = fit_prefill(_prefill_samples(truth), padded)
    assert fit.padded == padded
    np.testing.assert_allclose(
        [fit.intercept_s, fit.per_seq_s, fit.per_token_s, fit.per_attn_s],
        [truth.intercept_s, truth.per_seq_s, truth.per_token_s, truth.per_attn_s], rtol=1e-6)


@pytest.mark.parametrize("padded", [False, True])
def test_fit_decode_recovers_coefficients(padded: bool) -> None:
    truth = DecodeModel(0.005, 3e-4, 2e-6, padded)
    fit = fit_decode(_decode_samples(truth), padded)
    np.testing.assert_allclose([fit.intercept_s, fit.per_seq_s, fit.per_context_s],
                               [0.005, 3e-4, 2e-6], rtol=1e-6)


def test_fit_handoff_recovers_latency_and_bandwidth() -> None:
    truth = HandoffModel(0.0015, 2.5e9)
    samples = [HandoffSample(b, truth.time(b)) for b in (1 << 20, 8 << 20, 64 << 20, 512 << 20)]
    fit = fit_handoff(samples)
    assert fit.latency_s == pytest.approx(0.0015, rel=1e-6)
    assert fit.bytes_per_s == pytest.approx(2.5e9, rel=1e-6)


def test_fit_keeps_coefficients_non_negative() -> None:
    # time falls slightly with batch (noise): that coefficient is dropped, not made negative
    samples = [DecodeSample((100,) * b, 0.01 + 1e-6 * 100 * b - 1e-5 * b) for b in range(1, 9)]
    fit = fit_decode(samples)
    assert min(fit.intercept_s, fit.per_seq_s, fit.per_context_s) >= 0


def test_fit_rejects_too_few_or_bad_samples() -> None:
    with pytest.raises(ValueError, match="samples for"):
        fit_decode(_decode_samples(DECODE, 2))
    with pytest.raises(ValueError, match="positive"):
        fit_handoff([HandoffSample(1, 0.0), HandoffSample(2, 1.0)])


def test_profile_round_trips_with_provenance(tmp_path: Path) -> None:
    prof = LatencyProfile(PREFILL, DECODE, HandoffModel(0.001, 1e9), 6144,
                          {"machine": {"cpu": "x"}, "backend": "torch", "model": "m",
                           "date": "2026-01-01"}, {"prefill": []})
    prof.save(tmp_path / "p.json")
    again = LatencyProfile.load(tmp_path / "p.json")
    assert again == prof
    data = json.loads((tmp_path / "p.json").read_text())
    data["version"] = 9
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="bad.json: version"):
        LatencyProfile.load(tmp_path / "bad.json")
    del data["decode"]
    data["version"] = 1
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="missing or unknown"):
        LatencyProfile.load(tmp_path / "bad.json")


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class FakeRunner:
    """Advances a fake clock by the padded models' time of each call."""

    block_size = 16

    def __init__(self, clock: _Clock) -> None:
        self.clock = clock
        self.model_config = type("MC", (), {"vocab_size": 100})()

    def prefill(self, batch: object) -> None:
        chunks = [(s.start_pos, len(s.token_ids)) for s in batch.seqs]  # type: ignore[attr-defined]
        self.clock.t += PrefillModel(0.004, 0.001, 2e-4, 3e-8, True).time_of(chunks)

    def decode(self, batch: object) -> None:
        ctx = [p + 1 for p in batch.positions]  # type: ignore[attr-defined]
        self.clock.t += DecodeModel(0.005, 3e-4, 2e-6, True).time_of(ctx)


def test_profiling_pipeline_picks_the_padded_form_of_a_padded_runner() -> None:
    clock = _Clock()
    runner = FakeRunner(clock)
    grid = ProfileGrid(repeats=2)
    pre = measure_prefill(runner, grid.prefill_shapes(2048), 2, clock)  # type: ignore[arg-type]
    dec = measure_decode(runner, grid.decode_shapes(2048), 2, clock)  # type: ignore[arg-type]
    prof = fit_profile(pre, dec, HandoffModel(0.001, 1e9), 6144, {"backend": "fake"})
    assert prof.prefill.padded and prof.decode.padded
    assert prof.prefill.per_attn_s == pytest.approx(3e-8, rel=1e-6)
    assert prof.decode.per_context_s == pytest.approx(2e-6, rel=1e-6)
    assert prof.provenance["fit_errors"]["prefill"]["chosen"] == "padded"
    assert len(prof.samples["prefill"]) == len(pre)


def test_handoff_samples_from_the_repo_results() -> None:
    root = Path(__file__).resolve().parents[2]
    samples = handoff_samples(root / "docs/results/handoff_torch.json")
    assert samples and all(s.bytes > 0 and s.seconds > 0 for s in samples)
    assert fit_handoff(samples).bytes_per_s > 0


def test_profiling_drives_a_real_runner(demo_model_dir: Path) -> None:
    from pd_serve.backends import create_runner
    from pd_serve.backends.base import RunnerConfig

    runner = create_runner(RunnerConfig(model_dir=str(demo_model_dir), backend="torch",
                                        num_blocks=64, threads=1))
    try:
        pre = measure_prefill(runner, [((0, 16),), ((16, 8), (0, 4))], repeats=1)
        dec = measure_decode(runner, [(20,), (5, 40)], repeats=1)
    finally:
        runner.close()
    assert [s.chunks for s in pre] == [((0, 16),), ((16, 8), (0, 4))]
    assert [s.contexts for s in dec] == [(20,), (5, 40)]
    assert all(s.seconds > 0 for s in pre) and all(s.seconds > 0 for s in dec)
