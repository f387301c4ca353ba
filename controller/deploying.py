"""Deployment steps, the controller's side: :class:`Deployer` starts deployments and steps
the active ones with the pure :mod:`.rollout`.

A step looks at every device of the stack's group through the
:class:`~.scheduling.Scheduler`'s fleet view; what it changes is stored, a reverted stack
gets its previous version back, and when desired states may change (devices let go or sent
back, stages, a revert) the controller's ``sync`` schedules and publishes them. The
:class:`~.service.Controller` owns one, marks it :attr:`Deployer.dirty` when a device
reports or changes presence, and steps it from its tick.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from . import rollout
from .models import Stack
from .rollout import Deployment, Strategy
from .scheduling import Scheduler
from .store import Store

log = logging.getLogger(__name__)

DEPLOYMENT_IDLE_STEP = 2.0
STEP_SHARE = 3.0
"""After a deployment step that took t seconds, the next waits at least STEP_SHARE * t."""


class Deployer:
    """Starts deployments and steps the active ones (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        *,
        clock: Callable[[], float],
        scheduler: Scheduler,
        sync: Callable[[], None],
        note: Callable[[Deployment | None, Deployment], None],
    ) -> None:
        """``sync``: recompute every desired state and publish them; ``note``: emit the fleet
        event of a deployment that started or changed state."""
        self.store = store
        self.clock = clock
        self.scheduler = scheduler
        self._sync = sync
        self._note = note
        self.dirty = True
        """A device reported or changed presence since the last step."""
        self._next_deployment_step = 0.0
        self._step_not_before = 0.0
        self._progress: dict[int, rollout.Progress] = {}
        """Per active deployment, what its last step kept (see :func:`.rollout.step_changed`)."""

    def forget(self) -> None:
        """Judge every device again at the next step (another controller may have led meanwhile)."""
        self._progress = {}

    def advance(self, force: bool = True) -> None:
        """Step every active deployment; store, revert and publish what changed.

        From the tick (``force=False``) only when a device reported or changed presence
        since the last step, or every :data:`DEPLOYMENT_IDLE_STEP` seconds for the clock's
        sake (min_healthy_time, deadlines). A step judges only the devices whose
        observation changed since the last (the fleet view knows which) or whose deadline
        or healthy timer may have passed (:func:`.rollout.step_changed`); every device at
        a deployment's first step here, after :meth:`forget`, or when the deployment or its
        group changed otherwise.
        """
        now = time.monotonic()
        if not force and (
            now < self._step_not_before or (not self.dirty and now < self._next_deployment_step)
        ):
            return
        self.dirty = False
        self._next_deployment_step = now + DEPLOYMENT_IDLE_STEP
        active = [d for d in self.store.latest_deployments().values() if d.active]
        self._progress = {d.id: self._progress[d.id] for d in active if d.id in self._progress}
        self.scheduler.keep_observed(d.stack for d in active)  # none active: nothing kept
        if not active:
            return
        changed = False
        fleet = self.scheduler.fleet_view()
        for deployment in active:
            stack = self.store.get_stack(deployment.stack)
            if stack is None:
                continue
            targets = self.scheduler.targets(stack)
            observed, seen_changed = self.scheduler.observe_changes(
                stack.name, set(deployment.devices).union(targets), fleet
            )
            progress = self._progress.pop(deployment.id, None)  # taken over (dropped if this fails)
            nxt, self._progress[deployment.id] = rollout.step_changed(
                progress, deployment, targets, observed, seen_changed, self.clock()
            )
            if nxt is deployment:  # nothing changed (step returns it as it is)
                continue
            # Desired states only change when devices are let go or sent back (pins), or a
            # revert changes the stack: then a full sync; otherwise only the record is stored.
            changed = (
                changed
                or rollout.pins_changed(deployment, nxt, self._progress[deployment.id].changed)
                or nxt.state == "reverted"
            )
            with self.store.transaction():
                # only the entries this step changed are written (with the deployment's header)
                self.store.put_deployment(nxt, deployment, self._progress[deployment.id].changed)
                if nxt.state != deployment.state:
                    log.info("deployment %d of %s: %s %s", nxt.id, nxt.stack, nxt.state, nxt.message or "")
                    self._note(deployment, nxt)
                if nxt.state == "reverted" and nxt.from_hash is not None:
                    self._revert(stack, nxt.from_hash)
        if changed:
            self._sync()
        # A step reads the whole group: at 10,000 devices it takes a good part of a second.
        # Under a stream of reports, leave the inbox at least STEP_SHARE times as long.
        self._step_not_before = time.monotonic() + STEP_SHARE * (time.monotonic() - now)

    def _revert(self, stack: Stack, spec_hash: str) -> None:
        spec = self.store.get_spec(spec_hash)
        if spec is None:
            log.error("cannot revert %s: version %s is unknown", stack.name, spec_hash[:12])
            return
        now = self.clock()
        self.store.put_stack(
            stack.model_copy(
                update={"spec_hash": spec_hash, "spec": spec, "version": stack.version + 1, "updated": now}
            )
        )

    def start(self, stack: Stack, from_hash: str | None, strategy: Strategy) -> Deployment:
        """Create the deployment of ``stack``'s current version (inside the caller's transaction)."""
        now = self.clock()
        previous = self.store.latest_deployments().get(stack.name)
        if previous is not None and previous.active:
            superseded = previous.model_copy(update={"state": "superseded", "updated": now})
            self.store.put_deployment(superseded)
            self._note(previous, superseded)
        fleet = self.scheduler.fleet_view()
        targets = self.scheduler.targets(stack)
        started = rollout.start(
            self.store.next_deployment_id(), stack.name, from_hash, stack.spec_hash, strategy, targets, now
        )
        deployment = rollout.step(started, targets, self.scheduler.observe(stack.name, targets, fleet), now)
        self.store.put_deployment(deployment)
        self._note(None, deployment)
        self._note(started, deployment)  # done at once (no device): said too
        return deployment
