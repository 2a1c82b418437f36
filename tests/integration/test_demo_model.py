"""The shipped demo model: both backends serve it through the engine with greedy output equal
to transformers' `generate`, and that output reads as Shakespeare (speaker tags, verse lines)."""

from __future__ import annotations

import re

import pytest

from pd_serve.backends.base import RunnerConfig
from pd_serve.config import CacheConfig, SchedulerConfig
from pd_serve.engine.engine import LLMEngine
from pd_serve.engine.sampling_params import SamplingParams
from pd_serve.models.tokenizer import Tokenizer
from tests.checkpoints import DEMO_MODEL, load_hf_model

pytestmark = pytest.mark.slow  # MindSpore compiles a few graphs (~20 s)

PROMPTS = ["ROMEO:\n", "First Citizen:\nWhat say you to", "KING HENRY:\nMy lords,"]
NEW_TOKENS = 40
SPEAKER = re.compile(r"\n\n[A-Z][A-Za-z ]+:\n")  # a blank line, then 'NAME:' on its own line


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer(DEMO_MODEL)


@pytest.fixture(scope="module")
def hf_greedy(tokenizer: Tokenizer) -> list[list[int]]:
    import torch

    model = load_hf_model(DEMO_MODEL)
    outs = []
    for text in PROMPTS:
        ids = torch.tensor([tokenizer.encode(text)])
        gen = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False,
                             min_new_tokens=NEW_TOKENS, pad_token_id=0)
        outs.append(gen[0, ids.shape[1]:].tolist())
    return outs


@pytest.mark.parametrize("backend", ["mindspore", "torch"])
def test_demo_model_greedy_matches_transformers(backend: str, tokenizer: Tokenizer,
                                                hf_greedy: list[list[int]]) -> None:
    from pd_serve.backends import create_runner

    runner = create_runner(RunnerConfig(model_dir=str(DEMO_MODEL), backend=backend,
                                        block_size=16, num_blocks=64))
    engine = LLMEngine(runner, tokenizer, CacheConfig(16, 64, True),
                       SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=256))
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    outs = engine.generate([tokenizer.encode(t) for t in PROMPTS], params)
    engine.leak_check()
    runner.close()
    for out, expected in zip(outs, hf_greedy, strict=True):
        assert out.new_token_ids == expected
    texts = [p + o.text for p, o in zip(PROMPTS, outs, strict=True)]
    assert sum(bool(SPEAKER.search(t)) for t in texts) >= 2, texts
    words = re.findall(r"[A-Za-z']+", " ".join(texts))
    assert len(words) >= len(PROMPTS) * NEW_TOKENS // 3  # words, not byte soup
