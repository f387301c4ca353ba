"""What a command handler may use of the running controller: :class:`Context`, its parts.

Handlers are plain functions ``handler(ctx, command) -> result`` grouped by domain
(controller/groups.py, ...), registered once in their module's
:class:`~.registry.CommandRegistry`. They reach the controller only through the parts a
:class:`Context` holds, each named for what it does:

* ``ctx.store``: the state store; ``ctx.clock``: wall-clock seconds (a test moves it by hand);
* ``ctx.scheduler`` (:class:`~.scheduling.Scheduler`): ``recompute`` desired states,
  ``update_placements``, a stack's ``targets``, the ``fleet_view``;
* ``ctx.publisher`` (:class:`~.publishing.Publisher`): ``publish_pending``, ``publish_retained``;
* ``ctx.deployer`` (:class:`~.deploying.Deployer`): ``start`` a deployment, ``advance``
  the active ones;
* ``ctx.events`` (:class:`~.fleet_events.DueEvents`): ``emit`` a fleet event, or a
  deployment's change as one (``deployment``);
* the caches: ``variables``, ``registries`` (what desired states bind: ``forget()`` after a
  change), ``access`` (the broker's credentials), ``notifier`` (webhooks), ``secrets``,
  and the leader's in-memory ``device_metrics`` and ``device_history``.

One function wires the parts together, :func:`~.parts.build_context`: the
:class:`~.service.Controller` builds its own with it (``controller.context``), and a unit test
its ``context`` fixture, on a real SQLite store with a recording publisher and no controller
(tests/unit/conftest.py).

Writing a handler: read and validate first (raise a ``TetherError`` naming what is wrong,
before anything is written; :func:`require` for a lookup), then write inside
``ctx.store.transaction()`` and call ``ctx.scheduler.recompute()`` in the same transaction
when devices' desired states may change, then ``ctx.publisher.publish_pending()`` once it is
committed (or both at once: :meth:`Context.sync`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from tether.protocol.errors import NotFoundError

T = TypeVar("T")

if TYPE_CHECKING:  # the parts import the domain modules, which import this one
    from .deploying import Deployer
    from .fleet_events import DueEvents
    from .metrics_history import MetricsHistory
    from .models import DesiredRecord
    from .notify import Notifier
    from .publishing import Publisher
    from .registries import RegistryCredentials
    from .scheduling import Scheduler
    from .security import BrokerAccess
    from .store import Store
    from .variables import SecretsKey, VariableBindings


@dataclass(frozen=True, eq=False)
class Context:
    """The controller, as its command handlers see it: its parts (see the module docstring)."""

    store: Store
    clock: Callable[[], float]
    """Wall-clock seconds (injected: tests move it by hand)."""
    scheduler: Scheduler
    """The fleet view, targets, placements and desired states."""
    publisher: Publisher
    """What is published to devices (desired states, retained answers)."""
    deployer: Deployer
    """Deployments: started and stepped (their changes noted as fleet events)."""
    events: DueEvents
    """Fleet events, emitted once the change is committed."""
    variables: VariableBindings
    """The variables, as desired states bind them (cached; forget() after a change)."""
    registries: RegistryCredentials
    """The private registries' credentials, as desired states carry them (cached likewise)."""
    access: BrokerAccess
    """Who may connect, as the broker sees it: mirror credential and token changes there."""
    notifier: Notifier
    """The webhooks' notifier (controller/notify.py): forget() after a webhook changed."""
    secrets: SecretsKey | None
    """The key pair secrets are sealed to (None: secrets are refused)."""
    device_metrics: dict[str, dict[str, Any]]
    """The latest metrics sample of each device (in memory, on the leader only)."""
    device_history: MetricsHistory
    """Each device's recent usage, downsampled (in memory, on the leader only)."""

    def sync(self, device_ids: set[str] | None = None) -> None:
        """Recompute desired states (of ``device_ids``, or all) in a transaction of its own,
        then publish what changed."""
        self.sync_now(device_ids)
        self.publisher.publish_pending(device_ids)

    def sync_now(self, device_ids: set[str] | None = None) -> list[DesiredRecord] | None:
        """Recompute desired states (of ``device_ids``, or all) in a transaction of its own;
        of all, every desired record as committed (see :meth:`.scheduling.Scheduler.recompute`)."""
        with self.store.transaction():
            return self.scheduler.recompute(device_ids)


def require(value: T | None, what: str, key: object, hint: str = "") -> T:
    """``value``, what a lookup of ``what`` ``key`` returned; a :class:`NotFoundError`
    ("unknown {what} {key!r}", then ``hint``) when it is None: a handler's one way of
    refusing a name that names nothing, e.g. ``require(ctx.store.get_group(name), "group", name)``."""
    if value is None:
        raise NotFoundError(f"unknown {what} {key!r}{hint}")
    return value
