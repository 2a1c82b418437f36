"""The NCCL transport's control plane: pd_serve.kv.p2p_wire bound to NCCL's spec.

Frames open with b"PDN1", a Hello carries the reader's 128-byte ncclUniqueId, connection ids
and region descriptors are of kind "pd-nccl/1" and "pd-nccl-region/1". Everything else (the
messages, strict parsing, range checks) is p2p_wire's, re-exported here.
"""

from __future__ import annotations

from pd_serve.kv import p2p_wire
from pd_serve.kv.p2p_wire import (
    HEADER,
    MAX_JSON_BYTES,
    MAX_RANGES,
    PROTOCOL_VERSION,
    Done,
    Error,
    Hello,
    HelloOk,
    Message,
    PeerInfo,
    ReadRequest,
    WireError,
    WireSpec,
    check_ranges,
    read_table,
)

__all__ = ["CONN_KIND", "HEADER", "MAGIC", "MAX_JSON_BYTES", "MAX_RANGES", "NCCL_WIRE",
           "PROTOCOL_VERSION", "REGION_KIND", "UNIQUE_ID_BYTES", "ConnId", "Done", "Error",
           "FrameReader", "Hello", "HelloOk", "Message", "PeerInfo", "ReadRequest",
           "RegionDesc", "WireError", "check_ranges", "decode", "encode", "read_table"]

NCCL_WIRE = WireSpec("NCCL", b"PDN1", 128)
MAGIC = NCCL_WIRE.magic
UNIQUE_ID_BYTES = NCCL_WIRE.id_bytes
CONN_KIND = NCCL_WIRE.conn_kind
REGION_KIND = NCCL_WIRE.region_kind


class ConnId(p2p_wire.ConnId):
    """What an NCCL owner publishes: its control listener and CUDA device."""

    SPEC = NCCL_WIRE


class RegionDesc(p2p_wire.RegionDesc):
    """An exported NCCL registration: transport nonce, handle, size in bytes."""

    SPEC = NCCL_WIRE


class FrameReader(p2p_wire.FrameReader):
    """Reassembles NCCL control frames from a byte stream."""

    def __init__(self) -> None:
        super().__init__(NCCL_WIRE)


def encode(msg: Message) -> bytes:
    """One NCCL control frame holding `msg`."""
    return p2p_wire.encode(msg, NCCL_WIRE)


def decode(body: bytes, payload: bytes = b"") -> Message:
    """Parses one NCCL frame's JSON body and binary payload; WireError naming the problem."""
    return p2p_wire.decode(body, payload, NCCL_WIRE)
