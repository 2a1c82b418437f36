"""Tokenizer for a Hugging Face model directory: `tokenizer.json` plus the chat template and
special tokens from `tokenizer_config.json`; includes incremental detokenization for streaming."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


class Tokenizer:
    """Thin wrapper over `tokenizers.Tokenizer` with a Jinja chat template."""

    def __init__(self, model_dir: str | Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"model directory {model_dir} has no tokenizer.json")
        self.model_dir = model_dir
        self._tok = HFTokenizer.from_file(str(path))
        self.sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
        cfg_path = model_dir / "tokenizer_config.json"
        self._cfg: dict[str, Any] = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self.chat_template: str | None = self._cfg.get("chat_template")
        self.bos_token: str | None = _token_text(self._cfg.get("bos_token"))
        self.eos_token: str | None = _token_text(self._cfg.get("eos_token"))
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def apply_chat_template(self, messages: list[dict[str, Any]],
                            add_generation_prompt: bool = True) -> str:
        """Renders messages with the model's template (raises ValueError if it has none)."""
        if not self.chat_template:
            raise ValueError("this model has no chat template; use /v1/completions")
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except TemplateError as exc:
            raise ValueError(f"chat template failed: {exc}") from exc


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


_SPECIAL_ROLES = ("bos_token", "eos_token", "pad_token", "unk_token")


def tokenizer_hash(model_dir: str | Path) -> str:
    """sha256 hex identifying a model directory's tokenization: its tokenizer.json in canonical
    JSON form (sorted keys, no whitespace, so reformatting the file does not change it) plus the
    ids of the special-token roles tokenizer_config.json names (bos, eos, pad, unk: which id
    stops generation is part of what two sides must agree on). Needs no `tokenizers` package.
    ValueError when the directory has no tokenizer.json."""
    model_dir = Path(model_dir)
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"model directory {model_dir} has no tokenizer.json")
    spec = json.loads(path.read_text(encoding="utf-8"))
    cfg_path = model_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    ids = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    vocab = spec.get("model", {}).get("vocab")
    lookup = {**vocab, **ids} if isinstance(vocab, dict) else ids
    special = {role: lookup.get(_token_text(cfg.get(role)) or "") for role in _SPECIAL_ROLES}
    canonical = json.dumps({"tokenizer": spec, "special_ids": special}, sort_keys=True,
                           separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without splitting multi-byte
    characters, decoding only a short window of recent ids per step (linear in output length).

    Text is released once the window no longer ends in a replacement character; `flush` at the
    end releases whatever is still held (an incomplete or invalid byte sequence).

    Lifecycle: 1. created per request; 2. `push(new_ids)` after each step returns the new text;
    3. `flush()` at finish returns the held-back rest; `text` holds everything released.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0  # window start: ids before it are settled text
        self._read_offset = 0  # ids before it have been released as text
        self.text = ""

    def push(self, new_ids: list[int]) -> str:
        self._ids.extend(new_ids)
        prefix = self._tok.decode(self._ids[self._prefix_offset:self._read_offset])
        window = self._tok.decode(self._ids[self._prefix_offset:])
        if len(window) <= len(prefix) or window.endswith("\ufffd"):
            return ""
        delta = window[len(prefix):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """Releases text held back at the end (e.g. a final incomplete character)."""
        prefix = self._tok.decode(self._ids[self._prefix_offset:self._read_offset])
        window = self._tok.decode(self._ids[self._prefix_offset:])
        delta = window[len(prefix):] if len(window) > len(prefix) else ""
        self._prefix_offset = self._read_offset = len(self._ids)
        self.text += delta
        return delta
