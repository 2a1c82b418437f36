"""Contract tests of the Registry semantics (pd_serve.orchestrator.registry) for the embedded
store, for HttpRegistry against the store served over the orchestrator's /registry routes, and
for ZkRegistry against a real ZooKeeper server (tests/zk_server.py)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI

from pd_serve.api.errors import install_error_handlers
from pd_serve.orchestrator.embedded import EmbeddedStore
from pd_serve.orchestrator.http_registry import HttpRegistry
from pd_serve.orchestrator.registry import Json, Registry, RegistryError
from pd_serve.orchestrator.registry_routes import registry_router
from pd_serve.orchestrator.zk_registry import ZkRegistry, parse_zk_url
from tests.fake_orchestrator import Served
from tests.zk_server import ZkServer, expire_session, free_port

REPO = Path(__file__).resolve().parents[2]
SESSION_S = 2.0  # ZooKeeper session timeout of the test clients (server minimum: 1 s)
WAIT_S = 10.0  # upper bound of every eventually(); they return as soon as it holds
QUIET_S = 0.5  # how long "no callback" is watched for


def eventually(check: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


class Recorder:
    """A watch callback that records `snapshot()` (the reader's re-read) on every call."""

    def __init__(self, snapshot: Callable[[], Any], delay_s: float = 0.0) -> None:
        self.snapshot = snapshot
        self.delay_s = delay_s
        self.seen: list[Any] = []
        self.lock = threading.Lock()

    def __call__(self) -> None:
        value = self.snapshot()
        with self.lock:
            self.seen.append(value)
        time.sleep(self.delay_s)

    @property
    def count(self) -> int:
        with self.lock:
            return len(self.seen)

    def wait_for(self, expected: Any, after: int = 0) -> None:
        """Until a call numbered >= `after` saw `expected`."""
        eventually(lambda: expected in self.seen[after:])


@dataclass
class Backend:
    name: str
    make: Callable[..., Registry]  # make(session_timeout_s=..., timeout_s=...) -> a new client
    dead_session_put: Callable[[str, Json], None]  # ephemeral node of a session that goes silent
    clients: list[Registry] = field(default_factory=list)

    def client(self, **kwargs: float) -> Registry:
        reg = self.make(**kwargs)
        self.clients.append(reg)
        return reg


def _silent_zk_put(url: str) -> Callable[[str, Json], None]:
    script = ("import sys, time\nfrom pd_serve.orchestrator.zk_registry import ZkRegistry\n"
              f"r = ZkRegistry(sys.argv[1], session_timeout_s={SESSION_S})\n"
              "r.put(sys.argv[2], {'pid': 1}, ephemeral=True)\nprint('ready', flush=True)\n"
              "time.sleep(60)\n")

    def put(path: str, value: Json) -> None:  # a process that dies without closing its session
        proc = subprocess.Popen([sys.executable, "-c", script, url, path], cwd=REPO,
                                stdout=subprocess.PIPE)
        try:
            assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        finally:
            proc.kill()
            proc.wait()

    return put


def _zk(server: ZkServer) -> Backend:
    url = server.url(f"/t{uuid.uuid4().hex[:12]}")  # each test in its own chroot

    def make(session_timeout_s: float = SESSION_S, timeout_s: float = 3.0) -> Registry:
        return ZkRegistry(url, session_timeout_s=session_timeout_s, timeout_s=timeout_s)

    return Backend("zk", make, _silent_zk_put(url))


def _http(store: EmbeddedStore, served: Served) -> Backend:
    """HttpRegistry clients of the store served by an orchestrator's /registry routes."""

    def make(session_timeout_s: float = SESSION_S, timeout_s: float = 3.0) -> Registry:
        return HttpRegistry(served.url, session_timeout_s=session_timeout_s, timeout_s=timeout_s)

    def silent_put(path: str, value: Json) -> None:
        store.put(store.open_session(0.3), path, value, True)

    return Backend("http", make, silent_put)


@pytest.fixture(params=["embedded", "http", pytest.param("zk", marks=pytest.mark.e2e)])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    store = EmbeddedStore(session_timeout_s=SESSION_S)
    served = None
    if request.param == "embedded":

        def silent_put(path: str, value: Json) -> None:
            store.put(store.open_session(0.3), path, value, True)

        b = Backend("embedded", lambda **_: store.client(), silent_put)
    elif request.param == "http":
        app = FastAPI()
        install_error_handlers(app)
        app.include_router(registry_router(store))
        served = Served(app).start()
        b = _http(store, served)
    else:
        b = _zk(request.getfixturevalue("zk_server"))
    yield b
    for reg in b.clients:
        reg.close()
    if served is not None:
        served.stop()
    store.shutdown()


@pytest.fixture
def zk_backend(zk_server: ZkServer) -> Iterator[Backend]:
    b = _zk(zk_server)
    yield b
    for reg in b.clients:
        reg.close()


def test_put_get_overwrite(backend: Backend) -> None:
    reg = backend.client()
    assert reg.get("/a/b") is None
    value = {"n": 1, "nested": {"list": [1, "x", None, True], "f": 0.5}}
    reg.put("/a/b", value)
    got = reg.get("/a/b")
    assert got == value
    assert got is not None and got is not value
    got["n"] = 99  # callers own what they get
    assert reg.get("/a/b") == value
    reg.put("/a/b", {"n": 2})
    assert reg.get("/a/b") == {"n": 2}
    assert backend.client().get("/a/b") == {"n": 2}  # another client sees it


def test_values_are_json(backend: Backend) -> None:
    reg = backend.client()
    reg.put("/j", {"t": (1, 2), "k": {1: "one"}})
    assert reg.get("/j") == {"t": [1, 2], "k": {"1": "one"}}
    with pytest.raises((TypeError, ValueError)):
        reg.put("/j", {"x": object()})


def test_children(backend: Backend) -> None:
    reg = backend.client()
    for path in ("/c/x", "/c/b", "/c/a/deep/er", "/cc/y"):
        reg.put(path, {})
    assert reg.children("/c") == ["a", "b", "x"]
    assert reg.children("/c/a") == ["deep"]
    assert reg.children("/c/x") == []
    assert reg.children("/missing") == []


def test_delete_is_recursive_and_quiet(backend: Backend) -> None:
    reg = backend.client()
    for path in ("/d", "/d/x", "/d/x/y", "/d/z", "/dd", "/d2/x"):
        reg.put(path, {"p": path})
    reg.delete("/d")
    for path in ("/d", "/d/x", "/d/x/y", "/d/z"):
        assert reg.get(path) is None
    assert reg.children("/d") == []
    assert reg.get("/dd") == {"p": "/dd"} and reg.get("/d2/x") == {"p": "/d2/x"}
    reg.delete("/d")
    reg.delete("/never/was")


@pytest.mark.parametrize("path", ["a", "", "/", "/a/", "/a//b", "/a/./b", "/a/../b"])
def test_bad_paths_raise_value_error(backend: Backend, path: str) -> None:
    reg = backend.client()
    calls: list[Callable[[], object]] = [
        lambda: reg.put(path, {}), lambda: reg.get(path), lambda: reg.children(path),
        lambda: reg.delete(path), lambda: reg.watch(path, lambda: None)]
    for call in calls:
        with pytest.raises(ValueError):
            call()


def test_ephemeral_nodes_vanish_on_close(backend: Backend) -> None:
    owner, other = backend.client(), backend.client()
    owner.put("/e/eph", {"v": 1}, ephemeral=True)
    owner.put("/e/eph", {"v": 2}, ephemeral=True)
    owner.put("/e/kept", {"v": 1})
    owner.put("/e/was-eph", {"v": 1}, ephemeral=True)
    owner.put("/e/was-eph", {"v": 2})  # now persistent
    owner.put("/e/now-eph", {"v": 1})
    owner.put("/e/now-eph", {"v": 2}, ephemeral=True)
    assert other.get("/e/eph") == {"v": 2}
    owner.close()
    owner.close()  # idempotent
    assert other.get("/e/eph") is None and other.get("/e/now-eph") is None
    assert other.get("/e/kept") == {"v": 1} and other.get("/e/was-eph") == {"v": 2}
    assert other.children("/e") == ["kept", "was-eph"]
    with pytest.raises(RegistryError):
        owner.put("/e/late", {})


def test_ephemeral_node_vanishes_when_its_session_goes_silent(backend: Backend) -> None:
    reg = backend.client()
    backend.dead_session_put("/inst/dead", {"pid": 1})
    assert reg.get("/inst/dead") is not None
    eventually(lambda: reg.get("/inst/dead") is None, SESSION_S + 5.0)


def test_watch_fires_for_changes_at_or_under_path(backend: Backend) -> None:
    reg, writer = backend.client(), backend.client()
    rec = Recorder(lambda: (reg.get("/w"), reg.get("/w/a"), reg.children("/w")))
    reg.watch("/w", rec)
    rec.wait_for((None, None, []))  # the first call, soon after watch()
    steps: list[tuple[Callable[[], None], Any]] = [
        (lambda: writer.put("/w/a", {"v": 1}), (None, {"v": 1}, ["a"])),
        (lambda: writer.put("/w/a", {"v": 2}), (None, {"v": 2}, ["a"])),
        (lambda: writer.put("/w", {"root": 1}), ({"root": 1}, {"v": 2}, ["a"])),
        (lambda: writer.put("/w/a/b/c", {}), ({"root": 1}, {"v": 2}, ["a"])),
        (lambda: writer.put("/w/b", {}, ephemeral=True), ({"root": 1}, {"v": 2}, ["a", "b"])),
        (lambda: writer.delete("/w/a"), ({"root": 1}, None, ["b"])),
        (lambda: writer.put("/w/a", {"v": 3}), ({"root": 1}, {"v": 3}, ["a", "b"])),
    ]
    for change, expected in steps:
        mark = rec.count
        change()
        rec.wait_for(expected, after=mark)
    mark = rec.count
    writer.put("/w/a/b/c", {"deep": 1})  # a change the snapshot does not show still calls
    eventually(lambda: rec.count > mark)


def test_watch_ignores_siblings(backend: Backend) -> None:
    reg, writer = backend.client(), backend.client()
    writer.put("/s/watched/x", {})
    rec = Recorder(lambda: reg.children("/s/watched"))
    reg.watch("/s/watched", rec)
    rec.wait_for(["x"])
    time.sleep(QUIET_S)
    mark = rec.count
    writer.put("/s/watched2", {})
    writer.put("/s/watchedx/y", {})
    writer.put("/s/other", {})
    writer.put("/s", {"parent": 1})
    writer.delete("/s/other")
    time.sleep(QUIET_S)
    assert rec.count == mark


def test_watch_on_missing_path_and_its_recreation(backend: Backend) -> None:
    reg, writer = backend.client(), backend.client()
    rec = Recorder(lambda: reg.children("/m/n"))
    reg.watch("/m/n", rec)
    rec.wait_for([])
    mark = rec.count
    writer.put("/m/n/x/y", {})
    rec.wait_for(["x"], after=mark)
    mark = rec.count
    writer.delete("/m")
    rec.wait_for([], after=mark)
    mark = rec.count
    writer.put("/m/n/z", {})
    rec.wait_for(["z"], after=mark)


def test_watch_coalesces_bursts(backend: Backend) -> None:
    reg, writer = backend.client(), backend.client()
    rec = Recorder(lambda: reg.get("/b/counter"), delay_s=0.2)
    reg.watch("/b", rec)
    rec.wait_for(None)
    mark = rec.count
    for i in range(40):
        writer.put("/b/counter", {"i": i})
    rec.wait_for({"i": 39}, after=mark)
    time.sleep(QUIET_S)
    assert 1 <= rec.count - mark <= 10, rec.seen


def test_watch_cancel_close_and_failing_callbacks(backend: Backend) -> None:
    reg, writer = backend.client(), backend.client()
    rec, cancelled, closed = (Recorder(lambda: reg.get("/c/x")) for _ in range(3))

    def failing() -> None:
        raise RuntimeError("a watcher's bug")

    reg.watch("/c", failing)
    reg.watch("/c", rec)
    cancel = reg.watch("/c", cancelled)
    closer = backend.client()
    closer.watch("/c", closed)
    for r in (rec, cancelled, closed):
        r.wait_for(None)
    cancel()
    cancel()  # idempotent
    closer.close()
    time.sleep(QUIET_S)
    counts = cancelled.count, closed.count
    writer.put("/c/x", {"v": 1})
    rec.wait_for({"v": 1})  # the failing callback stops nothing
    writer.put("/c/x", {"v": 2})
    rec.wait_for({"v": 2})
    time.sleep(QUIET_S)
    assert (cancelled.count, closed.count) == counts


def test_concurrent_writers(backend: Backend) -> None:
    regs = [backend.client() for _ in range(2)]

    def write(k: int) -> None:
        for i in range(10):
            regs[k % 2].put(f"/t/{k}/{i}", {"k": k, "i": i}, ephemeral=bool(i % 2))

    threads = [threading.Thread(target=write, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert regs[0].children("/t") == [str(k) for k in range(6)]
    for k in range(6):
        assert regs[1].children(f"/t/{k}") == sorted(str(i) for i in range(10))
        assert regs[1].get(f"/t/{k}/9") == {"k": k, "i": 9}


# -- ZooKeeper only ---------------------------------------------------------------------------


@pytest.mark.e2e
def test_zk_session_expiry_recreates_own_ephemerals(zk_server: ZkServer,
                                                    zk_backend: Backend) -> None:
    owner, other = zk_backend.client(), zk_backend.client()
    assert isinstance(owner, ZkRegistry)
    owner.put("/i/a", {"v": 1}, ephemeral=True)
    owner.put("/i/a", {"v": 2}, ephemeral=True)
    owner.put("/i/gone", {"v": 1}, ephemeral=True)
    owner.delete("/i/gone")  # deleted: not re-created
    rec = Recorder(lambda: owner.children("/w"))
    owner.watch("/w", rec)
    rec.wait_for([])
    zk = owner._client
    old_session, _ = zk.client_id
    old_czxid = zk.exists(f"{owner._chroot}/i/a").czxid
    expire_session(zk_server.hosts, zk.client_id)
    eventually(lambda: zk.client_id is not None and zk.client_id[0] != old_session)
    new_session = zk.client_id[0]

    def recreated() -> bool:
        stat = zk.exists(f"{owner._chroot}/i/a")
        return stat is not None and stat.ephemeralOwner == new_session

    eventually(recreated)
    assert zk.exists(f"{owner._chroot}/i/a").czxid != old_czxid  # deleted, then re-created
    assert other.get("/i/a") == {"v": 2} and other.children("/i") == ["a"]
    mark = rec.count
    other.put("/w/x", {})  # the owner's watch works in its new session
    rec.wait_for(["x"], after=mark)
    owner.close()
    assert other.get("/i/a") is None


@pytest.mark.e2e
def test_zk_restart_keeps_nodes_sessions_and_watches(zk_server: ZkServer,
                                                     zk_backend: Backend) -> None:
    writer = zk_backend.client(session_timeout_s=6.0)
    reader = zk_backend.client(session_timeout_s=6.0, timeout_s=1.0)
    writer.put("/p/x", {"v": 1})
    writer.put("/live/w", {"v": 1}, ephemeral=True)
    rec = Recorder(lambda: reader.get("/p/x"))
    reader.watch("/p", rec)
    rec.wait_for({"v": 1})
    zk_server.stop()
    try:
        start = time.monotonic()
        with pytest.raises(RegistryError, match=zk_server.hosts):
            reader.get("/p/x")
        with pytest.raises(RegistryError):
            reader.put("/p/y", {})
        assert time.monotonic() - start < 5.0
    finally:
        zk_server.start()
    eventually(lambda: _quiet_get(reader, "/p/x") == {"v": 1})
    assert reader.get("/live/w") == {"v": 1}  # the writer's session survived the restart
    mark = rec.count
    writer.put("/p/x", {"v": 2})
    rec.wait_for({"v": 2}, after=mark)


def _quiet_get(reg: Registry, path: str) -> Json | None:
    try:
        return reg.get(path)
    except RegistryError:
        return None


@pytest.mark.e2e
def test_zk_chroot_is_created_and_scopes_paths(zk_server: ZkServer, zk_backend: Backend) -> None:
    reg = zk_backend.client()
    assert isinstance(reg, ZkRegistry)
    reg.put("/x", {"v": 1})
    top = ZkRegistry(zk_server.url(), session_timeout_s=SESSION_S)
    zk_backend.clients.append(top)
    assert top.get(f"{reg._chroot}/x") == {"v": 1}
    assert top.children(reg._chroot) == ["x"]
    reg._client.create(f"{reg._chroot}/raw", b"\xffnot json")
    with pytest.raises(RegistryError, match="JSON"):
        reg.get("/raw")


def test_zk_unreachable_server_raises_registry_error() -> None:
    port = free_port()
    start = time.monotonic()
    with pytest.raises(RegistryError, match=f"127.0.0.1:{port}"):
        ZkRegistry(f"zk://127.0.0.1:{port}/x", session_timeout_s=SESSION_S, timeout_s=0.5)
    assert time.monotonic() - start < 5.0


def test_parse_zk_url() -> None:
    assert parse_zk_url("zk://h:2181") == ("h:2181", "")
    assert parse_zk_url("zk://a:1,b.c:2,[::1]:3/pd/x") == ("a:1,b.c:2,[::1]:3", "/pd/x")
    for bad in ["", "zk://", "zk:///x", "zk://h", "zk://h:", "zk://h:0", "zk://h:70000",
                "zk://h:1,", "zk://h:x", "zk://h:1/", "zk://h:1//x", "zk://h:1/a/", "http://h:1",
                "zk://h:1?x=1", "zk://us er:1"]:
        with pytest.raises(ValueError):
            parse_zk_url(bad)
