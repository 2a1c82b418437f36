"""Shared parts of the P/D-Device evaluation (tools/bench_device.py) and profiling
(tools/profile_device.py): a local cloud deployment, a synchronous assist client that times
each event, the trace workload with prompts cut from held-out corpus text, and the quality
scores of a refined prompt.

Lifecycle of a `LocalCloud`: 1. `start()` spawns a decode instance, a prefill instance peered
with it and a gateway (`python -m pd_serve ...`, free loopback ports, logs in the work folder)
and waits for each /health; 2. its `url` serves /v1/completions and /v1/device/assist;
3. `stop()` SIGINTs every process (kills one that does not exit in 30 s).
"""

from __future__ import annotations

import math
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pd_serve.backends.base import DecodeBatch, ModelRunner, PrefillBatch, SeqChunk  # noqa: E402
from pd_serve.bench.scaling import scale_trace, synth_prompt  # noqa: E402
from pd_serve.bench.trace_formats import load_trace  # noqa: E402
from pd_serve.gateway.assist_protocol import ASSIST_PATH, parse_event  # noqa: E402
from pd_serve.instance.launch import free_port  # noqa: E402
from pd_serve.models.tokenizer import Tokenizer, tokenizer_hash  # noqa: E402


def _data(rel: str, staged: str) -> Path:
    """`staged` under the repository's ignored .data/ (what a GPU machine is given) when it is
    there, else `rel` in the shared folder beside the repository."""
    local = REPO / ".data" / staged
    return local if local.exists() else REPO.parent / "shared" / rel


_SHAREGPT = "sharegpt_lengths/sharegpt_8k_filtered_stats_llama2_tokenizer.csv"
_ARXIV = "arxiv_summarization_lengths/arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv"
DEFAULT_TRACES = {"sharegpt": _data(f"traces/{_SHAREGPT}", f"traces/{_SHAREGPT}"),
                  "arxiv": _data(f"traces/{_ARXIV}", f"traces/{_ARXIV}")}
DEFAULT_CORPUS = _data("corpora/tinyshakespeare/input.txt", "input.txt")
HELD_OUT = 0.05  # the demo model trained on the first 95% of the corpus' tokens


class LocalCloud:
    """Gateway + prefill + decode of `model` on loopback (see the module docstring)."""

    def __init__(self, model: Path, work: Path, backend: str = "torch", device: str = "cpu",
                 threads: int | None = 1) -> None:
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        cfg = {"model": {"path": str(model), "backend": backend, "device": device,
                         "threads": threads},
               # the benchmark sends each prompt several times (once per mode): no cache hits
               "cache": {"block_size": 16, "num_blocks": 1024, "enable_prefix_caching": False},
               "scheduler": {"max_num_seqs": 8, "max_num_batched_tokens": 2048},
               "pd": {"handoff_timeout_s": 60.0, "attach_timeout_s": 60.0}}
        self.config = work / "cloud.yaml"
        self.config.write_text(yaml.safe_dump(cfg))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.url = ""

    def _launch(self, name: str, argv: list[str]) -> str:
        port = free_port()
        log = (self.work / f"{name}.log").open("wb")
        cmd = [sys.executable, "-m", "pd_serve", *argv, "--config", str(self.config),
               "--port", str(port), "--log-level", "warning"]
        self.procs.append(subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                           env={**os.environ, "PYTHONUNBUFFERED": "1"}))
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.procs[-1].poll() is not None:
                raise RuntimeError(f"{name} exited: see {self.work / (name + '.log')}")
            try:
                if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"{name} not healthy after 600 s")

    def start(self) -> LocalCloud:
        decode = self._launch("decode", ["instance", "--role", "decode"])
        prefill = self._launch("prefill", ["instance", "--role", "prefill",
                                           "--decode-peers", decode])
        self.url = self._launch("gateway", ["gateway", "--prefill", prefill])
        return self

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@dataclass
class AssistRun:
    """One assist request as the device saw it: seconds from sending to the `first` event,
    to each `token` event and to the end of the stream (`end` or the cancel), the token ids
    (first included), kept prompt positions and the `end` event's fields."""

    first_s: float = math.nan
    token_s: list[float] = field(default_factory=list)
    end_s: float = math.nan
    token_ids: list[int] = field(default_factory=list)
    keep_indices: list[int] = field(default_factory=list)
    cloud_tokens: int = 0
    end_reason: str = ""


