"""One prefill engine and one decode engine in one process, KV handed off through KVSender /
KVReceiver: greedy output equals the aggregated engine token for token, the KV that lands
equals what prefill computed, and faults (corruption, truncation, timeout) fail cleanly."""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from pd_serve.backends.base import ModelRunner, RunnerConfig
from pd_serve.config import CacheConfig, SchedulerConfig
from pd_serve.engine.engine import LLMEngine
from pd_serve.engine.outputs import RequestOutput
from pd_serve.engine.sampling_params import SamplingParams
from pd_serve.kv.layout import KVLayout
from pd_serve.kv.messages import HandoffSource
from pd_serve.kv.receiver import MODES, HandoffError, KVReceiver
from pd_serve.kv.sender import KVSender, layer_checksums
from pd_serve.kv.transport import (
    CannExtTransport,
    FakeTransport,
    Transport,
    cann_ext_unavailable_reason,
)
from pd_serve.models.tokenizer import Tokenizer
from tests.checkpoints import DEMO_MODEL

pytest.importorskip("torch")

BLOCK, NUM_BLOCKS, MAX_LEN = 16, 48, 256
PARAMS = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
TEXTS = [
    "ROMEO:\nBut soft, what light through yonder window breaks?",
    "JULIET:\nO Romeo, Romeo, wherefore art thou Romeo? Deny thy father and refuse thy name;",
    "KING:\n",
    "HAMLET:\nTo be, or not to be, that is the question: whether 'tis nobler in the mind to "
    "suffer the slings and arrows of outrageous fortune, or to take arms against a sea",
]


def make_runner(backend: str) -> ModelRunner:
    from pd_serve.backends import create_runner

    return create_runner(RunnerConfig(model_dir=str(DEMO_MODEL), backend=backend,
                                      block_size=BLOCK, num_blocks=NUM_BLOCKS,
                                      max_model_len=MAX_LEN, threads=2))


@pytest.fixture(scope="module")
def runners() -> Iterator[tuple[ModelRunner, ModelRunner]]:
    prefill, decode = make_runner("torch"), make_runner("torch")
    yield prefill, decode
    prefill.close()
    decode.close()


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer(DEMO_MODEL)


@pytest.fixture(scope="module")
def prompts(tokenizer: Tokenizer) -> list[list[int]]:
    out = [tokenizer.encode(t) for t in TEXTS]
    out.append(out[3][:2 * BLOCK])  # exactly two full blocks
    return out


def engine(runner: ModelRunner, tokenizer: Tokenizer) -> LLMEngine:
    # A fresh engine has an empty prefix cache, so stale K/V of an earlier engine on the same
    # runner is never read.
    return LLMEngine(runner, tokenizer, CacheConfig(BLOCK, NUM_BLOCKS, True),
                     SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512))


@pytest.fixture(scope="module")
def aggregated(runners: tuple[ModelRunner, ModelRunner], tokenizer: Tokenizer,
               prompts: list[list[int]]) -> list[list[int]]:
    e = engine(runners[0], tokenizer)
    out = [o.new_token_ids for o in e.generate(prompts, PARAMS)]
    e.leak_check()
    return out


TransportPair = tuple[Transport, Transport]


def fake_pair() -> TransportPair:
    return FakeTransport(), FakeTransport()


def cann_pair() -> TransportPair:
    reason = cann_ext_unavailable_reason()
    if reason is not None:
        pytest.skip(f"cann_ext transport unavailable: {reason}")
    return CannExtTransport(), CannExtTransport()


@pytest.fixture(params=[fake_pair, cann_pair], ids=["fake", "cann_ext"])
def transports(request: pytest.FixtureRequest) -> Iterator[TransportPair]:
    make: Callable[[], TransportPair] = request.param
    pair = make()
    baseline = [t.num_registered for t in pair]
    yield pair
    assert [t.num_registered for t in pair] == baseline, "registrations leaked"
    for t in pair:
        t.close()


