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
or ``failed``. ``downloading``: moved, and the device reports that it is still fetching the
new version's images (its current version keeps running); a transient error there
(``retrying``) is not a failure: it fails only past ``download_deadline`` after the move,
and ``healthy_deadline`` counts from the end of the download. ``held``: the device accepted
the new version but its owner holds updates (a hold file on the device); it blocks no one
and has no deadline until released. ``pending (offline)``: not moved because it is
offline; it does not block the deployment and gets the final version when it returns.

Health is judged as Nomad does: the ``min_healthy_time`` timer starts when the device
reports the new version running, and any restart, exit or failing health check of its
services before the timer ends stops it; it starts again from zero when the stack runs
again (``DeviceRollout.reason`` says what happened). A restart is seen through the
services' restart counters, which only grow, so one the controller did not witness between
two reports still counts. A device fails when it reports the stack ``failed`` (a crash
loop, an unhealthy service, a non-zero exit without restart, an action that failed), when
a download fails permanently, or when it is not healthy by its deadline; every failure
says why (:func:`explain`: exit code, restarts, failing check, last log lines). A first
deployment is judged the same way: ``--wait`` reports success only after
``min_healthy_time`` of health.

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

import heapq
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ConfigDict, Field
from tether.protocol.commands import RolloutStrategy
from tether.protocol.durations import format_duration
from tether.protocol.heap import Kept, Shared
from tether.protocol.models import DownloadStatus, StackStatus

DeviceRolloutState = Literal[
    "pending",
    "pending (offline)",
    "staging",
    "staged",
    "downloading",
    "updating",
    "held",
    "healthy",
    "failed",
]
WAITING = ("pending", "staging", "staged")
"""Not moved yet: kept on the previous version (staging and staged ones download the new one)."""
PINNED = (*WAITING, "pending (offline)")
"""Kept on (or sent back to) the previous version while the deployment runs."""
MOVING = ("downloading", "updating")
"""Moved and not yet judged healthy: a rolling batch waits for these."""
REASON_CHARS = 600
"""The longest reason kept per device (remote text: a log tail is cut to its last lines)."""
DeploymentState = Literal[
    "staging",
    "staged",
    "running",
    "paused",
    "awaiting-promotion",
    "succeeded",
    "failed",
    "reverted",
    "superseded",
]
ACTIVE_STATES = ("staging", "staged", "running", "paused", "awaiting-promotion")


Strategy = RolloutStrategy


class DeviceRollout(Kept):
    """One device's progress in a deployment."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    state: DeviceRolloutState = "pending"
    batch: int = 0
    moved_at: float | None = None
    healthy_since: float | None = None
    error: str | None = None
    restarts: int | None = None
    """The stack's restart counter when the healthy timer started: a change restarts the timer."""
    ready_at: float | None = None
    """When the device stopped downloading: ``healthy_deadline`` counts from here (else from moved_at)."""
    reason: str | None = None
    """Why the device is not healthy yet (the last thing that stopped its healthy timer)."""


