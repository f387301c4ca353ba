"""Replica placement and disconnect policy, pure (modelled on Nomad's ``disconnect`` block).

A stack is placed ``global`` (every member of its group, the default) or on ``replicas: N``
members. For replicas, :func:`place` turns (policy, group members, device presence, the
current assignment, now) into the next assignment:

* an assigned device that left the group is dropped;
* an assigned device offline for ``lost_after`` or longer is *lost*. It stays assigned (it
  keeps running what it has, offline, as Nomad keeps an "unknown" allocation) but, when
  ``replace`` is set, no longer counts toward N, so a replacement is placed on an online
  member;
* when a lost device comes back, the stack has more than N healthy replicas and the
  ``reconcile`` policy picks who stays: ``keep_original`` (default: replacements go, the
  original keeps running, users see no interruption), ``keep_replacement`` (the returning
  originals go) or ``best_score`` (the least loaded stay);
* new replicas go to online members not yet assigned, least loaded first, then by id.

Everything is decided from the inputs: the exact count N is restored by the first call
after a reconnect.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

ReconcilePolicy = Literal["keep_original", "keep_replacement", "best_score"]


class Placement(BaseModel):
    """How a stack is placed on its group."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Literal["global", "replicas"] = "global"
    replicas: int = Field(default=0, ge=0, le=100_000)
    constraints: tuple[str, ...] = ()
    """Selector terms a device must match to run the stack (``arch == arm64``, ``gpu``...)."""
    lost_after_s: float | None = Field(default=None, ge=0, le=366 * 86400)
    replace: bool = False
    reconcile: ReconcilePolicy = "keep_original"


class Assignment(BaseModel):
    """One device chosen to run a replicated stack."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    device_id: str
    role: Literal["original", "replacement"] = "original"
    since: float = 0.0


@dataclass(frozen=True)
class Candidate:
    """What placement knows of a device: presence and how many stacks it runs."""

    device_id: str
    online: bool
    offline_since: float | None = None
    load: int = 0


def is_lost(policy: Placement, device: Candidate | None, now: float) -> bool:
    if policy.lost_after_s is None or device is None or device.online:
        return False
    since = device.offline_since
    return since is not None and now - since >= policy.lost_after_s


def place(
    policy: Placement,
    members: Sequence[str],
    devices: Mapping[str, Candidate],
    current: Sequence[Assignment],
    now: float,
) -> tuple[Assignment, ...]:
    """The next assignment for a replicated stack (see the module docstring)."""
    if policy.mode != "replicas":
        return ()
    wanted = policy.replicas
    member_set = set(members)
    kept = [a for a in current if a.device_id in member_set]
    lost = [a for a in kept if is_lost(policy, devices.get(a.device_id), now)]
    counting = [a for a in kept if a not in lost] if policy.replace else list(kept)

    def load(a: Assignment) -> tuple[int, str]:
        d = devices.get(a.device_id)
        return (d.load if d else 0, a.device_id)

    if len(counting) > wanted:
        excess = len(counting) - wanted
        if policy.reconcile == "keep_original":
            order = sorted(counting, key=lambda a: (a.role != "replacement", -a.since, a.device_id))
        elif policy.reconcile == "keep_replacement":
            order = sorted(counting, key=lambda a: (a.role != "original", -a.since, a.device_id))
        else:
            order = sorted(counting, key=lambda a: (-load(a)[0], a.device_id))
        removed = {a.device_id for a in order[:excess]}
        counting = [a for a in counting if a.device_id not in removed]
        kept = [a for a in kept if a.device_id not in removed]
    if len(counting) < wanted:
        taken = {a.device_id for a in kept}
        free = sorted(
            (d for d in members if d not in taken and (c := devices.get(d)) is not None and c.online),
            key=lambda d: (devices[d].load, d),
        )
        role: Literal["original", "replacement"] = "replacement" if lost else "original"
        for device_id in free[: wanted - len(counting)]:
            kept.append(Assignment(device_id=device_id, role=role, since=now))
    return tuple(sorted(kept, key=lambda a: a.device_id))
