"""`pd-serve console` against `FakeOrchestrator` (tests/fake_orchestrator.py), served by uvicorn
on a real loopback port, so every command goes through the real httpx path."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import pytest
import typer
from typer.testing import CliRunner, Result

from pd_serve.console import console_app
from tests.fake_orchestrator import FakeOrchestrator, Served, canned_status

_sleep = time.sleep  # the real one: outage tests replace time.sleep

ENV = {"COLUMNS": "220", "FORCE_COLOR": None, "TTY_COMPATIBLE": None, "TTY_INTERACTIVE": None}


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[Served, FakeOrchestrator]]:
    fake = FakeOrchestrator()
    srv = Served(fake.app).start()
    yield srv, fake
    srv.stop()


@pytest.fixture
def orch(served: tuple[Served, FakeOrchestrator]) -> tuple[str, FakeOrchestrator]:
    """The module's server with its fake state reset: (URL, fake)."""
    srv, fake = served
    fake.reset()
    return srv.url, fake


def invoke(url: str, *args: str) -> Result:
    result = CliRunner().invoke(console_app, ["--orchestrator", url, *args], env=ENV)
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


def row(output: str, first_cell: str, table: int = 0) -> str:
    """The table line whose first cell is `first_cell`, in the `table`-th table holding one."""
    lines = [ln for ln in output.splitlines() if ln.startswith(f"│ {first_cell} ")]
    assert len(lines) > table, (first_cell, output)
    return lines[table]


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_status_shows_scenarios_instances_spares_recoveries_adjustments(
        orch: tuple[str, FakeOrchestrator]) -> None:
    url, _ = orch
    r = invoke(url, "status")
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert f"orchestrator {url}  registry embedded  up 1h 02m" in out
    chat = row(out, "chat")
    for cell in ("2:1 / 2:1", " 3 ", "120", "182 ms", "431 ms", "18.5 ms", "1.73 s", "42.0%",
                 "97.5%", "3.21"):
        assert cell in chat, (cell, chat)
    summarize = row(out, "summarize")
    assert "1:0 / 1:1" in summarize and "1 (1 not ready)" in summarize
    assert summarize.count(" - ") >= 7  # no traffic: every metric shows "-"
    plan = row(out, "chat", table=1)
    assert "3:1" in plan and "prefill" in plan and "0.812" in plan
    assert "prefill-bound at [p90] load" in plan  # server text is not taken as rich markup
    p0 = row(out, "p0")
    assert "http://127.0.0.1:" in p0 and "prefill" in p0 and "ready" in p0
    assert "3/8" in p0 and "yes" in p0 and "0.4s ago" in p0
    d0 = row(out, "d0")
    assert "120/512" in d0 and " 11 " in d0 and "1.2s ago" in d0
    d1 = row(out, "d1")
    assert "failed" in d1 and "NO" in d1 and "1m 35s ago" in d1
    assert "spares (1): s0" in out
    assert "4.2s" in row(out, "p9") and "process exited" in row(out, "p9")
    assert "pending" in row(out, "d1", table=1) and "heartbeat lost" in out
    assert "set_ratio 2:1" in out and "planner" in out and "ttft p90 over SLO" in out


def test_json_prints_the_served_json(orch: tuple[str, FakeOrchestrator]) -> None:
    url, fake = orch
    r = invoke(url, "--json", "status")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == fake.state
    r = invoke(url, "--json", "set-ratio", "chat", "3", "1")
    assert json.loads(r.stdout) == {"scenario": "chat", "target": {"n_p": 3, "n_d": 1}}


def test_set_ratio_and_scale_change_the_target(orch: tuple[str, FakeOrchestrator]) -> None:
    url, fake = orch
    r = invoke(url, "scale", "chat", "6")
    assert r.exit_code == 0 and "scenario chat: target 4 prefill + 2 decode" in r.stdout
    r = invoke(url, "set-ratio", "chat", "3", "1")
    assert r.exit_code == 0 and "scenario chat: target 3 prefill + 1 decode" in r.stdout
    assert fake.state["scenarios"]["chat"]["target"] == {"n_p": 3, "n_d": 1}
    out = invoke(url, "status").stdout
    assert "2:1 / 3:1" in row(out, "chat")
    assert [a["action"] for a in fake.state["adjustments"]][-2:] == ["scale", "set_ratio"]


