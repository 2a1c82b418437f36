"""Our NumPy rope tables agree with transformers' own rope init and rotary module (llama3 scaling).

Tolerance: transformers computes in float32, we in float64, so inverse frequencies agree to
rtol 1e-6 and cos/sin over 512 positions to atol 1e-5.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from pd_serve.models.config import ModelConfig
from pd_serve.models.rope import cos_sin_table, inverse_frequencies
from tests.checkpoints import VARIANTS

LLAMA3: dict[str, Any] = {"vocab_size": 1024, "hidden_size": 64, "num_attention_heads": 4,
          "num_key_value_heads": 2, "intermediate_size": 128, "num_hidden_layers": 2,
          "max_position_embeddings": 512}


def llama3_configs() -> tuple[transformers.LlamaConfig, ModelConfig]:
    hf_cfg = transformers.LlamaConfig(**LLAMA3, **VARIANTS["llama3-scaled"][1])
    return hf_cfg, ModelConfig.from_hf_dict(hf_cfg.to_dict())


def test_llama3_config_is_parsed() -> None:
    _, cfg = llama3_configs()
    assert cfg.rope.rope_type == "llama3"
    assert (cfg.rope.theta, cfg.rope.factor, cfg.rope.original_max_position) == (500000.0, 8.0, 64)


def test_llama3_inverse_frequencies_match_transformers() -> None:
    hf_cfg, cfg = llama3_configs()
    hf_inv, scaling = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg)
    assert scaling == 1.0
    ours = inverse_frequencies(cfg.rope, cfg.head_dim)
    unscaled = inverse_frequencies(ModelConfig.from_hf_dict(LLAMA3 | {"model_type": "llama",
                                   "rope_theta": 500000.0}).rope, cfg.head_dim)
    assert not np.allclose(ours, unscaled)  # the scaling is in effect for this config
    np.testing.assert_allclose(ours, hf_inv.double().numpy(), rtol=1e-6)


def test_llama3_cos_sin_match_rotary_module() -> None:
    hf_cfg, cfg = llama3_configs()
    positions = torch.arange(512)[None]  # [1, 512]
    x = torch.zeros(1, 512, cfg.head_dim)  # only its dtype and device are used
    hf_cos, hf_sin = LlamaRotaryEmbedding(hf_cfg)(x, positions)  # each [1, 512, head_dim]
    cos, sin = cos_sin_table(cfg.rope, cfg.head_dim, 512)
    np.testing.assert_allclose(cos, hf_cos[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(sin, hf_sin[0].numpy(), atol=1e-5)
