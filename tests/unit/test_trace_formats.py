"""Trace loaders (pd_serve.bench.trace_formats, traces.read_mooncake, servegen): the real files in
shared/traces load with the README's row counts and statistics; malformed rows name file and
line (strict) or are skipped and counted (lenient); formats are detected from name and content."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from pd_serve.bench.servegen import load_servegen
from pd_serve.bench.trace_formats import FORMATS, detect_format, load_trace
from pd_serve.bench.traces import Trace

TRACES = Path(__file__).parents[3] / "shared" / "traces"
real = pytest.mark.skipif(not TRACES.is_dir(), reason=f"no shared traces at {TRACES}")
MOONCAKE = TRACES / "mooncake" / "conversation_trace.jsonl"
AZURE_CODE = TRACES / "azure_llm_2023" / "AzureLLMInferenceTrace_code.csv"
AZURE_CONV = TRACES / "azure_llm_2023" / "AzureLLMInferenceTrace_conv.csv"
SHAREGPT = TRACES / "sharegpt_lengths" / "sharegpt_8k_filtered_stats_llama2_tokenizer.csv"
ARXIV = (TRACES / "arxiv_summarization_lengths" /
         "arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv")
SERVEGEN = TRACES / "servegen" / "reason" / "deepseek-r1"
AZURE_HEAD = "TIMESTAMP,ContextTokens,GeneratedTokens"
LENGTH_HEAD = "num_prefill_tokens,num_decode_tokens,num_total_tokens,pd_ratio"


def _lengths(trace: Trace) -> np.ndarray:
    return np.array([(r.input_len, r.output_len) for r in trace.requests]).T  # [2, n]


def _stats(x: np.ndarray) -> tuple[float, float, float]:
    return float(x.mean()), float(np.percentile(x, 50)), float(np.percentile(x, 99))


@real
def test_mooncake_matches_readme() -> None:
    t = load_trace(MOONCAKE)
    assert (len(t), t.fmt, t.timed, t.block_size, t.skipped) == (12031, "mooncake", True, 512, 0)
    assert t.span_s == pytest.approx(3537, abs=1)
    ins, outs = _lengths(t)
    assert _stats(ins) == pytest.approx((12035, 6909, 85400), abs=1)
    assert outs.mean() == pytest.approx(343, abs=1) and outs.max() == 2000
    assert t.requests[0].source == "conversation_trace.jsonl:1"
    assert all(len(r.hash_ids) == -(-r.input_len // 512) for r in t.requests)


@real
@pytest.mark.parametrize("path, rows, span, ctx, gen_p50", [
    (AZURE_CODE, 8819, 3436, (2048, 1469, 7436), 13),
    (AZURE_CONV, 19366, 3502, (1155, 1020, 4142), 129),
])
def test_azure_matches_readme(path: Path, rows: int, span: float,
                              ctx: tuple[float, float, float], gen_p50: int) -> None:
    t = load_trace(path)
    assert (len(t), t.fmt, t.timed, t.block_size) == (rows, "azure", True, None)
    assert t.span_s == pytest.approx(span, abs=1)
    ins, outs = _lengths(t)
    assert _stats(ins) == pytest.approx(ctx, abs=1) and np.percentile(outs, 50) == gen_p50
    arrivals = [r.arrival_s for r in t.requests]
    assert arrivals[0] == 0.0 and arrivals == sorted(arrivals)
    assert t.requests[0].source == f"{path.name}:2"  # line 1 is the header


@real
def test_azure_timestamps_keep_100ns() -> None:
    t = load_trace(AZURE_CODE, limit=3)  # 18:17:03.9799600, 04.0319600, 04.0781490
    assert len(t) == 3
    assert [r.arrival_s for r in t.requests] == pytest.approx([0.0, 0.052, 0.098189], abs=1e-9)


@real
@pytest.mark.parametrize("path, rows, prefill, decode_max", [
    (SHAREGPT, 30731, (2340, 1730, 7434), 1024),
    (ARXIV, 28257, (2588, 2730, 3933), 4056),
])
def test_length_tables_match_readme(path: Path, rows: int, prefill: tuple[float, float, float],
                                    decode_max: int) -> None:
    t = load_trace(path)
    assert (len(t), t.fmt, t.timed) == (rows, "lengths", False)
    assert all(r.arrival_s == 0.0 for r in t.requests)
    ins, outs = _lengths(t)
    assert _stats(ins) == pytest.approx(prefill, abs=1) and outs.max() == decode_max


def _expected_count(folder: Path, clients: list[int], lo: float, hi: float) -> int:
    """Requests ServeGen's rule gives for windows starting in [lo, hi): sum of ceil(rate*600)."""
    total = 0
    for c in clients:
        with (folder / f"chunk-{c}-trace.csv").open(newline="") as f:
            for row in csv.reader(f):
                if lo <= float(row[0]) < hi and float(row[1]) > 0:
                    total += math.ceil(round(float(row[1]) * 600, 6))
    return total


