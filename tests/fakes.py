"""Fakes for unit tests: a ModelRunner whose "KV cache" stores token ids per slot.

FakeModelRunner's logits are a deterministic function of the context it READS BACK from its
cache through the block table, so a wrong block table, a slot written to the wrong place or a
corrupted prefix-cache block changes the generated tokens (or trips an assertion when a slot
that was never written is read).
"""

from __future__ import annotations

import hashlib

import numpy as np

from pd_serve.backends.base import DecodeBatch, ModelRunner, PrefillBatch, SeqChunk
from pd_serve.models.config import ModelConfig, RopeConfig


def fake_model_config(vocab_size: int = 1024, max_position_embeddings: int = 2048,
                      eos_token_ids: tuple[int, ...] = (0,)) -> ModelConfig:
    return ModelConfig(
        model_type="llama", vocab_size=vocab_size, hidden_size=8, intermediate_size=16,
        num_layers=1, num_heads=1, num_kv_heads=1, head_dim=1,
        max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-6, rope=RopeConfig(),
        tie_word_embeddings=True, attention_bias=False, qk_norm=False,
        eos_token_ids=eos_token_ids, bos_token_id=0)


def context_logits(context: list[int], vocab_size: int, banned: tuple[int, ...]) -> np.ndarray:
    """Pseudo-random float32 logits [vocab] seeded by a hash of the whole context."""
    digest = hashlib.blake2b(np.asarray(context, np.int64).tobytes(), digest_size=8).digest()
    rng = np.random.default_rng(int.from_bytes(digest, "little"))
    logits = (rng.standard_normal(vocab_size) * 3.0).astype(np.float32)
    logits[list(banned)] = -1e9
    return logits


class FakeModelRunner(ModelRunner):
    """Token-id "KV cache" of `num_blocks` blocks plus one scratch block.

    `banned` token ids never win (e.g. EOS, to get predictable lengths). Counters record how
    many prefill and decode tokens were computed.
    """

    def __init__(self, block_size: int = 4, num_blocks: int = 64, vocab_size: int = 1024,
                 max_position_embeddings: int = 2048, banned: tuple[int, ...] = (0,),
                 eos_token_ids: tuple[int, ...] = (0,)) -> None:
        self.model_config = fake_model_config(vocab_size, max_position_embeddings, eos_token_ids)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_model_len = max_position_embeddings
        self.banned = banned
        self.slots = np.full((num_blocks + 1) * block_size, -1, np.int64)
        self.prefill_tokens = 0
        self.decode_tokens = 0
        self.batches: list[PrefillBatch | DecodeBatch] = []

    def _slot(self, table: list[int], pos: int) -> int:
        block = table[pos // self.block_size]
        assert 0 <= block < self.num_blocks, f"block {block} outside the cache"
        return block * self.block_size + pos % self.block_size

    def _run(self, seq: SeqChunk) -> list[np.ndarray]:
        end = seq.start_pos + len(seq.token_ids)
        assert len(seq.block_table) == -(-end // self.block_size), "table length mismatch"
        for i, tok in enumerate(seq.token_ids):
            self.slots[self._slot(seq.block_table, seq.start_pos + i)] = tok
        context = [int(self.slots[self._slot(seq.block_table, p)]) for p in range(end)]
        assert -1 not in context, "read a slot that was never written"
        vocab = self.model_config.vocab_size
        return [context_logits(context[:p + 1], vocab, self.banned)
                for p in range(seq.start_pos, end)]

    def prefill(self, batch: PrefillBatch) -> np.ndarray | list[np.ndarray]:
        self.batches.append(batch)
        per_seq = [self._run(s) for s in batch.seqs]
        self.prefill_tokens += sum(len(s.token_ids) for s in batch.seqs)
        if batch.return_all_logits:
            return [np.stack(rows) for rows in per_seq]
        return np.stack([rows[-1] for rows in per_seq])

    def decode(self, batch: DecodeBatch) -> np.ndarray:
        self.batches.append(batch)
        self.decode_tokens += len(batch.token_ids)
        return np.stack([self._run(SeqChunk([t], p, table))[-1] for t, p, table in
                         zip(batch.token_ids, batch.positions, batch.block_tables)])

    def read_kv(self, block_table: list[int], num_tokens: int) -> np.ndarray:
        ids = [self.slots[self._slot(block_table, p)] for p in range(num_tokens)]
        return np.asarray(ids, np.float32).reshape(1, 1, num_tokens, 1, 1).repeat(2, axis=1)

    def write_kv(self, block_table: list[int], kv: np.ndarray) -> None:
        for p in range(kv.shape[2]):
            self.slots[self._slot(block_table, p)] = int(kv[0, 0, p, 0, 0])

    def close(self) -> None:
        self.slots[:] = -1


def greedy_reference(prompt: list[int], max_tokens: int, vocab_size: int = 1024,
                     banned: tuple[int, ...] = (0,)) -> list[int]:
    """What a correct engine must generate greedily with FakeModelRunner (no cache at all)."""
    context = list(prompt)
    for _ in range(max_tokens):
        context.append(int(np.argmax(context_logits(context, vocab_size, banned))))
    return context[len(prompt):]