class Deployment(Kept):
    """A change of one stack's version across its group."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: int
    stack: str
    from_hash: str | None
    to_hash: str
    strategy: Strategy = Field(default_factory=Strategy)
    state: DeploymentState = "running"
    promoted: bool = False
    switched: bool = False
    """A stage-only deployment: ``deployments switch`` was given (devices move from then on)."""
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
        if self.state == "reverted" and self.from_hash is not None:
            return {d: self.from_hash for d in self.devices}
        if not self.pins_waiting():
            return {}
        # "": a first deployment staged only runs nowhere before the switch
        pin = self.from_hash if self.from_hash is not None else ""
        return {d: pin for d, r in self.devices.items() if r.state in PINNED}

    def pins_waiting(self) -> bool:
        """Whether :meth:`pins` holds the devices not moved yet (in :data:`PINNED` states),
        unless every device goes back (``reverted``)."""
        if self.state in ("succeeded", "superseded"):
            return False
        return self.from_hash is not None or (self.strategy.stage_only and not self.switched)

    def stages(self) -> dict[str, str]:
        """Devices that must download ``to_hash`` without running it (a stage-only deployment)."""
        if not self.active or not self.strategy.stage_only:
            return {}
        return {d: self.to_hash for d, r in self.devices.items() if r.state in ("staging", "staged")}


@dataclass(frozen=True)
class Observation:
    """What the controller knows of one device for this stack."""

    online: bool
    spec_hash: str | None = None  # the version the device reports running
    state: str | None = None  # the stack state it reports (running, failed, converging...)
    held: bool = False
    error: str | None = None
    restarts: int = 0  # the stack's restart counter (sum of its services'): it only grows
    status: StackStatus | None = None  # what it reports of the stack, for explain()
    download: DownloadStatus | None = None  # what it reports of the stack's download, if any


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())  # one line: a device's text never spans the operator's screen
    return text if len(text) <= limit else text[: limit - 1] + "…"


def explain(status: StackStatus | None) -> str | None:
    """Why a stack is not healthy, from what the device reports: per failing service its state,
    exit code, restart count, failing health check output and last log lines. Pure."""
    if status is None:
        return None
    parts = []
    for name, svc in sorted(status.services.items()):
        bad = svc.state not in ("running",) or svc.health == "unhealthy" or svc.last_error
        if not bad or (svc.state == "exited" and svc.exit_code == 0 and not svc.last_error):
            continue
        words = [f"{name}: {svc.state}"]
        if svc.health == "unhealthy":
            words.append("unhealthy")
        if svc.exit_code is not None:
            words.append(f"exit code {svc.exit_code}")
        if svc.restarts:
            words.append(f"{svc.restarts} restart{'s' if svc.restarts != 1 else ''}")
        if svc.last_error:
            words.append(_clip(svc.last_error, 200))
        if svc.health_output:
            words.append("health check: " + _clip(svc.health_output, 160))
        if svc.log_tail:
            lines = [line for line in svc.log_tail.splitlines() if line.strip()][-3:]
            if lines:
                words.append("last log lines: " + _clip(" | ".join(lines), 240))
        parts.append(", ".join(words))
    return _clip("; ".join(parts), REASON_CHARS) if parts else None


def progress(download: DownloadStatus) -> str:
    """``downloading 43% (3.4 of 8.0 MB, 12 KB/s, ETA 6m)``, or ``retrying: <reason>``. Pure."""
    if download.state == "failed":
        return f"download failed: {_clip(download.reason or 'no reason given', 200)}"
    if download.state == "staged":
        return "staged (every image on the device)"
    words = []
    if download.total:
        words.append(f"{_mb(download.done)} of {_mb(download.total)} MB")
    elif download.done:
        words.append(f"{_mb(download.done)} MB")
    if download.rate:
        words.append(f"{_rate(download.rate)}")
    if download.eta_s is not None and download.state == "downloading":
        words.append(f"ETA {format_duration(download.eta_s)}")
    percent = f" {min(100, download.done * 100 // download.total)}%" if download.total else ""
    text = f"downloading{percent}" + (f" ({', '.join(words)})" if words else "")
    if download.state == "retrying":
        text += f" (retrying: {_clip(download.reason or 'no reason given', 200)})"
    return text


def _mb(n: int) -> str:
    return f"{n / 1_000_000:.1f}"


def _rate(bytes_per_s: float) -> str:
    for unit, size in (("MB/s", 1_000_000), ("KB/s", 1_000)):
        if bytes_per_s >= size:
            return f"{bytes_per_s / size:.0f} {unit}"
    return f"{bytes_per_s:.0f} B/s"


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
        devices=dict.fromkeys(sorted(members), _PENDING),
        created=now,
        updated=now,
    )


_PENDING = DeviceRollout()
"""A device not moved yet (frozen: every such device shares it)."""

_ENTRIES: Shared[tuple[DeviceRollout, tuple[tuple[str, Any], ...]], DeviceRollout] = Shared(1024)
""":func:`_entry`'s copies, one per entry and update."""


