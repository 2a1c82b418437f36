"""Registry client for an orchestrator's embedded store over HTTP (its /registry routes, see
registry_routes). Used by instances and gateways of a single-host deployment.

Lifecycle:
1. `HttpRegistry(url)` opens a session (RegistryError when the orchestrator does not answer
   within `timeout_s`) and starts the heartbeat thread, which touches the session every third of
   its timeout; when the session has expired (orchestrator restarted, long pause) it opens a new
   one and re-creates this client's ephemeral nodes;
2. each `watch` runs a long-poll thread: callback once at start, then after every change, and
   again after the orchestrator comes back from an outage (it may have missed changes);
3. `close()` stops the threads and deletes the session (its ephemeral nodes vanish).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import httpx

from pd_serve.orchestrator.registry import Cancel, Json, RegistryError, check_path

log = logging.getLogger(__name__)


class HttpRegistry:
    def __init__(self, url: str, *, session_timeout_s: float = 6.0, timeout_s: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self.session_timeout_s = session_timeout_s
        self._http = httpx.Client(base_url=f"{self.url}/registry", timeout=timeout_s)
        self._lock = threading.Lock()
        self._own: dict[str, Json] = {}  # this client's ephemeral nodes, re-created on expiry
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sid = self._open()
        self._spawn(self._heartbeat, "registry-heartbeat")

    # -- plumbing ---------------------------------------------------------------------------

    def _call(self, method: str, route: str, **kw: Any) -> httpx.Response:
        if self._http.is_closed:
            raise RegistryError(f"registry client of {self.url} is closed")
        try:
            r = self._http.request(method, route, **kw)
        except httpx.HTTPError as exc:
            raise RegistryError(f"registry at {self.url} unreachable: {exc}") from exc
        except RuntimeError as exc:  # closed by another thread meanwhile
            raise RegistryError(f"registry client of {self.url} is closed") from exc
        if r.status_code >= 400 and r.status_code not in (404, 410):
            raise RegistryError(f"registry at {self.url}: {r.status_code} {_message(r)}")
        return r

    def _open(self) -> str:
        r = self._call("POST", "/sessions", json={"ttl_s": self.session_timeout_s})
        return str(r.json()["session"])

    def _spawn(self, fn: Callable[[], None], name: str) -> threading.Thread:
        t = threading.Thread(target=fn, name=name, daemon=True)
        t.start()
        self._threads.append(t)
        return t

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.session_timeout_s / 3):
            try:
                if self._call("POST", f"/sessions/{self._sid}/touch").status_code == 410:
                    self._renew()
            except RegistryError as exc:
                log.warning("registry heartbeat failed: %s", exc)

    def _renew(self) -> None:
        """New session after expiry; this client's ephemeral nodes come back."""
        sid = self._open()
        with self._lock:
            self._sid = sid
            own = dict(self._own)
        log.warning("registry session expired; new session, re-creating %d node(s)", len(own))
        for path, value in own.items():
            self._put(path, value, True)

    def _put(self, path: str, value: Json, ephemeral: bool) -> None:
        params = {"path": path, "session": self._sid, "ephemeral": str(ephemeral).lower()}
        r = self._call("PUT", "/node", params=params, json=value)
        if r.status_code == 410:
            self._renew()
            params["session"] = self._sid
            if self._call("PUT", "/node", params=params, json=value).status_code >= 400:
                raise RegistryError(f"registry at {self.url} refused {path}")

    # -- Registry ---------------------------------------------------------------------------

    def put(self, path: str, value: Json, *, ephemeral: bool = False) -> None:
        check_path(path)
        with self._lock:
            if ephemeral:
                self._own[path] = dict(value)
            else:
                self._own.pop(path, None)
        self._put(path, dict(value), ephemeral)

    def get(self, path: str) -> Json | None:
        r = self._call("GET", "/node", params={"path": check_path(path)})
        return None if r.status_code == 404 else dict(r.json()["value"])

    def children(self, path: str) -> list[str]:
        r = self._call("GET", "/children", params={"path": check_path(path)})
        return list(r.json()["children"])

    def delete(self, path: str) -> None:
        check_path(path)
        with self._lock:
            for p in [p for p in self._own if p == path or p.startswith(path + "/")]:
                del self._own[p]
        self._call("DELETE", "/node", params={"path": path})

    def watch(self, path: str, callback: Callable[[], None]) -> Cancel:
        check_path(path)
        cancelled = threading.Event()

        def loop() -> None:
            since, fresh = -1, True
            while not (cancelled.is_set() or self._stop.is_set()):
                try:
                    r = self._call("GET", "/wait", params={"path": path, "since": since,
                                                           "timeout_s": 3.0},
                                   timeout=httpx.Timeout(15.0))
                    version = int(r.json()["version"])
                except (RegistryError, ValueError, KeyError) as exc:
                    log.debug("registry watch on %s: %s", path, exc)
                    fresh = True  # changes may be missed while the orchestrator is away
                    if cancelled.wait(0.5):
                        return
                    continue
                if (version != since or fresh) and not cancelled.is_set():
                    since, fresh = version, False
                    _safe(callback, path)

        self._spawn(loop, f"registry-watch{path}")
        return cancelled.set

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        try:
            self._call("DELETE", f"/sessions/{self._sid}")
        except RegistryError:
            pass
        self._http.close()


def _safe(callback: Callable[[], None], path: str) -> None:
    try:
        callback()
    except Exception:  # a watcher's bug must not end the watch
        log.exception("registry watch callback on %s failed", path)


def _message(r: httpx.Response) -> str:
    try:
        return str(r.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return r.text[:200]
