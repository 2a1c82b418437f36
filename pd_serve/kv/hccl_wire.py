"""The HCCL transport's control plane: pd_serve.kv.p2p_wire bound to HCCL's spec.

Frames open with b"PDH1", a Hello carries the reader's 4108-byte HcclRootInfo, connection ids and
region descriptors are of kind "pd-hccl/1" and "pd-hccl-region/1", so an NCCL peer and an HCCL
peer refuse each other's ids before dialing.
"""

from __future__ import annotations

from pd_serve.kv import p2p_wire
from pd_serve.kv.hccl_lib import ROOT_INFO_BYTES
from pd_serve.kv.p2p_wire import WireSpec

__all__ = ["HCCL_WIRE", "ConnId", "RegionDesc"]

HCCL_WIRE = WireSpec("HCCL", b"PDH1", ROOT_INFO_BYTES)


class ConnId(p2p_wire.ConnId):
    """What an HCCL owner publishes: its control listener and NPU."""

    SPEC = HCCL_WIRE


class RegionDesc(p2p_wire.RegionDesc):
    """An exported HCCL registration: transport nonce, handle, size in bytes."""

    SPEC = HCCL_WIRE
