"""Scenario tagging of a trace's requests, per-scenario summaries, and merging several traces
into one multi-scenario trace.

`tag_scenarios(trace, by=...)` -> (tagged Trace, summary). Keys by mode:
* "prefix" (traces with hash ids, i.e. Mooncake): a request's family is its first k hash ids.
  k defaults to the smallest k >= 1 that splits the trace into two or more families: in the
  Mooncake conversation trace every request starts with hash id 0 (a shared system-prompt
  block), so k=1 is one family and the default is k=2 (7,373 families, the largest of 43
  requests). Scenario names are `prefix-<id>-<id>...`;
* "source": the file in the request's `source` ("file:line"), named by its stem with the prefix
  common to all files' stems removed at a `_`/`-`/`.` boundary (AzureLLMInferenceTrace_code and
  _conv -> "code", "conv"); requests without a source get the trace's name;
* "client": the ServeGen client of `chunk-<i>-trace.csv:<line>` -> "client-<i>";
* "auto": prefix when requests have hash ids, client for ServeGen traces, else source.
The `top_n` keys with the most requests (ties: first to arrive) become scenarios, every other
request goes to `other` (None: every key its own scenario), so every request is in exactly one
scenario. Notes report the number of keys, the largest sizes and the share covered.

Summary: scenario -> {requests, share, mean_input, mean_output, keys (how many families /
files / clients it holds), and for traces with hash ids prefix_hit_ratio: prompt tokens an
infinite prefix cache already holds at arrival (the request's leading run of hash ids seen
before, in trace order over the whole trace, times block_size, at most input_len) over the
scenario's prompt tokens}.

`merge_traces(traces, names)`: all timed (merged by arrival, stable) or all untimed
(concatenated); same block_size; scenario of each request = its trace's name (or `names`); hash
ids of later traces shifted past the earlier ones' so unrelated blocks never collide.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from pd_serve.bench.traces import Trace, TraceRequest

MODES = ("auto", "prefix", "source", "client")
_CLIENT = re.compile(r"chunk-([0-9]+)-")


def prefix_hits(trace: Trace) -> list[int]:
    """Per request, prompt tokens an infinite prefix cache holds when it arrives (trace order)."""
    block, seen, out = trace.block_size or 0, set[int](), []
    for r in trace.requests:
        n = 0
        while n < len(r.hash_ids) and r.hash_ids[n] in seen:
            n += 1
        out.append(min(n * block, r.input_len))
        seen.update(r.hash_ids)
    return out


def scenario_summary(trace: Trace) -> dict[str, dict[str, float]]:
    """Scenario -> requests, share, mean_input, mean_output (and prefix_hit_ratio with hash
    ids), largest scenario first."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(trace.requests):
        groups.setdefault(r.scenario, []).append(i)
    hits = prefix_hits(trace) if any(r.hash_ids for r in trace.requests) else None
    out: dict[str, dict[str, float]] = {}
    for name, idx in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        reqs = [trace.requests[i] for i in idx]
        tokens = sum(r.input_len for r in reqs)
        row = {"requests": float(len(idx)), "share": len(idx) / len(trace.requests),
               "mean_input": tokens / len(idx),
               "mean_output": sum(r.output_len for r in reqs) / len(idx)}
        if hits is not None:
            row["prefix_hit_ratio"] = sum(hits[i] for i in idx) / tokens
        out[name] = row
    return out


def _auto_k(trace: Trace) -> int:
    longest = max((len(r.hash_ids) for r in trace.requests), default=1)
    for k in range(1, longest + 1):
        if len({r.hash_ids[:k] for r in trace.requests}) >= 2:
            return k
    return max(1, longest)


def _source_names(trace: Trace, files: list[str]) -> dict[str, str]:
    stems = {f: (Path(f).stem if f else trace.name) for f in set(files)}
    common = _common_prefix(list(stems.values())) if len(set(stems.values())) > 1 else ""
    short = {f: s[len(common):] for f, s in stems.items()}
    if any(not s for s in short.values()) or len(set(short.values())) < len(short):
        return stems
    return short


def _common_prefix(words: list[str]) -> str:
    """The longest common prefix of `words` that ends at a `_`, `-` or `.` boundary."""
    first, last = min(words), max(words)
    n = 0
    while n < min(len(first), len(last)) and first[n] == last[n]:
        n += 1
    cut = max(first.rfind(sep, 0, n) for sep in "_-.")
    return first[:cut + 1] if cut >= 0 else ""


def _file_of(r: TraceRequest) -> str:
    head, sep, tail = r.source.rpartition(":")
    return head if sep and tail.isdigit() else r.source


