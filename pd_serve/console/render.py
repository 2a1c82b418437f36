"""Rich tables and lines from the orchestrator's JSON (`GET /status` and the action answers);
tolerant of missing or mistyped fields, which show as "-" rather than failing."""

from __future__ import annotations

import json
import time
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

RECENT = 8  # recoveries and adjustments shown, newest first
EPOCH_CUTOFF_S = 1e9  # a "seconds" value above this is a unix time, not an age or a duration
STATE_STYLES = {"ready": "green", "loading": "cyan", "draining": "yellow", "failed": "bold red",
                "stateless": "dim"}


def status_view(status: dict[str, Any], url: str, now: float) -> RenderableType:
    """Everything `GET /status` says, as a header line and tables; `now` (unix time) is the
    moment the status was fetched, for ages."""
    instances = [i for i in _seq(status.get("instances")) if isinstance(i, dict)]
    spares = [str(s) for s in _seq(status.get("spares"))]
    parts: list[RenderableType] = [
        Text.assemble(("orchestrator ", "bold"), url, "  registry ",
                      (str(status.get("registry", "-")), "bold"),
                      "  up ", duration(_num(status.get("uptime_s")))),
        scenarios_table(_obj(status.get("scenarios")), instances)]
    plans = plans_table(_obj(status.get("scenarios")))
    if plans is not None:
        parts.append(plans)
    parts += [instances_table(instances, now),
              Text(f"spares ({len(spares)}): {', '.join(spares)}" if spares else "spares: none"),
              recoveries_table(_seq(status.get("recoveries")), now),
              adjustments_table(_seq(status.get("adjustments")), now)]
    return Group(*parts)


def scenarios_table(scenarios: dict[str, Any], instances: list[dict[str, Any]]) -> Table:
    state = {str(i.get("id")): i.get("state") for i in instances}
    t = _table("scenarios", "scenario", "P:D now/target", "instances", "requests", "TTFT p50",
               "TTFT p90", "TPOT p50", "E2E p50", "T_p share", "SLO ok", "req/s")
    for name, sc in sorted(scenarios.items()):
        sc = _obj(sc)
        p, d = _seq(sc.get("prefill")), _seq(sc.get("decode"))
        target = _obj(sc.get("target"))
        now_ratio = f"{len(p)}:{len(d)}"
        want = f"{_int(target.get('n_p'))}:{_int(target.get('n_d'))}"
        not_ready = sum(state.get(str(i)) != "ready" for i in (*p, *d))
        m = _obj(sc.get("metrics"))
        t.add_row(_t(name, "bold"),
                  _t(f"{now_ratio} / {want}", "" if now_ratio == want else "yellow"),
                  _t(f"{len(p) + len(d)}" + (f" ({not_ready} not ready)" if not_ready else "")),
                  _t(_int(m.get("requests"))),
                  _t(latency(m.get("ttft"), "p50")), _t(latency(m.get("ttft"), "p90")),
                  _t(latency(m.get("tpot"), "p50")), _t(latency(m.get("e2e"), "p50")),
                  _t(percent(m.get("tp_share"))), _t(percent(m.get("slo_success"))),
                  _t(_fixed(m.get("throughput_rps"), 2)))
    return t


def plans_table(scenarios: dict[str, Any]) -> Table | None:
    """The last profiling plan of each scenario that has one; None when none has."""
    rows = [(name, _obj(sc)["plan"]) for name, sc in sorted(scenarios.items())
            if isinstance(_obj(sc).get("plan"), dict)]
    if not rows:
        return None
    t = _table("plans", "scenario", "plan P:D", "bottleneck", "phi", "reason")
    for name, plan in rows:
        t.add_row(_t(name, "bold"), _t(f"{_int(plan.get('n_p'))}:{_int(plan.get('n_d'))}"),
                  _t(plan.get("bottleneck")), _t(_fixed(plan.get("phi"), 3)),
                  _t(plan.get("reason")))
    return t


def instances_table(instances: list[dict[str, Any]], now: float) -> Table:
    t = _table("instances", "id", "url", "role", "scenario", "state", "slots", "KV blocks",
               "running", "healthy", "last report")
    for i in instances:
        state = str(i.get("state", "-"))
        healthy = i.get("healthy")
        t.add_row(_t(i.get("id"), "bold"), _t(i.get("url")), _t(i.get("role")),
                  _t(i.get("scenario")), _t(state, STATE_STYLES.get(state, "")),
                  _t(used_of(i.get("slots_used"), i.get("slots_total"))),
                  _t(used_of(i.get("kv_blocks_used"), i.get("kv_blocks_total"))),
                  _t(_int(i.get("running"))),
                  _t("yes", "green") if healthy is True else _t("NO", "bold red"),
                  _t(ago(_report_age(i.get("last_report_s"), now))))
    return t