def _entry(r: DeviceRollout, update: dict[str, Any]) -> DeviceRollout:
    """``r.model_copy(update=update)``, one shared (frozen) copy per equal entry and update.

    Devices judged alike share their entry (moved together, running since the same step,
    healthy at the same step), as those moved together do: a step that changes 10,000
    devices makes a few entries instead of 10,000, and the store writes each distinct
    entry's JSON once (:meth:`~.store.Store.put_deployment`)."""
    return _ENTRIES.get((r, tuple(update.items())), lambda: r.model_copy(update=update))


def _judge(r: DeviceRollout, obs: Observation, to_hash: str, strategy: Strategy, now: float) -> DeviceRollout:
    """Advance one moved device: held, downloading, healthy, failed or still updating."""
    if r.state not in ("downloading", "updating", "held", "healthy"):
        return r
    if obs.held and obs.spec_hash != to_hash:
        if r.state == "held" and r.healthy_since is None:
            return r  # unchanged: no copy (a step looks at every device of the group)
        return _entry(r, {"state": "held", "healthy_since": None})
    if r.state == "held":  # released: the deadline starts now
        r = _entry(r, {"state": "updating", "moved_at": now, "ready_at": None})
    on_new = obs.spec_hash == to_hash
    download = obs.download if obs.download is not None and obs.download.spec_hash == to_hash else None
    if download is not None and download.state == "failed":
        return _fail(r, progress(download))
    if on_new and obs.state == "failed":
        return _fail(r, explain(obs.status) or obs.error or "stack failed on the device")
    if download is not None and download.state in ("downloading", "retrying") and r.state != "healthy":
        moved = r.moved_at if r.moved_at is not None else now
        if now - moved > strategy.download_deadline_s:
            return _fail(
                r,
                f"download not finished within {format_duration(strategy.download_deadline_s)} "
                f"({progress(download)})",
            )
        if r.state == "downloading":
            return r  # unchanged: progress is read from the reported state, not stored per step
        return _entry(r, {"state": "downloading", "healthy_since": None, "restarts": None})
    if r.state == "downloading":  # the images are on the device: the switch is under way
        r = _entry(r, {"state": "updating", "ready_at": now})
    if on_new and obs.state == "running":
        if r.state == "healthy":
            return r  # healthy for min_healthy_time: later blips are the stack's business, unless it fails
        since, restarts, reason = r.healthy_since, r.restarts, r.reason
        if since is None:
            since, restarts = now, obs.restarts
        elif obs.restarts != restarts:  # restarted (or the agent did) since the timer started
            reason = _restarted(obs, restarts, now)
            since, restarts = now, obs.restarts
        state: DeviceRolloutState = "healthy" if now - since >= strategy.min_healthy_time_s else "updating"
        if state == "healthy":
            reason = None
        elif _past_deadline(r, strategy, now):  # it keeps restarting: running now is not enough
            why = reason or explain(obs.status) or "never running for min_healthy_time"
            return _fail(r, f"not healthy within {format_duration(strategy.healthy_deadline_s)}: {why}")
        if (r.state, r.healthy_since, r.restarts, r.reason) == (state, since, restarts, reason):
            return r  # unchanged: no copy (a step looks at every device of the group)
        return _entry(r, {"state": state, "healthy_since": since, "restarts": restarts, "reason": reason})
    if r.state == "healthy":
        return r  # once healthy for long enough, a later blip is the stack's business, not the rollout's
    if r.healthy_since is not None:  # it ran, and now it does not: the timer stops
        why = explain(obs.status) or f"stack {obs.state or 'not reported'}"
        r = _entry(
            r,
            {
                "healthy_since": None,
                "restarts": None,
                "reason": _clip(f"not running after {now - r.healthy_since:.0f}s ({why})", REASON_CHARS),
            },
        )
    if _past_deadline(r, strategy, now):
        explained = explain(obs.status) if on_new else None
        why = (
            explained
            or r.reason
            or (f"reports version {obs.spec_hash[:12]}" if obs.spec_hash else "no report")
        )
        return _fail(r, f"not healthy within {format_duration(strategy.healthy_deadline_s)}: {why}")
    return r


