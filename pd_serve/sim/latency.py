"""Latency models of the simulator (prefill step, decode step, KV hand-off), least-squares fits
from measured samples, and JSON profiles that keep the samples and their provenance.

Model forms (seconds):
* prefill step over chunks (prior_i cached/earlier tokens, new_i tokens computed now):
      a + b*seqs + c*tokens + d*attn
  packed backends: tokens = sum new_i, attn = sum new_i * (prior_i + (new_i + 1) / 2) (causal
  query-key pairs); padded backends (the CPU runners pad the batch to [B, T, C]):
  tokens = B * max new_i, attn = B * max new_i * max(prior_i + new_i). The linear terms are the
  projections and MLP, the attention term the score/value products over the context.
* decode step over a batch of B sequences with contexts ctx_i: a + b*B + c*context, context =
  sum ctx_i (packed) or B * max ctx_i (padded).
* hand-off of a request's KV (stage + transfer + scatter): latency + bytes / bandwidth.
Fits minimise the relative error (rows weighted by 1/time) and keep every coefficient >= 0 (a
feature whose coefficient comes out negative is dropped and the rest refitted).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

PROFILE_VERSION = 1
Chunk = tuple[int, int]  # (prior tokens already in the KV cache, new tokens computed now)


@dataclass(frozen=True)
class PrefillSample:
    chunks: tuple[Chunk, ...]
    seconds: float


@dataclass(frozen=True)
class DecodeSample:
    contexts: tuple[int, ...]  # tokens each sequence attends over in this step
    seconds: float


@dataclass(frozen=True)
class HandoffSample:
    bytes: int
    seconds: float


def prefill_features(chunks: Sequence[Chunk], padded: bool) -> tuple[int, float, float]:
    """(seqs, tokens, attn) of one prefill step, as the model form above defines them."""
    if not chunks:
        raise ValueError("prefill_features: empty batch")
    if padded:
        t = max(n for _, n in chunks)
        c = max(p + n for p, n in chunks)
        return len(chunks), float(len(chunks) * t), float(len(chunks) * t * c)
    return (len(chunks), float(sum(n for _, n in chunks)),
            float(sum(n * (p + (n + 1) / 2) for p, n in chunks)))


def decode_context(contexts: Sequence[int], padded: bool) -> float:
    return float(len(contexts) * max(contexts) if padded else sum(contexts))


@dataclass(frozen=True)
class PrefillModel:
    intercept_s: float
    per_seq_s: float
    per_token_s: float
    per_attn_s: float
    padded: bool = False

    def time(self, seqs: int, tokens: float, attn: float) -> float:
        return (self.intercept_s + self.per_seq_s * seqs + self.per_token_s * tokens
                + self.per_attn_s * attn)

    def time_of(self, chunks: Sequence[Chunk]) -> float:
        return self.time(*prefill_features(chunks, self.padded))


@dataclass(frozen=True)
class DecodeModel:
    intercept_s: float
    per_seq_s: float
    per_context_s: float
    padded: bool = False

    def time(self, batch: int, context: float) -> float:
        return self.intercept_s + self.per_seq_s * batch + self.per_context_s * context

    def time_of(self, contexts: Sequence[int]) -> float:
        return self.time(len(contexts), decode_context(contexts, self.padded))


@dataclass(frozen=True)
class HandoffModel:
    latency_s: float
    bytes_per_s: float

    def __post_init__(self) -> None:
        if not self.latency_s >= 0 or not self.bytes_per_s > 0:
            raise ValueError(f"handoff: latency_s must be >= 0 and bytes_per_s > 0, got "
                             f"{self.latency_s!r}, {self.bytes_per_s!r}")

    def time(self, nbytes: float) -> float:
        return self.latency_s + nbytes / self.bytes_per_s


def _fit(rows: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Non-negative, relative-error least squares; (coefficients, max relative residual)."""
    if len(y) < rows.shape[1]:
        raise ValueError(f"fit: {len(y)} samples for {rows.shape[1]} coefficients")
    if np.any(y <= 0) or not np.all(np.isfinite(rows)):
        raise ValueError("fit: sample times must be positive and features finite")
    w = 1.0 / y
    active = list(range(rows.shape[1]))
    coef = np.zeros(rows.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(rows[:, active] * w[:, None], y * w, rcond=None)
        if sol.min() >= 0:
            coef[active] = sol
            break
        active.pop(int(np.argmin(sol)))
    resid = float(np.max(np.abs(rows @ coef - y) * w))
    return coef, resid


def fit_prefill(samples: Sequence[PrefillSample], padded: bool = False) -> PrefillModel:
    rows = np.array([[1.0, *prefill_features(s.chunks, padded)] for s in samples])
    c, _ = _fit(rows, np.array([s.seconds for s in samples]))
    return PrefillModel(float(c[0]), float(c[1]), float(c[2]), float(c[3]), padded)


def fit_decode(samples: Sequence[DecodeSample], padded: bool = False) -> DecodeModel:
    rows = np.array([[1.0, len(s.contexts), decode_context(s.contexts, padded)]
                     for s in samples])
    c, _ = _fit(rows, np.array([s.seconds for s in samples]))
    return DecodeModel(float(c[0]), float(c[1]), float(c[2]), padded)


def fit_handoff(samples: Sequence[HandoffSample]) -> HandoffModel:
    rows = np.array([[1.0, float(s.bytes)] for s in samples])
    coef, _ = _fit(rows, np.array([s.seconds for s in samples]))
    if coef[1] <= 0:
        raise ValueError("fit_handoff: the samples show no time growing with bytes")
    return HandoffModel(float(coef[0]), float(1.0 / coef[1]))


def fit_error(model: PrefillModel | DecodeModel, samples: Sequence[Any]) -> dict[str, float]:
    """Median, root-mean-square and max relative error of `model` over `samples`."""
    errs = [abs((model.time_of(s.chunks) if isinstance(model, PrefillModel)
                 else model.time_of(s.contexts)) / s.seconds - 1) for s in samples]
    return {"median_rel_err": float(np.median(errs)),
            "rms_rel_err": float(np.sqrt(np.mean(np.square(errs)))),
            "max_rel_err": float(np.max(errs))}


@dataclass(frozen=True)
class LatencyProfile:
    """The three models plus what the sim needs to apply them: KV bytes per token (hand-off
    size) and provenance (machine, backend, model, date, command). `samples` keeps the raw
    measurements so a profile can be refitted."""

    prefill: PrefillModel
    decode: DecodeModel
    handoff: HandoffModel
    kv_bytes_per_token: int
    provenance: dict[str, Any] = field(default_factory=dict)
    samples: dict[str, list[Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"version": PROFILE_VERSION, "provenance": self.provenance,
                "kv_bytes_per_token": self.kv_bytes_per_token,
                "prefill": asdict(self.prefill), "decode": asdict(self.decode),
                "handoff": asdict(self.handoff), "samples": self.samples}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatencyProfile:
        if data.get("version") != PROFILE_VERSION:
            raise ValueError(f"version: expected {PROFILE_VERSION}, got {data.get('version')!r}")
        try:
            kv = int(data["kv_bytes_per_token"])
            prof = cls(PrefillModel(**data["prefill"]), DecodeModel(**data["decode"]),
                       HandoffModel(**data["handoff"]), kv, dict(data.get("provenance", {})),
                       dict(data.get("samples", {})))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"latency profile: missing or unknown field ({exc})") from exc
        if kv <= 0:
            raise ValueError(f"kv_bytes_per_token: expected a positive integer, got {kv}")
        for name in ("prefill", "decode"):
            if any(not (math.isfinite(v) and v >= 0) for v in
                   asdict(getattr(prof, name)).values() if not isinstance(v, bool)):
                raise ValueError(f"{name}: coefficients must be finite and >= 0")
        return prof

    def save(self, path: str | Path) -> None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> LatencyProfile:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: cannot read a latency profile ({exc})") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a latency profile is a JSON object")
        try:
            return cls.from_dict(data)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc
