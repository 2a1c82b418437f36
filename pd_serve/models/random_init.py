"""Random-weight model directories: a real architecture's config.json, a byte-level tokenizer and
a seed, with weights generated on the target device instead of loaded from a checkpoint.

A directory holds config.json (the Hugging Face config plus the `pd_serve_random_init` marker
`{"seed": N, "std": S}`), generation_config.json, tokenizer.json and tokenizer_config.json.
Weights: every tensor draws from its own generator seeded from (seed, tensor name), so a tensor
does not depend on the order tensors are made in; projections and embeddings are
normal(0, std) drawn in float32 on the device and then cast, norms are ones, biases zeros. The
same seed on the same kind of device gives the same weights (CPU and CUDA generators differ).
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pd_serve.models.checkpoint import RANDOM_INIT_KEY, expected_weight_names, random_init_marker
from pd_serve.models.config import ModelConfig

if TYPE_CHECKING:
    import torch

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
_LLAMA_COMMON: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
    "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "pretraining_tp": 1,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "rope_scaling": LLAMA3_ROPE,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "initializer_range": 0.02,
}
# name -> the Hugging Face config.json fields of that architecture (ids of special tokens are
# added by `special_ids`).
PRESETS: dict[str, dict[str, Any]] = {
    # Llama-3.1-8B's shapes and rope (max positions cut to 8192 to keep rope tables small).
    "llama-3-8b": {**_LLAMA_COMMON, "vocab_size": 128256, "hidden_size": 4096,
                   "intermediate_size": 14336, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                   "max_position_embeddings": 8192},
    # The same architecture scaled down for tests (GQA 4:1, head_dim 64).
    "tiny": {**_LLAMA_COMMON, "vocab_size": 512, "hidden_size": 256, "intermediate_size": 512,
             "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2,
             "head_dim": 64, "max_position_embeddings": 2048},
}
BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ message['role'] + ': ' + "
                 "message['content'] + '\\n' }}{% endfor %}{% if add_generation_prompt %}"
                 "{{ 'assistant: ' }}{% endif %}")


@dataclass(frozen=True)
class RandomInit:
    """The marker's content: the seed and the standard deviation of projection weights."""

    seed: int
    std: float = 0.02

    def __post_init__(self) -> None:
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"{RANDOM_INIT_KEY}.seed must be a non-negative integer, "
                             f"got {self.seed!r}")
        if not isinstance(self.std, (int, float)) or not self.std > 0:
            raise ValueError(f"{RANDOM_INIT_KEY}.std must be a positive number, got {self.std!r}")

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> RandomInit | None:
        """The directory's marker, or None when it holds a checkpoint."""
        marker = random_init_marker(model_dir)
        if marker is None:
            return None
        unknown = set(marker) - {"seed", "std"}
        if unknown:
            raise ValueError(f"{RANDOM_INIT_KEY}: unknown keys {sorted(unknown)}")
        if "seed" not in marker:
            raise ValueError(f"{RANDOM_INIT_KEY} in {model_dir}/config.json has no seed")
        return cls(seed=marker["seed"], std=marker.get("std", 0.02))

    def tensor_seed(self, name: str) -> int:
        """A 63-bit seed for tensor `name`, stable across processes and machines."""
        digest = hashlib.sha256(f"{self.seed}:{name}".encode()).digest()
        return int.from_bytes(digest[:8], "little") >> 1


def special_ids(vocab_size: int) -> dict[str, int]:
    """Ids of the special tokens: Llama 3's layout (bos 128000, eos 128001, eot 128009 for a
    128256 vocabulary), i.e. the last 256 ids are the special range; bytes take ids 0..255."""
    if vocab_size < 512:
        raise ValueError(f"vocab_size must be at least 512 (256 bytes + 256 specials), "
                         f"got {vocab_size}")
    base = vocab_size - 256
    return {BOS: base, EOS: base + 1, EOT: base + 9}