def _stage(r: DeviceRollout, obs: Observation, to_hash: str, strategy: Strategy, now: float) -> DeviceRollout:
    """A device of a stage-only deployment before the switch: it downloads, and runs nothing new."""
    if r.state in ("pending", "pending (offline)"):
        if not obs.online:
            return r if r.state == "pending (offline)" else _entry(r, {"state": "pending (offline)"})
        r = _entry(r, {"state": "staging", "moved_at": now})
    download = obs.download if obs.download is not None and obs.download.spec_hash == to_hash else None
    if download is not None and download.state == "failed":
        return _fail(r, progress(download))
    state: DeviceRolloutState = "staging"
    if (download is not None and download.state == "staged") or obs.spec_hash == to_hash:
        state = "staged"
    elif r.state == "staged":
        state = "staged"  # staged stays staged (offline, or a report without it): the images are there
    elif r.moved_at is not None and now - r.moved_at > strategy.download_deadline_s:
        why = progress(download) if download is not None else "no download reported"
        return _fail(r, f"not staged within {format_duration(strategy.download_deadline_s)} ({why})")
    return r if r.state == state else _entry(r, {"state": state})


def _past_deadline(r: DeviceRollout, strategy: Strategy, now: float) -> bool:
    start = r.ready_at if r.ready_at is not None else r.moved_at
    return start is not None and now - start > strategy.healthy_deadline_s


def _fail(r: DeviceRollout, why: str) -> DeviceRollout:
    return _entry(r, {"state": "failed", "error": _clip(why, REASON_CHARS), "healthy_since": None})


def _restarted(obs: Observation, before: int | None, now: float) -> str:
    """Why the healthy timer restarted: which services restarted, and how they last ended."""
    names = []
    if obs.status is not None:
        names = [n for n, s in sorted(obs.status.services.items()) if s.restarts]
    what = ", ".join(names) or "a service"
    count = obs.restarts - before if before is not None and obs.restarts > before else None
    times = f" {count} time{'s' if count != 1 else ''}" if count else ""
    return f"{what} restarted{times} within min_healthy_time; the healthy timer started again"


def step(
    dep: Deployment,
    members: Sequence[str],
    observed: Mapping[str, Observation],
    now: float,
) -> Deployment:
    """The next state of ``dep`` given what the controller observes now: every device judged. Pure.

    ``dep`` itself when nothing changed (its ``updated`` time included), so a caller that
    steps every second can tell without comparing 10,000 devices. :func:`step_changed`
    gives the same result judging only the devices that may have changed."""
    if not dep.active:
        return dep
    devices = dict(dep.devices)
    for d in members:  # devices that joined the group during the deployment
        if d not in devices:  # (not setdefault: a DeviceRollout built per member and step)
            devices[d] = _PENDING
    member_set = set(members)  # a list of 10,000 would make this loop quadratic
    if len(devices) != len(member_set):  # else every device is a member (all were added above)
        for d in list(devices):
            if d not in member_set and devices[d].state in ("pending", "pending (offline)"):
                del devices[d]
    staging = dep.strategy.stage_only and not dep.switched
    unknown = Observation(online=False)
    for d, r in devices.items():
        devices[d] = _next(r, observed.get(d, unknown), staging, dep.to_hash, dep.strategy, now)
    counts: dict[str, int] = {}
    for r in devices.values():
        counts[r.state] = counts.get(r.state, 0) + 1
    first_failed = (
        min((d for d, r in devices.items() if r.state == "failed"), default=None)
        if counts.get("failed")
        else None
    )
    nxt = _step_state(dep, devices, staging, now, counts, first_failed, [])
    if (
        nxt.state == dep.state
        and nxt.batch == dep.batch
        and nxt.promoted == dep.promoted
        and nxt.message == dep.message
        and len(nxt.devices) == len(dep.devices)
        and all(dep.devices.get(d) is r for d, r in nxt.devices.items())
    ):
        return dep  # every device's entry is the very same object: nothing moved
    return nxt