@pytest.fixture(scope="module")
def first_hour() -> Trace:
    if not SERVEGEN.is_dir():
        pytest.skip(f"no shared traces at {TRACES}")
    return load_trace(SERVEGEN)


@real
def test_servegen_first_hour_has_rate_x_600_per_window(first_hour: Trace) -> None:
    t = first_hour
    assert t.fmt == "servegen" and t.timed and t.block_size is None
    assert len(t) == _expected_count(SERVEGEN, list(range(73)), 0, 3600) == 69511
    arrivals = [r.arrival_s for r in t.requests]
    assert arrivals == sorted(arrivals) and 0 <= arrivals[0] and arrivals[-1] < 3600
    assert len(t) / 3600 == pytest.approx(np.mean([14.86, 18.4, 20.05, 20.65, 20.56, 21.33]),
                                          rel=0.01)  # README: aggregate 4.3-42.5 req/s
    assert {r.scenario for r in t.requests} == {
        f"client-{r.source.split('-')[1]}" for r in t.requests}
    assert all(r.input_len >= 1 and r.output_len >= 0 for r in t.requests)


@real
def test_servegen_client_selection_and_seed() -> None:
    one = load_servegen(SERVEGEN, clients=[48], duration_s=1200)
    assert len(one) == _expected_count(SERVEGEN, [48], 0, 1200)
    assert {r.scenario for r in one.requests} == {"client-48"}
    assert load_servegen(SERVEGEN, clients=[48], duration_s=1200).requests == one.requests
    other = load_servegen(SERVEGEN, clients=[48], duration_s=1200, seed=1)
    assert other.requests != one.requests and len(other) == len(one)
    both = load_servegen(SERVEGEN, clients=[1, 48], duration_s=1200)
    assert [r for r in both.requests if r.scenario == "client-48"] == list(one.requests)
    top = load_servegen(SERVEGEN, top_k=2, duration_s=600)
    assert {r.scenario for r in top.requests} == {"client-35", "client-48"}
    via_file = load_trace(SERVEGEN / "chunk-48-trace.csv", duration_s=1200)
    assert via_file.requests == one.requests
    assert len(load_trace(SERVEGEN, limit=100, clients=[48], duration_s=600)) == 100


def _servegen_folder(tmp: Path, rows: list[str], pdfs: dict[str, dict[str, str]]) -> Path:
    (tmp / "chunk-0-trace.csv").write_text("\r\n".join(rows) + "\r\n")
    (tmp / "chunk-0-dataset.json").write_text(json.dumps(pdfs))
    return tmp


PDF = {"input_tokens": "{10: 0.5, 30: 0.5}", "output_tokens": "{5: 1.0}",
       "reason_ratio": "{0.5: 1.0}"}
EMPTY = {"input_tokens": "{}", "output_tokens": "{}", "reason_ratio": "{}"}


def test_servegen_window_rule_on_a_small_folder(tmp_path: Path) -> None:
    folder = _servegen_folder(tmp_path, ["0,0,0,,0,0", "600,0.085,6.7,Gamma,0.0223,73.0",
                                         "1200,0.5,1.0,Weibull,1.2,2.0"],
                              {"0": EMPTY, "21600": PDF})
    t = load_servegen(folder, duration_s=1800)
    win1 = [r for r in t.requests if r.source == "chunk-0-trace.csv:2"]
    win2 = [r for r in t.requests if r.source == "chunk-0-trace.csv:3"]
    assert len(win1) == 51 and len(win2) == 300  # ceil(rate * 600), not 52 from float noise
    assert all(600 <= r.arrival_s < 1200 for r in win1)
    assert all(1200 <= r.arrival_s < 1800 for r in win2)
    assert {r.input_len for r in t.requests} == {10, 30}
    assert {r.output_len for r in t.requests} == {5}
    assert any("later length PDF" in n for n in t.notes)  # window 0's PDF is empty
    shifted = load_servegen(folder, start_s=900, duration_s=600)
    assert all(0 <= r.arrival_s < 600 for r in shifted.requests)


