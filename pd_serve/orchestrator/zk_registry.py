"""The ZooKeeper registry: the semantics of pd_serve.orchestrator.registry on Apache ZooKeeper
through kazoo, for `zk://HOST:PORT[,HOST:PORT...][/CHROOT]`.

Lifecycle:
1. `ZkRegistry(url, ...)` parses the url, connects (RegistryError naming the hosts after
   `timeout_s`) and creates the chroot when missing; a state listener tracks the connection and
   the session id, and only sets flags (it runs on kazoo's connection thread);
2. `put`/`get`/`children`/`delete` wait up to `timeout_s` for a connection, then run kazoo's
   async calls bounded by `timeout_s`; every kazoo failure becomes RegistryError;
3. one dispatcher thread keeps the subtree watches armed (ZooKeeper watches fire once and kazoo
   drops them all when the connection drops) and calls the callbacks, coalesced; after each
   reconnection it re-arms every watch and calls it, and after a new session it first re-creates
   this client's ephemeral nodes with their last values;
4. `close()` cancels the watches, ends the session (its ephemeral nodes vanish) and stops the
   dispatcher; idempotent.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from kazoo.client import KazooClient
from kazoo.exceptions import (
    AuthFailedError,
    ConnectionClosedError,
    ConnectionDropped,
    ConnectionLoss,
    KazooException,
    NoAuthError,
    NoChildrenForEphemeralsError,
    NodeExistsError,
    NoNodeError,
    NotEmptyError,
    SessionExpiredError,
    ZookeeperStoppedError,
)
from kazoo.handlers.threading import KazooTimeoutError
from kazoo.protocol.states import EventType, KazooState, WatchedEvent
from kazoo.retry import KazooRetry

from pd_serve.orchestrator.registry import Cancel, Json, RegistryError, check_path

log = logging.getLogger(__name__)

URL_FORM = "zk://HOST:PORT[,HOST:PORT...][/CHROOT]"
_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):([0-9]{1,5})$")
_RETRY_S = 0.5  # pause before re-arming a watch or re-creating nodes after a failure
_MAX_DATA = 1_000_000  # ZooKeeper's jute.maxbuffer (1 MiB) bounds a node's data
_ATTEMPTS = 5  # put/delete retries when racing other writers


def parse_zk_url(url: str) -> tuple[str, str]:
    """(kazoo host list 'h:p,h:p', chroot or '') of a zk:// url; ValueError when malformed."""
    if not isinstance(url, str) or not url.startswith("zk://"):
        raise ValueError(f"registry url must look like {URL_FORM}, got {url!r}")
    hosts, slash, rest = url[len("zk://"):].partition("/")
    if not hosts:
        raise ValueError(f"registry url {url!r} names no host; expected {URL_FORM}")
    for host_port in hosts.split(","):
        m = _HOST_PORT.match(host_port)
        if m is None or not 0 < int(m.group(2)) < 65536:
            raise ValueError(f"registry url {url!r}: {host_port!r} is not HOST:PORT with a port "
                             f"in 1-65535; expected {URL_FORM}")
    chroot = slash + rest
    if chroot:
        try:
            check_path(chroot)
        except ValueError as e:
            raise ValueError(f"registry url {url!r} has a bad chroot: {e}") from None
    return hosts, chroot


@dataclass(eq=False)
class _Watch:
    """One subtree watch; the object itself is the kazoo watcher (hashed by identity, so kazoo
    keeps one registration per node however often it is armed)."""

    root: str  # full ZooKeeper path (chroot included)
    callback: Callable[[], None]
    sink: Callable[[_Watch, WatchedEvent], None]  # runs on kazoo's event thread
    events: list[WatchedEvent] = field(default_factory=list)
    known: set[str] = field(default_factory=set)  # existing armed nodes (dispatcher thread only)
    full: bool = True  # (re-)arm the whole subtree
    retry_at: float = 0.0  # not before (monotonic); inf: wait for the next connection
    pending: bool = True  # call the callback
    cancelled: bool = False

    def __call__(self, event: WatchedEvent) -> None:
        self.sink(self, event)


def _covers(top: str, path: str) -> bool:
    return path == top or path.startswith(top + "/")