def weight_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every tensor `expected_weight_names(cfg)` lists."""
    h, shapes = cfg.hidden_size, {}
    per_layer = {
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (cfg.q_size, h), "self_attn.k_proj.weight": (cfg.kv_size, h),
        "self_attn.v_proj.weight": (cfg.kv_size, h), "self_attn.o_proj.weight": (h, cfg.q_size),
        "mlp.gate_proj.weight": (cfg.intermediate_size, h),
        "mlp.up_proj.weight": (cfg.intermediate_size, h),
        "mlp.down_proj.weight": (h, cfg.intermediate_size),
        "self_attn.q_proj.bias": (cfg.q_size,), "self_attn.k_proj.bias": (cfg.kv_size,),
        "self_attn.v_proj.bias": (cfg.kv_size,),
        "self_attn.q_norm.weight": (cfg.head_dim,), "self_attn.k_norm.weight": (cfg.head_dim,),
    }
    for name in expected_weight_names(cfg):
        if name.startswith("model.layers."):
            shapes[name] = per_layer[name.split(".", 3)[3]]
        elif name == "model.norm.weight":
            shapes[name] = (h,)
        else:  # embed_tokens, lm_head
            shapes[name] = (cfg.vocab_size, h)
    return shapes


class RandomWeights:
    """Generates the tensors of a random-init directory on `device` on demand (float32)."""

    def __init__(self, cfg: ModelConfig, spec: RandomInit, device: torch.device | str) -> None:
        import torch

        self.spec, self.device = spec, torch.device(device)
        self.shapes = weight_shapes(cfg)

    def __call__(self, name: str) -> torch.Tensor | None:
        """The tensor `name` [shape], or None for a name the architecture does not have."""
        import torch

        shape = self.shapes.get(name)
        if shape is None:
            return None
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=torch.float32, device=self.device)
        if name.endswith(".bias"):
            return torch.zeros(shape, dtype=torch.float32, device=self.device)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.spec.tensor_seed(name))
        out = torch.empty(shape, dtype=torch.float32, device=self.device)
        return out.normal_(0.0, self.spec.std, generator=gen)


def preset_config(preset: str, seed: int, std: float = 0.02) -> dict[str, Any]:
    """config.json content of `preset` with the random-init marker."""
    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r} is unknown (choose from {sorted(PRESETS)})")
    RandomInit(seed, std)  # validates
    raw = copy.deepcopy(PRESETS[preset])
    ids = special_ids(raw["vocab_size"])
    raw.update(bos_token_id=ids[BOS], eos_token_id=ids[EOS])
    raw[RANDOM_INIT_KEY] = {"seed": seed, "std": std}
    return raw


def write_random_model(out_dir: str | Path, preset: str, seed: int, std: float = 0.02) -> Path:
    """Writes a random-init model directory of `preset` (config, tokenizer, no weights)."""
    raw = preset_config(preset, seed, std)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = special_ids(raw["vocab_size"])
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    gen = {"bos_token_id": ids[BOS], "eos_token_id": [ids[EOS], ids[EOT]]}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    build_tokenizer(raw["vocab_size"]).save(str(out / "tokenizer.json"))
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
               "model_max_length": raw["max_position_embeddings"],
               "chat_template": CHAT_TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    return out


def _byte_chars() -> list[str]:
    """The byte-level alphabet: the printable character standing for each byte 0..255 (the
    GPT-2 convention that tokenizers' ByteLevel pre-tokenizer and decoder use)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b], extra = chr(256 + extra), extra + 1
    return [chars[b] for b in range(256)]


def build_tokenizer(vocab_size: int) -> Any:
    """A byte-level tokenizer with exactly `vocab_size` ids: id b < 256 is byte b, the special
    tokens sit at `special_ids`, every other id is a filler `<|rN|>` that encoding never
    produces (no merges) and decoding prints as text."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    specials = special_ids(vocab_size)
    by_id = {i: name for name, i in specials.items()}
    vocab = {ch: b for b, ch in enumerate(_byte_chars())}
    for i in range(256, vocab_size):
        vocab[by_id.get(i, f"<|r{i}|>")] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(name, special=True, normalized=False)
                            for name in specials])
    return tok
