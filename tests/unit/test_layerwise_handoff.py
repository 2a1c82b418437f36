"""Layer-wise hand-off at the KV layer: KVSender stages layers while a KVReceiver thread polls
the progress trailer and reads them, over FakeTransport (memcpy between registered buffers) and
the cann_ext host TCP transport. Every test ends with the sender's and receiver's leak checks
and no registration left."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from pd_serve.kv import progress
from pd_serve.kv.layout import KVLayout
from pd_serve.kv.messages import HandoffSource
from pd_serve.kv.receiver import HandoffAborted, HandoffError, KVReceiver
from pd_serve.kv.sender import KVSender
from pd_serve.kv.transport import (
    CannExtTransport,
    FakeTransport,
    Transport,
    cann_ext_unavailable_reason,
)

LAYERS, HEADS, DIM, BLOCK = 4, 2, 8, 4
LAYOUT = KVLayout(LAYERS, HEADS, DIM, "float32", 4, 64)


class LayerRunner:
    """What the sender needs of a runner: K/V of a layer are a function of (layer, position)."""

    def read_kv_layer(self, table: list[int], num_tokens: int, layer: int) -> np.ndarray:
        pos = np.arange(num_tokens, dtype=np.float32)[None, :, None, None]
        plane = np.arange(2, dtype=np.float32)[:, None, None, None]
        return np.broadcast_to(1000 * layer + 100 * plane + pos + table[0],
                               (2, num_tokens, HEADS, DIM)).copy()


RUNNER: Any = LayerRunner()  # duck-typed: the sender only calls read_kv_layer


def expected(table: list[int], num_tokens: int) -> np.ndarray:
    runner = LayerRunner()
    return np.stack([runner.read_kv_layer(table, num_tokens, i) for i in range(LAYERS)])


def make_transports(kind: str) -> tuple[Transport, Transport]:
    if kind == "fake":
        return FakeTransport(), FakeTransport()
    reason = cann_ext_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    return CannExtTransport(), CannExtTransport()


@pytest.fixture(params=["fake", "cann_ext"])
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[KVSender, KVReceiver]]:
    owner, reader = make_transports(request.param)
    sender = KVSender(owner, LAYOUT, 2)
    receiver = KVReceiver(reader, LAYOUT, BLOCK, num_staging=2)
    yield sender, receiver
    sender.leak_check()
    sender.close()
    receiver.close()
    assert owner.num_registered == 0 and reader.num_registered == 0
    owner.close()
    reader.close()


def read_in_thread(receiver: KVReceiver, source: HandoffSource, table: list[int],
                   timeout_s: float = 10.0, staging: int = 0) -> Callable[[], Any]:
    """Starts read_layerwise on a thread; the returned function joins it and returns (kv copy,
    first token) or raises what the read raised."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            kv, first = receiver.read_layerwise(source, table, timeout_s, staging)
            box["result"] = (np.array(kv), first)
        except Exception as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()

    def join() -> Any:
        thread.join(30)
        assert not thread.is_alive()
        if "error" in box:
            raise box["error"]
        return box["result"]

    return join


def test_reader_follows_the_layers_as_they_are_staged(pair: tuple[KVSender, KVReceiver]) -> None:
    sender, receiver = pair
    table, n = [3, 7, 1], 10
    source = sender.begin_layerwise(0, n, "r1")
    assert source.layerwise and source.checksums == ()
    source = HandoffSource.from_json(source.to_json())  # as decode gets it
    join = read_in_thread(receiver, source, table)
    for layer in range(LAYERS):
        time.sleep(0.02)  # the reader polls meanwhile and reads what is staged
        sender.stage_layer(0, "r1", RUNNER, table, layer)
    sender.finish_layerwise(0, "r1", 42)
    kv, first = join()
    assert first == 42 and np.array_equal(kv, expected(table, n))
    assert 2 <= receiver.last_num_reads <= LAYERS  # the layers came in more than one read
    sender.release(0)


def test_two_layerwise_reads_at_once(pair: tuple[KVSender, KVReceiver]) -> None:
    """Two prefills stage at once and decode reads both, into its two staging buffers, while
    they progress (the transport is called under the receiver's lock, one read at a time)."""
    sender, receiver = pair
    tables = {0: [4, 5], 1: [9, 8]}
    joins = {slot: read_in_thread(receiver, sender.begin_layerwise(slot, 6, f"s{slot}"),
                                  tables[slot], staging=slot) for slot in (0, 1)}
    for layer in range(LAYERS):
        for slot in (1, 0):
            sender.stage_layer(slot, f"s{slot}", RUNNER, tables[slot], layer)
        time.sleep(0.01)
    for slot in (0, 1):
        sender.finish_layerwise(slot, f"s{slot}", 100 + slot)
    for slot in (0, 1):
        kv, first = joins[slot]()
        assert first == 100 + slot and np.array_equal(kv, expected(tables[slot], 6))
        sender.release(slot)
    with pytest.raises(ValueError, match="staging buffer 2 outside"):
        receiver.read_layerwise(sender.begin_layerwise(0, 2, "s2"), [0], 1.0, staging=2)
    sender.abort_layerwise(0, "s2", False)
    sender.release(0)