class Disagg:
    """Prefill engine + sender and decode engine + receiver over one transport pair."""

    def __init__(self, runners: tuple[ModelRunner, ModelRunner], tokenizer: Tokenizer,
                 transports: TransportPair, num_slots: int = 2) -> None:
        self.p_runner, self.d_runner = runners
        self.prefill, self.decode = engine(self.p_runner, tokenizer), engine(self.d_runner,
                                                                              tokenizer)
        layout = KVLayout.for_model(self.p_runner.model_config, MAX_LEN)
        self.sender = KVSender(transports[0], layout, num_slots)
        self.receiver = KVReceiver(transports[1], layout, BLOCK)

    def prefill_all(self, prompts: list[list[int]]) -> dict[str, RequestOutput]:
        for i, p in enumerate(prompts):
            self.prefill.add_request(f"r{i}", p, PARAMS, prefill_only=True)
        firsts: dict[str, RequestOutput] = {}
        while self.prefill.has_unfinished():
            for out in self.prefill.step():
                firsts[out.request_id] = out
        assert all(o.handoff_ready for o in firsts.values())
        return firsts

    def stage(self, rid: str) -> tuple[int, HandoffSource, list[int], int]:
        slot = self.sender.free_slots()[0]
        table, n = self.prefill.handoff_blocks(rid)
        src = self.sender.stage(slot, self.p_runner, table, n, request_id=rid)
        return slot, HandoffSource.from_json(src.to_json()), table, n  # over the "wire"

    def finish(self, rid: str, slot: int) -> None:
        self.sender.release(slot)
        self.prefill.release_handoff(rid)

    def close(self) -> None:
        self.sender.leak_check()
        self.prefill.leak_check()
        self.decode.leak_check()
        self.sender.close()
        self.receiver.close()


def stream(engine: LLMEngine) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return tokens


