"""What every simulated instance shares: the event loop, the instance shape, the latency
profile, the gateway it answers, the instances by name (hand-off peers), the noise and the
shared hosts (None: every instance has its own)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pd_serve.sim.config import InstanceSpec
from pd_serve.sim.engine import Noise
from pd_serve.sim.events import EventLoop
from pd_serve.sim.latency import LatencyProfile

if TYPE_CHECKING:
    from pd_serve.sim.gateway import SimGateway
    from pd_serve.sim.host import Hosts


@dataclass
class SimContext:
    loop: EventLoop
    spec: InstanceSpec
    profile: LatencyProfile
    gateway: SimGateway
    half_rtt: float  # one control message's latency
    noise: Noise | None = None
    instances: dict[str, Any] = field(default_factory=dict)  # name -> simulated instance
    hosts: Hosts | None = None
    first_token_delay: float = 0.0  # on a shared host whose neighbour computes (HostSpec)

    def kv_blocks_for(self, input_len: int, output_len: int) -> int:
        """Blocks a request's whole sequence needs (the last token's KV is never written)."""
        return -(-(input_len + output_len - 1) // self.spec.block_size)

    def handoff_time(self, input_len: int) -> float:
        t = self.profile.handoff.time(input_len * self.profile.kv_bytes_per_token)
        return t * self.noise() if self.noise is not None else t
