"""Mooncake trace loading, scaling to the demo model and prompt synthesis (pd_serve.bench.traces):
equal hash-id prefixes give identical token prefixes, scaling keeps one block per hash id and
fits the context, malformed lines name their file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pd_serve.bench.traces import (
    TraceRequest,
    load_mooncake,
    prompt_tokens,
    scale,
    spread_buckets,
)

ROWS = [
    {"timestamp": 0, "input_length": 1100, "output_length": 300, "hash_ids": [0, 1, 2]},
    {"timestamp": 0, "input_length": 1024, "output_length": 0, "hash_ids": [0, 1]},
    {"timestamp": 3000, "input_length": 700, "output_length": 40, "hash_ids": [0, 7]},
    {"timestamp": 6001, "input_length": 90000, "output_length": 500,
     "hash_ids": list(range(100, 276))},
]


def _write(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "trace.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_load_and_limit(tmp_path: Path) -> None:
    path = _write(tmp_path, [json.dumps(r) for r in ROWS[:3]] + [""])
    reqs = load_mooncake(path)
    assert reqs[0] == TraceRequest(0.0, 1100, 300, (0, 1, 2), source="trace.jsonl:1")
    assert reqs[2].arrival_s == 3.0 and len(reqs) == 3
    assert len(load_mooncake(path, limit=2)) == 2


@pytest.mark.parametrize("bad, why", [
    ("{not json", "not JSON"),
    ("[1, 2]", "not a JSON object"),
    ('{"timestamp": 0, "input_length": 10, "output_length": 1}', "hash_ids"),
    ('{"timestamp": -1, "input_length": 10, "output_length": 1, "hash_ids": [0]}', "timestamp"),
    ('{"timestamp": 0, "input_length": "10", "output_length": 1, "hash_ids": [0]}',
     "input_length"),
    ('{"timestamp": 0, "input_length": 600, "output_length": 1, "hash_ids": [0]}',
     "expected ceil"),
])
def test_malformed_line_names_file_and_line(tmp_path: Path, bad: str, why: str) -> None:
    path = _write(tmp_path, [json.dumps(ROWS[0]), bad])
    with pytest.raises(ValueError, match=why) as err:
        load_mooncake(path)
    assert f"{path}:2:" in str(err.value)


def test_scaling_keeps_blocks_and_fits_context(tmp_path: Path) -> None:
    reqs = load_mooncake(_write(tmp_path, [json.dumps(r) for r in ROWS]))
    scaled, report = scale(reqs, block_tokens=32, max_model_len=2048, max_output=16)
    assert report.factor == 1 / 16 and report.block_tokens == 32
    assert [(r.input_len, r.output_len) for r in scaled[:3]] == [(69, 16), (64, 1), (44, 3)]
    for orig, r in zip(reqs[:3], scaled[:3]):
        assert r.hash_ids == orig.hash_ids and len(r.hash_ids) == -(-r.input_len // 32)
    long = scaled[3]  # 90000 / 16 = 5625 tokens: cut to the context
    assert long.input_len + long.output_len == 2048 and long.output_len == 16
    assert long.hash_ids == reqs[3].hash_ids[:64]
    assert report.capped_input == 1 and report.capped_output == 2
    with pytest.raises(ValueError, match="divide"):
        scale(reqs, block_tokens=30, max_model_len=2048)


def test_prefix_sharing_preserved() -> None:
    a = TraceRequest(0.0, 80, 1, (0, 1, 2))
    b = TraceRequest(0.0, 64, 1, (0, 1))
    c = TraceRequest(0.0, 70, 1, (0, 5, 6))
    pa, pb, pc = (prompt_tokens(r, 32, 1024) for r in (a, b, c))
    assert len(pa) == 80 and len(pb) == 64 and len(pc) == 70
    assert pa[:64] == pb  # two shared blocks
    assert pa[:32] == pc[:32] and pa[32:64] != pc[32:64]  # one shared block, then not
    assert all(3 <= t < 1024 for t in pa + pc)
    assert prompt_tokens(a, 32, 1024) == pa  # deterministic
    salted = prompt_tokens(a, 32, 1024, salt=1)
    assert salted != pa and salted[:64] == prompt_tokens(b, 32, 1024, salt=1)
    with pytest.raises(ValueError, match="cover"):
        prompt_tokens(TraceRequest(0.0, 65, 1, (0, 1)), 32, 1024)


def test_spread_buckets_evenly_in_order() -> None:
    reqs = [TraceRequest(t, 1, 1, (0,)) for t in (0.0, 0.0, 0.0, 3.0, 5.0, 5.0)]
    got = [r.arrival_s for r in spread_buckets(reqs, bucket_s=3.0)]
    assert got == pytest.approx([0.0, 1.0, 2.0, 3.0, 5.0, 6.5])
