"""Loads Hugging Face safetensors checkpoints (single file or sharded with an index) to NumPy.

A model directory whose config.json carries the `pd_serve_random_init` marker has no checkpoint:
its weights are generated from a seed (`pd_serve.models.random_init`, torch backend only). This
module is the one place that tells the two kinds apart (`random_init_marker`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pd_serve.models.config import ModelConfig

RANDOM_INIT_KEY = "pd_serve_random_init"


def random_init_marker(model_dir: str | Path) -> dict | None:
    """The `pd_serve_random_init` object of the directory's config.json (seed, std), or None for
    a directory with checkpoint files. ValueError if the marker is not an object."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text()).get(RANDOM_INIT_KEY)
    except (json.JSONDecodeError, AttributeError) as exc:
        raise ValueError(f"{path}: invalid config.json ({exc})") from exc
    if marker is not None and not isinstance(marker, dict):
        raise ValueError(f"{path}: {RANDOM_INIT_KEY} must be an object, got {marker!r}")
    return marker


def _shard_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise ValueError(f"{index}: not a valid safetensors index ({exc})") from exc
        files = sorted({model_dir / name for name in weight_map.values()})
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model directory {model_dir} has no *.safetensors weights")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ValueError(f"model directory {model_dir}: missing shards {missing}")
    return files


def load_state_dict(model_dir: str | Path) -> dict[str, np.ndarray]:
    """All tensors of the checkpoint as float32 NumPy arrays keyed by their HF names."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, np.ndarray] = {}
    for path in _shard_files(Path(model_dir)):
        try:
            # torch reads bf16, which NumPy cannot; we keep float32 on the host.
            tensors = load_file(str(path))
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise ValueError(f"{path}: cannot read safetensors file ({exc})") from exc
        for name, tensor in tensors.items():
            state[name] = tensor.float().numpy()
    return state


def expected_weight_names(cfg: ModelConfig) -> list[str]:
    """Every tensor name the decoder needs, in HF naming."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not cfg.tie_word_embeddings:
        names.append("lm_head.weight")
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        names += [p + f"self_attn.{n}_proj.weight" for n in ("q", "k", "v", "o")]
        names += [p + f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")]
        if cfg.attention_bias:
            names += [p + f"self_attn.{n}_proj.bias" for n in ("q", "k", "v")]
        if cfg.qk_norm:
            names += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
    return names


def load_weights(model_dir: str | Path, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Checks names and shapes against `cfg`; a tied checkpoint may still carry lm_head."""
    if random_init_marker(model_dir) is not None:
        raise ValueError(
            f"model directory {model_dir} has no checkpoint: its config.json carries "
            f"{RANDOM_INIT_KEY!r}, weights generated from a seed, which only the torch backend "
            "supports (pd_serve.models.random_init)")
    state = load_state_dict(model_dir)
    missing = [n for n in expected_weight_names(cfg) if n not in state]
    if missing:
        raise ValueError(f"checkpoint {model_dir} lacks {len(missing)} tensors, e.g. {missing[:3]}")
    shapes = {
        "model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size),
        "model.layers.0.self_attn.q_proj.weight": (cfg.q_size, cfg.hidden_size),
        "model.layers.0.self_attn.k_proj.weight": (cfg.kv_size, cfg.hidden_size),
        "model.layers.0.mlp.gate_proj.weight": (cfg.intermediate_size, cfg.hidden_size),
    }
    for name, shape in shapes.items():
        if state[name].shape != shape:
            raise ValueError(f"checkpoint {model_dir}: {name} has shape {state[name].shape}, "
                             f"config.json implies {shape}")
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state