def _next(
    r: DeviceRollout, obs: Observation, staging: bool, to_hash: str, strategy: Strategy, now: float
) -> DeviceRollout:
    """One device's next entry (``r`` itself when it does not change)."""
    if staging and r.state in PINNED:
        return _stage(r, obs, to_hash, strategy, now)
    if r.state in ("staging", "staged"):
        return r  # switched: waits to be moved like a pending device, its images already there
    if r.state in ("pending", "pending (offline)"):
        pending = "pending" if obs.online else "pending (offline)"
        return r if r.state == pending else _entry(r, {"state": pending})
    # A first deployment is judged too: a crash-looping one must not be reported healthy.
    return _judge(r, obs, to_hash, strategy, now)


def _wake(r: DeviceRollout, strategy: Strategy) -> float:
    """The earliest time at which :func:`_next` could change ``r`` with the same observation:
    its deadline (download, healthy) or the end of its healthy timer; ``inf`` for a device
    whose entry only an observation changes. Never later than the real change (earlier is
    harmless: the device is judged again, as a full step would)."""
    state = r.state
    if state == "updating":  # unchanged: no download under way (else it would be downloading)
        start = r.ready_at if r.ready_at is not None else r.moved_at
        wake = start + strategy.healthy_deadline_s if start is not None else _NEVER
        if r.healthy_since is not None:
            wake = min(wake, r.healthy_since + strategy.min_healthy_time_s)
    elif state in ("downloading", "staging") and r.moved_at is not None:
        wake = r.moved_at + strategy.download_deadline_s  # unchanged: still downloading
    else:
        return _NEVER
    return wake - _EARLY


MASS_SHARE = 0.5
"""The share of a group to judge above which :func:`step_changed` judges it all."""
_TIMED = ("updating", "downloading", "staging")
"""The states :func:`_wake` may give a time for."""
_NEVER = float("inf")
_EARLY = 0.001
"""Seconds before a deadline its device is judged again: a deadline compared by subtraction
(``now - since > deadline``) is not always the sum's float; judging early changes nothing."""


@dataclass
class Progress:
    """What :func:`step_changed` keeps of one deployment between its steps. Pure data.

    Valid for ``deployment`` (the very object the last step returned) and ``members`` (the
    list it was given, or an equal one): any other deployment (an operator's pause,
    promote, switch, a new deployment, one another controller wrote, a controller that just
    started or took the lease) or group gets a full judgement and a new one."""

    deployment: Deployment
    members: Sequence[str]
    now: float
    counts: dict[str, int]
    """How many devices are in each state."""
    failed: set[str]
    wakes: list[tuple[float, str]]
    """A heap of (time, device): when a device's deadline or healthy timer may change it."""
    due: dict[str, float]
    """Each device's current wake (heap entries that differ are stale)."""
    recheck: set[str]
    """Devices whose entry changed at the last step: judged again at the next (a moved device
    is judged then for the first time)."""
    changed: set[str] | None = None
    """Devices whose entry the last step changed (None: unknown, a full judgement)."""


def _progress(before: Deployment, dep: Deployment, members: Sequence[str], now: float) -> Progress:
    """A :class:`Progress` made afresh for ``dep``, the full step of ``before``."""
    counts: dict[str, int] = {}
    failed = set()
    due = {}
    strategy = dep.strategy
    for d, r in dep.devices.items():
        state = r.state
        counts[state] = counts.get(state, 0) + 1
        if state in _TIMED:
            wake = _wake(r, strategy)
            if wake != _NEVER:
                due[d] = wake
        elif state == "failed":
            failed.add(d)
    wakes = [(t, d) for d, t in due.items()]
    heapq.heapify(wakes)
    old = before.devices
    recheck = set() if before is dep else {d for d, r in dep.devices.items() if old.get(d) is not r}
    return Progress(dep, members, now, counts, failed, wakes, due, recheck)