@pytest.mark.parametrize("mode", MODES)
def test_disaggregated_equals_aggregated(runners: tuple[ModelRunner, ModelRunner],
                                         tokenizer: Tokenizer, prompts: list[list[int]],
                                         aggregated: list[list[int]], transports: TransportPair,
                                         mode: str) -> None:
    d = Disagg(runners, tokenizer, transports)
    firsts = d.prefill_all(prompts)
    for i, p in enumerate(prompts):
        rid = f"r{i}"
        slot, src, table, n = d.stage(rid)
        expected = d.p_runner.read_kv(table, n)  # what prefill computed
        reservation = d.decode.reserve_handoff(rid, n)
        assert reservation is not None
        kv = d.receiver.fetch(src, reservation, d.d_runner, mode=mode)  # type: ignore[arg-type]
        layout = src.layout
        assert layer_checksums(layout, d.sender.buffer(slot)) == src.checksums
        np.testing.assert_array_equal(kv, expected)
        np.testing.assert_array_equal(d.d_runner.read_kv(reservation, n), expected)
        want = {"bulk": 1, "per_layer": layout.num_layers,
                "block_fixed": 2 * layout.num_layers * -(-n // BLOCK)}[mode]
        assert d.receiver.last_num_reads == want
        d.decode.add_prefilled(rid, p, firsts[rid].new_token_ids[0], PARAMS, reservation)
        d.finish(rid, slot)
    rest = stream(d.decode)
    got = [firsts[f"r{i}"].new_token_ids + rest[f"r{i}"] for i in range(len(prompts))]
    assert got == aggregated
    assert d.receiver.num_peers == 1  # one cached connection for every request
    d.close()


def fail_one(d: Disagg, rid: str, corrupt: Callable[[int, HandoffSource], HandoffSource],
             match: str, timeout_s: float = 5.0) -> None:
    """Stages `rid`, breaks the hand-off, checks the error and that everything is freed."""
    slot, src, _, n = d.stage(rid)
    reservation = d.decode.reserve_handoff(rid, n)
    assert reservation is not None
    with pytest.raises(HandoffError, match=match):
        d.receiver.fetch(corrupt(slot, src), reservation, d.d_runner, timeout_s=timeout_s)
    d.decode.cancel_reservation(rid)
    d.finish(rid, slot)


def test_faults_fail_cleanly(runners: tuple[ModelRunner, ModelRunner], tokenizer: Tokenizer,
                             prompts: list[list[int]], transports: TransportPair) -> None:
    d = Disagg(runners, tokenizer, transports)
    d.prefill_all(prompts[:4])

    def flip_byte(slot: int, src: HandoffSource) -> HandoffSource:
        buf = d.sender.buffer(slot)
        buf[src.layout.offset(2, 1) + 5] ^= 0x40  # layer 2's V plane
        return src

    def short_write(slot: int, src: HandoffSource) -> HandoffSource:
        end = src.layout.total_bytes  # the last token of the last V plane never arrived
        d.sender.buffer(slot)[end - src.layout.token_bytes:end] = 0
        return src

    def past_the_region(slot: int, src: HandoffSource) -> HandoffSource:
        # The region (KV and progress trailer) ends before the layout does: a truncated source.
        shift = d.sender.buffer(slot).nbytes - src.layout.total_bytes + 64
        return dataclasses.replace(src, offset=shift)

    fail_one(d, "r0", flip_byte, r"checksum mismatch in layer\(s\) \[2\]")
    fail_one(d, "r1", short_write, r"checksum mismatch in layer\(s\) \[5\]")
    fail_one(d, "r2", past_the_region, "failed")
    d.close()
    d.decode.leak_check()


def test_timeout_is_a_handoff_error(runners: tuple[ModelRunner, ModelRunner],
                                    tokenizer: Tokenizer, prompts: list[list[int]],
                                    transports: TransportPair) -> None:
    d = Disagg(runners, tokenizer, transports)
    d.prefill_all(prompts[:1])
    if isinstance(transports[1], FakeTransport):
        transports[1].stall_s = 1.0

        def stall(slot: int, src: HandoffSource) -> HandoffSource:
            return src
        fail_one(d, "r0", stall, "timed out", timeout_s=0.2)
        transports[1].stall_s = 0.0
    else:
        with socket.socket() as silent:  # accepts TCP but never answers the handshake
            silent.bind(("127.0.0.1", 0))
            silent.listen()
            port = silent.getsockname()[1]

            def mute_peer(slot: int, src: HandoffSource) -> HandoffSource:
                fields = src.conn_id.decode().split()
                fields[-2] = str(port)
                return dataclasses.replace(src, conn_id=" ".join(fields).encode())
            fail_one(d, "r0", mute_peer, "timed out", timeout_s=0.3)
    assert d.receiver.num_peers == 0  # the failing peer was forgotten
    d.close()


@pytest.mark.slow
def test_mindspore_disaggregated_equals_aggregated(tokenizer: Tokenizer,
                                                   prompts: list[list[int]]) -> None:
    pytest.importorskip("mindspore")
    pair = make_runner("mindspore"), make_runner("mindspore")
    transports = fake_pair()
    try:
        e = engine(pair[0], tokenizer)
        aggregated = [o.new_token_ids for o in e.generate(prompts, PARAMS)]
        d = Disagg(pair, tokenizer, transports)
        firsts = d.prefill_all(prompts)
        for i, p in enumerate(prompts):
            rid = f"r{i}"
            slot, src, table, n = d.stage(rid)
            reservation = d.decode.reserve_handoff(rid, n)
            assert reservation is not None
            kv = d.receiver.fetch(src, reservation, d.d_runner, mode="per_layer")
            np.testing.assert_array_equal(kv, d.p_runner.read_kv(table, n))
            d.decode.add_prefilled(rid, p, firsts[rid].new_token_ids[0], PARAMS, reservation)
            d.finish(rid, slot)
        rest = stream(d.decode)
        assert [firsts[f"r{i}"].new_token_ids + rest[f"r{i}"]
                for i in range(len(prompts))] == aggregated
        d.close()
        assert [t.num_registered for t in transports] == [0, 0]
    finally:
        for r in pair:
            r.close()
        for t in transports:
            t.close()
