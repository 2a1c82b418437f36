"""Shared hosts: instances placed on one host slow each other's steps while they compute at the
same time, by measured factors (off by default: every instance has its own accelerator).

Every instance on a host owns a `WorkClock` that maps virtual time to its *work time* (seconds
of compute at full speed). While k co-located instances are busy, an instance's clock runs at
1 / (1 + (f - 1) * k), f the factor of its role (`HostSpec`). Step durations come from the
latency models in work time; the instance schedules its step end at the virtual time its clock
reaches it, and re-schedules it whenever a neighbour starts or stops computing, so a step that
starts alone and is overlapped half-way stretches only for the overlapped part.

Lifecycle:
1. `Hosts(loop, spec)`; `place(name)` for every instance id in order, `spec.size` per host;
2. an instance object takes its id's clock with `clock(name, role, retime)` (a re-roled
   instance keeps its place and gets its new role's factor; it is idle when that happens);
3. the instance calls `set_busy(True)` when it starts computing and `set_busy(False)` when it
   has nothing left; the host recomputes its neighbours' speeds and calls the `retime` of each
   whose speed changed (at most one re-scheduled event per neighbour and change);
4. work time: `local(t)` (virtual -> work) and `real(w)` (work -> virtual at the current speed);
   `neighbour_busy()` for the first-token delay (HostSpec.first_token_delay_s).
"""

from __future__ import annotations

from collections.abc import Callable

from pd_serve.sim.config import HostSpec
from pd_serve.sim.events import EventLoop


class WorkClock:
    __slots__ = ("host", "name", "factor", "busy", "stretch", "t_a", "w_a", "retime")

    def __init__(self, host: Host, name: str) -> None:
        self.host = host
        self.name = name
        self.factor = 1.0  # this instance's stretch per busy neighbour, minus 1, plus 1
        self.busy = False
        self.stretch = 1.0  # virtual seconds per work second, now
        self.t_a = 0.0  # anchor: work time w_a at virtual time t_a; linear since
        self.w_a = 0.0
        self.retime: Callable[[], None] | None = None

    def local(self, t: float) -> float:
        """Work time at virtual time `t` (not before the last speed change)."""
        return self.w_a + (t - self.t_a) / self.stretch

    def real(self, w: float) -> float:
        """Virtual time at which work time `w` is reached if the speed stays as it is."""
        return self.t_a + (w - self.w_a) * self.stretch

    def neighbour_busy(self) -> bool:
        return any(c.busy for c in self.host.clocks if c is not self)

    def set_busy(self, busy: bool) -> None:
        if busy != self.busy:
            self.busy = busy
            self.host.changed(self)

    def set_stretch(self, t: float, stretch: float) -> bool:
        """Re-anchors at `t`; False (nothing touched) when the speed is unchanged, which keeps
        every timing of a host whose factors are 1 bit-for-bit those of no host at all."""
        if stretch == self.stretch:
            return False
        self.w_a = self.local(t)
        self.t_a = t
        self.stretch = stretch
        return True


class Host:
    __slots__ = ("loop", "clocks")

    def __init__(self, loop: EventLoop) -> None:
        self.loop = loop
        self.clocks: list[WorkClock] = []

    def _stretch_of(self, clock: WorkClock) -> float:
        k = sum(1 for c in self.clocks if c.busy and c is not clock)
        return 1.0 + (clock.factor - 1.0) * k

    def changed(self, who: WorkClock) -> None:
        """`who` started or stopped computing: its neighbours' speeds follow."""
        now = self.loop.now
        for c in self.clocks:
            if c is not who and c.set_stretch(now, self._stretch_of(c)) and c.retime:
                c.retime()

    def refresh(self, clock: WorkClock) -> None:
        clock.set_stretch(self.loop.now, self._stretch_of(clock))


class Hosts:
    """Every host of a simulation and the placement of instance ids on them."""

    def __init__(self, loop: EventLoop, spec: HostSpec) -> None:
        self.loop = loop
        self.spec = spec
        self.hosts: list[Host] = []
        self.by_name: dict[str, WorkClock] = {}

    def place(self, name: str) -> None:
        if name in self.by_name:
            raise ValueError(f"host placement: {name!r} placed twice")
        if not self.hosts or len(self.hosts[-1].clocks) >= self.spec.size:
            self.hosts.append(Host(self.loop))
        host = self.hosts[-1]
        clock = WorkClock(host, name)
        host.clocks.append(clock)
        self.by_name[name] = clock

    def clock(self, name: str, role: str, retime: Callable[[], None]) -> WorkClock:
        """`name`'s clock, now serving `role` (its factor) and re-timed by `retime`."""
        clock = self.by_name.get(name)
        if clock is None:
            raise ValueError(f"host placement: {name!r} was never placed on a host")
        if clock.busy:
            raise AssertionError(f"{name}: took a new role while computing")
        clock.factor = self.spec.factor(role)
        clock.retime = retime
        clock.host.refresh(clock)
        return clock
