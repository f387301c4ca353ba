"""Deployments: moving a group from one version of a stack to another, safely. Pure.

Theory of operation
-------------------
Every deploy that changes a stack's definition is a :class:`Deployment` from ``from_hash``
to ``to_hash`` with a :class:`Strategy`. While it runs, devices that have not been moved
yet are *pinned* to ``from_hash`` (the scheduler gives them the old definition); moving a
device means unpinning it. :func:`step` is called with what the controller knows now
(presence, what each device reports for the stack, the controller's clock) and returns
the next deployment state; it is the whole policy and does no I/O.

Per device: ``pending`` -> ``updating`` (moved; waiting to be healthy) -> ``healthy``
(reported running the new version for ``min_healthy_time``, on the controller's clock),
or ``failed`` (not healthy by ``healthy_deadline`` after it was moved, or the stack
failed on it). ``held``: the device accepted the new version but its owner holds updates
(a hold file on the device); it blocks no one and has no deadline until released.
``pending (offline)``: not moved because it is offline; it does not block the deployment
and gets the final version when it returns.

Strategies: ``all-at-once`` moves every device at once; ``rolling`` moves ``max_parallel``
devices at a time and the next batch only once the whole current batch is healthy;
``canary`` moves ``canary`` devices first, then waits: for ``min_healthy_time`` of health
when ``auto_promote``, else for ``tether deployments promote``; then the rest roll with
``max_parallel`` (0 = all at once).

A failed device fails the deployment. With ``auto_revert`` every moved device goes back to
``from_hash`` (state ``reverted``); without, the deployment stops as ``failed`` and moved
devices stay where they are. ``paused`` moves nobody new.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from tether.protocol.commands import RolloutStrategy

DeviceRolloutState = Literal["pending", "pending (offline)", "updating", "held", "healthy", "failed"]
DeploymentState = Literal[
    "running", "paused", "awaiting-promotion", "succeeded", "failed", "reverted", "superseded"
]
ACTIVE_STATES = ("running", "paused", "awaiting-promotion")


Strategy = RolloutStrategy


class DeviceRollout(BaseModel):
    """One device's progress in a deployment."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    state: DeviceRolloutState = "pending"
    batch: int = 0
    moved_at: float | None = None
    healthy_since: float | None = None
    error: str | None = None


