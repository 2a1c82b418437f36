"""Connects one instance to the registry: registers it (stateless, ephemeral node), applies the
orchestrator's assignment, follows its scenario's decode list, and reports health.

Lifecycle (one asyncio task on the instance's event loop; registry calls run on worker threads):
1. `RegistryAgent(inst, connect, instance_id, report_interval_s)`; `start()` connects and
   registers /pd/instances/{id} (retrying every second while the registry is away, so an
   instance may start before the orchestrator) and watches /pd/assign/{id};
2. every wake-up (a watch fired, or each report interval): read the assignment; a new epoch is
   applied on its own task (assign: load or switch role in place; role None: release to
   stateless; `drain`) so reports continue while a model loads or work drains; a prefill
   instance watches /pd/meta/{scenario} and takes its decode list as its peers;
3. report: the instance record with state, applied epoch and health (slots, KV blocks,
   running requests), overwritten every `report_interval_s`;
4. `stop()` cancels the task and the watches and closes the registry (the node vanishes).
If the registry is unreachable the instance keeps serving with what it knows.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pd_serve.instance.messages import AssignRequest
from pd_serve.orchestrator.records import Assignment, GroupMeta, Health, InstanceRecord
from pd_serve.orchestrator.registry import (
    ASSIGN,
    INSTANCES,
    META,
    Registry,
    RegistryError,
    child,
)

if TYPE_CHECKING:
    from pd_serve.instance.app import Instance

log = logging.getLogger(__name__)


class RegistryAgent:
    def __init__(self, inst: Instance, connect: Callable[[], Registry], instance_id: str,
                 report_interval_s: float) -> None:
        self.inst = inst
        self._connect = connect
        self.registry: Registry | None = None
        self.id = instance_id
        self.report_interval_s = report_interval_s
        self.epoch = 0  # applied assignment epoch
        self.error: str | None = None
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._apply: asyncio.Task[None] | None = None
        self._cancels: list[Callable[[], None]] = []
        self._meta_watch: tuple[str, Callable[[], None]] | None = None
        self._outage = False

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._run())

    async def stop(self) -> None:
        for task in (self._task, self._apply):
            if task is not None:
                task.cancel()
        for cancel in self._cancels:
            cancel()
        if self._meta_watch is not None:
            self._meta_watch[1]()
        if self.registry is not None:
            await asyncio.to_thread(self.registry.close)

    def poke(self) -> None:
        """Thread-safe: wake the agent (registry watch callbacks call this)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake.set)

    async def _run(self) -> None:
        while True:
            try:
                if self.registry is None:
                    self.registry = await asyncio.to_thread(self._connect)
                await self._report()
                break
            except RegistryError as exc:
                log.warning("registering %s failed (%s); retrying", self.id, exc)
                await asyncio.sleep(1.0)
        self._cancels.append(self.registry.watch(child(ASSIGN, self.id), self.poke))
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.report_interval_s)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self._sync()
                await self._report()
                if self._outage:
                    log.warning("registry reachable again")
                self._outage = False
            except RegistryError as exc:
                if not self._outage:  # once per outage, not every report interval
                    log.warning("registry: %s (serving on with what we know)", exc)
                self._outage = True

    async def _sync(self) -> None:
        assert self.registry is not None
        path = child(ASSIGN, self.id)
        a = Assignment.parse(await asyncio.to_thread(self.registry.get, path), path)
        if a is not None and a.epoch > self.epoch and (self._apply is None or self._apply.done()):
            self._apply = asyncio.get_running_loop().create_task(self._apply_assignment(a))
        await self._follow_meta()

    async def _apply_assignment(self, a: Assignment) -> None:
        try:
            if a.role is None:
                await self.inst.release()
            else:
                await self.inst.assign(AssignRequest(
                    role=a.role, group=a.scenario or "default", model_path=a.model_path,
                    decode_peers=self.inst.prefill.peers if self.inst.prefill else []))
            self.inst.drain(a.drain)
            self.error = None
        except Exception as exc:  # reported to the orchestrator, which decides
            log.exception("applying assignment epoch %d failed", a.epoch)
            self.error = f"epoch {a.epoch}: {type(exc).__name__}: {exc}"
        self.epoch = a.epoch
        self.poke()

    async def _follow_meta(self) -> None:
        """Prefill: watch the scenario's meta and take its decode list as peers."""
        assert self.registry is not None
        scenario = self.inst.group if self.inst.prefill is not None else None
        if self._meta_watch is not None and self._meta_watch[0] != scenario:
            self._meta_watch[1]()
            self._meta_watch = None
        if scenario is None:
            return
        path = child(META, scenario)
        if self._meta_watch is None:
            self._meta_watch = (scenario, self.registry.watch(path, self.poke))
        meta = GroupMeta.parse(await asyncio.to_thread(self.registry.get, path), path)
        if meta is None:  # no word from an orchestrator (e.g. one restarting): keep the peers
            return
        peers = [m.url.rstrip("/") for m in meta.decode]
        if self.inst.prefill is not None and peers != self.inst.prefill.peers:
            log.info("decode peers of %s: %s", self.id, peers)
            self.inst.prefill.set_peers(peers)

    async def _report(self) -> None:
        assert self.registry is not None
        rec = self.record()
        await asyncio.to_thread(self.registry.put, child(INSTANCES, self.id), rec.to_json(),
                                ephemeral=True)

    def record(self) -> InstanceRecord:
        inst = self.inst
        return InstanceRecord(
            id=self.id, url=inst.self_url, pid=os.getpid(),
            role=inst.role,  # type: ignore[arg-type]
            scenario=inst.group, model_path=inst.model_path,
            state=inst.state,  # type: ignore[arg-type]
            draining=inst.draining, epoch=self.epoch, health=health_of(inst),
            reported_at=time.time(), error=self.error)


def health_of(inst: Instance) -> Health:
    h: dict[str, Any] = {"idle": inst.idle}
    if inst.runtime is not None:
        eng = inst.runtime.engine
        h["ok"] = bool(eng.health()["ok"])
        st = eng.stats()
        h["running"] = st.get("num_running")
        h["waiting"] = st.get("num_waiting")
        total = st.get("num_blocks")
        if total is not None:
            h["kv_blocks_total"] = total
            h["kv_blocks_used"] = total - st.get("num_free_blocks", total)
    if inst.prefill is not None:
        h["slots_used"] = inst.prefill.slots.busy
        h["slots_total"] = inst.prefill.slots.size
    return Health(**h)
