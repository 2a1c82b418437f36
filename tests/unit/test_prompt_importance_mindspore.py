"""Prompt-token importance on the MindSpore backend (eager pass over the cached K/V): equal to
the attention transformers reports on every tiny variant, and the cache is read only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pd_serve.backends.base import PrefillBatch, RunnerConfig, SeqChunk
from tests.checkpoints import VARIANTS
from tests.unit.test_prompt_importance import hf_importance

ms_runner = pytest.importorskip("pd_serve.backends.mindspore.runner")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_scores_equal_transformers_attention(tiny_checkpoints: dict[str, Path],
                                             variant: str) -> None:
    runner = ms_runner.MindSporeRunner(RunnerConfig(str(tiny_checkpoints[variant]),
                                                    block_size=16, num_blocks=12))
    ids = np.random.RandomState(7).randint(1, 1024, size=40).tolist()
    table = [5, 0, 9]
    runner.prefill(PrefillBatch([SeqChunk(ids, 0, table)]))
    kv = runner.read_kv(table, len(ids))
    scores = runner.prefill_importance(PrefillBatch([SeqChunk(ids, 0, table)]), 8)[0]
    assert np.array_equal(kv, runner.read_kv(table, len(ids)))  # read only
    assert scores.shape == (len(ids),) and scores.dtype == np.float32
    np.testing.assert_allclose(scores, hf_importance(tiny_checkpoints[variant], ids, 8),
                               atol=1e-6)
    with pytest.raises(ValueError, match="start_pos 0"):
        runner.prefill_importance(PrefillBatch([SeqChunk(ids[:4], 2, table)]), 8)
    runner.close()