def recoveries_table(recoveries: list[Any], now: float) -> Table:
    rows = _recent(recoveries, "detected_at")
    t = _table(_recent_title("recoveries", rows, recoveries), "failed", "role", "scenario",
               "reason", "detected", "replacement", "recovery")
    for r in rows:
        rec = _num(r.get("recovery_s"))
        t.add_row(_t(r.get("failed"), "bold"), _t(r.get("role")), _t(r.get("scenario")),
                  _t(r.get("reason")), _t(when(_num(r.get("detected_at")), now)),
                  _t(r.get("replacement")),
                  _t(f"{rec:.1f}s", "green") if rec is not None else _t("pending", "yellow"))
    return t


def adjustments_table(adjustments: list[Any], now: float) -> Table:
    rows = _recent(adjustments, "at")
    t = _table(_recent_title("adjustments", rows, adjustments), "at", "scenario", "action",
               "source", "reason")
    for a in rows:
        t.add_row(_t(when(_num(a.get("at")), now)), _t(a.get("scenario"), "bold"),
                  _t(a.get("action")), _t(a.get("source")), _t(a.get("reason")))
    return t


def key_values(title: str, values: dict[str, Any]) -> Table:
    """A two-column table of one JSON object (profile results, plans)."""
    t = _table(title, "key", "value")
    for k, v in values.items():
        t.add_row(_t(k, "bold"), _t(_value(v)))
    return t


def latency(summary: Any, key: str) -> str:
    """One percentile of a {"count", "mean", "p50", ...} summary in seconds, as ms or s."""
    s = _obj(summary)
    v = _num(s.get(key))
    if not _num(s.get("count")) or v is None:
        return "-"
    if v >= 1:
        return f"{v:.2f} s"
    return f"{v * 1000:.1f} ms" if v < 0.1 else f"{v * 1000:.0f} ms"


def percent(value: Any) -> str:
    v = _num(value)
    return "-" if v is None else f"{v * 100:.1f}%"


def used_of(used: Any, total: Any) -> str:
    return "-" if used is None and total is None else f"{_int(used)}/{_int(total)}"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    if s < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h"


def ago(seconds: float | None) -> str:
    return "-" if seconds is None else f"{duration(max(0.0, seconds))} ago"


def when(unix: float | None, now: float) -> str:
    """Local clock time of a unix time and how long before `now` it was."""
    if unix is None:
        return "-"
    return f"{time.strftime('%H:%M:%S', time.localtime(unix))} ({ago(now - unix)})"


def _report_age(value: Any, now: float) -> float | None:
    """`last_report_s` is the age of the instance's last report; a unix time is taken too."""
    v = _num(value)
    if v is None:
        return None
    return now - v if v > EPOCH_CUTOFF_S else v


def _recent(items: list[Any], time_key: str) -> list[dict[str, Any]]:
    rows = [x for x in items if isinstance(x, dict)]
    rows.sort(key=lambda x: _num(x.get(time_key)) or 0.0, reverse=True)
    return rows[:RECENT]


def _recent_title(what: str, shown: list[Any], all_: list[Any]) -> str:
    if not all_:
        return f"recent {what}: none"
    more = f", newest {len(shown)} of {len(all_)}" if len(shown) < len(all_) else ""
    return f"recent {what}{more}"


def _table(title: str, *columns: str) -> Table:
    t = Table(title=title, title_justify="left", title_style="bold", header_style="bold")
    for c in columns:
        t.add_column(c, overflow="fold")
    return t


def _t(value: Any, style: str = "") -> Text:
    """A cell as plain Text: server strings may hold '[...]', which must not be markup."""
    return Text("-" if value is None else str(value), style=style)


def _obj(x: Any) -> dict[str, Any]:
    return x if isinstance(x, dict) else {}


def _seq(x: Any) -> list[Any]:
    return x if isinstance(x, list) else []


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else None


def _int(x: Any) -> str:
    v = _num(x)
    return "-" if v is None else str(int(v)) if v.is_integer() else f"{v:g}"


def _value(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.6g}"
    return json.dumps(x) if isinstance(x, dict | list) else "-" if x is None else str(x)


def _fixed(x: Any, digits: int) -> str:
    v = _num(x)
    return "-" if v is None else f"{v:.{digits}f}"
