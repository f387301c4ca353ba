"""Restart tracking: every service's restart state, and the one answer "restart now, wait, or not?".

Theory of operation
-------------------
Like Nomad's ``RestartTracker`` (client/allocrunner/taskrunner/restarts), one object owns
the restart state of every service of the device, :class:`RestartTracker`, and one pure
function decides from it, :func:`decide`. The agent core feeds the tracker events; the
reconciler (:func:`tether.agent.reconcile.plan`) asks :func:`decide` and never keeps state.

Events (:class:`RestartTracker`):

* ``restarted``: the agent started an exited instance again. The consecutive ``count``
  and the lifetime ``total`` go up by one; the return value says whether that makes a
  crash loop (:data:`CRASH_LOOP_RESTARTS` in a row).
* ``create_failed``: creating an instance failed (a missing image, a port in use): the
  ``count`` goes up, so the next attempt waits its backoff too; ``total`` counts restarts
  of running services only and stays.
* ``observed``: an instance runs. Once it has run :data:`STEADY_RUN_SECONDS` since the
  last attempt, the ``count`` (and with it the backoff and the crash loop) is forgotten.
* ``keep_only``: services no longer desired are forgotten.

Decisions (:func:`decide`), each with a named reason:

* ``restart``: the restart policy asks for it (``always``/``unless-stopped``; ``on-failure``
  with a non-zero exit code) and the backoff has passed;
* ``wait``: it asks for it, but not before ``at`` (1 s, 2 s, 4 s ... after the last attempt,
  capped at :data:`RESTART_BACKOFF_CAP`);
* ``no-restart``: the policy does not restart this exit (``no``; ``on-failure`` after exit 0);
* ``max-attempts``: ``deploy.restart_policy.max_attempts`` consecutive restarts were made.

A crash loop is not a decision to stop: the service is reported ``failed`` and is still
restarted, with the backoff, so it does not hammer the device.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

from tether.protocol.models import ServiceSpec

__all__ = [
    "CRASH_LOOP_RESTARTS",
    "NO_RESTARTS",
    "RESTART_BACKOFF_BASE",
    "RESTART_BACKOFF_CAP",
    "STEADY_RUN_SECONDS",
    "RestartDecision",
    "RestartRecord",
    "RestartTracker",
    "ServiceKey",
    "decide",
    "wants_restart",
]

RESTART_BACKOFF_BASE = 1.0
RESTART_BACKOFF_CAP = 300.0
CRASH_LOOP_RESTARTS = 5
"""Consecutive restarts (without :data:`STEADY_RUN_SECONDS` of running in between) after
which a service is reported ``failed`` (a crash loop)."""
STEADY_RUN_SECONDS = 60.0
"""Running this long after the last attempt forgets the consecutive restarts."""

ServiceKey = tuple[str, str]  # (stack, service)


@dataclass(frozen=True)
class RestartRecord:
    """How often the agent restarted a service in a row (``count``) and in all (``total``),
    and when it last tried."""

    count: int = 0
    last_at: float = 0.0
    total: int = 0

    def next_allowed(self) -> float:
        """When the next attempt may be made: the backoff after the last one."""
        if self.count == 0:
            return self.last_at
        return self.last_at + min(RESTART_BACKOFF_CAP, RESTART_BACKOFF_BASE * 2.0 ** (self.count - 1))


NO_RESTARTS = RestartRecord()
"""The record of a service never restarted (immutable, so one for all: a frozen dataclass
costs about 0.7 µs to make, and the plan and the status asked for one per service)."""


def wants_restart(service: ServiceSpec, exit_code: int | None, restarted: int = 0) -> bool:
    """Whether the restart policy restarts an instance that exited with ``exit_code``, after
    ``restarted`` consecutive restarts (``deploy.restart_policy.max_attempts`` caps them)."""
    return decide(service, exit_code, RestartRecord(restarted), now=float("inf")).kind != "no"


@dataclass(frozen=True)
class RestartDecision:
    """What to do with an exited instance: ``restart`` now, ``wait`` until ``at``, or ``no``
    restart; ``reason`` names why."""

    kind: Literal["restart", "wait", "no"]
    reason: Literal["restart", "backoff", "no-restart", "max-attempts"]
    at: float = 0.0


def decide(service: ServiceSpec, exit_code: int | None, record: RestartRecord, now: float) -> RestartDecision:
    """The decision for an instance of ``service`` that exited with ``exit_code``. Pure."""
    if service.restart_max_attempts is not None and record.count >= service.restart_max_attempts:
        return RestartDecision("no", "max-attempts")
    policy = service.restart
    if not (policy in ("always", "unless-stopped") or (policy == "on-failure" and exit_code != 0)):
        return RestartDecision("no", "no-restart")
    at = record.next_allowed()
    if now >= at:
        return RestartDecision("restart", "restart", at)
    return RestartDecision("wait", "backoff", at)


class RestartTracker(Mapping[ServiceKey, RestartRecord]):
    """Every service's :class:`RestartRecord`, changed only through its events. Read as a
    mapping (what :func:`~tether.agent.reconcile.plan` and ``status`` take)."""

    def __init__(self) -> None:
        self._records: dict[ServiceKey, RestartRecord] = {}

    def __getitem__(self, key: ServiceKey) -> RestartRecord:
        return self._records[key]

    def __iter__(self) -> Iterator[ServiceKey]:
        return iter(self._records)

    def __len__(self) -> int:
        return len(self._records)

    def get(self, key: ServiceKey, default: RestartRecord | None = None) -> RestartRecord | None:  # type: ignore[override]
        # Mapping.get looks the key up through __getitem__ and a caught KeyError: the agent
        # asks for services without a record on every reconcile (reconcile.status, 7 % of the
        # simulator's CPU per deploy).
        return self._records.get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self._records

    def record(self, key: ServiceKey) -> RestartRecord:
        return self._records.get(key, NO_RESTARTS)

    def restarted(self, key: ServiceKey, now: float) -> bool:
        """An exited instance was started again; True if that makes a crash loop (the
        restart that reaches :data:`CRASH_LOOP_RESTARTS` and every one after)."""
        rec = self.record(key)
        self._records[key] = RestartRecord(rec.count + 1, now, rec.total + 1)
        return rec.count + 1 >= CRASH_LOOP_RESTARTS

    def create_failed(self, key: ServiceKey, now: float) -> None:
        """Creating an instance failed: the next attempt waits its backoff."""
        rec = self.record(key)
        self._records[key] = RestartRecord(rec.count + 1, now, rec.total)

    def observed(self, key: ServiceKey, running: bool, now: float) -> bool:
        """An instance was seen; True if it has now run steadily and its consecutive restarts
        are forgotten."""
        rec = self._records.get(key)
        if rec and rec.count and running and now - rec.last_at > STEADY_RUN_SECONDS:
            self._records[key] = RestartRecord(0, rec.last_at, rec.total)
            return True
        return False

    def keep_only(self, keys: Collection[ServiceKey]) -> None:
        """Forget the services not in ``keys`` (no longer desired)."""
        self._records = {k: v for k, v in self._records.items() if k in keys}

    def counting(self) -> bool:
        """Whether some service has consecutive restarts to forget after a steady run (the
        clock matters to the next reconcile)."""
        return any(r.count for r in self._records.values())
