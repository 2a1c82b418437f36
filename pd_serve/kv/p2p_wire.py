"""Control plane of the collective-library transports (NCCL, HCCL): ids, descriptors, messages.

Backend-neutral: a `WireSpec` names the backend, its frame magic and the size of its
communicator id (ncclUniqueId 128 bytes, HcclRootInfo 4108), and the `ConnId` / `RegionDesc`
subclasses of each backend bind one (pd_serve.kv.nccl_wire, pd_serve.kv.hccl_wire). Pure
Python + numpy, so the parser is unit-tested on any machine. A frame is
`magic | u32 json_bytes | u32 binary_bytes` (big endian), then a JSON object, then binary data
(only a read request has any: its ranges as little-endian int64 pairs). Messages:
reader -> owner: Hello (the communicator id), ReadRequest (region handle + remote ranges);
owner -> reader: HelloOk, Done (a read's sends completed), Error (a refusal or failure).
Everything from the network is checked before use; bad input raises WireError (a ValueError)
that names the problem.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import numpy as np

PROTOCOL_VERSION = 1
HEADER = struct.Struct("!4sII")  # magic, JSON bytes, binary bytes
MAX_JSON_BYTES = 1 << 16
MAX_RANGES = 1 << 22  # 64 MiB of ranges; block-fixed batches of a 1 GiB request need 32 Ki
_U32, _I63 = 1 << 32, 1 << 63


@dataclass(frozen=True)
class WireSpec:
    """What differs between the backends on the wire."""

    name: str  # "NCCL": in messages, and (lower case) in the id kinds
    magic: bytes  # 4 bytes opening every frame
    id_bytes: int  # the communicator id a Hello carries

    @property
    def conn_kind(self) -> str:
        return f"pd-{self.name.lower()}/1"

    @property
    def region_kind(self) -> str:
        return f"pd-{self.name.lower()}-region/1"


class WireError(ValueError):
    """A connection id, descriptor or control message that is malformed or out of range."""


def _obj(data: Any, what: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise WireError(f"{what} must be a JSON object, got {type(data).__name__}")
    return data


def _int(obj: dict[str, Any], name: str, lo: int, hi: int) -> int:
    value = obj.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise WireError(f"field {name!r} must be an integer, got {value!r}")
    if not lo <= value < hi:
        raise WireError(f"field {name!r} = {value} is outside [{lo}, {hi})")
    return value


def _str(obj: dict[str, Any], name: str, max_len: int = 256, empty: bool = False) -> str:
    value = obj.get(name)
    if not isinstance(value, str) or len(value) > max_len or (not value and not empty):
        raise WireError(f"field {name!r} must be a {'' if empty else 'non-empty '}string of "
                        f"at most {max_len} characters, got {value!r}")
    return value


def _load_json(blob: bytes, what: str) -> dict[str, Any]:
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise WireError(f"{what} must be bytes, got {type(blob).__name__}")
    try:
        return _obj(json.loads(bytes(blob)), what)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError(f"{what} is not JSON: {exc}") from exc


@dataclass(frozen=True)
class PeerInfo:
    """Who is on the other end: host, process, CUDA device index and uuid ("" if unknown)."""

    host: str
    pid: int
    device: int
    uuid: str

    def to_dict(self) -> dict[str, Any]:
        return {"host": self.host, "pid": self.pid, "device": self.device, "uuid": self.uuid}

    @classmethod
    def from_dict(cls, data: Any) -> PeerInfo:
        obj = _obj(data, "peer info")
        return cls(_str(obj, "host"), _int(obj, "pid", 0, _U32), _int(obj, "device", 0, 1 << 16),
                   _str(obj, "uuid", empty=True))


_C = TypeVar("_C", bound="ConnId")
_R = TypeVar("_R", bound="RegionDesc")


@dataclass(frozen=True)
class ConnId:
    """What an owner publishes (`conn_id()`): its control listener and device. Each backend
    subclasses it with its SPEC."""

    SPEC: ClassVar[WireSpec]
    host: str
    port: int
    peer: PeerInfo
    nonce: str  # random per transport: descriptors of an older incarnation are refused

    def encode(self) -> bytes:
        return json.dumps({"kind": self.SPEC.conn_kind, "host": self.host, "port": self.port,
                           "peer": self.peer.to_dict(), "nonce": self.nonce}).encode()

    @classmethod
    def parse(cls: type[_C], blob: bytes) -> _C:
        spec = cls.SPEC
        obj = _load_json(blob, f"{spec.name} connection id")
        if obj.get("kind") != spec.conn_kind:
            raise WireError(f"not an {spec.name} connection id (kind {obj.get('kind')!r}, "
                            f"expected {spec.conn_kind!r})")
        return cls(_str(obj, "host"), _int(obj, "port", 1, 1 << 16),
                   PeerInfo.from_dict(obj.get("peer")), _str(obj, "nonce", 64))


@dataclass(frozen=True)
class RegionDesc:
    """An exported registration: which transport (nonce), its handle and its size in bytes.
    Each backend subclasses it with its SPEC."""

    SPEC: ClassVar[WireSpec]
    nonce: str
    handle: int
    nbytes: int

    def encode(self) -> bytes:
        return json.dumps({"kind": self.SPEC.region_kind, "nonce": self.nonce,
                           "handle": self.handle, "nbytes": self.nbytes}).encode()

    @classmethod
    def parse(cls: type[_R], blob: bytes) -> _R:
        spec = cls.SPEC
        obj = _load_json(blob, f"{spec.name} region descriptor")
        if obj.get("kind") != spec.region_kind:
            raise WireError(f"not an {spec.name} region descriptor (kind {obj.get('kind')!r})")
        return cls(_str(obj, "nonce", 64), _int(obj, "handle", 1, _U32),
                   _int(obj, "nbytes", 1, _I63))


@dataclass(frozen=True)
class Hello:
    uid: bytes  # the communicator id the reader made (ncclUniqueId, HcclRootInfo)
    peer: PeerInfo
    timeout_ms: int  # how long the reader waits for the communicator


@dataclass(frozen=True)
class HelloOk:
    peer: PeerInfo


@dataclass(frozen=True, eq=False)
class ReadRequest:
    read_id: int
    region: int  # the owner's registration handle
    timeout_ms: int
    ranges: np.ndarray  # [n, 2] int64: (remote offset, length)


@dataclass(frozen=True)
class Done:
    read_id: int


@dataclass(frozen=True)
class Error:
    read_id: int | None  # None: about the connection, not one read
    message: str


Message = Hello | HelloOk | ReadRequest | Done | Error


def _json_of(msg: Message) -> dict[str, Any]:
    if isinstance(msg, Hello):
        return {"type": "hello", "v": PROTOCOL_VERSION, "uid": msg.uid.hex(),
                "peer": msg.peer.to_dict(), "timeout_ms": msg.timeout_ms}
    if isinstance(msg, HelloOk):
        return {"type": "hello_ok", "peer": msg.peer.to_dict()}
    if isinstance(msg, ReadRequest):
        return {"type": "read", "id": msg.read_id, "region": msg.region,
                "timeout_ms": msg.timeout_ms, "n": int(msg.ranges.shape[0])}
    if isinstance(msg, Done):
        return {"type": "done", "id": msg.read_id}
    return {"type": "error", "id": msg.read_id, "message": msg.message[:4096]}


def encode(msg: Message, spec: WireSpec) -> bytes:
    """One frame holding `msg`."""
    body = json.dumps(_json_of(msg)).encode()
    payload = b""
    if isinstance(msg, ReadRequest):
        payload = np.ascontiguousarray(msg.ranges, dtype="<i8").tobytes()
    return HEADER.pack(spec.magic, len(body), len(payload)) + body + payload


def _parse_hello(obj: dict[str, Any], spec: WireSpec) -> Hello:
    if obj.get("v") != PROTOCOL_VERSION:
        raise WireError(f"protocol version {obj.get('v')!r} is not {PROTOCOL_VERSION}")
    try:
        uid = bytes.fromhex(_str(obj, "uid", 2 * spec.id_bytes))
    except ValueError as exc:
        raise WireError(f"field 'uid' is not hex: {exc}") from exc
    if len(uid) != spec.id_bytes:
        raise WireError(f"field 'uid' holds {len(uid)} bytes, expected {spec.id_bytes}")
    return Hello(uid, PeerInfo.from_dict(obj.get("peer")), _int(obj, "timeout_ms", 1, 1 << 31))


def _parse_read(obj: dict[str, Any], payload: bytes) -> ReadRequest:
    n = _int(obj, "n", 1, MAX_RANGES + 1)
    if len(payload) != 16 * n:
        raise WireError(f"read request announces {n} ranges but carries {len(payload)} bytes "
                        f"(expected {16 * n})")
    ranges = np.frombuffer(payload, dtype="<i8").reshape(n, 2)  # [n, 2] (offset, length)
    return ReadRequest(_int(obj, "id", 0, _I63), _int(obj, "region", 1, _U32),
                       _int(obj, "timeout_ms", 1, 1 << 31), ranges)


def _parse_error(obj: dict[str, Any], _: bytes) -> Error:
    read_id = None if obj.get("id") is None else _int(obj, "id", 0, _I63)
    return Error(read_id, _str(obj, "message", 4096))


_PARSERS: dict[str, Callable[[dict[str, Any], bytes], Message]] = {
    "hello_ok": lambda obj, _: HelloOk(PeerInfo.from_dict(obj.get("peer"))),
    "read": _parse_read,
    "done": lambda obj, _: Done(_int(obj, "id", 0, _I63)),
    "error": _parse_error,
}


def decode(body: bytes, payload: bytes, spec: WireSpec) -> Message:
    """Parses one frame's JSON body and binary payload; WireError naming the problem."""
    obj = _load_json(body, "control message")
    kind = obj.get("type")
    known = kind == "hello" or kind in _PARSERS
    if not isinstance(kind, str) or not known:
        raise WireError(f"unknown control message type {kind!r}")
    if payload and kind != "read":
        raise WireError(f"a {kind!r} message carries no binary data, got {len(payload)} bytes")
    return _parse_hello(obj, spec) if kind == "hello" else _PARSERS[kind](obj, payload)