def _keys(trace: Trace, mode: str, k: int | None) -> tuple[list[str], str]:
    """(candidate scenario per request, what a key is)."""
    reqs = trace.requests
    if mode == "prefix":
        if not any(r.hash_ids for r in reqs):
            raise ValueError(f"trace {trace.name!r} has no hash ids: tag by 'source' or 'client'")
        if k is not None and k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        k = _auto_k(trace) if k is None else k
        return ["prefix-" + "-".join(map(str, r.hash_ids[:k])) for r in reqs], \
            f"prefix families (k={k})"
    if mode == "source":
        files = [_file_of(r) for r in reqs]
        names = _source_names(trace, files)
        return [names[f] for f in files], "source files"
    clients = []
    for r in reqs:
        m = _CLIENT.match(r.source)
        if not m:
            raise ValueError(f"request from {r.source!r} has no ServeGen client (tag by "
                             f"'source' or 'prefix')")
        clients.append(f"client-{int(m[1])}")
    return clients, "clients"


def tag_scenarios(trace: Trace, by: str = "auto", k: int | None = None, top_n: int | None = 8,
                  other: str = "other") -> tuple[Trace, dict[str, dict[str, float]]]:
    """`trace` with every request's scenario set by the rule in the module docstring, and the
    per-scenario summary (`keys` added: families / files / clients per scenario)."""
    if by not in MODES:
        raise ValueError(f"unknown tagging mode {by!r}; modes: {', '.join(MODES)}")
    if top_n is not None and top_n < 1:
        raise ValueError(f"top_n must be >= 1 or None, got {top_n}")
    if not trace.requests:
        raise ValueError(f"trace {trace.name!r} has no requests to tag")
    mode = by if by != "auto" else ("prefix" if any(r.hash_ids for r in trace.requests)
                                    else "client" if trace.fmt == "servegen" else "source")
    keys, what = _keys(trace, mode, k)
    counts = Counter(keys)  # insertion order = first arrival, kept by the stable sort
    ranked = sorted(counts, key=lambda key: -counts[key])
    kept = set(ranked if top_n is None else ranked[:top_n])
    if other in kept:
        raise ValueError(f"scenario name {other!r} is taken; pass another `other`")
    covered = sum(counts[key] for key in kept) / len(keys)
    top = ", ".join(str(counts[key]) for key in ranked[:min(len(kept), 8)])
    note = (f"tagged by {what}: {len(counts)} key(s), largest {top}; {len(kept)} scenario(s) "
            f"cover {covered:.1%} of requests" + (f", {other!r} the rest" if covered < 1 else ""))
    tagged = replace(trace, requests=tuple(replace(r, scenario=key if key in kept else other)
                                           for r, key in zip(trace.requests, keys)),
                     notes=(*trace.notes, note))
    summary = scenario_summary(tagged)
    per = Counter(key if key in kept else other for key in counts)
    for name, row in summary.items():
        row["keys"] = float(per[name])
    return tagged, summary


def merge_traces(traces: Sequence[Trace], names: Sequence[str] | None = None) -> Trace:
    """One trace holding every request of `traces`, scenario = trace name (module docstring)."""
    if not traces:
        raise ValueError("merge_traces needs at least one trace")
    labels = [t.name for t in traces] if names is None else list(names)
    if len(labels) != len(traces) or len(set(labels)) != len(labels):
        raise ValueError(f"need one distinct name per trace, got {labels}")
    if len({t.timed for t in traces}) > 1:
        raise ValueError("cannot merge timed and untimed traces: give the untimed ones arrival "
                         f"times first ({[(t.name, t.timed) for t in traces]})")
    if len({t.block_size for t in traces}) > 1:
        raise ValueError(f"traces have different block sizes "
                         f"{[(t.name, t.block_size) for t in traces]}")
    out: list[TraceRequest] = []
    next_id = None
    for t, label in zip(traces, labels):
        ids = [h for r in t.requests for h in r.hash_ids]
        shift = 0 if next_id is None or not ids else next_id - min(ids)
        if ids:
            next_id = max(ids) + shift + 1  # past every id so far: shifted ids start at next_id
        out.extend(replace(r, scenario=label, hash_ids=tuple(h + shift for h in r.hash_ids))
                   for r in t.requests)
    if traces[0].timed:
        out.sort(key=lambda r: r.arrival_s)
    notes = [f"merged {len(traces)} traces: " + ", ".join(
        f"{label} ({len(t)} requests)" for t, label in zip(traces, labels))]
    notes += [f"{label}: {n}" for t, label in zip(traces, labels) for n in t.notes]
    fmts = {t.fmt for t in traces}
    return Trace("+".join(labels), tuple(out), traces[0].timed, traces[0].block_size,
                 sum(t.skipped for t in traces), tuple(notes),
                 fmts.pop() if len(fmts) == 1 else "merged")
