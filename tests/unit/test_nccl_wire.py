"""The NCCL transport's control plane (pd_serve.kv.nccl_wire): round trips and strict parsing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pd_serve.kv.nccl_wire import (
    HEADER,
    MAGIC,
    MAX_RANGES,
    ConnId,
    Done,
    Error,
    FrameReader,
    Hello,
    HelloOk,
    Message,
    PeerInfo,
    ReadRequest,
    RegionDesc,
    WireError,
    check_ranges,
    decode,
    encode,
    read_table,
)
from pd_serve.kv.transport import Read

INFO = PeerInfo("127.0.0.1", 4242, 1, "GPU-1234")


def frame(obj: object, payload: bytes = b"") -> bytes:
    body = json.dumps(obj).encode()
    return HEADER.pack(MAGIC, len(body), len(payload)) + body + payload


def test_every_message_round_trips_through_a_byte_stream() -> None:
    ranges = np.array([[0, 4096], [8192, 16]], dtype=np.int64)  # [2, 2] (offset, length)
    msgs: list[Message] = [Hello(bytes(range(128)), INFO, 5000), HelloOk(INFO),
            ReadRequest(7, 3, 2500, ranges), Done(7), Error(None, "no"), Error(7, "refused")]
    stream = b"".join(encode(m) for m in msgs)
    reader, got = FrameReader(), []
    for i in range(0, len(stream), 5):  # arbitrary split points
        got += reader.feed(stream[i:i + 5])
    assert reader.pending_bytes == 0 and len(got) == len(msgs)
    for want, have in zip(msgs, got):
        if isinstance(want, ReadRequest):
            assert isinstance(have, ReadRequest)
            assert (have.read_id, have.region, have.timeout_ms) == (7, 3, 2500)
            np.testing.assert_array_equal(have.ranges, ranges)
        else:
            assert have == want


def test_conn_id_and_region_descriptor_round_trip() -> None:
    cid = ConnId("10.0.0.2", 40000, INFO, "ab12")
    assert ConnId.parse(cid.encode()) == cid
    desc = RegionDesc("ab12", 5, 1 << 30)
    assert RegionDesc.parse(desc.encode()) == desc


@pytest.mark.parametrize("blob, match", [
    (b"cx-tcp/1 127.0.0.1 4000 1", "not JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b'{"kind": "pd-nccl-region/1"}', "not an NCCL connection id"),
    (json.dumps({"kind": "pd-nccl/1", "host": "h", "port": 0, "peer": INFO.to_dict(),
                 "nonce": "a"}).encode(), r"'port' = 0 is outside \[1, 65536\)"),
    (json.dumps({"kind": "pd-nccl/1", "host": "h", "port": 5, "peer": {"host": "h"},
                 "nonce": "a"}).encode(), "'pid' must be an integer"),
    (b"\xff\xfe", "not JSON"),
])
def test_bad_conn_ids_are_refused(blob: bytes, match: str) -> None:
    with pytest.raises(WireError, match=match):
        ConnId.parse(blob)


@pytest.mark.parametrize("obj, match", [
    ({"kind": "pd-nccl-region/1", "nonce": "a", "handle": 0, "nbytes": 8}, "'handle' = 0"),
    ({"kind": "pd-nccl-region/1", "nonce": "a", "handle": 1, "nbytes": -1}, "'nbytes' = -1"),
    ({"kind": "pd-nccl-region/1", "nonce": "a", "handle": True, "nbytes": 8}, "integer"),
    ({"kind": "x", "nonce": "a", "handle": 1, "nbytes": 8}, "not an NCCL region"),
])
def test_bad_region_descriptors_are_refused(obj: dict[str, object], match: str) -> None:
    with pytest.raises(WireError, match=match):
        RegionDesc.parse(json.dumps(obj).encode())


HELLO = {"type": "hello", "v": 1, "uid": "00" * 128, "peer": INFO.to_dict(), "timeout_ms": 10}


@pytest.mark.parametrize("raw, match", [
    (b"XXXX" + bytes(8), "bad frame magic"),
    (HEADER.pack(MAGIC, 1 << 20, 0), "frame too large"),
    (HEADER.pack(MAGIC, 0, 16 * MAX_RANGES + 1), "frame too large"),
    (frame("just a string"), "must be a JSON object"),
    (frame({"type": "launch"}), "unknown control message type 'launch'"),
    (frame({"kind": "done", "id": 1}), "unknown control message type None"),
    (frame({"type": "done", "id": -1}), r"'id' = -1 is outside"),
    (frame({"type": "done", "id": "7"}), "'id' must be an integer"),
    (frame({"type": "done", "id": 1}, b"x"), "carries no binary data"),
    (frame({**HELLO, "v": 2}), "protocol version 2"),
    (frame({**HELLO, "uid": "zz" * 128}), "'uid' is not hex"),
    (frame({**HELLO, "uid": "00" * 64}), "holds 64 bytes, expected 128"),
    (frame({**HELLO, "timeout_ms": 0}), "'timeout_ms' = 0"),
    (frame({"type": "error", "id": None, "message": 5}), "'message' must be"),
    (frame({"type": "read", "id": 1, "region": 1, "timeout_ms": 9, "n": 2}, bytes(16)),
     "announces 2 ranges but carries 16 bytes"),
    (frame({"type": "read", "id": 1, "region": 1, "timeout_ms": 9, "n": 0}), "'n' = 0"),
    (frame({"type": "read", "id": 1, "region": 0, "timeout_ms": 9, "n": 1}, bytes(16)),
     "'region' = 0"),
])
def test_malformed_frames_are_refused(raw: bytes, match: str) -> None:
    with pytest.raises(WireError, match=match):
        FrameReader().feed(raw)


def test_decode_rejects_non_json_body() -> None:
    with pytest.raises(WireError, match="not JSON"):
        decode(b"{not json")


def test_read_table_accepts_reads_and_arrays_and_rejects_bad_shapes() -> None:
    table = read_table([Read(0, 64, 8), Read(8, 0, 8)])
    assert table.dtype == np.int64 and table.tolist() == [[0, 64, 8], [8, 0, 8]]
    assert read_table(np.array([[1, 2, 3]], dtype=np.uint32)).dtype == np.int64
    with pytest.raises(WireError, match="at least one|>= 1"):
        read_table([])
    with pytest.raises(WireError, match="must be integers"):
        read_table(np.array([(0.5, 0, 8)]))
    with pytest.raises(WireError, match=r"shape \(1, 2\)"):
        read_table([(0, 8)])


@pytest.mark.parametrize("offsets, lengths, match", [
    ([0, -1], [8, 8], r"range 1 \(offset -1, length 8\) is outside the 64-byte local region"),
    ([0], [0], "range 0 .* is empty"),
    ([60], [8], "range 0 .* is outside"),
    ([0], [65], "is outside"),
    ([2**62], [2**62], "is outside"),  # no overflow in offset + length
])
def test_check_ranges_names_the_first_bad_range(offsets: list[int], lengths: list[int],
                                                 match: str) -> None:
    with pytest.raises(WireError, match=match):
        check_ranges(np.array(offsets, np.int64), np.array(lengths, np.int64), 64, "local")


def test_check_ranges_accepts_exact_fit() -> None:
    check_ranges(np.array([0, 56], np.int64), np.array([64, 8], np.int64), 64, "remote")
