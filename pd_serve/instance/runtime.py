"""What an instance builds once it has a role: runner, tokenizer, engine thread and the KV
transport with its sender (prefill) or receiver (decode). Every call into pd_serve.kv lives here.

Lifecycle:
1. `Runtime.build(cfg, role)` loads the model (blocking: call it off the event loop), creates the
   transport and the role's KV side, and starts the engine thread;
2. the role objects use `engine`, `runner`, `sender` / `receiver`; `switch_role` swaps the KV
   side in place once the role's work has drained (re-roling keeps the loaded model);
3. `close()` stops the engine thread, closes sender/receiver, transport and runner, in that order.
Who frees what: the role objects free slots, buffers and blocks per request; `close` frees the
rest whatever is left.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pd_serve.backends import create_runner
from pd_serve.backends.base import ModelRunner, RunnerConfig
from pd_serve.config import ServeConfig
from pd_serve.engine.engine import LLMEngine
from pd_serve.engine.step_trace import StepTrace
from pd_serve.instance.role_engine import RoleEngine
from pd_serve.models.tokenizer import Tokenizer

log = logging.getLogger(__name__)
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def model_dir(cfg: ServeConfig) -> Path:
    p = Path(cfg.model.path)
    p = p if p.is_absolute() else PROJECT_ROOT / p
    if not p.is_dir():
        raise ValueError(f"model.path: no model directory at {p}")
    return p


@dataclass
class Runtime:
    role: str
    runner: ModelRunner
    tokenizer: Tokenizer
    engine: RoleEngine
    transport: Any
    sender: Any = None  # prefill: kv.KVSender
    receiver: Any = None  # decode: kv.KVReceiver
    cfg: ServeConfig | None = None

    @classmethod
    def build(cls, cfg: ServeConfig, role: str) -> Runtime:
        mdir = model_dir(cfg)
        runner = create_runner(RunnerConfig(
            model_dir=str(mdir), backend=cfg.model.backend, device=cfg.model.device,
            dtype=cfg.model.dtype, block_size=cfg.cache.block_size,
            num_blocks=cfg.cache.num_blocks, max_model_len=cfg.scheduler.max_model_len,
            threads=cfg.model.threads))
        trace = None
        try:
            warmup = getattr(runner, "warmup", None)
            if callable(warmup):
                warmup()
            tokenizer = Tokenizer(mdir)
            llm = LLMEngine(runner, tokenizer, cfg.cache, cfg.scheduler)
            trace = (StepTrace.in_dir(cfg.server.step_trace_dir, role)
                     if cfg.server.step_trace_dir else None)
            transport = make_transport(cfg)
        except BaseException:
            if trace is not None:
                trace.close()
            runner.close()
            raise
        rt = cls(role, runner, tokenizer, RoleEngine(llm, trace), transport, cfg=cfg)
        rt._attach(role)
        rt.engine.start()
        return rt

    def _attach(self, role: str) -> None:
        assert self.cfg is not None
        if role == "prefill":
            self.sender = make_sender(self.cfg, self.transport, self.runner, self.max_model_len)
        elif role == "decode":
            self.receiver = make_receiver(self.cfg, self.transport, self.runner,
                                          self.max_model_len)
        self.role = role

    def switch_role(self, role: str) -> None:
        """In place (blocking; the role object has stopped and its work drained): closes this
        role's KV side (slot buffers or receiver) and opens the other's; runner, engine (and its
        prefix cache) and transport stay."""
        if role == self.role:
            return
        for part in (self.sender, self.receiver):
            if part is not None:
                part.close()
        self.sender = self.receiver = None
        self._attach(role)

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def close(self) -> None:
        self.engine.stop()
        for part in (self.sender, self.receiver, self.transport):
            close = getattr(part, "close", None)
            if callable(close):
                try:
                    close()
                except Exception:
                    log.exception("closing %s failed", type(part).__name__)
        self.runner.close()


# -- the pd_serve.kv boundary ------------------------------------------------------------------

def make_transport(cfg: ServeConfig) -> Any:
    """cann_ext host TCP (host buffers), NCCL between GPUs or HCCL between NPUs (device
    buffers). NCCL/HCCL where the library is missing: TransportError saying what is missing."""
    index = cfg.model.device.partition(":")[2]
    device = int(index) if index.isdigit() else 0
    if cfg.pd.transport == "nccl":
        from pd_serve.kv.nccl import NcclTransport
        from pd_serve.kv.nccl_config import NcclConfig

        return NcclTransport(NcclConfig(device=device, bind_host=cfg.pd.transport_host))
    if cfg.pd.transport == "hccl":
        from pd_serve.kv.hccl import HcclConfig, HcclTransport

        return HcclTransport(HcclConfig(device=device, bind_host=cfg.pd.transport_host))
    from pd_serve.kv.transport import CannExtTransport

    return CannExtTransport(f"{cfg.pd.transport_host}:0")


def _kv_side(cfg: ServeConfig, runner: ModelRunner, max_tokens: int) -> tuple[Any, Any]:
    """The hand-off layout (max_tokens tokens) and buffer strategy of this transport: host
    buffers move float32 (what `read_kv` returns), device buffers the cache dtype."""
    from pd_serve.kv.buffers import DeviceBuffers, HostBuffers
    from pd_serve.kv.layout import KVLayout

    if cfg.pd.transport == "hccl":
        raise ValueError("pd.transport hccl needs hand-off buffers in NPU memory, which no model "
                         "runner provides yet: use pd.transport tcp on Ascend for now")
    if cfg.pd.transport != "nccl":
        return KVLayout.for_model(runner.model_config, max_tokens), HostBuffers()
    if cfg.model.backend != "torch" or not cfg.model.device.startswith("cuda"):
        raise ValueError("pd.transport nccl needs model.backend torch on a cuda device, got "
                         f"{cfg.model.backend} on {cfg.model.device}")
    layout = KVLayout.for_model(runner.model_config, max_tokens, cfg.model.dtype)
    return layout, DeviceBuffers(cfg.model.device, cfg.pd.device_checksum)


def make_sender(cfg: ServeConfig, transport: Any, runner: ModelRunner, max_tokens: int) -> Any:
    """`b_p` slot buffers, each big enough for the longest prompt the engine admits."""
    from pd_serve.kv.sender import KVSender

    layout, buffers = _kv_side(cfg, runner, max_tokens)
    if cfg.pd.handoff_layerwise and not runner.supports_layer_hook:
        raise ValueError(f"pd.handoff_layerwise needs a runner that stages layers during "
                         f"prefill (model.backend torch); {type(runner).__name__} cannot")
    sender = KVSender(transport, layout, cfg.pd.b_p, buffers)
    if cfg.pd.transport == "nccl":
        sender.on_progress = _ready_event_hook(transport, cfg.model.device)
    return sender


def _ready_event_hook(transport: Any, device: str) -> Any:
    """NCCL: a slot's reads are served after everything queued on the compute stream so far
    (layer copies, progress words), without a host sync (transport.set_ready_event)."""
    import torch

    def on_progress(handle: int) -> None:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(torch.device(device)))
        transport.set_ready_event(handle, event)

    return on_progress


def make_receiver(cfg: ServeConfig, transport: Any, runner: ModelRunner, max_tokens: int) -> Any:
    from pd_serve.kv.receiver import KVReceiver

    layout, buffers = _kv_side(cfg, runner, max_tokens)
    return KVReceiver(transport, layout, cfg.cache.block_size, buffers,
                      cfg.pd.decode_staging_buffers)


def source_to_json(source: Any) -> dict[str, Any]:
    return dict(source.to_dict())


def source_from_json(data: dict[str, Any]) -> Any:
    """ValueError on a malformed descriptor."""
    from pd_serve.kv.messages import HandoffSource

    return HandoffSource.from_dict(data)
