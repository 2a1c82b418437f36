"""A peer process for tests/gpu/test_nccl_transport.py: an NCCL transport owner or reader.

`python tests/gpu/nccl_peer_proc.py owner DEVICE NBYTES` serves a patterned region of NBYTES;
`python tests/gpu/nccl_peer_proc.py reader DEVICE CONN_ID REGION NBYTES` reads from one.
Each prints one JSON line when ready, then obeys JSON commands from stdin (one per line),
answering each with JSON lines; "quit" deregisters, closes and reports what was left.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from typing import Any

import numpy as np
import torch

from pd_serve.kv.nccl import NcclConfig, NcclTransport

PATTERN_SEED = 1


def pattern(nbytes: int, seed: int, device: str) -> torch.Tensor:
    """[nbytes] uint8: a function of (index, seed) alone, so any GPU reproduces it exactly."""
    idx = torch.arange(nbytes, dtype=torch.int64, device=device)  # [nbytes]
    return ((idx * 2654435761 + seed * 40503) >> 11 & 0xFF).to(torch.uint8)


def say(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


def nccl_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("pd-nccl")]


def owner(device: int, nbytes: int) -> None:
    transport = NcclTransport(NcclConfig(device=device))
    region = pattern(nbytes, PATTERN_SEED, f"cuda:{device}")  # [nbytes]
    torch.cuda.synchronize(device)  # the bytes are complete before anyone may read them
    handle = transport.register(region)
    say({"conn_id": transport.conn_id().decode(), "region": transport.export(handle).decode(),
         "pid": os.getpid()})
    for line in sys.stdin:
        msg = json.loads(line)
        cmd = msg["cmd"]
        if cmd == "quit":
            break
        if cmd == "stall":
            transport.stall_s = float(msg["s"])
            say({"ok": True})
        elif cmd == "stale":  # a descriptor of a region deregistered at once
            tmp = torch.zeros(4096, dtype=torch.uint8, device=f"cuda:{device}")  # [4096]
            extra = transport.register(tmp)
            desc = transport.export(extra).decode()
            transport.deregister(extra)
            say({"region": desc})
        elif cmd == "raw_send":
            transport.send_contiguous(transport.accept_peer(60.0), region, 60.0)
            say({"ok": True})
    transport.deregister(handle)
    report: dict[str, Any] = {"num_registered": transport.num_registered}
    transport.close()
    say({**report, "threads": nccl_threads()})


def reader(device: int, conn_id: str, region_desc: str, nbytes: int) -> None:
    transport = NcclTransport(NcclConfig(device=device))
    peer = transport.connect(conn_id.encode(), 60.0)
    remote = transport.import_(peer, region_desc.encode())
    local = torch.zeros(nbytes, dtype=torch.uint8, device=f"cuda:{device}")  # [nbytes]
    handle = transport.register(local)
    say({"connected": True})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            break
        chunk = int(cmd["chunk"])  # "read": the whole region in `chunk`-byte ranges
        starts = np.arange(0, nbytes, chunk, dtype=np.int64)  # [n]
        table = np.stack([starts, starts, np.full_like(starts, chunk)], axis=1)  # [n, 3]
        read = transport.read_batch_async(peer, handle, remote, table, 120.0)
        say({"posted": True})
        read.wait()
        say({"done": True})
    transport.deregister(handle)
    transport.close()
    say({"threads": nccl_threads()})


if __name__ == "__main__":
    role, dev = sys.argv[1], int(sys.argv[2])
    if role == "owner":
        owner(dev, int(sys.argv[3]))
    else:
        reader(dev, sys.argv[3], sys.argv[4], int(sys.argv[5]))
