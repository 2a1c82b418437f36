"""Sampler: greedy, top-k, top-p, temperature and per-request seeds."""

from __future__ import annotations

import numpy as np
import pytest

from pd_serve.engine.sampler import Sampler
from pd_serve.engine.sampling_params import SamplingParams


def random_logits(n: int, vocab: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, vocab)).astype(np.float32) * 2


def test_greedy_is_argmax() -> None:
    logits = random_logits(5)
    out = Sampler(0).sample(logits, [SamplingParams(temperature=0.0)] * 5, [None] * 5)
    assert out == list(np.argmax(logits, axis=-1))


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, top_k=1),
    SamplingParams(temperature=5.0, top_p=1e-6),
    SamplingParams(temperature=0.7, top_k=3, top_p=1e-3),
])
def test_filters_that_keep_one_token_equal_greedy(params: SamplingParams) -> None:
    logits = random_logits(16, seed=1)
    sampler = Sampler(0)
    for _ in range(5):
        assert sampler.sample(logits, [params] * 16, [None] * 16) == \
            list(np.argmax(logits, axis=-1))


def test_seeded_rows_do_not_depend_on_neighbours() -> None:
    row = random_logits(1, seed=2)[0]
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=7)
    plain = SamplingParams(temperature=0.8, seed=7)

    def draws(neighbours: int, neighbour_params: SamplingParams, at: int) -> list[tuple]:
        gens = [np.random.default_rng(7), np.random.default_rng(7)]
        sampler = Sampler(neighbours)
        out = []
        for step in range(20):
            logits = random_logits(neighbours + 2, seed=100 + step + neighbours)
            logits[at], logits[at + 1] = row, row
            params = [neighbour_params] * (neighbours + 2)
            params[at], params[at + 1] = seeded, plain
            g: list[np.random.Generator | None] = [None] * (neighbours + 2)
            g[at], g[at + 1] = gens
            tokens = sampler.sample(logits, params, g)
            out.append((tokens[at], tokens[at + 1]))
        return out

    alone = draws(0, seeded, 0)
    assert draws(3, SamplingParams(temperature=1.3, top_k=5), 2) == alone
    assert draws(5, SamplingParams(temperature=0.0), 4) == alone
    assert len(set(alone)) > 1  # really sampled


def test_engine_seed_reproducible() -> None:
    logits = random_logits(8, seed=3)
    params = [SamplingParams(temperature=1.0)] * 8
    assert Sampler(11).sample(logits, params, [None] * 8) == \
        Sampler(11).sample(logits, params, [None] * 8)


def empirical(logits: list[float], params: SamplingParams, n: int = 20000) -> np.ndarray:
    batch = np.tile(np.asarray(logits, np.float32), (n, 1))
    tokens = Sampler(0).sample(batch, [params] * n, [None] * n)
    return np.bincount(tokens, minlength=len(logits)) / n


def test_temperature_one_follows_softmax() -> None:
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    freq = empirical(list(np.log(probs)), SamplingParams(temperature=1.0))
    assert np.abs(freq - probs).max() < 0.02


def test_temperature_flattens_and_sharpens() -> None:
    logits = list(np.log([0.5, 0.3, 0.15, 0.05]))
    hot = empirical(logits, SamplingParams(temperature=100.0))
    assert np.abs(hot - 0.25).max() < 0.03
    cold = empirical(logits, SamplingParams(temperature=0.05))
    assert cold[0] > 0.99


def test_top_k_and_top_p_cut_the_tail() -> None:
    logits = list(np.log([0.5, 0.3, 0.15, 0.05]))
    k2 = empirical(logits, SamplingParams(temperature=1.0, top_k=2))
    assert k2[2:].sum() == 0 and abs(k2[0] - 0.5 / 0.8) < 0.02
    p6 = empirical(logits, SamplingParams(temperature=1.0, top_p=0.6))  # keeps 0.5 + 0.3
    assert p6[2:].sum() == 0 and abs(p6[0] - 0.5 / 0.8) < 0.02
    p85 = empirical(logits, SamplingParams(temperature=1.0, top_p=0.85))  # adds 0.15
    assert p85[3] == 0 and p85[2] > 0.1


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="do not match"):
        Sampler().sample(random_logits(2), [SamplingParams()], [None])
