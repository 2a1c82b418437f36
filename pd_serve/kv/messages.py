"""The KV hand-off's wire metadata as JSON-able dataclasses (no pickle on any wire).

`HandoffSource` goes prefill -> decode (where and how to read one request's KV);
`HandoffDone` goes decode -> prefill (the hand-off finished or failed: free the slot).
Byte blobs (connection ids, exported region descriptors) travel as base64 text. Parsing is
strict: a missing, extra or mistyped field raises ValueError naming it.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from pd_serve.kv.layout import KVLayout

VERSION = 2  # 2: progress_offset (layer-wise hand-off)
CHECKSUM_ALGO = "crc32"  # per-layer zlib.crc32 of the layer's K and V planes (host buffers)
CHECKSUM_ALGOS = ("crc32", "i32sum", "none")  # see pd_serve.kv.buffers


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str, name: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ValueError(f"{name} is not valid base64") from exc


def _fields(data: Any, kind: str, types: dict[str, type | tuple[type, ...]]) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ValueError(f"{kind} must be a JSON object, got {type(data).__name__}")
    if set(data) != set(types):
        raise ValueError(f"{kind} fields {sorted(data)} differ from {sorted(types)}")
    for name, typ in types.items():
        value = data[name]
        if not isinstance(value, typ) or (isinstance(value, bool) and typ is int):
            raise ValueError(f"{kind}.{name} has the wrong type {type(value).__name__}")
    return data


@dataclass(frozen=True)
class HandoffSource:
    """Where one request's KV waits on the prefill instance, and how to check it."""

    request_id: str
    conn_id: bytes  # the prefill transport endpoint to connect to
    region: bytes  # exported descriptor of the registered slot buffer
    offset: int  # bytes from the region's start to the request's layout
    layout: KVLayout
    checksums: tuple[int, ...]  # one per layer (checksum_algo); () when layer-wise
    checksum_algo: str = CHECKSUM_ALGO
    # Layer-wise: the region offset of the progress trailer (pd_serve.kv.progress), which
    # carries the checksums and first token once done; -1: the KV is staged already.
    progress_offset: int = -1

    @property
    def layerwise(self) -> bool:
        return self.progress_offset >= 0

    def __post_init__(self) -> None:
        if self.offset < 0:
            raise ValueError(f"offset must be >= 0, got {self.offset}")
        if self.progress_offset < -1:
            raise ValueError(f"progress_offset must be >= -1, got {self.progress_offset}")
        want = 0 if self.layerwise else self.layout.num_layers
        if len(self.checksums) != want:
            raise ValueError(f"{len(self.checksums)} checksums for "
                             f"{self.layout.num_layers} layers"
                             + (" (a layer-wise source carries none)" if self.layerwise else ""))
        if self.checksum_algo not in CHECKSUM_ALGOS:
            raise ValueError(f"checksum_algo {self.checksum_algo!r} is not one of "
                             f"{CHECKSUM_ALGOS}")

    def to_dict(self) -> dict[str, Any]:
        return {"version": VERSION, "request_id": self.request_id,
                "conn_id": b64(self.conn_id), "region": b64(self.region),
                "offset": self.offset, "layout": self.layout.to_dict(),
                "checksums": list(self.checksums), "checksum_algo": self.checksum_algo,
                "progress_offset": self.progress_offset}

    @classmethod
    def from_dict(cls, data: Any) -> HandoffSource:
        d = _fields(data, "HandoffSource", {
            "version": int, "request_id": str, "conn_id": str, "region": str, "offset": int,
            "layout": dict, "checksums": list, "checksum_algo": str, "progress_offset": int})
        if d["version"] != VERSION:
            raise ValueError(f"HandoffSource version {d['version']} is not {VERSION}")
        sums = d["checksums"]
        if not all(isinstance(c, int) and not isinstance(c, bool) for c in sums):
            raise ValueError("HandoffSource.checksums must be integers")
        return cls(d["request_id"], unb64(d["conn_id"], "conn_id"),
                   unb64(d["region"], "region"), d["offset"], KVLayout.from_dict(d["layout"]),
                   tuple(sums), d["checksum_algo"], d["progress_offset"])

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str | bytes) -> HandoffSource:
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"HandoffSource is not valid JSON: {exc}") from exc
        return cls.from_dict(data)


@dataclass(frozen=True)
class HandoffDone:
    """Decode's answer: the KV landed (`ok`) or the hand-off failed (`error` says why)."""

    request_id: str
    ok: bool
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"version": VERSION, "request_id": self.request_id, "ok": self.ok,
                "error": self.error}

    @classmethod
    def from_dict(cls, data: Any) -> HandoffDone:
        d = _fields(data, "HandoffDone",
                    {"version": int, "request_id": str, "ok": bool, "error": str})
        if d["version"] != VERSION:
            raise ValueError(f"HandoffDone version {d['version']} is not {VERSION}")
        return cls(d["request_id"], d["ok"], d["error"])