def step_changed(
    progress: Progress | None,
    dep: Deployment,
    members: Sequence[str],
    observed: Mapping[str, Observation],
    changed: Iterable[str] | None,
    now: float,
    *,
    mass: float = MASS_SHARE,
) -> tuple[Deployment, Progress]:
    """:func:`step`'s result, judging only the devices whose observation changed (``changed``:
    every device whose observation is not the very object of the last step; None: unknown),
    whose deadline or healthy timer may have passed, or whose entry changed at the last step.
    Pure (no I/O): ``progress`` is what the last call returned, taken over and brought up
    to date (not copied: that would be a copy of the group's size per step).

    A step costs in proportion to those devices, not to the group (at 10,000 devices a step
    runs about every second while devices report). Judged in full, as :func:`step` does,
    where what was kept may not hold: the first step (no progress: a new deployment, a
    controller that just started or took the lease over), a deployment not the one the
    last step returned (changed by an operator or another controller), other members (the
    group changed; an equal list is compared at C speed), observations all made again (``changed`` None), or the clock
    going back; and where more than ``mass`` of the group is to be judged anyway (cheaper).
    tests/unit/test_rollout_incremental.py compares both on random runs."""
    if (
        progress is None
        or progress.deployment is not dep
        or (progress.members is not members and progress.members != members)
        or changed is None
        or now < progress.now
        or not dep.active
    ):
        nxt = step(dep, members, observed, now)
        return nxt, _progress(dep, nxt, members, now)
    counts, failed, due, wakes = progress.counts, progress.failed, progress.due, progress.wakes
    todo = set(changed)
    todo.update(progress.recheck)
    while wakes and wakes[0][0] <= now:
        t, d = heapq.heappop(wakes)
        if due.get(d) == t:
            del due[d]
            todo.add(d)
    if len(todo) > mass * len(dep.devices):
        # Most of the group to judge (every device moved, or its timers ended, at once): the
        # full judgement and a new Progress cost less than the bookkeeping device by device.
        nxt = step(dep, members, observed, now)
        return nxt, _progress(dep, nxt, members, now)
    staging = dep.strategy.stage_only and not dep.switched
    unknown = Observation(online=False)
    devices = dep.devices  # copied once an entry changes
    touched: set[str] = set()
    for d in todo:
        r = devices.get(d)
        if r is None:
            continue  # not (or no longer) in the deployment
        new = _next(r, observed.get(d, unknown), staging, dep.to_hash, dep.strategy, now)
        if new is r:
            if d in due:
                continue  # its wake stands (a wake depends on the entry alone)
        else:
            if devices is dep.devices:
                devices = dict(devices)
            devices[d] = new
            touched.add(d)
            _count(counts, failed, d, r, new)
        wake = _wake(new, dep.strategy)
        if wake == due.get(d):
            continue  # its heap entry stands
        if wake != _NEVER:
            due[d] = wake
            heapq.heappush(wakes, (wake, d))
        else:
            due.pop(d, None)
    moved: list[str] = []
    nxt = _step_state(dep, devices, staging, now, counts, min(failed) if failed else None, moved)
    for d in moved:
        touched.add(d)
        wake = _wake(nxt.devices[d], dep.strategy)
        if wake != _NEVER:
            due[d] = wake
            heapq.heappush(wakes, (wake, d))
    if len(wakes) > 2 * len(due) + 64:  # stale entries: made again
        wakes[:] = [(t, d) for d, t in due.items()]
        heapq.heapify(wakes)
    if (
        not touched
        and nxt.state == dep.state
        and nxt.batch == dep.batch
        and nxt.promoted == dep.promoted
        and nxt.message == dep.message
    ):
        nxt = dep  # nothing moved: step() returns dep itself too
    progress.deployment, progress.members, progress.now = nxt, members, now
    progress.recheck = progress.changed = touched
    return nxt, progress


def _count(counts: dict[str, int], failed: set[str], d: str, old: DeviceRollout, new: DeviceRollout) -> None:
    counts[old.state] -= 1
    counts[new.state] = counts.get(new.state, 0) + 1
    if old.state == "failed":
        failed.discard(d)
    if new.state == "failed":
        failed.add(d)