def test_drain_undrain_replace(orch: tuple[str, FakeOrchestrator]) -> None:
    url, fake = orch
    assert "instance p0: draining" in invoke(url, "drain", "p0").stdout
    assert "draining" in row(invoke(url, "status").stdout, "p0")
    assert "instance p0: ready" in invoke(url, "undrain", "p0").stdout
    assert "instance d1: replaced by s0" in invoke(url, "replace", "d1").stdout
    r = invoke(url, "replace", "p2")
    assert r.exit_code == 0 and "p2: being replaced; no replacement assigned yet" in r.stdout


def test_profile_shows_profile_and_plan(orch: tuple[str, FakeOrchestrator]) -> None:
    url, fake = orch
    r = invoke(url, "profile", "summarize")
    assert r.exit_code == 0, r.output
    assert "scenario summarize profiled" in r.stdout
    assert "5120" in row(r.stdout, "prefill_tok_s") and " 8 " in row(r.stdout, "b_p")
    assert "decode" in row(r.stdout, "bottleneck") and "1.25" in row(r.stdout, "phi")
    assert fake.state["scenarios"]["summarize"]["plan"]["n_d"] == 2


def test_rollout(orch: tuple[str, FakeOrchestrator]) -> None:
    url, _ = orch
    r = invoke(url, "rollout", "/models/v2")
    assert r.exit_code == 0 and "rollout of /models/v2 started" in r.stdout


@pytest.mark.parametrize(("args", "message"), [
    (("set-ratio", "nope", "1", "1"),
     "error: unknown scenario 'nope' (HTTP 404 from POST /scenarios/nope/ratio)"),
    (("set-ratio", "chat", "0", "1"), "error: n_p and n_d must be >= 1 (HTTP 400"),
    (("scale", "chat", "1"), "error: instances must be >= 2 (HTTP 400"),
    (("drain", "p2"), "error: instance 'p2' is loading, not ready (HTTP 409"),
    (("undrain", "p0"), "error: instance 'p0' is ready, not draining (HTTP 409"),
    (("replace", "zz"), "error: unknown instance 'zz' (HTTP 404"),
    (("profile", "nope"), "error: unknown scenario 'nope' (HTTP 404"),
    (("rollout", ""), "error: model_path: field required (HTTP 400"),
])
def test_refused_requests_exit_2_with_the_servers_message(
        orch: tuple[str, FakeOrchestrator], args: tuple[str, ...], message: str) -> None:
    r = invoke(orch[0], *args)
    assert r.exit_code == 2 and r.stderr.startswith(message), r.output
    assert r.stdout == "" and len(r.stderr.strip().splitlines()) == 1


def test_bad_arguments_exit_2(orch: tuple[str, FakeOrchestrator]) -> None:
    assert invoke(orch[0], "set-ratio", "chat", "two", "1").exit_code == 2
    assert invoke(orch[0], "nosuchcommand").exit_code == 2
    r = invoke("ftp://127.0.0.1:1", "status")
    assert r.exit_code == 2 and "--orchestrator: expected http://HOST:PORT" in r.stderr
    r = invoke("http://127.0.0.1:99999", "status")
    assert r.exit_code == 2 and "--orchestrator: invalid URL" in r.stderr


def test_unreachable_orchestrator_exits_1_with_a_clear_message() -> None:
    url = f"http://127.0.0.1:{dead_port()}"
    for args in (("status",), ("drain", "p0"), ("--json", "status")):
        r = invoke(url, *args)
        assert r.exit_code == 1, r.output
        assert r.stderr.startswith(f"error: cannot reach the orchestrator at {url}: ")
        assert r.stderr.rstrip().endswith("is `pd-serve orchestrator` running?")
        assert len(r.stderr.strip().splitlines()) == 1


def test_env_var_names_the_orchestrator(orch: tuple[str, FakeOrchestrator]) -> None:
    r = CliRunner().invoke(console_app, ["--json", "status"], env=ENV | {
        "PD_ORCHESTRATOR": orch[0]})
    assert r.exit_code == 0 and json.loads(r.stdout)["registry"] == "embedded"


def test_server_error_and_malformed_json_exit_1(orch: tuple[str, FakeOrchestrator]) -> None:
    url, fake = orch
    fake.status_errors = 1
    r = invoke(url, "status")
    assert r.exit_code == 1
    assert r.stderr.strip() == "error: registry unavailable (HTTP 503 from GET /status)"
    fake.malformed = True
    r = invoke(url, "status")
    assert r.exit_code == 1, r.output
    assert r.stderr.startswith(f"error: the orchestrator at {url} sent malformed JSON for "
                               "GET /status: ")


