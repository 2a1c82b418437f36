"""DeviceRuntime: the device's Python API, running the model in-process through pd_serve's own
engine and serving each request with the cloud's help (P/D-Device) or alone.

Per request in mode pd_device (docs/pd_device.md has the whole flow): send the assist request
(N, rho from Settings); show the cloud's first token at once; buffer the following cloud tokens
and release them through the speed controller; meanwhile prefill locally over the refined prompt
plus the cloud tokens received so far, in chunks; hand over once caught up (the cloud stream is
closed) and decode locally. Three threads per request: the cloud stream (client.py), the device
worker (worker.py, the only one touching the engine) and the caller's, which iterates the
display (display.py); they share one Session.

Lifecycle:
1. `DeviceRuntime(cfg)` builds the runner (thread-limited), tokenizer and engine, and warms up:
   the runner's graph warm-up, then one timed prefill and a few decode steps that give the
   controller its first speed estimates;
2. `generate(prompt_token_ids, params, settings)` returns an iterator of DisplayEvents; one
   request at a time; closing the iterator early cancels the cloud and the local work;
3. once the iterator is exhausted or closed, `last_report` holds the RequestReport and the
   engine is idle;
4. `close()` releases the runner.
"""

from __future__ import annotations

import inspect
import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass

from pd_device.client import AssistStream
from pd_device.config import DeviceConfig
from pd_device.controller import ControllerConfig
from pd_device.display import Display
from pd_device.report import DisplayEvent, RequestReport
from pd_device.session import Session
from pd_device.settings import Settings
from pd_device.worker import DeviceWorker, stretch_s
from pd_serve.backends import create_runner
from pd_serve.backends.base import ModelRunner, RunnerConfig
from pd_serve.config import CacheConfig, SchedulerConfig
from pd_serve.engine.engine import LLMEngine
from pd_serve.engine.sampling_params import SamplingParams
from pd_serve.gateway.assist_protocol import AssistRequest
from pd_serve.instance.messages import SamplingWire
from pd_serve.models.tokenizer import Tokenizer, tokenizer_hash

WARMUP_PROMPT_TOKENS = 64
WARMUP_DECODE_STEPS = 4


@dataclass
class _Request:
    """What one generate call runs: the session and its threads."""

    session: Session
    stream: AssistStream | None
    worker: DeviceWorker | None
    display: Display
    mode: str
    t0: float


