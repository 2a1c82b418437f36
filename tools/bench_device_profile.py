"""The P/D-Device evaluation's own profiles: the device and the cloud measured in the run, and
quality per prompt-length band on held-out prompts whose lengths follow the evaluation's
scaled trace lengths (never the evaluation's prompts).

Quality bands: the evaluation's prompts run from a few tokens to nearly the whole context, and
a refined long prompt loses more than a short one, so one curve measured on mid-length prompts
overstated the long prompts' quality. Per band [lo, hi] the bench draws `per_band` lengths from
the scaled traces' input lengths inside the band (a trace chosen uniformly, as the evaluation
draws the same number of requests per trace, then one of its lengths), cuts consecutive windows
of those lengths from the start of the held-out text (the evaluation's prompts come from the
text after them) and takes the one-sided 95% lower bound of the agreement per rho over the
band's prompts (tools/bench_device_lib.measure_quality).
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import Any

from bench_device_lib import AssistClient, measure_quality

from pd_device.profiles import Profiles, QualityBand, QualityCurve
from pd_serve.bench.scaling import scale_trace
from pd_serve.bench.trace_formats import load_trace


def quality_bands(edges: list[int], max_len: int) -> list[tuple[int, int]]:
    """Bands [1, e1 - 1], [e1, e2 - 1], ..., [e_k, max_len] from ascending edges."""
    cuts = [1, *sorted(e for e in edges if 1 < e <= max_len), max_len + 1]
    return [(lo, hi - 1) for lo, hi in zip(cuts, cuts[1:])]


def band_lengths(traces: dict[str, Path], max_model_len: int, max_output: int,
                 bands: list[tuple[int, int]], per_band: int, max_len: int,
                 seed: int) -> dict[tuple[int, int], list[int]]:
    """`per_band` prompt lengths per band drawn from the scaled traces (module docstring);
    lengths above `max_len` are left out (the quality measure needs room for its output)."""
    pools = {}
    for name, path in traces.items():
        trace, _ = scale_trace(load_trace(path, fmt="lengths"), max_model_len,
                               policy="quantile", max_output=max_output)
        pools[name] = [r.input_len for r in trace.requests if 2 <= r.input_len <= max_len]
    rng = random.Random(f"{seed}:quality-profile")
    out = {}
    for lo, hi in bands:
        inside = {k: [n for n in v if lo <= n <= hi] for k, v in pools.items()}
        names = sorted(k for k, v in inside.items() if v)
        if names:
            out[(lo, hi)] = [rng.choice(inside[rng.choice(names)]) for _ in range(per_band)]
    return out


def cut_prompts(text: list[int], lengths: dict[tuple[int, int], list[int]]
                ) -> tuple[dict[tuple[int, int], list[list[int]]], list[int]]:
    """Consecutive windows of the given lengths from the start of `text`, and the rest (from
    which the evaluation's prompts are cut); ValueError if they need more than half of it."""
    at = 0
    out: dict[tuple[int, int], list[list[int]]] = {}
    for band, ns in lengths.items():
        out[band] = []
        for n in ns:
            if at + n > len(text) // 2:
                raise ValueError(f"the quality profile's prompts ({sum(map(sum, lengths.values()))}"
                                 f" tokens) need more than half of the {len(text)} held-out "
                                 f"tokens: fewer --profile-quality-prompts")
            out[band].append(text[at:at + n])
            at += n
    return out, text[at:]


def banded_quality(runner: Any, client: AssistClient,
                   prompts: dict[tuple[int, int], list[list[int]]], rhos: list[float],
                   g: int) -> dict[str, Any]:
    """Quality vs rho per band and over all the profile's prompts (lower bounds)."""
    every = [p for ps in prompts.values() for p in ps]
    bands = []
    for (lo, hi), ps in prompts.items():
        q = measure_quality(runner, client, ps, rhos, g)
        bands.append({"band": [lo, hi], "prompts": len(ps),
                      "lengths": [len(p) for p in ps], **q})
        print(f"quality band {lo}-{hi} ({len(ps)} prompts): {q['curve']}", flush=True)
    return {"all": measure_quality(runner, client, every, rhos, g), "bands": bands}


def with_bands(prof: Profiles, quality: dict[str, Any] | None) -> Profiles:
    """`prof` with the measured band curves (`banded_quality`) and the curve over all."""
    if not quality:
        return prof
    bands = tuple(QualityBand(b["band"][0], b["band"][1],
                              QualityCurve(tuple((r, q) for r, q in b["curve"])), b["prompts"])
                  for b in quality["bands"])
    curve = QualityCurve(tuple((r, q) for r, q in quality["all"]["curve"]))
    return Profiles(prof.device, prof.cloud, curve, prof.provenance, bands)


def measured_profiles(args: argparse.Namespace, client: AssistClient, runner: Any,
                      prompts: dict[tuple[int, int], list[list[int]]]
                      ) -> tuple[Profiles, dict[str, Any]]:
    """Profiles measured now, as tools/profile_device.py measures them: the device in this
    process (the runtime's backend and threads; engine steps, the 90th percentile of
    `--profile-repeats`), the cloud through the assist API, and quality per band on `prompts`
    (held out from the evaluation's); returns them with the raw measurements."""
    from profile_device import measure_cloud, measure_device, profiles_of

    # a profiled prompt leaves room for its 9 (cloud) or more (device) output tokens
    lengths = [n for n in (16, 32, 64, 128, 256, 512, 1024, 2048)
               if n <= args.max_model_len - 64]
    dev = measure_device(args.model, args.device_backend, args.device_threads, lengths,
                         [min(200, args.max_model_len // 2)], 16, args.profile_repeats)
    cloud = measure_cloud(client, lengths, 8, 0.5, 2)
    quality = banded_quality(runner, client, prompts, args.profile_rhos,
                             args.profile_quality_output) if prompts else None
    raw = {"device": dev, "cloud": cloud, "quality": quality}
    prof = profiles_of(dev, cloud, None, args.device_slowdown, {"measured": "in the run"})
    return with_bands(prof, quality), raw