@pytest.mark.parametrize("finished", [True, False])
def test_owner_abort_reaches_the_reader(pair: tuple[KVSender, KVReceiver],
                                        finished: bool) -> None:
    sender, receiver = pair
    source = sender.begin_layerwise(1, 5, "r2")
    join = read_in_thread(receiver, source, [0, 1])
    sender.stage_layer(1, "r2", RUNNER, [0, 1], 0)
    time.sleep(0.02)
    sender.abort_layerwise(1, "other", finished)  # not this slot's request: ignored
    sender.abort_layerwise(1, "r2", finished)
    with pytest.raises(HandoffAborted, match="finished" if finished else "failed") as info:
        join()
    assert info.value.finished is finished
    sender.abort_layerwise(1, "r2", finished)  # a second abort is harmless
    with pytest.raises(ValueError, match="not being staged"):
        sender.stage_layer(1, "r2", RUNNER, [0, 1], 1)
    sender.release(1)


def test_no_progress_times_out(pair: tuple[KVSender, KVReceiver]) -> None:
    sender, receiver = pair
    source = sender.begin_layerwise(0, 4, "r3")
    with pytest.raises(HandoffError, match="timed out .* 0 of 4 layers"):
        receiver.read_layerwise(source, [0], timeout_s=0.3)
    sender.release(0)


def test_corrupt_layer_and_corrupt_trailer_are_errors(pair: tuple[KVSender,
                                                                  KVReceiver]) -> None:
    sender, receiver = pair
    source = sender.begin_layerwise(0, 4, "r4")
    for layer in range(LAYERS):
        sender.stage_layer(0, "r4", RUNNER, [2], layer)
    sender.finish_layerwise(0, "r4", 7)
    sender.buffer(0)[LAYOUT.with_tokens(4).layer_bytes + 3] ^= 0xFF  # a bit flip in layer 1
    with pytest.raises(HandoffError, match=r"checksum mismatch in layer\(s\) \[1\]"):
        receiver.read_layerwise(source, [2])
    words = sender.buffer(0)[source.progress_offset:].view(np.int64)
    words[0] = 5  # no such state
    with pytest.raises(HandoffError, match="corrupt"):
        receiver.read_layerwise(source, [2])
    sender.release(0)


def test_sender_refuses_misuse(pair: tuple[KVSender, KVReceiver]) -> None:
    sender, receiver = pair
    sender.begin_layerwise(0, 4, "r5")
    with pytest.raises(ValueError, match="still holds"):
        sender.begin_layerwise(0, 4, "r6")
    with pytest.raises(ValueError, match="layer 4 outside"):
        sender.stage_layer(0, "r5", RUNNER, [0], LAYERS)
    sender.stage_layer(0, "r5", RUNNER, [0], 0)
    with pytest.raises(ValueError, match="not being staged layer-wise for 'r6'"):
        sender.stage_layer(0, "r6", RUNNER, [0], 1)  # a stale request's late layer
    with pytest.raises(ValueError, match="1 of 4 layers staged"):
        sender.finish_layerwise(0, "r5", 1)
    with pytest.raises(ValueError, match="do not fit"):
        sender.begin_layerwise(1, LAYOUT.num_tokens + 1, "r7")
    with pytest.raises(HandoffError, match="layer-wise: use read_layerwise"):
        receiver.read(HandoffSource.from_json(sender.begin_layerwise(1, 4, "r8").to_json()),
                      [0])
    for slot, rid in ((0, "r5"), (1, "r8")):
        sender.abort_layerwise(slot, rid, False)
        sender.release(slot)


def test_source_and_trailer_validation() -> None:
    with pytest.raises(ValueError, match="carries none"):
        HandoffSource("r", b"c", b"r", 0, LAYOUT, (1, 2, 3, 4), progress_offset=64)
    with pytest.raises(ValueError, match="3 checksums for 4 layers"):
        HandoffSource("r", b"c", b"r", 0, LAYOUT, (1, 2, 3))
    with pytest.raises(ValueError, match="progress_offset"):
        HandoffSource("r", b"c", b"r", 0, LAYOUT, (), progress_offset=-2)
    words = np.array([progress.DONE, 3, 9, 0, 0, 0, 0], np.int64)
    with pytest.raises(ValueError, match="done with 3 of 4"):
        progress.Progress.parse(words, LAYERS)
    words[1] = 4
    assert progress.Progress.parse(words, LAYERS).first_token == 9
