"""`FakeOrchestrator`: the orchestrator's HTTP API (as `pd-serve console` uses it) over canned
but consistent state, and `Served`, which runs an app with uvicorn on a real loopback port.

Lifecycle: `FakeOrchestrator()` builds the app over `canned_status()`; routes change that state
and `reset()` restores it; `Served(app).start()` serves it until `stop()` (`start()` again
reuses the port).
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response

from pd_serve.api.errors import APIError, bad_request, install_error_handlers

_sleep = time.sleep  # the real one: console tests replace time.sleep to time an outage
T0 = float(int(time.time()))  # the fake's clock: fixed unix times keep /status deterministic


def _summary(n: int, p50: float, p90: float) -> dict[str, Any]:
    return {"count": n, "mean": p50 * 1.1, "p50": p50, "p90": p90, "p99": p90 * 2} if n else {
        "count": 0}


def _instance(id_: str, role: str | None, scenario: str | None, state: str, **kw: Any,
              ) -> dict[str, Any]:
    port = 9000 + sum(map(ord, id_)) % 100
    base = {"id": id_, "url": f"http://127.0.0.1:{port}", "role": role, "scenario": scenario,
            "state": state, "slots_used": None, "slots_total": None, "kv_blocks_used": None,
            "kv_blocks_total": None, "running": None, "healthy": True, "last_report_s": 0.4}
    return base | kw


def canned_status() -> dict[str, Any]:
    """Two scenarios: chat 2:1 with traffic and a plan; summarize, 1:1 wanted, whose decode
    instance d1 failed (recovery pending) while its prefill p2 is still loading."""
    chat = {"requests": 120, "ttft": _summary(120, 0.182, 0.431),
            "tpot": _summary(120, 0.0185, 0.03), "e2e": _summary(120, 1.734, 3.1),
            "tp_share": 0.42, "slo_success": 0.975, "throughput_rps": 3.21}
    empty = {"requests": 0, "ttft": {"count": 0}, "tpot": {"count": 0}, "e2e": {"count": 0},
             "tp_share": None, "slo_success": None, "throughput_rps": None}
    return {
        "registry": "embedded", "uptime_s": 3723.5,
        "scenarios": {
            "chat": {"target": {"n_p": 2, "n_d": 1}, "prefill": ["p0", "p1"], "decode": ["d0"],
                     "ratio": "2:1", "metrics": chat,
                     "plan": {"n_p": 3, "n_d": 1, "bottleneck": "prefill", "phi": 0.812,
                              "reason": "prefill-bound at [p90] load"}},
            "summarize": {"target": {"n_p": 1, "n_d": 1}, "prefill": ["p2"], "decode": [],
                          "ratio": "1:0", "metrics": empty, "plan": None}},
        "instances": [
            _instance("p0", "prefill", "chat", "ready", slots_used=3, slots_total=8, running=3),
            _instance("p1", "prefill", "chat", "ready", slots_used=8, slots_total=8, running=8),
            _instance("d0", "decode", "chat", "ready", kv_blocks_used=120, kv_blocks_total=512,
                      running=11, last_report_s=1.2),
            _instance("p2", "prefill", "summarize", "loading"),
            _instance("d1", "decode", "summarize", "failed", healthy=False, last_report_s=95.0),
            _instance("s0", None, None, "stateless")],
        "spares": ["s0"],
        "recoveries": [
            {"failed": "p9", "role": "prefill", "scenario": "chat", "reason": "process exited",
             "detected_at": T0 - 600, "replacement": "p1", "recovery_s": 4.2},
            {"failed": "d1", "role": "decode", "scenario": "summarize",
             "reason": "heartbeat lost", "detected_at": T0 - 30, "replacement": None,
             "recovery_s": None}],
        "adjustments": [
            {"scenario": "chat", "action": "set_ratio 2:1", "source": "planner",
             "reason": "ttft p90 over SLO", "at": T0 - 900}]}


class FakeOrchestrator:
    """The orchestrator's HTTP API over `canned_status()`; actions change that state.

    Knobs: `status_errors` answers the next N `GET /status` with 503; `malformed` makes
    `GET /status` send broken JSON; `status_delay_s` makes it answer late. `status_calls`
    counts `GET /status`."""

    def __init__(self) -> None:
        self.reset()
        self.app = self._build()

    def reset(self) -> None:
        self.state = canned_status()
        self.status_calls = 0
        self.status_errors = 0
        self.malformed = False
        self.status_delay_s = 0.0

    def scenario(self, name: str) -> dict[str, Any]:
        if name not in self.state["scenarios"]:
            raise APIError(404, f"unknown scenario '{name}'", param="scenario")
        return self.state["scenarios"][name]

    def instance(self, id_: str) -> dict[str, Any]:
        for inst in self.state["instances"]:
            if inst["id"] == id_:
                return inst
        raise APIError(404, f"unknown instance '{id_}'", param="id")

    def _adjust(self, name: str, action: str) -> None:
        self.state["adjustments"].append({"scenario": name, "action": action,
                                          "source": "operator", "reason": "console",
                                          "at": T0 + len(self.state["adjustments"])})

    def _set_target(self, name: str, n_p: int, n_d: int, action: str) -> dict[str, Any]:
        self.scenario(name)["target"].update(n_p=n_p, n_d=n_d)
        self._adjust(name, action)
        return {"scenario": name, "target": {"n_p": n_p, "n_d": n_d}}

    def _set_state(self, id_: str, want: str, new: str) -> dict[str, Any]:
        inst = self.instance(id_)
        if inst["state"] != want:
            raise APIError(409, f"instance '{id_}' is {inst['state']}, not {want}")
        inst["state"] = new
        return {"id": id_, "state": new}

    def _build(self) -> FastAPI:
        app = FastAPI()
        install_error_handlers(app)

        @app.get("/health")
        def health() -> dict[str, Any]:
            return {"status": "ok"}

        @app.get("/status")
        def status() -> Any:
            self.status_calls += 1
            _sleep(self.status_delay_s)  # a sync route: this blocks a worker thread only
            if self.status_errors:
                self.status_errors -= 1
                raise APIError(503, "registry unavailable", type="server_error")
            if self.malformed:
                return Response('{"registry": "embedded", ', media_type="application/json")
            return self.state

        @app.post("/scenarios/{name}/ratio")
        async def ratio(name: str, request: Request) -> dict[str, Any]:
            self.scenario(name)
            body = await request.json()
            if body["n_p"] < 1 or body["n_d"] < 1:
                raise bad_request("n_p and n_d must be >= 1", param="n_p")
            return self._set_target(name, body["n_p"], body["n_d"], "set_ratio")

        @app.post("/scenarios/{name}/scale")
        async def scale(name: str, request: Request) -> dict[str, Any]:
            target, n = self.scenario(name)["target"], (await request.json())["instances"]
            if n < 2:
                raise bad_request("instances must be >= 2", param="instances")
            n_p = max(1, min(n - 1, round(n * target["n_p"] / (target["n_p"] + target["n_d"]))))
            return self._set_target(name, n_p, n - n_p, "scale")

        @app.post("/scenarios/{name}/profile")
        def profile(name: str) -> dict[str, Any]:
            plan = {"n_p": 3, "n_d": 2, "bottleneck": "decode", "phi": 1.25, "reason": "tpot"}
            self.scenario(name)["plan"] = plan
            return {"scenario": name, "profile": {"prefill_tok_s": 5120.5, "b_p": 8},
                    "plan": plan}

        @app.post("/instances/{id_}/drain")
        def drain(id_: str) -> dict[str, Any]:
            return self._set_state(id_, "ready", "draining")

        @app.post("/instances/{id_}/undrain")
        def undrain(id_: str) -> dict[str, Any]:
            return self._set_state(id_, "draining", "ready")

        @app.post("/instances/{id_}/replace")
        def replace(id_: str) -> dict[str, Any]:
            self.instance(id_)
            spares = self.state["spares"]
            return {"id": id_, "replacement": spares.pop(0) if spares else None}

        @app.post("/rollout")
        async def rollout(request: Request) -> dict[str, Any]:
            if not (await request.json()).get("model_path"):
                raise bad_request("model_path: field required", param="model_path")
            return {"started": True}

        return app


class Served:
    """Runs an app with uvicorn in a daemon thread on a loopback port; `stop()` and `start()`
    again reuse that port, so a client sees the server go down and come back."""

    def __init__(self, app: FastAPI, port: int = 0) -> None:
        self.app, self.port = app, port
        self.server: uvicorn.Server | None = None
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Served:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        server = self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="error"))
        self.thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                                       daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            _sleep(0.01)
        return self

    def stop(self) -> None:
        assert self.server is not None and self.thread is not None
        self.server.should_exit = True
        self.thread.join(10)