@pytest.mark.parametrize("row, why", [
    ("600,0.5,1.0,Poisson,1,1", "pattern"),
    ("600,0.5,1.0,,0,0", "needs a pattern"),
    ("600,-1,1.0,Gamma,1,1", "rate"),
    ("600,0.5,1.0,Gamma,1", "expected 6 fields"),
    ("0,0.5,1.0,Gamma,1,1", "does not increase"),
])
def test_servegen_bad_window_rows(tmp_path: Path, row: str, why: str) -> None:
    folder = _servegen_folder(tmp_path, ["0,0.1,1,Gamma,1,1", row], {"0": PDF})
    with pytest.raises(ValueError, match=why) as err:
        load_servegen(folder)
    assert "chunk-0-trace.csv:2:" in str(err.value)
    t = load_servegen(folder, strict=False)
    assert t.skipped == 1 and len(t) == 60 and any(why in n for n in t.notes)


@pytest.mark.parametrize("literal, why", [
    ("__import__('os').system('true')", "not a python literal"),
    ("[1, 2]", "must be a dict literal"),
    ("{'a': 1.0}", "token counts"),
    ("{3: -1.0}", "probabilities"),
])
def test_servegen_bad_pdfs_are_never_evaluated(tmp_path: Path, literal: str, why: str) -> None:
    folder = _servegen_folder(tmp_path, ["0,0.1,1,Gamma,1,1"],
                              {"0": {**PDF, "input_tokens": literal}, "21600": PDF})
    with pytest.raises(ValueError, match=why) as err:
        load_servegen(folder)
    assert "chunk-0-dataset.json" in str(err.value)
    t = load_servegen(folder, strict=False)  # the bad entry dropped, the later one used
    assert t.skipped == 1 and {r.input_len for r in t.requests} <= {10, 30}


def _write(tmp: Path, name: str, lines: list[str], newline_at_end: bool = False) -> Path:
    path = tmp / name
    path.write_text("\n".join(lines) + ("\n" if newline_at_end else ""))
    return path


GOOD_AZURE = ["2023-11-16 18:17:03.9799600,4808,10", "2023-11-16 18:17:04.0319600,3180,8"]


@pytest.mark.parametrize("bad, why", [
    ("2023-11-16 18:17:05.1,-3,8", "ContextTokens must be >= 1"),
    ("2023-11-16 18:17:05.1,12.5,8", "ContextTokens must be an integer"),
    ("2023-11-16 18:17:05.1,12", "expected 3 fields"),
    ("2023-11-16 18:17:05.1,12,x", "GeneratedTokens must be an integer"),
    ("16/11/2023 18:17:05,12,3", "TIMESTAMP must look like"),
    ("2023-11-31 18:17:05.1,12,3", "not a valid time"),
    ("2023-11-16 18:17:01.0,12,3", "before the previous row"),
])
def test_azure_malformed_rows(tmp_path: Path, bad: str, why: str) -> None:
    path = _write(tmp_path, "az.csv", [AZURE_HEAD, *GOOD_AZURE, bad, GOOD_AZURE[1]])
    with pytest.raises(ValueError, match=why) as err:
        load_trace(path)
    assert f"{path}:4:" in str(err.value)
    t = load_trace(path, strict=False)
    if why == "before the previous row":  # lenient: kept, sorted, shifted to start at 0
        assert t.skipped == 0 and len(t) == 4 and "sorted" in t.notes[0]
        assert t.requests[0].source == "az.csv:4" and t.requests[0].arrival_s == 0.0
    else:
        assert t.skipped == 1 and len(t) == 3 and f"{path}:4:" in t.notes[1]


