"""What the registry holds, as typed records with JSON round trips (pydantic, extra keys
rejected so a malformed node is noticed): an instance's report, its assignment, and a
scenario's group meta info `<scenario, prefill instances, decode instances>`."""

from __future__ import annotations

import logging
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = logging.getLogger(__name__)
Role = Literal["prefill", "decode"]
State = Literal["stateless", "loading", "ready", "switching", "releasing"]
R = TypeVar("R", bound="_Record")


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def parse(cls: type[R], data: dict[str, Any] | None, where: str) -> R | None:
        """None for a missing node; a malformed one is logged and treated as missing."""
        if data is None:
            return None
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            log.warning("registry: ignoring malformed %s at %s: %s", cls.__name__, where,
                        str(exc).splitlines()[0])
            return None


class Health(_Record):
    ok: bool = True
    slots_used: int | None = None
    slots_total: int | None = None
    kv_blocks_used: int | None = None
    kv_blocks_total: int | None = None
    running: int | None = None
    waiting: int | None = None
    idle: bool = True


class InstanceRecord(_Record):
    """/pd/instances/{id}, ephemeral, written by the instance (at start and every report)."""

    id: str
    url: str
    pid: int | None = None
    role: Role | None = None
    scenario: str | None = None
    model_path: str | None = None
    state: State = "stateless"
    draining: bool = False
    epoch: int = 0  # the assignment epoch the instance has applied
    health: Health = Field(default_factory=Health)
    reported_at: float = 0.0  # unix time
    error: str | None = None  # the last assignment that failed to apply


class Assignment(_Record):
    """/pd/assign/{id}, written by the orchestrator; role None means stay or become stateless."""

    role: Role | None = None
    scenario: str | None = None
    model_path: str | None = None
    drain: bool = False
    epoch: int = 0


class Member(_Record):
    id: str
    url: str


class GroupMeta(_Record):
    """/pd/meta/{scenario}: the instances serving a scenario. Gateways forward to `prefill`;
    prefill instances hand off to `decode`. Only ready, healthy, undrained instances appear."""

    scenario: str
    prefill: list[Member] = Field(default_factory=list)
    decode: list[Member] = Field(default_factory=list)
    epoch: int = 0
