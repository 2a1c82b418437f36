"""Keeps the gateway's forwarding table `<scenario, prefill instances>` equal to the
orchestrator's meta info in the registry (/pd/meta/{scenario}).

Lifecycle:
1. `MetaFollower(fwd, registry_url, session_timeout_s, self_url)`; `start()` (on the event
   loop) connects on a worker thread, retrying every second while the registry is away,
   registers the gateway at /pd/gateways/{host:port} (ephemeral) and watches /pd/meta;
2. each change: every configured scenario with meta info takes its prefill list (an empty list
   makes its requests wait at the gateway until their TTFT deadline; a scenario without meta
   info keeps its table, as when an orchestrator restarts); unknown scenarios are logged once;
3. `stop()` cancels the watch and closes the registry client.
While the registry is unreachable the gateway keeps forwarding on the last table it saw.
"""

from __future__ import annotations

import asyncio
import logging

from pd_serve.gateway.forward import Forwarder
from pd_serve.orchestrator.records import GroupMeta
from pd_serve.orchestrator.registry import (
    GATEWAYS,
    META,
    Registry,
    RegistryError,
    child,
    connect,
)

log = logging.getLogger(__name__)


class MetaFollower:
    def __init__(self, fwd: Forwarder, registry_url: str, session_timeout_s: float,
                 self_url: str) -> None:
        self.fwd = fwd
        self.self_url = self_url
        self.registry_url = registry_url
        self.session_timeout_s = session_timeout_s
        self.registry: Registry | None = None
        self.updates = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._unknown: set[str] = set()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self.registry is not None:
            await asyncio.to_thread(self.registry.close)

    def _poke(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake.set)

    async def _run(self) -> None:
        while self.registry is None:
            try:
                self.registry = await asyncio.to_thread(
                    connect, self.registry_url, session_timeout_s=self.session_timeout_s)
            except RegistryError as exc:
                log.warning("gateway: registry %s unreachable (%s); retrying", self.registry_url,
                            exc)
                await asyncio.sleep(1.0)
        gid = self.self_url.split("://", 1)[-1].replace("/", "_")
        try:  # the orchestrator finds gateways here (for their /stats/samples)
            await asyncio.to_thread(self.registry.put, child(GATEWAYS, gid),
                                    {"url": self.self_url}, ephemeral=True)
        except RegistryError as exc:
            log.warning("gateway: registering failed (%s)", exc)
        self.registry.watch(META, self._poke)
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._sync(self.registry)
            except RegistryError as exc:
                log.warning("gateway: reading meta info failed (%s); keeping the last table", exc)

    async def _sync(self, registry: Registry) -> None:
        names = await asyncio.to_thread(registry.children, META)
        metas: dict[str, GroupMeta] = {}
        for name in names:
            path = child(META, name)
            meta = GroupMeta.parse(await asyncio.to_thread(registry.get, path), path)
            if meta is not None:
                metas[name] = meta
        for name in sorted(set(metas) - set(self.fwd.scenarios) - self._unknown):
            self._unknown.add(name)
            log.warning("gateway: meta info for scenario %r, which this gateway does not "
                        "serve (not in gateway.scenarios)", name)
        for name in self.fwd.scenarios:
            meta = metas.get(name)
            if meta is None:  # no word from an orchestrator (e.g. one restarting): keep
                continue
            urls = [m.url for m in meta.prefill]
            if self.fwd.set_instances(name, urls):
                self.updates += 1
                log.info("gateway: scenario %s now forwards to %s", name, urls)
