"""Tiny random-weight Hugging Face checkpoints (Llama, Qwen2, Qwen3) for parity tests.

Each is written with `transformers` into a directory in the HF layout, with the demo model's
tokenizer copied beside it so the serving stack can load the directory as it is.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import GenerationMixin, PreTrainedModel

    class HFCausalLM(PreTrainedModel, GenerationMixin):
        """What `AutoModelForCausalLM.from_pretrained` returns: a model that can `generate`."""

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / "models" / "shakespeare-llama"

# name -> (HF config class name, keyword overrides)
VARIANTS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {}),
    "llama-untied": ("LlamaConfig", {"tie_word_embeddings": False}),
    "llama3-scaled": ("LlamaConfig", {
        "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    }),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": False}),
    "qwen3": ("Qwen3Config", {"tie_word_embeddings": True, "head_dim": 16}),
}


def make_checkpoint(variant: str, out_dir: Path, seed: int = 0, shard: bool = False) -> Path:
    """Writes a random-weight checkpoint of `variant` to `out_dir` and returns it."""
    import torch
    import transformers

    cls_name, overrides = VARIANTS[variant]
    base = dict(
        vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
        pad_token_id=0,
    )
    base.update(overrides)
    cfg = getattr(transformers, cls_name)(**base)
    model_cls = getattr(transformers, cls_name.replace("Config", "ForCausalLM"))
    torch.manual_seed(seed)
    model = model_cls(cfg).float().eval()
    with torch.no_grad():  # larger-than-default weights make layer bugs visible in the logits
        for p in model.parameters():
            p.normal_(0.0, 0.08)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True,
                          max_shard_size="100KB" if shard else "5GB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO_MODEL / name, out_dir / name)
    return out_dir


def load_hf_model(model_dir: Path) -> HFCausalLM:
    """The transformers reference model for a checkpoint directory, float32, eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="float32").eval()
