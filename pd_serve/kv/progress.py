"""The progress trailer of a layer-wise hand-off (prefill stages layers while it computes).

Each slot buffer (and the reader's staging buffer) has room for a small int64 trailer after its
KV bytes. The owner writes it as the prefill runs; the reader polls it with one-sided reads
and reads the layers it reports staged, so the transfer overlaps the prefill:

  word 0  state: RUNNING, DONE (every layer staged, first token and checksums valid),
          FAILED (prefill or staging failed) or FINISHED (the request ended at its first
          token: nothing to decode);
  word 1  layers staged so far (layers 0 .. n-1 hold their final bytes);
  word 2  the first token id (valid once DONE);
  word 3+ one checksum per layer (valid once DONE).
The owner writes the data of a layer before raising word 1, and words 2+ before DONE.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RUNNING, DONE, FAILED, FINISHED = 0, 1, -1, -2
STATES = {RUNNING: "running", DONE: "done", FAILED: "failed", FINISHED: "finished"}
HEADER_WORDS = 3


def trailer_words(num_layers: int) -> int:
    return HEADER_WORDS + num_layers


def trailer_bytes(num_layers: int) -> int:
    return 8 * trailer_words(num_layers)


@dataclass(frozen=True)
class Progress:
    """One reading of a trailer."""

    state: int
    staged: int
    first_token: int
    checksums: tuple[int, ...]

    @classmethod
    def parse(cls, words: np.ndarray, num_layers: int) -> Progress:
        """`words` [trailer_words(num_layers)] int64 as read; ValueError on nonsense (a torn or
        foreign trailer)."""
        state, staged, first = (int(w) for w in words[:HEADER_WORDS])
        if state not in STATES or not 0 <= staged <= num_layers:
            raise ValueError(f"progress trailer is corrupt: state {state}, {staged} of "
                             f"{num_layers} layers staged")
        if state == DONE and staged != num_layers:
            raise ValueError(f"progress trailer says done with {staged} of {num_layers} layers")
        return cls(state, staged, first, tuple(int(c) for c in words[HEADER_WORDS:]))