class AssistClient:
    """Synchronous `POST /v1/device/assist` with the handshake fields of `model_dir`."""

    def __init__(self, base_url: str, model_dir: Path, timeout_s: float = 600.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.http = httpx.Client(timeout=timeout_s)
        models = self.http.get(f"{self.base_url}/v1/models").json()["data"]
        self.model = str(models[0]["id"])
        self.tokenizer_hash = tokenizer_hash(model_dir)

    def available(self) -> bool:
        """Whether the gateway serves the assist route (an empty body gets 400/422, not 404)."""
        r = self.http.post(self.base_url + ASSIST_PATH, json={})
        return r.status_code != 404

    def body(self, prompt: Sequence[int], n: int, rho: float, g: int,
             window: int = 32) -> dict[str, Any]:
        return {"model": self.model, "tokenizer_hash": self.tokenizer_hash,
                "prompt_token_ids": list(prompt), "max_cloud_tokens": n, "refine_ratio": rho,
                "refine_window": window,
                "sampling": {"max_tokens": g, "temperature": 0.0, "ignore_eos": True}}

    def run(self, prompt: Sequence[int], n: int, rho: float, g: int,
            window: int = 32) -> AssistRun:
        """Greedy assist of `prompt` with N = `n`, rho and budget G; RuntimeError on an
        HTTP or protocol error."""
        out, t0, name = AssistRun(), time.perf_counter(), ""
        with self.http.stream("POST", self.base_url + ASSIST_PATH,
                              json=self.body(prompt, n, rho, g, window)) as r:
            if r.status_code != 200:
                raise RuntimeError(f"assist: HTTP {r.status_code}: {r.read()[:300]!r}")
            for line in r.iter_lines():
                if line.startswith("event:"):
                    name = line[6:].strip()
                elif line.startswith("data:"):
                    self._event(out, name, parse_event(name, _json(line[5:])).model_dump(),
                                time.perf_counter() - t0)
        out.end_s = time.perf_counter() - t0
        return out

    @staticmethod
    def _event(out: AssistRun, name: str, d: dict[str, Any], t: float) -> None:
        if name == "error":
            raise RuntimeError(f"assist error event: {d}")
        if name == "first":
            out.first_s = t
            out.token_ids.append(d["token_id"])
        elif name == "token":
            out.token_s.append(t)
            out.token_ids.append(d["token_id"])
        elif name == "refined":
            out.keep_indices = list(d["keep_indices"])
        elif name == "end":
            out.cloud_tokens, out.end_reason = d["cloud_tokens"], d["reason"]

    def close(self) -> None:
        self.http.close()


def _json(text: str) -> dict[str, Any]:
    import json
    value = json.loads(text)
    if not isinstance(value, dict):
        raise RuntimeError(f"assist: event data is not an object: {text[:100]!r}")
    return value


@dataclass(frozen=True)
class WorkItem:
    """One request of the evaluation: scaled trace lengths and its prompt token ids."""

    trace: str
    source: str
    input_len: int
    output_len: int
    prompt: tuple[int, ...]


def held_out_tokens(model_dir: Path, corpus: Path) -> list[int]:
    """The corpus' last 5% of tokens (text the demo model did not train on)."""
    ids = Tokenizer(model_dir).encode(corpus.read_text(encoding="utf-8"))
    return ids[int(len(ids) * (1.0 - HELD_OUT)):]


def build_workload(traces: dict[str, Path], per_trace: int, max_model_len: int,
                   max_output: int, text_ids: list[int] | None, vocab: int,
                   seed: int) -> tuple[list[WorkItem], list[str]]:
    """`per_trace` requests drawn (seeded) from each trace after scaling it to the context
    (pd_serve.bench.scaling, policy "quantile": factor from the whole trace's p99 total,
    outputs capped at `max_output`); prompts are held-out corpus windows of the scaled input
    length (random tokens when no corpus is given). Returns the items and scaling notes."""
    items, notes = [], []
    for name, path in traces.items():
        if not path.is_file():
            raise ValueError(f"trace {name}: {path} not found (pass --traces NAME=PATH)")
        trace, report = scale_trace(load_trace(path, fmt="lengths"), max_model_len,
                                    policy="quantile", max_output=max_output)
        notes.append(f"{name}: x{report.factor:.4f}, {report.capped} of {len(trace)} capped")
        rng = random.Random(f"{seed}:{name}")
        for i in sorted(rng.sample(range(len(trace)), min(per_trace, len(trace)))):
            r = trace.requests[i]
            if text_ids is not None and len(text_ids) > r.input_len:
                start = rng.randrange(len(text_ids) - r.input_len)
                prompt = text_ids[start:start + r.input_len]
            else:
                prompt = synth_prompt(r, i, vocab, salt=seed)
            items.append(WorkItem(name, r.source, r.input_len, r.output_len, tuple(prompt)))
    return items, notes


def teacher_forced(runner: ModelRunner, context: Sequence[int],
                   target: Sequence[int]) -> tuple[list[bool], list[float]]:
    """Per target token i: whether argmax p(. | context, target[:i]) == target[i] and its
    negative log-likelihood, from one prefill over context + target[:-1] (all logits)."""
    seq = list(context) + list(target[:-1])
    blocks = list(range(-(-len(seq) // runner.block_size)))
    logits = runner.prefill(PrefillBatch([SeqChunk(seq, 0, blocks)], return_all_logits=True))
    tail = np.asarray(logits[0], dtype=np.float64)[len(context) - 1:]  # [len(target), vocab]
    shifted = tail - tail.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    idx = np.arange(len(target))
    hits = tail.argmax(axis=1) == np.asarray(target)
    return [bool(h) for h in hits], [float(-v) for v in logp[idx, list(target)]]


def percentile(values: Sequence[float], q: float) -> float | None:
    """numpy linear percentile, None for no values."""
    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else None


def greedy_continue(runner: ModelRunner, context: Sequence[int], first: int,
                    steps: int) -> list[int]:
    """`steps` greedy tokens after `context` + [first] (the device decoding on its own)."""
    seq = [*context, first]
    table = list(range(-(-(len(seq) + steps) // runner.block_size)))
    out = [int(runner.prefill_argmax(PrefillBatch([SeqChunk(seq, 0, table)]))[0])]
    while len(out) < steps:
        pos = len(seq) + len(out) - 1
        out.append(int(runner.decode_argmax(DecodeBatch([out[-1]], [pos], [table]))[0]))
    return out[:steps]


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else math.nan


def score_refined(runner: ModelRunner, context: Sequence[int],
                  y: Sequence[int]) -> dict[str, float]:
    """Quality of a (refined) prompt against the cloud-only greedy output y (see
    `measure_quality`)."""
    hits, nll = teacher_forced(runner, context, y)
    free = greedy_continue(runner, context, y[0], len(y) - 1)
    same = [a == b for a, b in zip(free, y[1:])]
    prefix = same.index(False) if False in same else len(same)
    return {"agreement": _mean(hits[1:]), "nll": _mean(nll[1:]),
            "ppl": math.exp(_mean(nll[1:])) if len(nll) > 1 else math.nan,
            "free_agreement": _mean(same), "free_prefix": prefix / max(1, len(same))}


QUALITY_DEFINITION = (
    "y = the cloud-only greedy output (G tokens; assist with N = G - 1, rho = 1); the refined "
    "prompt = the prompt positions the cloud keeps for rho (assist with N = 0). agreement = "
    "share of y_2..y_G that are the device model's top-1 given the refined prompt and y's "
    "earlier tokens (teacher-forced; y_1 always comes from the cloud); ppl = exp(mean NLL of "
    "y_2..y_G) under the refined prompt, ppl_ratio = ppl / ppl under the full prompt; "
    "free_agreement / free_prefix = positionwise agreement / common-prefix share of the "
    "device's own greedy continuation after y_1 with y_2..y_G. quality(rho) for the planner = "
    "the one-sided 95% lower confidence bound of the mean agreement over prompts (Student t, "
    "each prompt one sample: its tokens are not independent); the mean is reported beside it "
    "(the full prompt's agreement is the sanity check, ~1.0).")

# one-sided 95% Student t quantiles by degrees of freedom (1..30; the normal 1.645 beyond)
_T95 = (6.314, 2.920, 2.353, 2.132, 2.015, 1.943, 1.895, 1.860, 1.833, 1.812, 1.796, 1.782,
        1.771, 1.761, 1.753, 1.746, 1.740, 1.734, 1.729, 1.725, 1.721, 1.717, 1.714, 1.711,
        1.708, 1.706, 1.703, 1.701, 1.699, 1.697)


def lower_bound(values: Sequence[float]) -> float:
    """One-sided 95% lower confidence bound of the mean of `values` (Student t); a single
    value bounds nothing and gives 0.0."""
    n = len(values)
    if n < 2:
        return 0.0
    t = _T95[n - 2] if n - 1 <= len(_T95) else 1.645
    return max(0.0, float(np.mean(values)) - t * float(np.std(values, ddof=1)) / math.sqrt(n))


def measure_quality(runner: ModelRunner, client: AssistClient, prompts: Sequence[Sequence[int]],
                    rhos: Sequence[float], g: int, window: int = 32) -> dict[str, Any]:
    """Quality vs rho over `prompts` (QUALITY_DEFINITION); `curve` is [[rho, quality]]."""
    if g < 2:
        raise ValueError(f"quality needs an output of at least 2 tokens, got {g}")
    rows = []
    for i, prompt in enumerate(prompts):
        y = client.run(prompt, g - 1, 1.0, g, window).token_ids
        full = score_refined(runner, prompt, y)
        row: dict[str, Any] = {"prompt": i, "prompt_len": len(prompt), "full": full,
                               "rhos": {}}
        for rho in rhos:
            keep = client.run(prompt, 0, rho, g, window).keep_indices
            s = score_refined(runner, [prompt[j] for j in keep], y)
            s["kept"] = len(keep)
            s["ppl_ratio"] = s["ppl"] / full["ppl"]
            row["rhos"][str(rho)] = s
        rows.append(row)
    curve = [[rho, lower_bound([r["rhos"][str(rho)]["agreement"] for r in rows])]
             for rho in rhos]
    summary = {str(rho): {k: _mean([r["rhos"][str(rho)][k] for r in rows])
                          for k in ("agreement", "ppl_ratio", "free_agreement", "free_prefix",
                                    "kept")} for rho in rhos}
    for rho, lcb in curve:
        summary[str(rho)]["agreement_lcb95"] = lcb
    summary["1.0"] = {k: _mean([r["full"][k] for r in rows])
                      for k in ("agreement", "free_agreement", "free_prefix")}
    return {"curve": curve, "summary": summary, "rows": rows, "output_tokens": g,
            "prompts": len(prompts), "definition": QUALITY_DEFINITION}