def pins_changed(before: Deployment, after: Deployment, devices: Iterable[str] | None) -> bool:
    """Whether ``after``'s :meth:`~Deployment.pins` or :meth:`~Deployment.stages` differ from
    ``before``'s, knowing that only the entries of ``devices`` changed, were added or removed
    (None: any): without comparing every device. Pure."""
    if (
        devices is None
        or before.state != after.state
        or before.id != after.id
        or before.switched != after.switched
    ):
        return before.pins() != after.pins() or before.stages() != after.stages()
    # The same deployment in the same state: pins and stages depend on these entries' states only.
    pinning = after.pins_waiting() and not (after.state == "reverted" and after.from_hash is not None)
    staging = after.active and after.strategy.stage_only
    for d in devices:
        old, new = before.devices.get(d), after.devices.get(d)
        if old is None or new is None:
            return before.pins() != after.pins() or before.stages() != after.stages()
        if pinning and (old.state in PINNED) != (new.state in PINNED):
            return True
        if staging and (old.state in ("staging", "staged")) != (new.state in ("staging", "staged")):
            return True
    return False


def _step_state(
    dep: Deployment,
    devices: dict[str, DeviceRollout],
    staging: bool,
    now: float,
    counts: dict[str, int],
    first_failed: str | None,
    moved: list[str],
) -> Deployment:
    """The deployment's own state after its devices were judged: fail, move the next batch, finish.

    ``counts``: how many of ``devices`` are in each state, kept up to date here as devices
    move; ``first_failed``: the first failed device by id; ``moved`` gets the devices moved.
    ``devices`` is not changed (moves go to a copy)."""

    def some(*states: str) -> bool:
        return any(counts.get(state, 0) for state in states)

    if first_failed is not None:
        reason = devices[first_failed].error or "failed"
        if dep.strategy.auto_revert and dep.from_hash is not None:
            return dep.model_copy(
                update={
                    "devices": devices,
                    "state": "reverted",
                    "updated": now,
                    "message": f"{first_failed}: {reason}; every device goes back to the previous version",
                }
            )
        return dep.model_copy(
            update={
                "devices": devices,
                "state": "failed",
                "updated": now,
                "message": f"{first_failed}: {reason}",
            }
        )

    if staging:
        state = dep.state
        if state != "paused":
            ready = counts.get("staged", 0) + counts.get("pending (offline)", 0) == len(devices)
            state = "staged" if ready else "staging"
        return dep.model_copy(update={"devices": devices, "state": state, "updated": now})

    state = dep.state
    batch = dep.batch
    strategy = dep.strategy

    def move(names: Sequence[str]) -> None:
        # The same entry (most: every pending device shares one) moves to one (frozen) value;
        # by identity, not by hashing each device's model. Each kept with its copy: its id stays its.
        copies: dict[int, tuple[DeviceRollout, DeviceRollout]] = {}
        for d in names:
            r = devices[d]
            hit = copies.get(id(r))
            if hit is None:
                hit = copies[id(r)] = (
                    r,
                    r.model_copy(update={"state": "updating", "batch": batch, "moved_at": now}),
                )
            devices[d] = hit[1]
            counts[r.state] -= 1
            counts["updating"] = counts.get("updating", 0) + 1
            moved.append(d)

    if state == "running" and not some(*MOVING) and some(*WAITING):
        # Between batches only: the one place a step reads every device (and copies them:
        # ``devices`` may be the deployment's own).
        devices = dict(devices)
        waiting = sorted(d for d, r in devices.items() if r.state in WAITING)
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

    done = sum(counts.get(s, 0) for s in ("healthy", "held", "pending (offline)")) == len(devices)
    if state == "running" and done and not some(*WAITING):
        state = "succeeded"
    return dep.model_copy(update={"devices": devices, "state": state, "batch": batch, "updated": now})


def switch(dep: Deployment, now: float) -> Deployment:
    """Let a stage-only deployment move its devices (under its strategy) to the staged version."""
    return dep.model_copy(
        update={"switched": True, "state": "running" if dep.active else dep.state, "updated": now}
    )


def promote(dep: Deployment, now: float) -> Deployment:
    """Let a canary deployment go on to the rest of the group."""
    return dep.model_copy(
        update={"promoted": True, "state": "running" if dep.active else dep.state, "updated": now}
    )
