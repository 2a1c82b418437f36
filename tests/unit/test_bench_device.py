"""The P/D-Device evaluation's pure parts (tools/bench_device_lib.py, bench_device_report.py):
trace workload scaling and prompts, teacher-forced scoring on a real runner, and the summary's
TTFT claim, displayed-gap statistics, token agreement and cloud occupancy gains."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import bench_device_lib as lib  # noqa: E402
import bench_device_report as report  # noqa: E402

from pd_serve.backends import create_runner  # noqa: E402
from pd_serve.backends.base import RunnerConfig  # noqa: E402

MODEL = ROOT / "models" / "shakespeare-llama"


def test_workload_scales_lengths_and_cuts_corpus_prompts(tmp_path: Path) -> None:
    csv = tmp_path / "lengths.csv"
    rows = [(400 * (i + 1), 50 * (i + 1)) for i in range(20)]
    csv.write_text("num_prefill_tokens,num_decode_tokens,num_total_tokens\n"
                   + "".join(f"{a},{b},{a + b}\n" for a, b in rows))
    text = list(range(3, 3003))
    items, notes = lib.build_workload({"t": csv}, 5, 512, 32, text, 1024, seed=1)
    again, _ = lib.build_workload({"t": csv}, 5, 512, 32, text, 1024, seed=1)
    assert items == again and len(items) == 5 and "t: x" in notes[0]
    for it in items:
        assert it.input_len + it.output_len <= 512 and 1 <= it.output_len <= 32
        assert list(it.prompt) == text[it.prompt[0] - 3:it.prompt[0] - 3 + it.input_len]
    synth, _ = lib.build_workload({"t": csv}, 2, 512, 32, None, 1024, seed=1)
    assert all(len(it.prompt) == it.input_len for it in synth)
    with pytest.raises(ValueError, match="not found"):
        lib.build_workload({"x": tmp_path / "missing.csv"}, 1, 512, 32, None, 1024, 0)


def test_teacher_forced_matches_greedy_continuation() -> None:
    runner = create_runner(RunnerConfig(str(MODEL), backend="torch", threads=1, num_blocks=16))
    try:
        prompt = [5, 17, 42, 99, 7, 300, 12, 64]
        y = [int(t) for t in lib.greedy_continue(runner, prompt[:-1], prompt[-1], 6)]
        hits, nll = lib.teacher_forced(runner, prompt, y)
        assert hits == [True] * len(y) and all(v >= 0 for v in nll)
        scores = lib.score_refined(runner, prompt, y)
        assert scores["agreement"] == 1.0 and scores["free_prefix"] == 1.0
    finally:
        runner.close()


def _row(request: int, mode: str, ttft: float, gaps: list[float], ids: list[int],
         **extra: Any) -> dict[str, Any]:
    return {"request": request, "mode": mode, "report_mode": mode, "ttft_s": ttft,
            "gaps_s": gaps, "token_ids": ids, "cloud_tokens_used": extra.get("used", 0),
            "handover_index": extra.get("handover")}


def test_summary_claim_gaps_agreement_and_gains() -> None:
    rows = [_row(0, "cloud_only", 0.10, [0.01, 0.02], [1, 2, 3]),
            _row(0, "device_only", 1.00, [0.05, 0.05], [1, 2, 3]),
            _row(0, "pd_device", 0.12, [0.05, 0.30], [1, 2, 4], used=2, handover=2),
            _row(1, "cloud_only", 0.20, [0.01], [5, 6]),
            _row(1, "device_only", 0.30, [0.05], [5, 6]),
            _row(1, "pd_device", 0.25, [0.04], [5, 6], used=1, handover=1)]
    occ = {"cloud_only": {"busy_s_per_request": 0.4, "requests_per_s": 2.0},
           "pd_device": {"busy_s_per_request": 0.1, "requests_per_s": 6.0}}
    quality = {"summary": {"0.5": {"agreement": 0.9}}}
    s = report.summarise(rows, occ, quality)
    assert s["modes"]["pd_device"]["tpot_max_s"] == 0.30
    assert s["claim"]["ttft_reduction_p50"] == pytest.approx(1 - 0.185 / 0.65)
    assert s["claim"]["ttft_60pct_lower_p50"] is True
    assert s["agreement"]["pd_device"]["identical_requests"] == 1
    assert s["agreement"]["pd_device"]["positionwise_mean"] == pytest.approx((2 / 3 + 1) / 2)
    assert s["cloud"]["busy_gain"] == pytest.approx(4.0)
    assert s["cloud"]["throughput_gain"] == pytest.approx(3.0)


def test_quality_profile_prompts_follow_the_trace_per_band(tmp_path: Path) -> None:
    import bench_device_profile as bp

    csv = tmp_path / "lengths.csv"
    rows = [(40 * (i + 1), 10) for i in range(40)]
    csv.write_text("num_prefill_tokens,num_decode_tokens,num_total_tokens\n"
                   + "".join(f"{a},{b},{a + b}\n" for a, b in rows))
    bands = bp.quality_bands([128, 256], 512)
    assert bands == [(1, 127), (128, 255), (256, 512)]
    lengths = bp.band_lengths({"t": csv}, 512, 32, bands, 3, 480, seed=0)
    scaled = {it.input_len for it in lib.build_workload({"t": csv}, 40, 512, 32, None, 1024,
                                                        0)[0]}
    for (lo, hi), ns in lengths.items():
        assert len(ns) == 3 and all(lo <= n <= min(hi, 480) and n in scaled for n in ns)
    text = list(range(5000))
    prompts, rest = bp.cut_prompts(text, lengths)
    used = sum(map(sum, lengths.values()))
    assert rest == text[used:] and [len(p) for p in prompts[bands[1]]] == lengths[bands[1]]
    with pytest.raises(ValueError, match="half"):
        bp.cut_prompts(list(range(100)), lengths)


def test_band_curves_become_profiles_and_evaluation_bands() -> None:
    import bench_device
    import bench_device_profile as bp

    from pd_device.profiles import CloudProfile, DeviceProfile, Profiles, TimeCurve

    prof = Profiles(DeviceProfile(TimeCurve(((1.0, 0.1),)), 0.01),
                    CloudProfile(TimeCurve(((1.0, 0.1),)), 0.01))
    q = {"all": {"curve": [[0.2, 0.8]]},
         "bands": [{"band": [1, 99], "prompts": 3, "curve": [[0.2, 0.9]]},
                   {"band": [100, 200], "prompts": 3, "curve": [[0.2, 0.5]]}]}
    banded = bp.with_bands(prof, q)
    assert banded.quality(0.2) == 0.8 and banded.quality_for((150, 150))(0.2) == 0.5
    rows = [{"prompt_len": n, "rhos": {"0.2": {"agreement": a}}}
            for n, a in ((10, 0.9), (20, 0.7), (150, 0.4))]
    out = bench_device.quality_by_band({"rows": rows}, [(1, 99), (100, 200), (201, 300)])
    assert [b["band"] for b in out] == [[1, 99], [100, 200]]
    assert out[0]["rhos"]["0.2"]["agreement"] == pytest.approx(0.8)
    assert out[1]["rhos"]["0.2"]["agreement_lcb95"] == 0.0  # one prompt bounds nothing