class DeviceRuntime:
    """The device: one model in-process, one request at a time (see the module docstring)."""

    def __init__(self, cfg: DeviceConfig, runner: ModelRunner | None = None) -> None:
        self.cfg = cfg
        self._runner = runner or create_runner(RunnerConfig(
            model_dir=cfg.model_dir, backend=cfg.backend, device=cfg.device,
            block_size=cfg.block_size, num_blocks=cfg.num_blocks,
            max_model_len=cfg.max_model_len, threads=cfg.threads))
        self._owns_runner = runner is None
        self.tokenizer = Tokenizer(cfg.model_dir)
        self.tokenizer_hash = tokenizer_hash(cfg.model_dir)
        self.engine = self._new_engine()
        eos = set(self._runner.model_config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self.prefill_tps, self.decode_step_s = 2000.0, 0.02  # replaced by the warm-up
        self.last_report: RequestReport | None = None
        self._busy = False
        self._ids = itertools.count()
        if cfg.warmup:
            self.warmup()

    def warmup(self) -> None:
        """Compiles the runner's graphs and measures the device's prefill speed and decode step
        time (the controller's estimates until the request's own measurements come in)."""
        warm = getattr(self._runner, "warmup", None)
        if callable(warm):
            if "decode_contexts" in inspect.signature(warm).parameters:
                warm(prefill_lens=(16, 32, 64), decode_contexts=_buckets(
                    self.cfg.warmup_context, self.cfg.block_size))
            else:
                warm()
        vocab = self._runner.model_config.vocab_size
        prompt = [(7 * i + 3) % vocab for i in range(WARMUP_PROMPT_TOKENS)]
        params = SamplingParams(max_tokens=WARMUP_DECODE_STEPS + 1, temperature=0.0,
                                ignore_eos=True)
        self.engine.add_request("warmup", prompt, params)
        times = []
        while self.engine.has_unfinished():
            t0, c0 = time.monotonic(), time.process_time()
            self.engine.step()
            wall = time.monotonic() - t0
            times.append(wall + stretch_s(wall, time.process_time() - c0, self.cfg.slowdown))
        self.prefill_tps = WARMUP_PROMPT_TOKENS / max(times[0], 1e-6)
        decode = times[1:] or times
        self.decode_step_s = sum(decode) / len(decode)

    def _new_engine(self) -> LLMEngine:
        """An engine over the runner with an empty prefix cache (the runner's cache is reused)."""
        cfg = self.cfg
        return LLMEngine(
            self._runner, self.tokenizer,
            CacheConfig(cfg.block_size, min(cfg.num_blocks, self._runner.num_blocks), True),
            SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=cfg.chunk_max_tokens,
                            max_model_len=cfg.max_model_len))

    def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                 settings: Settings | None = None) -> Iterator[DisplayEvent]:
        """The user's stream of one request; `last_report` is set when it ends. ValueError for
        an empty prompt, a mode that needs the cloud without `cloud_url`, or a busy runtime."""
        settings = settings or Settings()
        prompt = [int(t) for t in prompt_token_ids]
        if not prompt:
            raise ValueError("prompt_token_ids is empty")
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        if settings.mode != "device_only" and not self.cfg.cloud_url:
            raise ValueError(f"mode {settings.mode!r} needs DeviceConfig.cloud_url")
        if self._busy:
            raise ValueError("the device runtime serves one request at a time")
        return self._stream(prompt, params, settings)

    def run(self, prompt_token_ids: list[int], params: SamplingParams,
            settings: Settings | None = None) -> RequestReport:
        """`generate` consumed to the end; returns its report."""
        for _ in self.generate(prompt_token_ids, params, settings):
            pass
        assert self.last_report is not None
        return self.last_report

    def close(self) -> None:
        if self._owns_runner:
            self._runner.close()

    def __enter__(self) -> DeviceRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----- one request -----------------------------------------------------------------------

    def _start(self, prompt: list[int], params: SamplingParams, settings: Settings) -> _Request:
        mode, t0 = settings.mode, time.monotonic()
        if not self.cfg.reuse_prefix_cache:
            self.engine = self._new_engine()  # nothing computed for an earlier request counts
        n_cloud = params.max_tokens - 1 if mode == "cloud_only" else settings.n_cloud
        rho = 1.0 if mode == "cloud_only" else settings.rho
        cap = min(n_cloud + 1, params.max_tokens)
        if mode == "pd_device" and self.cfg.handover_after is not None:
            cap = min(cap, self.cfg.handover_after + 1)
        session = Session(prompt, params.max_tokens, cap, rho, self.prefill_tps,
                          self.decode_step_s, self.cfg.refine_window)
        stream = None
        if mode != "device_only":
            assert self.cfg.cloud_url is not None
            stream = AssistStream(self.cfg.cloud_url, self._assist_request(
                prompt, params, n_cloud, rho), session.on_cloud, self.cfg.connect_timeout_s)
        worker = None
        if mode != "cloud_only":
            worker = DeviceWorker(self.engine, self._runner, session, params, self.cfg, mode,
                                  t0 + self.cfg.ttft_target_s,
                                  stream.cancel if stream is not None else _nothing,
                                  f"req-{next(self._ids)}")
        else:
            session.worker_done = True
        ctrl = None if mode == "cloud_only" else ControllerConfig(
            pace_s=min(settings.pace_s, self.cfg.max_gap_s), max_gap_s=self.cfg.max_gap_s,
            margin_s=self.decode_step_s if self.cfg.margin_s is None else self.cfg.margin_s,
            jitter_s=self.cfg.display_jitter_s)
        display = Display(session, self.tokenizer, params, self.eos_token_ids, ctrl, t0)
        return _Request(session, stream, worker, display, mode, t0)

    def _assist_request(self, prompt: list[int], params: SamplingParams, n_cloud: int,
                        rho: float) -> AssistRequest:
        return AssistRequest(model=self.cfg.served_name, tokenizer_hash=self.tokenizer_hash,
                             prompt_token_ids=prompt, max_cloud_tokens=n_cloud,
                             refine_ratio=float(rho), refine_window=self.cfg.refine_window,
                             sampling=SamplingWire.of(params))

    def _stream(self, prompt: list[int], params: SamplingParams,
                settings: Settings) -> Iterator[DisplayEvent]:
        if self._busy:
            raise ValueError("the device runtime serves one request at a time")
        self._busy = True
        req = self._start(prompt, params, settings)
        try:
            if req.stream is not None:
                req.stream.start()
            if req.worker is not None:
                req.worker.start()
            yield from req.display.events()
        finally:
            self._finish(req)

    def _finish(self, req: _Request) -> None:
        s = req.session
        with s.cond:
            s.closed = True
            s.cond.notify_all()
        if req.stream is not None:
            req.stream.cancel()
        if req.worker is not None:
            req.worker.join()
        if req.stream is not None:
            req.stream.join(timeout=10.0)
        self.last_report = _report(req, time.monotonic())
        self._busy = False


def _report(req: _Request, now: float) -> RequestReport:
    s, shown = req.session, req.display.shown
    times = [e.t_display for e in shown]
    local = [e.index for e in shown if e.source == "local"]
    mode = "fallback_device_only" if s.fallback else req.mode
    return RequestReport(
        mode=mode, ttft_s=times[0] if times else None,
        tpot_gaps_s=[b - a for a, b in zip(times, times[1:])],
        handover_index=local[0] if local else None,
        cloud_tokens_used=sum(1 for e in shown if e.source == "cloud"), events=list(shown),
        prompt_tokens=len(s.prompt),
        refined_tokens=s.base_len if req.mode == "pd_device" and not s.fallback else None,
        cloud_tokens_received=len(s.cloud), local_prefill_tokens=s.prefill_tokens,
        prefill_tps=s.prefill_tps, decode_step_s=s.decode_step_s,
        finish_reason=req.display.finish_reason or "abort", reason=s.reason or s.cloud_failure,
        e2e_s=now - req.t0,
        trace=[{**e, "t": e["t"] - req.t0} for e in s.trace],
        wake_late_s=list(req.display.wake_late_s))


def _nothing() -> None:
    return None


def _buckets(limit: int, block_size: int) -> tuple[int, ...]:
    """Context sizes whose shape buckets cover 1..limit (the runner rounds each up)."""
    from pd_serve.backends.inputs import shape_bucket

    sizes: list[int] = []
    c = max(block_size, 16)
    while c <= limit:
        sizes.append(shape_bucket(c, max(block_size, 16)))
        c = sizes[-1] + 1
    return tuple(sizes)