class FrameReader:
    """Reassembles frames from a byte stream: `feed(data)` returns the messages completed."""

    def __init__(self, spec: WireSpec) -> None:
        self._spec = spec
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Message]:
        self._buf += data
        out: list[Message] = []
        while len(self._buf) >= HEADER.size:
            magic, body_len, bin_len = HEADER.unpack_from(self._buf)
            if magic != self._spec.magic:
                raise WireError(f"bad frame magic {bytes(magic)!r} (expected "
                                f"{self._spec.magic!r})")
            if body_len > MAX_JSON_BYTES or bin_len > 16 * MAX_RANGES:
                raise WireError(f"frame too large: {body_len} JSON + {bin_len} binary bytes")
            end = HEADER.size + body_len + bin_len
            if len(self._buf) < end:
                break
            body = bytes(self._buf[HEADER.size:HEADER.size + body_len])
            payload = bytes(self._buf[HEADER.size + body_len:end])
            del self._buf[:end]
            out.append(decode(body, payload, self._spec))
        return out

    @property
    def pending_bytes(self) -> int:
        return len(self._buf)


def read_table(reads: Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
    """[n, 3] int64 (local offset, remote offset, length) from Read tuples or such an array."""
    raw = np.asarray(reads)
    if raw.size and raw.dtype.kind not in "iu":
        raise WireError(f"read ranges must be integers, got {raw.dtype}")
    if raw.ndim != 2 or raw.shape[0] < 1 or raw.shape[1] != 3:
        raise WireError(f"a read batch needs >= 1 (local_offset, remote_offset, length) ranges, "
                        f"got shape {raw.shape}")
    if raw.shape[0] > MAX_RANGES:
        raise WireError(f"a read batch holds at most {MAX_RANGES} ranges, got {raw.shape[0]}")
    return np.ascontiguousarray(raw, dtype=np.int64)


def check_ranges(offsets: np.ndarray, lengths: np.ndarray, region_bytes: int, what: str) -> None:
    """WireError naming the first empty range or range outside [0, region_bytes)."""
    bad = (offsets < 0) | (lengths <= 0) | (lengths > region_bytes) \
        | (offsets > region_bytes - lengths)
    if bad.any():
        i = int(np.argmax(bad))
        off, n = int(offsets[i]), int(lengths[i])
        why = "is empty" if n <= 0 else f"is outside the {region_bytes}-byte {what} region"
        raise WireError(f"{what} range {i} (offset {off}, length {n}) {why}")