def test_lengths_malformed_rows(tmp_path: Path) -> None:
    path = _write(tmp_path, "len.csv", [LENGTH_HEAD, "74,918,992,0.08", "74,918,990,0.08",
                                        "", "-1,5,4,0", "10,5,15,2.0"], newline_at_end=True)
    with pytest.raises(ValueError, match=r"len.csv:3: .*num_total_tokens 990 != .* 992"):
        load_trace(path)
    t = load_trace(path, strict=False)
    assert (len(t), t.skipped) == (2, 2) and "len.csv:5:" in t.notes[2]


def test_mooncake_lenient_and_backwards(tmp_path: Path) -> None:
    rows = [{"timestamp": 3000, "input_length": 10, "output_length": 1, "hash_ids": [0]},
            {"timestamp": 0, "input_length": 600, "output_length": 1, "hash_ids": [0, 1]},
            {"timestamp": 0, "input_length": 600, "output_length": 1, "hash_ids": [0]}]
    path = _write(tmp_path, "m.jsonl", [json.dumps(r) for r in rows])
    with pytest.raises(ValueError, match=r"m.jsonl:2: arrival 0.000000 s is before"):
        load_trace(path)
    t = load_trace(path, strict=False)
    assert t.skipped == 1 and "expected ceil" in t.notes[-1]
    assert [r.source for r in t.requests] == ["m.jsonl:2", "m.jsonl:1"]


@pytest.mark.parametrize("lines, why", [
    ([], "empty file"),
    ([AZURE_HEAD], "no requests \\(empty file\\)"),
    (["TIMESTAMP,ContextTokens,Other", "x,1,2"], "header lacks column\\(s\\) GeneratedTokens"),
])
def test_empty_or_headless_files_raise_in_both_modes(tmp_path: Path, lines: list[str],
                                                     why: str) -> None:
    path = _write(tmp_path, "a.csv", lines)
    for strict in (True, False):
        with pytest.raises(ValueError, match=why):
            load_trace(path, fmt="azure", strict=strict)


def test_all_rows_malformed_raises_when_lenient(tmp_path: Path) -> None:
    path = _write(tmp_path, "a.csv", [AZURE_HEAD, "bad,1,1", "worse,1,1"])
    with pytest.raises(ValueError, match="all 2 rows malformed, first: .*a.csv:2:"):
        load_trace(path, strict=False)


def test_detection_rules(tmp_path: Path) -> None:
    assert detect_format(_write(tmp_path, "x.txt", ['{"timestamp": 0}'])) == "mooncake"
    assert detect_format(_write(tmp_path, "y.dat", [AZURE_HEAD, GOOD_AZURE[0]])) == "azure"
    assert detect_format(_write(tmp_path, "z.csv", ["", LENGTH_HEAD])) == "lengths"
    folder = _servegen_folder(tmp_path, ["0,0.1,1,Gamma,1,1"], {"0": PDF})
    assert detect_format(folder) == detect_format(folder / "chunk-0-dataset.json") == "servegen"
    with pytest.raises(ValueError, match=", ".join(FORMATS)):
        detect_format(_write(tmp_path, "w.csv", ["a,b,c", "1,2,3"]))
    empty_dir = tmp_path / "nothing"
    empty_dir.mkdir()
    with pytest.raises(ValueError, match="without ServeGen"):
        detect_format(empty_dir)
    az = _write(tmp_path, "v.csv", [AZURE_HEAD, *GOOD_AZURE])
    with pytest.raises(ValueError, match="unknown trace format 'parquet'; formats: mooncake"):
        load_trace(az, fmt="parquet")
    with pytest.raises(ValueError, match="do not apply to azure"):
        load_trace(az, seed=3)
    assert len(load_trace(az, fmt="splitwise", limit=1)) == 1
    with pytest.raises(ValueError, match="limit"):
        load_trace(az, limit=0)
    lengths = _write(tmp_path, "s.csv", [LENGTH_HEAD, "74,918,992,0.08"])
    assert load_trace(lengths, fmt="sharegpt").fmt == "lengths"


@real
@pytest.mark.parametrize("path, fmt", [(MOONCAKE, "mooncake"), (AZURE_CODE, "azure"),
                                       (SHAREGPT, "lengths"), (ARXIV, "lengths"),
                                       (SERVEGEN, "servegen"),
                                       (SERVEGEN / "chunk-3-trace.csv", "servegen")])
def test_real_files_are_detected(path: Path, fmt: str) -> None:
    assert detect_format(path) == fmt
