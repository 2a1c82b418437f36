"""Incremental detokenization: the concatenated deltas equal one full decode."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pd_serve.models.tokenizer import IncrementalDetokenizer, Tokenizer
from tests.checkpoints import DEMO_MODEL

TOK = Tokenizer(DEMO_MODEL)


def _stream(ids: list[int], step: int) -> str:
    detok = IncrementalDetokenizer(TOK)
    out = "".join(detok.push(ids[i:i + step]) for i in range(0, len(ids), step))
    out += detok.flush()
    assert out == detok.text
    return out


@settings(max_examples=60, deadline=None)
@given(text=st.text(min_size=1, max_size=80), step=st.integers(1, 4))
def test_deltas_concatenate_to_full_decode(text: str, step: int) -> None:
    ids = TOK.encode(text)
    assert _stream(ids, step) == TOK.decode(ids)


def test_multibyte_character_is_held_until_complete() -> None:
    ids = TOK.encode("héllo ✓ wörld")
    detok = IncrementalDetokenizer(TOK)
    for i in range(len(ids)):
        detok.push(ids[i:i + 1])
        assert "\ufffd" not in detok.text
    detok.flush()
    assert detok.text == "héllo ✓ wörld"


@settings(max_examples=40, deadline=None)
@given(ids=st.lists(st.integers(3, TOK.vocab_size - 1), min_size=1, max_size=40))
def test_arbitrary_ids_match_full_decode(ids: list[int]) -> None:
    assert _stream(ids, 1) == TOK.decode(ids)
