"""`OrchestratorClient`: the orchestrator's HTTP API over httpx, one method per route, every
failure raised as a one-line `ConsoleError` that carries the console's exit status.

Lifecycle:
1. `OrchestratorClient(url, timeout)` checks the URL and opens an httpx connection pool (no
   request is sent yet);
2. each route method sends one request and blocks until the answer or the timeout;
3. `close()` (or leaving the `with` block) closes the pool.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

EXIT_SERVER = 1  # orchestrator unreachable, slow, broken or failing (5xx)
EXIT_USAGE = 2  # bad arguments: a bad URL or a 4xx answer
PROFILE_TIMEOUT_S = 300.0  # profiling runs the scenario's instances for tens of seconds


class ConsoleError(Exception):
    """A failure to print as `error: <message>` before exiting with `exit_code`."""

    def __init__(self, message: str, exit_code: int = EXIT_SERVER, *,
                 reachable: bool = True) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.reachable = reachable  # False: no connection at all (watch shows "unreachable")


class OrchestratorClient:
    """Blocking client of one orchestrator; every method returns the answer's JSON object."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        self.url = check_url(url)
        self.timeout = timeout
        self._http = httpx.Client(base_url=self.url, timeout=timeout)

    def __enter__(self) -> OrchestratorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/health")

    def status(self) -> dict[str, Any]:
        return self._request("GET", "/status")

    def set_ratio(self, scenario: str, n_p: int, n_d: int) -> dict[str, Any]:
        return self._request("POST", f"/scenarios/{_seg(scenario)}/ratio",
                             {"n_p": n_p, "n_d": n_d})

    def scale(self, scenario: str, instances: int) -> dict[str, Any]:
        """`instances` is the scenario's new total; the orchestrator keeps its P:D ratio."""
        return self._request("POST", f"/scenarios/{_seg(scenario)}/scale",
                             {"instances": instances})

    def profile(self, scenario: str) -> dict[str, Any]:
        """Profiles the scenario and returns the plan; waits at least `PROFILE_TIMEOUT_S`."""
        return self._request("POST", f"/scenarios/{_seg(scenario)}/profile", {},
                             timeout=max(self.timeout, PROFILE_TIMEOUT_S))

    def drain(self, instance_id: str) -> dict[str, Any]:
        return self._request("POST", f"/instances/{_seg(instance_id)}/drain")

    def undrain(self, instance_id: str) -> dict[str, Any]:
        return self._request("POST", f"/instances/{_seg(instance_id)}/undrain")

    def replace(self, instance_id: str) -> dict[str, Any]:
        return self._request("POST", f"/instances/{_seg(instance_id)}/replace")

    def rollout(self, model_path: str) -> dict[str, Any]:
        return self._request("POST", "/rollout", {"model_path": model_path})

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None,
                 timeout: float | None = None) -> dict[str, Any]:
        what = f"{method} {path}"
        wait = self.timeout if timeout is None else timeout
        try:
            resp = self._http.request(method, path, json=body, timeout=wait)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise ConsoleError(f"cannot reach the orchestrator at {self.url}: {_reason(exc)}; "
                               "is `pd-serve orchestrator` running?", reachable=False) from exc
        except httpx.TimeoutException as exc:
            raise ConsoleError(f"the orchestrator at {self.url} did not answer {what} within "
                               f"{wait:g}s (raise --timeout)") from exc
        except httpx.TransportError as exc:
            raise ConsoleError(f"lost the connection to the orchestrator at {self.url} during "
                               f"{what}: {_reason(exc)}", reachable=False) from exc
        if not resp.is_success:
            code = EXIT_USAGE if 400 <= resp.status_code < 500 else EXIT_SERVER
            raise ConsoleError(f"{error_message(resp)} (HTTP {resp.status_code} from {what})",
                               code)
        return self._decode(resp, what)

    def _decode(self, resp: httpx.Response, what: str) -> dict[str, Any]:
        try:
            data = json.loads(resp.content)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConsoleError(f"the orchestrator at {self.url} sent malformed JSON for "
                               f"{what}: {exc}") from exc
        if not isinstance(data, dict):
            raise ConsoleError(f"the orchestrator at {self.url} sent malformed JSON for "
                               f"{what}: expected an object, got {type(data).__name__}")
        return data


def check_url(url: str) -> str:
    """The orchestrator's base URL without a trailing slash; `ConsoleError` (exit 2) if it is
    not an http(s) URL with a host."""
    url = url.strip().rstrip("/")
    try:
        parts = urlsplit(url)
        port_ok = parts.port is None or parts.port > 0  # reading .port validates it
        httpx.URL(url)
    except (ValueError, httpx.InvalidURL) as exc:
        raise ConsoleError(f"--orchestrator: invalid URL {url!r}: {exc}", EXIT_USAGE) from exc
    if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
        raise ConsoleError(f"--orchestrator: expected http://HOST:PORT, got {url!r}", EXIT_USAGE)
    return url


def error_message(resp: httpx.Response) -> str:
    """`error.message` of an OpenAI-style error body; else FastAPI's `detail`; else the text."""
    try:
        body = json.loads(resp.content)
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return _one_line(err["message"])
        if isinstance(body.get("detail"), str):
            return _one_line(body["detail"])
    text = _one_line(resp.text)
    return text[:200] if text else resp.reason_phrase or "no error message"


def _seg(value: str) -> str:
    """One URL path segment: scenario names and instance ids may hold '/' or ':'."""
    return quote(value, safe="")


def _reason(exc: Exception) -> str:
    return _one_line(str(exc)) or type(exc).__name__


def _one_line(text: str) -> str:
    return " ".join(text.split())
