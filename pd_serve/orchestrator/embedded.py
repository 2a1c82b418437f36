"""The embedded registry: an in-process store with the semantics of pd_serve.orchestrator.registry
(the single-host default; the orchestrator of `pd-serve up` holds it and serves it to the other
processes over HTTP, see http_registry).

Lifecycle:
1. `EmbeddedStore(session_timeout_s)`; `client()` gives an in-process Registry whose session lives
   until `close()`; `open_session(ttl)` gives a remote session id that expires without `touch`;
2. every change bumps the store's version and the subtree versions of the changed path and its
   ancestors; watchers of those subtrees are called (coalesced) on the dispatcher thread, and
   long-polls in `wait_change` wake;
3. `reap()` (called on each access and by the dispatcher every second) ends expired sessions and
   removes their ephemeral nodes; `shutdown()` stops the dispatcher.
"""

from __future__ import annotations

import copy
import itertools
import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from pd_serve.orchestrator.registry import Cancel, Json, RegistryError, check_path


@dataclass
class _Node:
    value: Json
    owner: str | None  # session id of an ephemeral node


@dataclass
class _Session:
    ttl_s: float | None  # None: in-process, lives until closed
    seen: float = field(default_factory=time.monotonic)


@dataclass(eq=False)
class _Watch:
    path: str
    callback: Callable[[], None]
    pending: bool = True
    cancelled: bool = False


class EmbeddedStore:
    def __init__(self, session_timeout_s: float = 6.0) -> None:
        self.session_timeout_s = session_timeout_s
        self._nodes: dict[str, _Node] = {}
        self._sessions: dict[str, _Session] = {}
        self._subtree_version: dict[str, int] = {}
        self._version = itertools.count(1)
        self._cond = threading.Condition()
        self._watches: list[_Watch] = []
        self._stop = False
        self._dispatcher = threading.Thread(target=self._dispatch, name="registry-watch",
                                            daemon=True)
        self._dispatcher.start()

    # -- sessions ---------------------------------------------------------------------------

    def client(self) -> EmbeddedClient:
        return EmbeddedClient(self, self.open_session(None))

    def open_session(self, ttl_s: float | None) -> str:
        sid = uuid.uuid4().hex
        with self._cond:
            self._sessions[sid] = _Session(ttl_s)
        return sid

    def touch(self, sid: str) -> None:
        """RegistryError when the session has expired or never existed."""
        with self._cond:
            self._reap_locked()
            s = self._sessions.get(sid)
            if s is None:
                raise RegistryError(f"registry session {sid[:8]} expired")
            s.seen = time.monotonic()

    def close_session(self, sid: str) -> None:
        with self._cond:
            if self._sessions.pop(sid, None) is not None:
                self._drop_owned_locked(sid)

    def reap(self) -> None:
        with self._cond:
            self._reap_locked()

    def _reap_locked(self) -> None:
        now = time.monotonic()
        dead = [sid for sid, s in self._sessions.items()
                if s.ttl_s is not None and now - s.seen > s.ttl_s]
        for sid in dead:
            del self._sessions[sid]
            self._drop_owned_locked(sid)

    def _drop_owned_locked(self, sid: str) -> None:
        for path in [p for p, n in self._nodes.items() if n.owner == sid]:
            self._delete_locked(path)

    # -- data -------------------------------------------------------------------------------

    def put(self, sid: str, path: str, value: Json, ephemeral: bool) -> None:
        check_path(path)
        data = json.loads(json.dumps(dict(value)))  # JSON semantics, as on the other registries
        with self._cond:
            self._reap_locked()
            if sid not in self._sessions:
                raise RegistryError(f"registry session {sid[:8]} expired")
            self._nodes[path] = _Node(data, sid if ephemeral else None)
            self._changed_locked(path)

    def get(self, path: str) -> Json | None:
        check_path(path)
        with self._cond:
            self._reap_locked()
            node = self._nodes.get(path)
            return copy.deepcopy(node.value) if node is not None else None

    def children(self, path: str) -> list[str]:
        check_path(path)
        prefix = path + "/"
        with self._cond:
            self._reap_locked()
            return sorted({p[len(prefix):].split("/", 1)[0] for p in self._nodes
                           if p.startswith(prefix)})

    def delete(self, path: str) -> None:
        check_path(path)
        with self._cond:
            self._delete_locked(path)

    def _delete_locked(self, path: str) -> None:
        prefix = path + "/"
        doomed = [p for p in self._nodes if p == path or p.startswith(prefix)]
        for p in doomed:
            del self._nodes[p]
            self._changed_locked(p)

    def _changed_locked(self, path: str) -> None:
        v = next(self._version)
        p = path
        while p:
            self._subtree_version[p] = v
            p = p.rsplit("/", 1)[0]
        for w in self._watches:
            if _covers(w.path, path):
                w.pending = True
        self._cond.notify_all()

    # -- watches ----------------------------------------------------------------------------

    def version(self, path: str) -> int:
        with self._cond:
            return self._subtree_version.get(path, 0)

    def wait_change(self, path: str, since: int, timeout_s: float) -> int:
        """Blocks until the subtree version of `path` exceeds `since` or `timeout_s` passes;
        returns the subtree version then."""
        check_path(path)
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._subtree_version.get(path, 0) <= since and not self._stop:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 1.0))
                self._reap_locked()
            return self._subtree_version.get(path, 0)

    def watch(self, path: str, callback: Callable[[], None]) -> Cancel:
        check_path(path)
        w = _Watch(path, callback)
        with self._cond:
            self._watches.append(w)
            self._cond.notify_all()

        def cancel() -> None:
            with self._cond:
                w.cancelled = True
                if w in self._watches:
                    self._watches.remove(w)

        return cancel

    def _dispatch(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not any(w.pending for w in self._watches):
                    self._cond.wait(1.0)
                    self._reap_locked()
                if self._stop:
                    return
                due = [w for w in self._watches if w.pending]
                for w in due:
                    w.pending = False
            for w in due:
                if not w.cancelled:
                    try:
                        w.callback()
                    except Exception:  # a watcher's bug must not stop the others
                        import logging

                        logging.getLogger(__name__).exception("registry watch on %s failed",
                                                              w.path)

    def shutdown(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()


def _covers(watched: str, changed: str) -> bool:
    return changed == watched or changed.startswith(watched + "/")


class EmbeddedClient:
    """In-process Registry over an EmbeddedStore (its own session; never expires until close).
    `close()` of the client that created the store (via `connect("embedded")`) does not stop the
    store; call `store.shutdown()` for that."""

    def __init__(self, store: EmbeddedStore, sid: str) -> None:
        self.store = store
        self.sid = sid
        self._cancels: list[Cancel] = []
        self._closed = False

    def put(self, path: str, value: Json, *, ephemeral: bool = False) -> None:
        self.store.put(self.sid, path, value, ephemeral)

    def get(self, path: str) -> Json | None:
        return self.store.get(path)

    def children(self, path: str) -> list[str]:
        return self.store.children(path)

    def delete(self, path: str) -> None:
        self.store.delete(path)

    def watch(self, path: str, callback: Callable[[], None]) -> Cancel:
        cancel = self.store.watch(path, callback)
        self._cancels.append(cancel)
        return cancel

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for cancel in self._cancels:
            cancel()
        self.store.close_session(self.sid)