def test_slow_orchestrator_exits_1_naming_the_timeout(
        orch: tuple[str, FakeOrchestrator]) -> None:
    url, fake = orch
    fake.status_delay_s = 1.0
    r = invoke(url, "--timeout", "0.2", "status")
    assert r.exit_code == 1, r.output
    assert r.stderr.strip() == (f"error: the orchestrator at {url} did not answer GET /status "
                                "within 0.2s (raise --timeout)")


def test_registered_under_a_parent_app(orch: tuple[str, FakeOrchestrator]) -> None:
    """As the lead registers it: `app.add_typer(console_app, name="console")`."""
    root = typer.Typer()
    root.add_typer(console_app, name="console")

    @root.command()
    def other() -> None:
        """Keeps `root` a group, as pd_serve.cli.app is."""

    r = CliRunner().invoke(root, ["console", "--orchestrator", orch[0], "drain", "p0"], env=ENV)
    assert r.exit_code == 0 and "instance p0: draining" in r.stdout, r.output


def test_watch_refreshes_until_the_iterations_are_done(
        orch: tuple[str, FakeOrchestrator]) -> None:
    url, fake = orch
    r = invoke(url, "watch", "--interval", "0.01", "--iterations", "3")
    assert r.exit_code == 0, r.output
    assert fake.status_calls == 3
    assert "refreshed" in r.stdout and "182 ms" in row(r.stdout, "chat")
    assert "unreachable" not in r.stdout


def test_watch_shows_a_banner_and_recovers(orch: tuple[str, FakeOrchestrator]) -> None:
    url, fake = orch
    fake.status_errors = 1
    r = invoke(url, "watch", "--interval", "0.01", "--iterations", "1")
    assert r.exit_code == 0 and "orchestrator error" in r.stdout and "no status yet" in r.stdout
    fake.status_errors = 1
    r = invoke(url, "watch", "--interval", "0.01", "--iterations", "2")
    assert r.exit_code == 0 and fake.status_calls == 3
    assert "orchestrator error" not in r.stdout and "p0" in r.stdout


def test_watch_when_never_reachable() -> None:
    url = f"http://127.0.0.1:{dead_port()}"
    r = invoke(url, "watch", "--interval", "0.01", "--iterations", "2")
    assert r.exit_code == 0, r.output
    assert "orchestrator unreachable" in r.stdout and "no status yet" in r.stdout
    assert f"cannot reach the orchestrator at {url}" in r.stdout


def test_watch_stops_cleanly_on_ctrl_c(orch: tuple[str, FakeOrchestrator],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupt(seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("pd_serve.console.app.time.sleep", interrupt)
    r = invoke(orch[0], "watch", "--interval", "0.01")
    assert r.exit_code == 0, r.output
    assert orch[1].status_calls == 1 and "182 ms" in row(r.stdout, "chat")


def _outage(monkeypatch: pytest.MonkeyPatch, plan: list[str]) -> Served:
    """A fresh fake on its own port; the watch loop's sleeps stop ("down") or restart ("up")
    it in the order of `plan`, so the outage lands between two refreshes."""
    srv = Served(FakeOrchestrator().app).start()
    steps = iter(plan)

    def step(seconds: float) -> None:
        action = next(steps, "")
        if action == "down":
            srv.stop()
        elif action == "up":
            srv.start()
        _sleep(seconds)

    monkeypatch.setattr("pd_serve.console.app.time.sleep", step)
    return srv


def test_watch_keeps_the_last_status_under_an_unreachable_banner(
        monkeypatch: pytest.MonkeyPatch) -> None:
    srv = _outage(monkeypatch, ["down"])
    try:
        r = invoke(srv.url, "watch", "--interval", "0.01", "--iterations", "2")
    finally:
        srv.stop()
    assert r.exit_code == 0, r.output
    assert "orchestrator unreachable" in r.stdout and "showing the status from" in r.stdout
    assert "182 ms" in row(r.stdout, "chat")  # the last good status, under the banner


def test_watch_json_lines_through_an_outage(monkeypatch: pytest.MonkeyPatch) -> None:
    srv = _outage(monkeypatch, ["down", "up"])
    try:
        r = invoke(srv.url, "--json", "watch", "--interval", "0.01", "--iterations", "3")
    finally:
        srv.stop()
    assert r.exit_code == 0, r.output
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2 and all(json.loads(ln) == canned_status() for ln in lines)
    assert r.stderr.startswith(f"error: cannot reach the orchestrator at {srv.url}")
