"""Random-init model directories on CPU: config, tokenizer, deterministic weights, and the
checkpoint loader's refusal (the MindSpore backend cannot generate them)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pd_serve.backends.base import DecodeBatch, PrefillBatch, RunnerConfig, SeqChunk
from pd_serve.backends.torch.runner import TorchRunner
from pd_serve.models.checkpoint import RANDOM_INIT_KEY, load_weights, random_init_marker
from pd_serve.models.config import ModelConfig
from pd_serve.models.random_init import (
    RandomInit,
    RandomWeights,
    special_ids,
    weight_shapes,
    write_random_model,
)
from pd_serve.models.tokenizer import Tokenizer

TOOL = Path(__file__).resolve().parents[2] / "tools" / "make_random_model.py"


def make_main(args: list[str]) -> int:
    """Runs tools/make_random_model.py; its exit status."""
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True).returncode


def need(weights: RandomWeights, name: str) -> torch.Tensor:
    tensor = weights(name)
    assert tensor is not None, name
    return tensor


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_model(tmp_path_factory.mktemp("rand") / "tiny", "tiny", seed=7)


def test_llama3_8b_config_written(tmp_path: Path) -> None:
    assert make_main(["--out", str(tmp_path / "m"), "--preset", "llama-3-8b", "--seed", "3"]) == 0
    mc = ModelConfig.from_dir(tmp_path / "m")
    assert (mc.hidden_size, mc.num_layers, mc.num_heads, mc.num_kv_heads, mc.head_dim) == (
        4096, 32, 32, 8, 128)
    assert (mc.intermediate_size, mc.vocab_size, mc.max_position_embeddings) == (
        14336, 128256, 8192)
    assert mc.rope.theta == 500000.0 and mc.rope.rope_type == "llama3"
    assert (mc.rope.factor, mc.rope.original_max_position) == (8.0, 8192)
    assert mc.rms_norm_eps == 1e-5 and not mc.tie_word_embeddings
    assert mc.eos_token_ids == (128001, 128009) and mc.bos_token_id == 128000
    assert random_init_marker(tmp_path / "m") == {"seed": 3, "std": 0.02}
    tok = Tokenizer(tmp_path / "m")
    assert tok.vocab_size == 128256 and tok.eos_token_id == 128001
    assert not list((tmp_path / "m").glob("*.safetensors"))


def test_tokenizer_round_trip(tiny_dir: Path) -> None:
    tok = Tokenizer(tiny_dir)
    ids = special_ids(512)
    assert tok.vocab_size == 512
    assert tok.eos_token_id == ids["<|end_of_text|>"] == 257
    text = "Grüße, world! 12"
    encoded = tok.encode(text)
    assert encoded == list(text.encode())  # id b is byte b
    assert tok.decode(encoded) == text
    assert tok.decode([300]) == "<|r300|>"  # fillers print as text
    assert tok.decode([256, 72, 257]) == "H"  # specials skipped
    assert "user: hi" in tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_weights_deterministic_and_shaped(tiny_dir: Path) -> None:
    mc = ModelConfig.from_dir(tiny_dir)
    spec = RandomInit.from_dir(tiny_dir)
    assert spec == RandomInit(7, 0.02)
    a, b = RandomWeights(mc, spec, "cpu"), RandomWeights(mc, spec, "cpu")
    other = RandomWeights(mc, RandomInit(8, 0.02), "cpu")
    for name, shape in weight_shapes(mc).items():
        x = need(a, name)
        assert tuple(x.shape) == shape and x.dtype == torch.float32
        assert torch.equal(x, need(b, name))
    q = need(a, "model.layers.0.self_attn.q_proj.weight")
    assert abs(float(q.std()) - 0.02) < 0.002
    assert not torch.equal(q, need(a, "model.layers.1.self_attn.q_proj.weight"))
    assert not torch.equal(q, need(other, "model.layers.0.self_attn.q_proj.weight"))
    norm = need(a, "model.layers.0.input_layernorm.weight")
    assert torch.equal(norm, torch.ones_like(norm))
    assert a("model.layers.0.self_attn.q_proj.bias") is None  # llama has no biases


def test_runner_loads_random_dir_deterministically(tiny_dir: Path) -> None:
    cfg = RunnerConfig(str(tiny_dir), backend="torch", block_size=16, num_blocks=8)
    outs = []
    for _ in range(2):
        runner = TorchRunner(cfg)
        logits = runner.prefill(PrefillBatch([SeqChunk(list(range(1, 20)), 0, [0, 1])]))
        step = runner.decode(DecodeBatch([5], [19], [[0, 1]]))
        runner.close()
        assert isinstance(logits, np.ndarray) and np.isfinite(logits).all()
        outs.append((logits, step))
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    np.testing.assert_array_equal(outs[0][1], outs[1][1])


def test_checkpoint_loader_refuses_random_dir(tiny_dir: Path) -> None:
    with pytest.raises(ValueError, match=RANDOM_INIT_KEY):
        load_weights(tiny_dir, ModelConfig.from_dir(tiny_dir))


@pytest.mark.parametrize("marker, message", [
    ({"seed": -1}, "seed"), ({"seed": 1, "std": 0}, "std"), ({"std": 0.1}, "no seed"),
    ({"seed": 1, "mean": 0}, "unknown"), (5, "object")])
def test_bad_markers(tmp_path: Path, marker: object, message: str) -> None:
    write_random_model(tmp_path, "tiny", seed=1)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw[RANDOM_INIT_KEY] = marker
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=message):
        RandomInit.from_dir(tmp_path)


def test_unknown_preset(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="preset"):
        write_random_model(tmp_path, "llama-9000", seed=0)
    assert make_main(["--out", str(tmp_path), "--preset", "tiny", "--seed", "-2"]) == 2