def _reason(e: BaseException, hosts: str, timeout_s: float) -> str:
    if isinstance(e, KazooTimeoutError):
        return f"no answer from ZooKeeper at {hosts} within {timeout_s:g} s"
    if isinstance(e, ConnectionClosedError | ZookeeperStoppedError):
        return "the registry client is closed"
    if isinstance(e, ConnectionLoss | ConnectionDropped):
        return f"connection to ZooKeeper at {hosts} lost"
    if isinstance(e, SessionExpiredError):
        return f"ZooKeeper session at {hosts} expired"
    if isinstance(e, NoAuthError):
        return "ZooKeeper refused it: no permission (ACL)"
    if isinstance(e, AuthFailedError):
        return f"authentication to ZooKeeper at {hosts} failed"
    if isinstance(e, NoChildrenForEphemeralsError):
        return "a parent is an ephemeral node, and ZooKeeper ephemeral nodes have no children"
    if isinstance(e, NotEmptyError):
        return "the node has children, so it cannot be replaced by an ephemeral node"
    return f"ZooKeeper error {type(e).__name__}: {e}"


class ZkRegistry:
    """Registry on ZooKeeper (see the module docstring); thread-safe."""

    def __init__(self, url: str, *, session_timeout_s: float = 6.0,
                 timeout_s: float = 5.0) -> None:
        self._hosts, self._chroot = parse_zk_url(url)
        if session_timeout_s <= 0 or timeout_s <= 0:
            raise ValueError(f"registry: session_timeout_s and timeout_s must be > 0, got "
                             f"{session_timeout_s} and {timeout_s}")
        self._timeout_s = timeout_s
        self._cond = threading.Condition()
        self._connected = threading.Event()
        self._session_id: int | None = None
        self._watches: list[_Watch] = []
        self._write_lock = threading.RLock()  # orders puts/deletes with ephemeral re-creation
        self._own: dict[str, bytes] = {}  # this client's ephemeral nodes -> last data
        self._recreate_due = False
        self._recreate_at = 0.0
        self._closed = False
        # Reconnect quickly after an outage: kazoo's default backoff grows to an hour.
        retry = KazooRetry(max_tries=-1, delay=0.1, backoff=2, max_delay=1.0)
        self._client = KazooClient(hosts=self._hosts, timeout=session_timeout_s,
                                   connection_retry=retry)
        self._client.add_listener(self._on_state)
        try:
            self._client.start(timeout=timeout_s)  # stops and closes itself on failure
        except KazooTimeoutError:
            raise RegistryError(f"registry: no ZooKeeper answered at {self._hosts} within "
                                f"{timeout_s:g} s") from None
        try:
            if self._chroot:
                with self._errors("create chroot", self._chroot):
                    self._wait(self._client.ensure_path_async(self._chroot))
        except RegistryError:
            self._client.stop()
            self._client.close()
            raise
        self._dispatcher = threading.Thread(target=self._dispatch, name="zk-registry-watch",
                                            daemon=True)
        self._dispatcher.start()

    # -- data -------------------------------------------------------------------------------

    def put(self, path: str, value: Json, *, ephemeral: bool = False) -> None:
        zpath = self._chroot + check_path(path)
        try:
            data = json.dumps(dict(value), separators=(",", ":"), allow_nan=False).encode()
        except (TypeError, ValueError) as e:
            raise ValueError(f"registry value for {path} is not a JSON object: {e}") from None
        if len(data) > _MAX_DATA:
            raise RegistryError(f"registry put {path}: {len(data)} bytes exceed ZooKeeper's "
                                f"node limit of {_MAX_DATA}")
        with self._write_lock:
            self._put_locked(path, zpath, data, ephemeral)
            if ephemeral:
                self._own[path] = data
            else:
                self._own.pop(path, None)

    def _put_locked(self, path: str, zpath: str, data: bytes, ephemeral: bool) -> None:
        client = self._client
        with self._errors("put", path):
            for _ in range(_ATTEMPTS):
                try:
                    stat = self._wait(client.exists_async(zpath))
                    if stat is None:
                        self._wait(client.create_async(zpath, data, ephemeral=ephemeral,
                                                       makepath=True))
                        return
                    owner = stat.ephemeralOwner
                    if (owner != 0) == ephemeral and (not owner or owner == self._live_session()):
                        self._wait(client.set_async(zpath, data))
                        return
                    self._wait(client.delete_async(zpath))  # other ephemerality or owner
                except (NoNodeError, NodeExistsError):
                    continue  # raced with another writer: look again
        raise RegistryError(f"registry put {path}: the node kept changing under other writers")

    def get(self, path: str) -> Json | None:
        zpath = self._chroot + check_path(path)
        with self._errors("get", path):
            try:
                data, _ = self._wait(self._client.get_async(zpath))
            except NoNodeError:
                return None
        if not data:  # a parent that only kazoo's makepath created
            return None
        try:
            value = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise RegistryError(f"registry node {path} does not hold utf-8 JSON") from None
        if not isinstance(value, dict):
            raise RegistryError(f"registry node {path} holds JSON that is not an object")
        return value

    def children(self, path: str) -> list[str]:
        zpath = self._chroot + check_path(path)
        with self._errors("children", path):
            try:
                return sorted(self._wait(self._client.get_children_async(zpath)))
            except NoNodeError:
                return []

    def delete(self, path: str) -> None:
        zpath = self._chroot + check_path(path)
        with self._write_lock:
            for own in [p for p in self._own if _covers(path, p)]:
                del self._own[own]
            with self._errors("delete", path):
                self._delete_tree(path, zpath)

    def _delete_tree(self, path: str, zpath: str) -> None:
        for _ in range(_ATTEMPTS):
            try:
                names = self._wait(self._client.get_children_async(zpath))
                for name in names:
                    self._delete_tree(path, f"{zpath}/{name}")
                self._wait(self._client.delete_async(zpath))
                return
            except NoNodeError:
                return
            except NotEmptyError:
                continue  # a child appeared meanwhile
        raise RegistryError(f"registry delete {path}: children kept appearing under {zpath}")

    # -- plumbing ---------------------------------------------------------------------------

    def _wait(self, async_result: Any) -> Any:
        return async_result.get(timeout=self._timeout_s)

    def _live_session(self) -> int | None:
        client_id = self._client.client_id
        return client_id[0] if client_id else None

    @contextmanager
    def _errors(self, op: str, path: str) -> Iterator[None]:
        """Waits for a connection, then turns kazoo failures into RegistryError."""
        if self._closed:
            raise RegistryError(f"registry {op} {path}: the registry client is closed")
        if not self._connected.wait(self._timeout_s):
            raise RegistryError(f"registry {op} {path}: not connected to ZooKeeper at "
                                f"{self._hosts} (waited {self._timeout_s:g} s)")
        try:
            yield
        except (KazooException, KazooTimeoutError) as e:
            raise RegistryError(f"registry {op} {path}: "
                                f"{_reason(e, self._hosts, self._timeout_s)}") from e

    def _on_state(self, state: str) -> None:
        """kazoo's connection thread: record the state, never block."""
        with self._cond:
            if state != KazooState.CONNECTED:
                self._connected.clear()
                return
            session = self._live_session()
            if self._session_id is not None and session != self._session_id:
                self._recreate_due, self._recreate_at = True, 0.0
            self._session_id = session
            for w in self._watches:  # kazoo dropped every watch with the connection
                w.full, w.retry_at = True, 0.0
            self._connected.set()
            self._cond.notify_all()

    # -- watches ----------------------------------------------------------------------------

    def watch(self, path: str, callback: Callable[[], None]) -> Cancel:
        w = _Watch(self._chroot + check_path(path), callback, self._on_event)
        with self._cond:
            if self._closed:
                raise RegistryError(f"registry watch {path}: the registry client is closed")
            self._watches.append(w)
            self._cond.notify_all()

        def cancel() -> None:
            with self._cond:
                w.cancelled = True
                if w in self._watches:
                    self._watches.remove(w)

        return cancel

    def _on_event(self, w: _Watch, event: WatchedEvent) -> None:
        """kazoo's event thread: queue the event for the dispatcher."""
        if event.type == EventType.NONE:
            return  # the connection dropped; _on_state re-arms on reconnection
        with self._cond:
            if not w.cancelled:
                w.events.append(event)
                self._cond.notify_all()

    def _due(self, w: _Watch, now: float) -> bool:
        return w.pending or bool(w.events) or (w.full and now >= w.retry_at)

    def _work_ready(self) -> bool:
        now = time.monotonic()
        if self._recreate_due and now >= self._recreate_at and self._connected.is_set():
            return True
        return any(self._due(w, now) for w in self._watches)

    def _dispatch(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._work_ready():
                    self._cond.wait(_RETRY_S)
                if self._closed:
                    return
                now = time.monotonic()
                recreate = self._recreate_due and now >= self._recreate_at
                self._recreate_due = self._recreate_due and not recreate
                batch = []
                for w in self._watches:
                    if self._due(w, now):
                        full = w.full and now >= w.retry_at
                        w.full = w.full and not full
                        batch.append((w, full, w.events))
                        w.events = []
            if recreate:
                self._recreate_ephemerals()
            for w, full, events in batch:
                self._rearm(w, full, events)
            for w, _, _ in batch:
                self._fire(w)

    def _rearm(self, w: _Watch, full: bool, events: list[WatchedEvent]) -> None:
        try:
            if not self._connected.is_set():
                raise ConnectionLoss("not connected")
            if full:
                self._arm_subtree(w, w.root)
            elif not w.full:  # with a full re-arm waiting, events need no handling
                for event in events:
                    self._handle(w, event)
        except (KazooException, KazooTimeoutError) as e:
            log.debug("registry: re-arming the watch on %s failed: %r", w.root, e)
            with self._cond:
                w.full = True
                w.retry_at = (time.monotonic() + _RETRY_S if self._connected.is_set()
                              else math.inf)
            return
        if full or events:
            with self._cond:
                w.pending = True

    def _handle(self, w: _Watch, event: WatchedEvent) -> None:
        path = event.path
        if event.type == EventType.CHANGED:  # data watches fire once: set it again
            self._wait(self._client.exists_async(path, watch=w))
        elif event.type == EventType.CHILD:
            try:
                names = self._wait(self._client.get_children_async(path, watch=w))
            except NoNodeError:
                return  # deleted meanwhile: its DELETED event follows
            for name in names:
                if f"{path}/{name}" not in w.known:
                    self._arm_subtree(w, f"{path}/{name}")
        elif event.type == EventType.DELETED:
            w.known.difference_update([p for p in w.known if _covers(path, p)])
            if path == w.root:  # watch for its re-creation
                self._arm_subtree(w, path)
        elif event.type == EventType.CREATED:
            self._arm_subtree(w, path)

    def _arm_subtree(self, w: _Watch, top: str) -> None:
        """Sets a data and a child watch on every node at or under `top`, a level at a time."""
        w.known.difference_update([p for p in w.known if _covers(top, p)])
        level = [top]
        while level:
            calls = [(p, self._client.exists_async(p, watch=w),
                      self._client.get_children_async(p, watch=w)) for p in level]
            level = []
            for path, exists, children in calls:
                stat = self._wait(exists)
                try:
                    names = self._wait(children)
                except NoNodeError:
                    continue
                if stat is not None:
                    w.known.add(path)
                    level.extend(f"{path}/{name}" for name in names)

    def _fire(self, w: _Watch) -> None:
        with self._cond:
            if not w.pending or w.cancelled:
                return
            w.pending = False
        try:
            w.callback()
        except Exception:  # a watcher's bug must not stop the others
            log.exception("registry watch on %s failed", w.root)

    def _recreate_ephemerals(self) -> None:
        """After a new session: write this client's ephemeral nodes again (latest values)."""
        with self._write_lock:
            paths = list(self._own)
        for path in paths:
            with self._write_lock:
                data = self._own.get(path)
                if data is None:
                    continue
                try:
                    self._put_locked(path, self._chroot + path, data, True)
                except RegistryError as e:
                    log.warning("registry: re-creating ephemeral node %s failed: %s", path, e)
                    with self._cond:
                        self._recreate_due = True
                        self._recreate_at = time.monotonic() + _RETRY_S

    # -- lifecycle --------------------------------------------------------------------------

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            for w in self._watches:
                w.cancelled = True
            self._watches.clear()
            self._cond.notify_all()
        try:
            self._client.stop()  # ends the session: its ephemeral nodes vanish
        finally:
            self._client.close()
        if threading.current_thread() is not self._dispatcher:
            self._dispatcher.join(timeout=self._timeout_s + 1.0)
