"""Reporting helpers of tools/sim_experiments.py: goodput, compact run records, the JSON
layout, printed tables and matplotlib plumbing.

An experiment hands back an `Experiment`: its JSON body, the table it prints and a function
that writes its PNG (matplotlib is imported only there, `pyplot`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Experiment:
    """What an experiment hands back: its JSON body, the printed table and a plot writer."""

    data: dict[str, Any]
    text: str
    plot: Callable[[Path], None]


# ---------------------------------------------------------------------------------------------
# Goodput and run records


def best_goodput(points: Sequence[dict[str, Any]], key: str,
                 targets: Sequence[float]) -> dict[str, dict[str, Any]]:
    """Per attainment target: among the load points of one configuration whose `key`
    ("attainment": TTFT band + TPOT, or "ttft_attainment") reaches it, the one with the
    highest goodput (SLO-met completions/s); goodput 0 when none does."""
    good = "goodput_rps" if key == "attainment" else "ttft_goodput_rps"
    out = {}
    for target in targets:
        ok = [(p["metrics"]["overall"][good], p["offered_rps"], p["metrics"]["overall"][key])
              for p in points if p["metrics"]["overall"][key] >= target]
        g, rate, att = max(ok) if ok else (0.0, None, None)
        out[f"{target:g}"] = {"goodput_rps": g, "offered_rps": rate, "attainment": att}
    return out


KEPT = ("throughput_rps", "output_tokens_per_s", "goodput_rps", "ttft_goodput_rps",
        "attainment", "ttft_attainment", "terminated_share", "prefix_hit_rate", "ttft_p50_s",
        "ttft_p90_s", "ttft_p99_s", "tpot_p50_s", "tpot_p90_s")


def compact(r: dict[str, Any]) -> dict[str, Any]:
    """One run's result without the per-scenario breakdown (smaller JSON)."""
    return {"point": r["point"], "offered_rps": r["offered_rps"],
            "metrics": {k: r["metrics"]["overall"][k] for k in KEPT},
            "events": r["sim"]["events"], "wall_s": r["sim"]["wall_s"]}


def as_rows(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Runs as a table: {"columns": [...], "rows": [[...], ...]} (one line per run in the JSON)."""
    cols = ["load", "offered_rps", *KEPT, "events"]
    return {"columns": cols, "rows": [[r["point"]["load"], r["offered_rps"],
                                       *(r["metrics"]["overall"][k] for k in KEPT),
                                       r["sim"]["events"]] for r in runs]}


# ---------------------------------------------------------------------------------------------
# JSON and text


def dumps(value: Any, indent: int = 0) -> str:
    """JSON with objects indented one space a level and lists of scalars on one line."""
    pad = " " * (indent + 1)
    if isinstance(value, dict) and value:
        items = [f"{pad}{json.dumps(str(k))}: {dumps(v, indent + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    if isinstance(value, list) and any(isinstance(v, dict | list) for v in value):
        items = [pad + dumps(v, indent + 1) for v in value]
        return "[\n" + ",\n".join(items) + "\n" + " " * indent + "]"
    return json.dumps(value, default=str)


def rounded(value: Any, digits: int = 5) -> Any:
    """Floats to `digits` significant digits, recursively (the JSON stays readable)."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}") if math.isfinite(value) else value
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [rounded(v, digits) for v in value]
    return value


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def fmt(x: Any, digits: int = 2, scale: float = 1.0) -> str:
    return "-" if x is None else f"{x * scale:.{digits}f}"


# ---------------------------------------------------------------------------------------------
# Plots


def pyplot() -> Any:
    import matplotlib  # only for the plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def scenario_axes(plt: Any, n: int) -> tuple[Any, Any]:
    """A figure with one 6 x 4 panel per scenario, side by side (axes[0][i])."""
    return plt.subplots(1, n, figsize=(6 * n, 4), squeeze=False)


def finish_axes(ax: Any, xlabel: str, ylabel: str, legend_size: int = 7) -> None:
    """Axis labels, a light grid and a small legend."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)


def save_figure(plt: Any, fig: Any, path: Path) -> None:
    """Lays the figure out, writes it as a 120-dpi PNG and frees it."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