class Deployment(BaseModel):
    """A change of one stack's version across its group."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: int
    stack: str
    from_hash: str | None
    to_hash: str
    strategy: Strategy = Field(default_factory=Strategy)
    state: DeploymentState = "running"
    promoted: bool = False
    batch: int = 0
    devices: dict[str, DeviceRollout] = Field(default_factory=dict)
    created: float = 0.0
    updated: float = 0.0
    message: str | None = None

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    def pins(self) -> dict[str, str]:
        """Devices that must stay on (or go back to) ``from_hash`` now."""
        if self.from_hash is None:
            return {}
        if self.state == "reverted":
            return {d: self.from_hash for d in self.devices}
        if self.state in ("succeeded", "superseded"):
            return {}
        return {
            d: self.from_hash for d, r in self.devices.items() if r.state in ("pending", "pending (offline)")
        }


@dataclass(frozen=True)
class Observation:
    """What the controller knows of one device for this stack."""

    online: bool
    spec_hash: str | None = None  # the version the device reports running
    state: str | None = None  # the stack state it reports (running, failed, converging...)
    held: bool = False
    error: str | None = None


def start(
    deployment_id: int,
    stack: str,
    from_hash: str | None,
    to_hash: str,
    strategy: Strategy,
    members: Sequence[str],
    now: float,
) -> Deployment:
    """A new deployment over ``members``."""
    return Deployment(
        id=deployment_id,
        stack=stack,
        from_hash=from_hash,
        to_hash=to_hash,
        strategy=strategy,
        devices={d: DeviceRollout() for d in sorted(members)},
        created=now,
        updated=now,
    )


def _judge(r: DeviceRollout, obs: Observation, to_hash: str, strategy: Strategy, now: float) -> DeviceRollout:
    """Advance one moved device: held, healthy, failed or still updating."""
    if r.state not in ("updating", "held", "healthy"):
        return r
    if obs.held and obs.spec_hash != to_hash:
        return r.model_copy(update={"state": "held", "healthy_since": None})
    if r.state == "held":  # released: the deadline starts now
        r = r.model_copy(update={"state": "updating", "moved_at": now})
    on_new = obs.spec_hash == to_hash
    if on_new and obs.state == "failed":
        return r.model_copy(update={"state": "failed", "error": obs.error or "stack failed on the device"})
    if on_new and obs.state == "running":
        since = r.healthy_since if r.healthy_since is not None else now
        state: DeviceRolloutState = "healthy" if now - since >= strategy.min_healthy_time_s else "updating"
        if r.state == "healthy":
            state = "healthy"
        if r.state == state and r.healthy_since == since:
            return r  # unchanged: no copy (a step looks at every device of the group)
        return r.model_copy(update={"state": state, "healthy_since": since})
    if r.state == "healthy":
        return r  # once healthy for long enough, a later blip is the stack's business, not the rollout's
    if r.healthy_since is not None:
        r = r.model_copy(update={"healthy_since": None})
    if r.moved_at is not None and now - r.moved_at > strategy.healthy_deadline_s:
        return r.model_copy(
            update={"state": "failed", "error": f"not healthy within {strategy.healthy_deadline_s:g}s"}
        )
    return r


def step(
    dep: Deployment,
    members: Sequence[str],
    observed: Mapping[str, Observation],
    now: float,
) -> Deployment:
    """The next state of ``dep`` given what the controller observes now. Pure."""
    if not dep.active:
        return dep
    devices = dict(dep.devices)
    for d in members:  # devices that joined the group during the deployment
        devices.setdefault(d, DeviceRollout())
    member_set = set(members)  # a list of 10,000 would make this loop quadratic
    for d in list(devices):
        if d not in member_set and devices[d].state in ("pending", "pending (offline)"):
            del devices[d]
    # A first deployment has nothing to protect: running is healthy at once.
    judged = dep.strategy if dep.from_hash else dep.strategy.model_copy(update={"min_healthy_time_s": 0.0})
    for d, r in devices.items():
        obs = observed.get(d, Observation(online=False))
        if r.state in ("pending", "pending (offline)"):
            pending = "pending" if obs.online else "pending (offline)"
            if r.state != pending:
                devices[d] = r.model_copy(update={"state": pending})
        else:
            devices[d] = _judge(r, obs, dep.to_hash, judged, now)

    failed = sorted(d for d, r in devices.items() if r.state == "failed")
    if failed:
        reason = devices[failed[0]].error or "failed"
        if dep.strategy.auto_revert and dep.from_hash is not None:
            return dep.model_copy(
                update={
                    "devices": devices,
                    "state": "reverted",
                    "updated": now,
                    "message": f"{failed[0]}: {reason}; every device goes back to the previous version",
                }
            )
        return dep.model_copy(
            update={
                "devices": devices,
                "state": "failed",
                "updated": now,
                "message": f"{failed[0]}: {reason}",
            }
        )

    state = dep.state
    batch = dep.batch
    strategy = dep.strategy
    moving = [d for d, r in devices.items() if r.state in ("updating",)]
    waiting = sorted(d for d, r in devices.items() if r.state == "pending")

    def move(names: Sequence[str]) -> None:
        for d in names:
            devices[d] = devices[d].model_copy(update={"state": "updating", "batch": batch, "moved_at": now})

    if state == "running" and not moving and waiting:
        if strategy.kind == "all-at-once" or dep.from_hash is None:
            batch += 1
            move(waiting)
        elif strategy.kind == "canary" and not dep.promoted:
            if batch == 0:
                batch += 1
                move(waiting[: strategy.canary])
            elif strategy.auto_promote:
                dep = dep.model_copy(update={"promoted": True})
                batch += 1
                move(waiting if strategy.max_parallel == 0 else waiting[: strategy.max_parallel])
            else:
                state = "awaiting-promotion"
        else:
            batch += 1
            move(waiting if strategy.max_parallel == 0 else waiting[: strategy.max_parallel])

    done = all(r.state in ("healthy", "held", "pending (offline)") for r in devices.values())
    if state == "running" and done and not any(r.state == "pending" for r in devices.values()):
        state = "succeeded"
    return dep.model_copy(update={"devices": devices, "state": state, "batch": batch, "updated": now})


def promote(dep: Deployment, now: float) -> Deployment:
    """Let a canary deployment go on to the rest of the group."""
    return dep.model_copy(
        update={"promoted": True, "state": "running" if dep.active else dep.state, "updated": now}
    )
