"""The registry interface: a small ZooKeeper-shaped store of JSON objects at slash paths, with
ephemeral nodes tied to the client's session and subtree watches. Instances, gateways and the
orchestrator share cluster state through it; `connect(url)` picks the implementation:

* `embedded`            an in-process store (the orchestrator of `pd-serve up` holds it);
* `http://HOST:PORT`    a client of an orchestrator's embedded store (its /registry routes);
* `zk://HOST:PORT[,HOST:PORT...][/CHROOT]`  Apache ZooKeeper through kazoo.

Semantics every implementation keeps (tests/unit/test_registry_contract.py checks them):
* `put` creates or overwrites (parents are created as needed); `ephemeral=True` ties the node to
  this client's session: it disappears when the session ends (`close`, process death, or no
  contact within the session timeout). After the registry comes back with a new session the
  client re-creates its own ephemeral nodes with their last values.
* `watch(path, cb)` calls `cb()` once soon after the call and again (coalesced, possibly late,
  never before the change is visible to `get`) after any change at or under `path`; callbacks run
  on a registry thread and must not block long. Readers re-read what they need.
* All methods are thread-safe. `RegistryError` means the registry is unreachable or refused the
  operation; callers keep their last known state and retry.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

ROOT = "/pd"
INSTANCES = f"{ROOT}/instances"  # /pd/instances/{id}: ephemeral InstanceRecord (instance writes)
ASSIGN = f"{ROOT}/assign"  # /pd/assign/{id}: Assignment (orchestrator writes, instance watches)
META = f"{ROOT}/meta"  # /pd/meta/{scenario}: GroupMeta (orchestrator writes; gateways watch)
PLAN = f"{ROOT}/plan"  # /pd/plan/{scenario}: desired n_p/n_d (orchestrator's own state)
ORCHESTRATOR = f"{ROOT}/orchestrator"  # ephemeral {"url"} of the live orchestrator
GATEWAYS = f"{ROOT}/gateways"  # /pd/gateways/{id}: ephemeral {"url"} of each gateway


class RegistryError(RuntimeError):
    """The registry is unreachable, the session is gone, or an operation was refused."""


Json = dict[str, Any]
Cancel = Callable[[], None]


class Registry(Protocol):
    """Callers: instance agents, gateways, the orchestrator, the console (any thread).
    Blocking: every method may block for a network round trip (bounded by the client's timeout,
    then RegistryError). Frees: `close` ends the session, which removes its ephemeral nodes."""

    def put(self, path: str, value: Json, *, ephemeral: bool = False) -> None:
        """Create or overwrite the node at `path` with `value`."""
        ...

    def get(self, path: str) -> Json | None:
        """The node's value, or None when it does not exist."""
        ...

    def children(self, path: str) -> list[str]:
        """Names (not paths) of the direct children, sorted; [] when `path` does not exist."""
        ...

    def delete(self, path: str) -> None:
        """Remove the node and everything under it; no error when it does not exist."""
        ...

    def watch(self, path: str, callback: Callable[[], None]) -> Cancel:
        """Call `callback` now and after changes at or under `path`; returns a cancel function."""
        ...

    def close(self) -> None:
        """End the session (its ephemeral nodes vanish) and stop watch threads; idempotent."""
        ...


def check_path(path: str) -> str:
    """ValueError for a path that is not absolute, has empty or dot segments, or a trailing /."""
    if not isinstance(path, str) or not path.startswith("/") or path == "/":
        raise ValueError(f"registry path must be absolute and not the root, got {path!r}")
    parts = path.split("/")[1:]
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"registry path has an empty or dot segment: {path!r}")
    return path


def child(parent: str, name: str) -> str:
    """`parent/name`; ValueError for a name holding '/' or empty."""
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"registry node name must be non-empty without '/', got {name!r}")
    return f"{parent}/{name}"


def connect(url: str, *, session_timeout_s: float = 6.0, timeout_s: float = 5.0) -> Registry:
    """A Registry client for `url` (see the module docstring). ValueError for an unknown scheme;
    RegistryError when the registry cannot be reached within `timeout_s`."""
    if url == "embedded":
        from pd_serve.orchestrator.embedded import EmbeddedStore

        return EmbeddedStore(session_timeout_s).client()
    if url.startswith(("http://", "https://")):
        from pd_serve.orchestrator.http_registry import HttpRegistry

        return HttpRegistry(url, session_timeout_s=session_timeout_s, timeout_s=timeout_s)
    if url.startswith("zk://"):
        from pd_serve.orchestrator.zk_registry import ZkRegistry

        return ZkRegistry(url, session_timeout_s=session_timeout_s, timeout_s=timeout_s)
    raise ValueError(f"registry: expected 'embedded', http://HOST:PORT or zk://HOST:PORT[/chroot], "
                     f"got {url!r}")
